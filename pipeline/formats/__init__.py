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
- matched sensitive values and their context never reach an alert, a part or a rejected record.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import ValidationError

from pipeline.errors import DecodeError
from pipeline.formats import common, defender_streaming, graph_alert, management_activity, sentinel_alert
from pipeline.models import DlpAlert

# Parts of one alert are merged in this order (see pipeline/assemble.py).
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


def decode_message(body: bytes) -> Decoded:
    """Decode one message body. See the module docstring for what is guaranteed."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise DecodeError("invalid_json", f"{exc.msg} at byte {exc.pos}") from None
    if defender_streaming.looks_like(document):
        return _decode_streaming(document["records"])
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
    return _decode_items(items)


def scrubbed_body(body: bytes) -> bytes:
    """The body with matched sensitive content removed when it is JSON; otherwise the bytes as they are."""
    try:
        return orjson.dumps(common.scrub(orjson.loads(body)))
    except orjson.JSONDecodeError:
        return body


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


def _decode_items(items: list[Any]) -> Decoded:
    out = Decoded(records=len(items))
    formats: set[str] = set()
    for index, item in enumerate(items):
        fmt = _format_of(item)
        if fmt is None:
            out.rejected.append(_reject(index, "unrecognised_record", "record matches none of the supported formats", item))
            continue
        formats.add(fmt)
        if fmt == "graph_alert":
            dlp, build = graph_alert.is_dlp(item), graph_alert.to_alert
        elif fmt == "sentinel_alert":
            dlp, build = sentinel_alert.is_dlp(item), sentinel_alert.to_alert
        else:
            dlp, build = management_activity.is_dlp(item), management_activity.to_alert
        if not dlp:
            out.skipped += 1
            continue
        _add_alert(out, index, item, build)
    out.format = formats.pop() if len(formats) == 1 else ("mixed" if formats else None)
    return out


def _decode_streaming(records: list[Any]) -> Decoded:
    out = Decoded(format="defender_streaming", records=len(records))
    for index, record in enumerate(records):
        properties = record.get("properties") if isinstance(record, dict) else None
        category = record.get("category") if isinstance(record, dict) else None
        if not isinstance(properties, dict) or not isinstance(category, str):
            out.rejected.append(_reject(index, "malformed_record", "streaming record without category or properties", record))
            continue
        if category == defender_streaming.CLOUD_APP_EVENTS:
            activity = defender_streaming.cloud_app_dlp_activity(record, properties)
            if activity is None:
                out.skipped += 1
            else:
                _add_alert(out, index, record, lambda _: activity)
            continue
        if category == defender_streaming.ALERT_INFO:
            rank, build = RANK_ALERT_INFO, defender_streaming.info_part
        elif category == defender_streaming.ALERT_EVIDENCE:
            rank, build = RANK_EVIDENCE, defender_streaming.evidence_part
        else:
            out.skipped += 1
            continue
        if not defender_streaming.is_dlp_row(properties):
            out.skipped += 1
            continue
        data = build(record, properties)
        alert_id = data.get("alert_id")
        if not alert_id:
            out.rejected.append(_reject(index, "invalid_record", "alert row without AlertId", record))
            continue
        out.parts.append(AlertPart(alert_id=alert_id, rank=rank, data=data))
    return out


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


__all__ = ["AlertPart", "Decoded", "RejectedRecord", "decode_message", "scrubbed_body", "validation_summary"]
