"""Join the parts of a split alert (Streaming API AlertInfo + AlertEvidence rows) into one alert.

Strategy (docs/architecture.md, "Split alerts"):
- every part is stored in the state store, keyed by alert id and a digest of its content, so a
  redelivered row is recognised and ignored;
- an alert is emitted once its parts have *settled*: no new part for `settle_seconds` (default 30),
  or its first part is older than `max_hold_seconds` (default 600); the CLI flushes everything at
  the end of a run, the Functions app on every batch and on a one-minute timer;
- a part arriving after the alert was emitted (within `retention_hours`) makes it pending again and
  produces a revised record holding all parts; its content changed, so its record_id does too.

Merging is order-independent: parts are sorted by (rank, digest) before merging, AlertInfo first.

DLP lifecycle (Management Activity DlpRuleMatch / DlpInfo / DlpRuleUndo, parts of rank
`RANK_LIFECYCLE`, keyed by the match they belong to): `merge_lifecycle` folds every event of a match
into one alert, whatever order the events arrived in. Events are put in event order (time, then
matched < overridden < reported_false_positive < undone, then digest); the latest event gives the
lifecycle state and the latest exception, the latest rule match gives the alert's details, and the
actions any event says were overridden are kept on their rules. A new event is a new revision
(new record_id, same alert key).

Hostile input: the state store keeps at most `limits.max_evidence_per_alert` parts per alert; new
parts beyond it are dead-lettered as `too_many_evidence` (pipeline/runner.py) and the alert is
emitted from the parts it holds, so one alert id cannot grow the store or a claim without bound.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from pipeline.ingest.formats.common import named_policies
from pipeline.ingest.formats.contract import PART_ORDER, RANK_LIFECYCLE, AlertPart
from pipeline.models import DlpAlert, validate_alert

_LIST_FIELDS = ("files", "sensitive_info")
_MERGED_FIELDS = frozenset(_LIST_FIELDS + ("user", "device"))  # merged from every part; any other field: the first part's
_STATE_ORDER = {"matched": 0, "overridden": 1, "reported_false_positive": 2, "undone": 3}


def merge_parts(parts: Iterable[AlertPart]) -> dict[str, Any]:
    """The canonical fields of one alert from its parts: lifecycle events folded by `merge_lifecycle`;
    split-alert rows merged (first non-empty scalar wins, lists union)."""
    parts = list(parts)
    if any(part.rank == RANK_LIFECYCLE for part in parts):
        return merge_lifecycle(part for part in parts if part.rank == RANK_LIFECYCLE)
    merged: dict[str, Any] = {"source_format": "defender_streaming"}
    for part in sorted(parts, key=PART_ORDER):
        for key, value in part.data.items():
            if value is None:
                continue
            if key not in _MERGED_FIELDS:  # most fields: the first value wins
                if key not in merged:
                    merged[key] = value
            elif key in _LIST_FIELDS:
                bucket = merged.setdefault(key, [])
                for item in value:
                    if item not in bucket:
                        bucket.append(item)
            else:  # user, device: field by field
                current = merged.setdefault(key, {})
                for sub_key, sub_value in value.items():
                    if sub_value is not None and current.get(sub_key) is None:
                        current[sub_key] = sub_value
    if not merged.get("policies"):
        merged["policies"] = named_policies(merged.get("policy_name"), merged.get("rule_name"))
    return merged


def _event_time(part: AlertPart) -> float:
    at = (part.data.get("lifecycle_event") or {}).get("at")
    if isinstance(at, str):
        try:
            return datetime.fromisoformat(at).timestamp()
        except ValueError:
            pass
    return float("-inf")  # no usable time: before every timed event


def _event_order(part: AlertPart) -> tuple[float, int, str]:
    state = (part.data.get("lifecycle_event") or {}).get("state")
    return _event_time(part), _STATE_ORDER.get(str(state), 0), part.digest


def merge_lifecycle(parts: Iterable[AlertPart]) -> dict[str, Any]:
    """The canonical fields of one DLP match from its lifecycle events (see the module docstring).
    A pure function of the set of parts: any arrival order gives the same fields."""
    ordered = sorted(parts, key=_event_order)
    if not ordered:
        raise ValueError("a match needs at least one lifecycle event")
    matches = [part for part in ordered if (part.data.get("lifecycle_event") or {}).get("operation") == "DlpRuleMatch"]
    base = (matches or ordered)[-1]
    merged = {key: value for key, value in base.data.items() if key != "lifecycle_event"}
    merged["alert_id"] = base.alert_id
    overridden: dict[str, list[str]] = {}
    for part in ordered:
        for policy in part.data.get("policies") or []:
            for rule in policy.get("rules") or []:
                if rule.get("rule_id"):
                    bucket = overridden.setdefault(rule["rule_id"], [])
                    bucket.extend(a for a in rule.get("overridden_actions") or [] if a not in bucket)
    merged["policies"] = [
        dict(policy, rules=[dict(rule, overridden_actions=overridden.get(rule.get("rule_id") or "", rule.get("overridden_actions") or [])) for rule in policy.get("rules") or []])
        for policy in merged.get("policies") or []
    ]
    exceptions = [part.data["exception"] for part in ordered if part.data.get("exception")]
    merged["exception"] = exceptions[-1] if exceptions else None
    events = [event for part in ordered if isinstance(event := part.data.get("lifecycle_event"), dict)]
    merged["lifecycle"] = {"state": events[-1].get("state"), "events": events} if events else None
    times = [event["at"] for event in events if event.get("at")]
    first_match = (matches or ordered)[0].data.get("created_at")
    merged["created_at"] = first_match or (times[0] if times else None)
    if len(events) > 1 and times:
        merged["last_activity_at"] = times[-1]
    warnings = [w for part in ordered for w in part.data.get("decode_warnings") or []]
    merged["decode_warnings"] = list(dict.fromkeys(warnings))
    return merged


def assemble(parts: Iterable[AlertPart]) -> DlpAlert:
    """Build the alert from its parts; a broken optional field is nulled with a warning
    (`validate_alert`). Raises pydantic.ValidationError when they do not make one."""
    return validate_alert(merge_parts(parts))
