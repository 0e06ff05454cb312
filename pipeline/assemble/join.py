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

Hostile input: the state store keeps at most `limits.max_evidence_per_alert` parts per alert; new
parts beyond it are dead-lettered as `too_many_evidence` (pipeline/runner.py) and the alert is
emitted from the parts it holds, so one alert id cannot grow the store or a claim without bound.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pipeline.ingest.formats.contract import AlertPart
from pipeline.models import DlpAlert

_LIST_FIELDS = ("files", "sensitive_info")


def merge_parts(parts: Iterable[AlertPart]) -> dict[str, Any]:
    """The canonical fields of one alert from its parts: first non-empty scalar wins, lists union."""
    merged: dict[str, Any] = {"source_format": "defender_streaming"}
    for part in sorted(parts, key=lambda p: (p.rank, p.digest)):
        for key, value in part.data.items():
            if value is None:
                continue
            if key in _LIST_FIELDS:
                bucket = merged.setdefault(key, [])
                for item in value:
                    if item not in bucket:
                        bucket.append(item)
            elif key in ("user", "device"):
                current = merged.setdefault(key, {})
                for sub_key, sub_value in value.items():
                    if sub_value is not None and current.get(sub_key) is None:
                        current[sub_key] = sub_value
            elif key not in merged:
                merged[key] = value
    return merged


def assemble(parts: Iterable[AlertPart]) -> DlpAlert:
    """Build the alert from its parts. Raises pydantic.ValidationError when they do not make one."""
    return DlpAlert.model_validate(merge_parts(parts))
