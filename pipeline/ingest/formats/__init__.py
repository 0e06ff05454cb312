"""Turn one Event Hub message body (bytes) into DLP alerts, recognising the format by its shape.

Recognised, with no configuration:
- Defender XDR Streaming API envelopes `{"records": [...]}` (AlertInfo, AlertEvidence, CloudAppEvents);
- Microsoft Graph security alerts: one object, an array, or a `{"value": [...]}` page;
- Office 365 Management Activity API DLP records: one object or an array;
- Sentinel SecurityAlert rows: one object or an array.

Guarantees of `decode_message`:
- it raises only `DecodeError`, and only when the body as a whole is unusable (not JSON, or not a
  shape above); one bad record inside a usable body is returned in `rejected`, the rest goes on;
- records of a known format that are not DLP are counted in `skipped`, never rejected;
- matched sensitive values and their context never reach an alert, a part or a rejected record:
  every record is scrubbed (`common.scrub`) before a decoder reads it;
- hostile input is bounded by `limits` (pipeline/ingest/limits.py): a body over `max_body_bytes` is not
  parsed, one with more than `max_records_per_message` records is refused as a whole, and a record
  that is too deep, holds a too-long string or too many evidence items is rejected on its own, each
  with its own reason code;
- no other exception escapes: a record a decoder cannot handle is rejected as `decoder_error`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import ValidationError

from pipeline.errors import DecodeError
from pipeline.ingest import limits as limits_module
from pipeline.ingest.formats import common, defender_streaming, graph_alert, management_activity, sentinel_alert
from pipeline.ingest.limits import DEFAULT_LIMITS, LimitExceeded, Limits, check_body_size, check_evidence_count, check_record, check_record_count
from pipeline.models import DlpAlert

# Parts of one alert are merged in this order (see pipeline/assemble/join.py).
RANK_ALERT_INFO = 0
RANK_EVIDENCE = 1


@dataclass(slots=True)
class AlertPart:
    """One row of a split alert (Streaming API AlertInfo/AlertEvidence), reduced to canonical fields."""

    alert_id: str
    rank: int
    data: dict[str, Any]
    digest: str = ""

    def __post_init__(self) -> None:
        if not self.digest:
            payload = orjson.dumps([self.rank, self.data], option=orjson.OPT_SORT_KEYS)
            self.digest = hashlib.sha256(payload).hexdigest()[:32]


@dataclass(slots=True)
class RejectedRecord:
    """A record that could not be decoded; `record` is its JSON with matched content removed."""

    index: int
    reason: str
    detail: str
    record: bytes


@dataclass(slots=True)
class Decoded:
    format: str | None = None
    records: int = 0
    alerts: list[DlpAlert] = field(default_factory=list)
    parts: list[AlertPart] = field(default_factory=list)
    skipped: int = 0
    rejected: list[RejectedRecord] = field(default_factory=list)


def decode_message(body: bytes, *, limits: Limits | None = None) -> Decoded:
    """Decode one message body. See the module docstring for what is guaranteed."""
    limits = limits or DEFAULT_LIMITS
    try:
        check_body_size(body, limits)  # before parsing: a too-large body is never parsed
    except LimitExceeded as exc:
        raise DecodeError(exc.reason, exc.detail) from None
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise DecodeError("invalid_json", f"{exc.msg} at byte {exc.pos}") from None
    has_escape = b"\\u" in body  # a \u escape can spell anything: neither shortcut below then holds
    # A body that never spells a removed key (nor a \u escape that could) has nothing to scrub.
    clean = not common.mentions_removed_key(body, has_escape=has_escape)
    # Most bodies are small enough for their bytes to prove every record within the depth and string limits.
    checked = limits_module.records_surely_within(body, limits, has_escape=has_escape)
    if defender_streaming.looks_like(document):
        return _decode_streaming(_counted(document["records"], limits), limits, clean=clean, checked=checked)
    if isinstance(document, dict) and isinstance(document.get("value"), list):
        items = document["value"]
    elif isinstance(document, list):
        items = document
    elif isinstance(document, dict):
        if _format_of(document) is None:
            raise DecodeError("unrecognised_shape", "object matches none of the supported formats")
        items = [document]
    else:
        raise DecodeError("unrecognised_shape", f"top-level JSON {type(document).__name__} is not an object or array")
    return _decode_items(_counted(items, limits), limits, clean=clean, checked=checked)


def scrubbed_body(body: bytes) -> bytes:
    """The body with matched sensitive content removed when it is JSON; otherwise the bytes as they are.

    Use `stored_body` for what the dead-letter store keeps: it also withholds unparseable bodies
    that may hold matched content.
    """
    try:
        return orjson.dumps(common.scrub(orjson.loads(body)))
    except orjson.JSONDecodeError:
        return body


def stored_body(body: bytes, reason: str) -> bytes:
    """What the dead-letter store keeps of a message body that could not be decoded as a whole.

    - JSON: the body with matched content and free text removed (`common.scrub`), kept for replay;
    - a body over the size limit is never parsed, so it cannot be scrubbed: it is withheld;
    - not JSON: kept as it is unless it may name a removed key (then it cannot be scrubbed safely
      and is withheld).
    A withheld body is replaced by a small JSON note with its size and SHA-256; the original stays
    in the Event Hub for the hub's retention period, found by the dead letter's `source`
    (partition, sequence number, offset).
    """
    if reason != limits_module.BODY_TOO_LARGE:
        if not common.mentions_removed_key(body):
            return body  # nothing to remove: kept as it is, without parsing it again
        try:
            return orjson.dumps(common.scrub(orjson.loads(body)))
        except orjson.JSONDecodeError:
            pass
    note = {"withheld": reason, "bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    return orjson.dumps(note)


def _counted(items: list[Any], limits: Limits) -> list[Any]:
    try:
        check_record_count(len(items), limits)
    except LimitExceeded as exc:
        raise DecodeError(exc.reason, exc.detail) from None
    return items


def _within_limits(out: Decoded, index: int, item: Any, limits: Limits, evidence: tuple[int, str] | None = None) -> bool:
    """Check one record's depth and strings (or, given `evidence`, its evidence count); a violation
    rejects it with the limit's own reason code."""
    try:
        if evidence is None:
            check_record(item, limits)
        else:
            check_evidence_count(evidence[0], limits, evidence[1])
    except LimitExceeded as exc:
        out.rejected.append(_reject(index, exc.reason, exc.detail, item))
        return False
    return True


def _evidence_of(fmt: str, item: dict[str, Any]) -> tuple[int, str]:
    """How many evidence items one record carries, by format (see pipeline/ingest/limits.py)."""
    if fmt == "graph_alert":
        return len(common.as_list(item.get("evidence"))), "evidence items"
    if fmt == "sentinel_alert":
        return len(common.json_list(item.get("Entities"))), "entities"
    return _sit_entries(item), "sensitive information entries"


def _sit_entries(record: dict[str, Any]) -> int:
    count = 0
    for policy in common.as_list(record.get("PolicyDetails")):
        for rule in common.as_list(policy.get("Rules") if isinstance(policy, dict) else None):
            matched = rule.get("ConditionsMatched") if isinstance(rule, dict) else None
            if isinstance(matched, dict):
                count += len(common.as_list(matched.get("SensitiveInformation")))
    endpoint = record.get("EndpointMetaData")
    if isinstance(endpoint, dict):
        count += len(common.as_list(endpoint.get("SensitiveInfoTypeData")))
    return count


def _format_of(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    if graph_alert.looks_like(record):
        return "graph_alert"
    if sentinel_alert.looks_like(record):
        return "sentinel_alert"
    if management_activity.looks_like(record):
        return "management_activity"
    return None


def _decode_items(items: list[Any], limits: Limits = DEFAULT_LIMITS, *, clean: bool = False, checked: bool = False) -> Decoded:
    """`clean`: the body names no removed key (nothing to scrub); `checked`: its records are known to be
    within the depth and string limits (`limits.records_surely_within`)."""
    out = Decoded(records=len(items))
    formats: set[str] = set()
    for index, item in enumerate(items):
        if not checked and not _within_limits(out, index, item, limits):
            continue
        fmt = _format_of(item)
        if fmt is None:
            out.rejected.append(_reject(index, "unrecognised_record", "record matches none of the supported formats", item))
            continue
        formats.add(fmt)
        item = item if clean else common.scrub(item)
        try:
            if fmt == "graph_alert":
                dlp, build = graph_alert.is_dlp(item), graph_alert.to_alert
            elif fmt == "sentinel_alert":
                dlp, build = sentinel_alert.is_dlp(item), sentinel_alert.to_alert
            else:
                dlp, build = management_activity.is_dlp(item), management_activity.to_alert
            if not dlp:
                out.skipped += 1
                continue
            if not _within_limits(out, index, item, limits, _evidence_of(fmt, item)):
                continue
            _add_alert(out, index, item, build)
        except Exception as exc:  # a decoder bug must cost one record, never the message
            out.rejected.append(_reject(index, "decoder_error", type(exc).__name__, item))
    out.format = formats.pop() if len(formats) == 1 else ("mixed" if formats else None)
    return out


def _decode_streaming(records: list[Any], limits: Limits = DEFAULT_LIMITS, *, clean: bool = False, checked: bool = False) -> Decoded:
    out = Decoded(format="defender_streaming", records=len(records))
    for index, record in enumerate(records):
        if not checked and not _within_limits(out, index, record, limits):
            continue
        record = record if clean else common.scrub(record)
        try:
            _decode_streaming_record(out, index, record, limits)
        except Exception as exc:  # a decoder bug must cost one record, never the message
            out.rejected.append(_reject(index, "decoder_error", type(exc).__name__, record))
    return out


def _decode_streaming_record(out: Decoded, index: int, record: Any, limits: Limits) -> None:
    properties = record.get("properties") if isinstance(record, dict) else None
    category = record.get("category") if isinstance(record, dict) else None
    if not isinstance(properties, dict) or not isinstance(category, str):
        out.rejected.append(_reject(index, "malformed_record", "streaming record without category or properties", record))
        return
    if category == defender_streaming.CLOUD_APP_EVENTS:
        raw = common.json_object(properties.get("RawEventData"))
        if not management_activity.is_dlp(raw):
            out.skipped += 1
        elif _within_limits(out, index, record, limits, (_sit_entries(raw), "sensitive information entries")):
            activity = defender_streaming.cloud_app_dlp_activity(record, properties)
            _add_alert(out, index, record, lambda _: activity)
        return
    if category == defender_streaming.ALERT_INFO:
        rank, build = RANK_ALERT_INFO, defender_streaming.info_part
    elif category == defender_streaming.ALERT_EVIDENCE:
        rank, build = RANK_EVIDENCE, defender_streaming.evidence_part
    else:
        out.skipped += 1
        return
    if not defender_streaming.is_dlp_row(properties):
        out.skipped += 1
        return
    extra = common.json_object(properties.get("AdditionalFields"))
    types = extra.get("SensitiveInfoTypes")
    if not _within_limits(out, index, record, limits, (len(types) if isinstance(types, list) else 0, "sensitive information types")):
        return
    data = build(record, properties)
    alert_id = data.get("alert_id")
    if not alert_id:
        out.rejected.append(_reject(index, "invalid_record", "alert row without AlertId", record))
        return
    out.parts.append(AlertPart(alert_id=alert_id, rank=rank, data=data))


def _add_alert(out: Decoded, index: int, record: Any, build: Any) -> None:
    try:
        out.alerts.append(DlpAlert.model_validate(build(record)))
    except ValidationError as exc:
        out.rejected.append(_reject(index, "invalid_record", validation_summary(exc), record))


def validation_summary(exc: ValidationError) -> str:
    """Where and why validation failed, without the offending values (they may be sensitive)."""
    problems = []
    for error in exc.errors(include_url=False, include_input=False, include_context=False)[:5]:
        location = ".".join(str(part) for part in error["loc"]) or "(root)"
        problems.append(f"{location}: {error['msg']}")
    return "; ".join(problems)


def _reject(index: int, reason: str, detail: str, record: Any) -> RejectedRecord:
    return RejectedRecord(index=index, reason=reason, detail=detail, record=orjson.dumps(common.scrub(record)))


__all__ = ["AlertPart", "Decoded", "RejectedRecord", "decode_message", "scrubbed_body", "stored_body", "validation_summary"]
