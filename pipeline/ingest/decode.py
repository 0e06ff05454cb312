"""Turn one Event Hub message body (bytes) into DLP alerts, recognising the format by its shape.

The formats are the decoders in the registry (pipeline/ingest/formats/registry.py, which gives the
order they are asked in); with no configuration:
- Defender XDR Streaming API envelopes `{"records": [...]}` (AlertInfo, AlertEvidence, CloudAppEvents);
- Microsoft Graph security alerts: one object, an array, or a `{"value": [...]}` page; and Graph
  incidents read with `$expand=alerts` (one, an array or a page), unpacked into their alerts, each
  with its incident's id (pipeline/ingest/formats/graph_alert.py);
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

Fast skip. A format whose envelope carries other data beside DLP rows (Defender streaming: every
Advanced Hunting table the tenant streams) gives its decoder `row_may_be_dlp` (four fields of a
row) and `parsed_row_may_be_dlp`. A row they turn down is counted in `skipped` without being built,
checked against the limits or scrubbed; only the other rows go the whole way above, each with the
shortcuts worked out from its own bytes (a `Subject` in an EmailEvents row scrubs nothing else).
With msgspec installed the envelope is read into just those fields (it still rejects malformed
JSON; UTF-8 is checked here) and only the rows that go on are parsed; otherwise orjson parses the
body and the test runs on each parsed row.

What a row that cannot be DLP gets: `skipped`, whatever its size or depth. A non-DLP row that
breaks a record limit (too deep, a too-long string) is not dead-lettered: no decoder reads it, so it
can harm nothing, and dead-lettering the streamed tables' oversized rows would fill the dead-letter
store with data the pipeline never wanted (docs/architecture.md, "Fast skip"). A row with no
`category` string or no `properties` object still goes on and is rejected as `malformed_record`.
The body-level guarantees stay: a body that is not JSON, too large or with too many records is
dead-lettered as a whole.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import ValidationError

try:  # optional: reads a streaming envelope's few needed fields several times faster than parsing it
    import msgspec
except ImportError:  # pragma: no cover - depends on the installation
    msgspec = None  # type: ignore[assignment]  # (installed with requirements.txt; the code works without it)


from pipeline.errors import DecodeError
from pipeline.ingest import limits as limits_module
from pipeline.ingest.formats import common, registry
from pipeline.ingest.formats.contract import AlertPart, Decoder
from pipeline.ingest.limits import (
    DEFAULT_LIMITS,
    LimitExceeded,
    Limits,
    check_body_size,
    check_evidence_count,
    check_record,
    check_record_count,
    has_unicode_escape,
)
from pipeline.models import DlpAlert, validate_alert, validation_summary


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
    # Broken optional fields set to null (each also in its alert's `decode_warnings`).
    warnings: int = 0


def decode_message(body: bytes, *, limits: Limits | None = None, keep_user_justification: bool = False) -> Decoded:
    """Decode one message body. See the module docstring for what is guaranteed.

    `keep_user_justification`: keep the user's override justification on the alert's `exception`
    (decoders read it from the record before it is scrubbed); by default it is dropped like all free text."""
    limits = limits or DEFAULT_LIMITS
    try:
        check_body_size(body, limits)  # before parsing: a too-large body is never parsed
    except LimitExceeded as exc:
        raise DecodeError(exc.reason, exc.detail) from None
    decoders = registry.decoders()
    fast = _fast_envelope(body, decoders, limits, keep=keep_user_justification)
    if fast is not None:
        return fast
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise DecodeError("invalid_json", f"{exc.msg} at byte {exc.pos}") from None
    for decoder in decoders:
        rows = decoder.envelope_rows(document)
        if rows is not None:
            if getattr(decoder, "parsed_row_may_be_dlp", None) is not None:
                return _decode_parsed_rows(decoder, _counted(rows, limits), limits, keep=keep_user_justification)
            clean, checked = _shortcuts(body, limits)
            return _decode_envelope(decoder, _counted(rows, limits), limits, clean=clean, checked=checked, keep=keep_user_justification)
    if isinstance(document, dict) and isinstance(document.get("value"), list):
        items = document["value"]
    elif isinstance(document, list):
        items = document
    elif isinstance(document, dict):
        if _owner(decoders, document) is None:
            raise DecodeError("unrecognised_shape", "object matches none of the supported formats")
        items = [document]
    else:
        raise DecodeError("unrecognised_shape", f"top-level JSON {type(document).__name__} is not an object or array")
    clean, checked = _shortcuts(body, limits)
    return _decode_records(decoders, _counted(items, limits), limits, clean=clean, checked=checked, keep=keep_user_justification)


def _shortcuts(body: bytes, limits: Limits) -> tuple[bool, bool]:
    """(clean, checked) of a body: `clean` when it never spells a removed key (nor a \\u escape that
    could), so nothing needs scrubbing; `checked` when its bytes prove every record within the depth
    and string limits (most bodies are small enough), so none needs walking."""
    has_escape = has_unicode_escape(body)  # a \\u escape can spell anything: neither shortcut then holds
    clean = not common.mentions_removed_key(body, has_escape=has_escape)
    return clean, limits_module.records_surely_within(body, limits, has_escape=has_escape)


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


class _Output:
    """The `RecordOutput` decoders report to: collects into one message's `Decoded`, for the record
    the loop is at (`index`, `record`)."""

    __slots__ = ("decoded", "limits", "index", "record", "free_text")

    def __init__(self, decoded: Decoded, limits: Limits) -> None:
        self.decoded = decoded
        self.limits = limits
        self.index = 0
        self.record: Any = None
        self.free_text: dict[str, str] = {}

    def skip(self) -> None:
        self.decoded.skipped += 1

    def reject(self, reason: str, detail: str) -> None:
        self.decoded.rejected.append(_reject(self.index, reason, detail, self.record))

    def within_evidence_limit(self, count: int, what: str) -> bool:
        if count <= self.limits.max_evidence_per_alert:  # the usual answer, without the check's exception path
            return True
        try:
            check_evidence_count(count, self.limits, what)
        except LimitExceeded as exc:
            self.reject(exc.reason, exc.detail)
            return False
        return True

    def alert(self, fields: dict[str, Any]) -> None:
        try:
            alert = validate_alert(fields)  # a broken optional field is nulled with a warning
        except ValidationError as exc:
            self.reject("invalid_record", validation_summary(exc))
            return
        self.decoded.warnings += len(alert.decode_warnings)
        self.decoded.alerts.append(alert)

    def part(self, part: AlertPart) -> None:
        warnings = part.data.get("decode_warnings")
        self.decoded.warnings += len(warnings) if isinstance(warnings, list) else 0
        self.decoded.parts.append(part)


def _counted(items: list[Any], limits: Limits) -> list[Any]:
    try:
        check_record_count(len(items), limits)
    except LimitExceeded as exc:
        raise DecodeError(exc.reason, exc.detail) from None
    return items


def _within_record_limits(out: Decoded, index: int, item: Any, limits: Limits) -> bool:
    """Check one record's depth and strings; a violation rejects it with the limit's own reason code."""
    try:
        check_record(item, limits)
    except LimitExceeded as exc:
        out.rejected.append(_reject(index, exc.reason, exc.detail, item))
        return False
    return True


def _owner(decoders: tuple[Decoder, ...], record: Any) -> Decoder | None:
    """The first decoder, in detection order, that owns `record`."""
    if not isinstance(record, dict):
        return None
    for decoder in decoders:
        if decoder.owns_record(record):
            return decoder
    return None


def _free_text(decoder: Decoder, record: Any, keep: bool) -> dict[str, str]:
    """What free text `decoder` keeps of the record before it is scrubbed, only when asked to."""
    kept = getattr(decoder, "kept_free_text", None) if keep and isinstance(record, dict) else None
    return kept(record) if kept is not None else {}


def _decode_records(decoders: tuple[Decoder, ...], items: list[Any], limits: Limits, *, clean: bool, checked: bool, keep: bool = False) -> Decoded:
    """`clean`: the body names no removed key (nothing to scrub); `checked`: its records are known to be
    within the depth and string limits (`limits.records_surely_within`)."""
    out = Decoded(records=len(items))
    output = _Output(out, limits)
    formats: set[str] = set()
    for index, item in enumerate(items):
        if not checked and not _within_record_limits(out, index, item, limits):
            continue
        decoder = _owner(decoders, item)
        if decoder is None:
            out.rejected.append(_reject(index, "unrecognised_record", "record matches none of the supported formats", item))
            continue
        formats.add(decoder.name)
        output.index = index
        try:
            output.free_text = _free_text(decoder, item, keep)
            item = item if clean else common.scrub(item)
            output.record = item
            decoder.decode(item, output)
        except Exception as exc:  # a decoder bug must cost one record, never the message
            out.rejected.append(_reject(index, "decoder_error", type(exc).__name__, item))
    out.format = formats.pop() if len(formats) == 1 else ("mixed" if formats else None)
    return out


if msgspec is not None:

    class _Properties(msgspec.Struct):
        """The fields `row_may_be_dlp` reads; every other key is skipped (validated, not built)."""

        ServiceSource: object = None
        DetectionSource: object = None
        RawEventData: object = None

    class _Row(msgspec.Struct):
        category: object = None
        properties: _Properties | None = None

    class _Envelope(msgspec.Struct):
        records: list[_Row]

    class _RawEnvelope(msgspec.Struct):
        records: list[msgspec.Raw]

    _ENVELOPE = msgspec.json.Decoder(_Envelope)
    _RAW_ENVELOPE = msgspec.json.Decoder(_RawEnvelope)


def _fast_envelope(body: bytes, decoders: tuple[Decoder, ...], limits: Limits, *, keep: bool = False) -> Decoded | None:
    """The decoded envelope when msgspec is installed, the first decoder has `row_may_be_dlp` and
    `body` is `{"records": [row objects with an object or null `properties`]}`; None sends the body
    the ordinary way (which also reports malformed JSON in orjson's words)."""
    if msgspec is None or not decoders or b'"records"' not in body:  # not an envelope: parsed once, the ordinary way
        return None
    decoder = decoders[0]
    may_be_dlp = getattr(decoder, "row_may_be_dlp", None)
    if may_be_dlp is None or decoder.envelope_rows({"records": []}) is None:
        return None
    try:
        rows = _ENVELOPE.decode(body).records
    except Exception:  # msgspec's DecodeError (ValidationError is one), or RecursionError past its nesting limit
        return None  # the ordinary path decides, and names the fault in orjson's words
    if not body.isascii():
        try:  # msgspec does not check the UTF-8 of what it skips; orjson would refuse the body
            body.decode()
        except UnicodeDecodeError:
            return None
    _counted(rows, limits)
    candidates = []
    for index, row in enumerate(rows):
        properties = row.properties
        if properties is None:
            candidates.append(index)
        elif may_be_dlp(row.category, properties.ServiceSource, properties.DetectionSource, properties.RawEventData):
            candidates.append(index)
    out = Decoded(format=decoder.name, records=len(rows), skipped=len(rows) - len(candidates))
    if not candidates:
        return out
    raw_rows = _RAW_ENVELOPE.decode(body).records
    output = _Output(out, limits)
    body_clean, deep = _dense_body_proofs(body) if 2 * len(candidates) > len(rows) else (False, None)
    for index in candidates:
        raw = bytes(raw_rows[index])
        row = _loaded(raw, index)
        if body_clean:
            clean, checked = True, limits_module.records_surely_within(raw, limits, has_escape=False, has_deep_embedding=deep)
        else:
            clean, checked = _shortcuts(raw, limits)
        _decode_row(decoder, output, index, row, limits, clean=clean, checked=checked, keep=keep)
    return out


def _dense_body_proofs(body: bytes) -> tuple[bool, bool | None]:
    """(clean, deep) of a DLP-dense body (most of its rows go on), from searches of the whole body
    that serve every row: a row's bytes are part of the body's, so a body that names no removed key
    and holds no \\u escape proves each of its rows clean, and one without three backslashes in a row
    proves none holds JSON embedded two levels deep (`deep` False; None: each row is searched),
    leaving only a row's length and brackets to count (`limits.records_surely_within`)."""
    if limits_module.escape_or_deep_embedding(body):  # which of the two, the ordinary searches tell
        return not common.mentions_removed_key(body), None
    return not common.mentions_removed_key(body, has_escape=False), False


def _loaded(raw: bytes, index: int) -> Any:
    """A row's bytes parsed; what msgspec let through and orjson refuses (a lone surrogate escape, a
    number out of range) makes the whole body invalid."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise DecodeError("invalid_json", f"{exc.msg} in record {index}") from None


def _decode_parsed_rows(decoder: Decoder, rows: list[Any], limits: Limits, *, keep: bool = False) -> Decoded:
    """The parsed rows of an envelope whose decoder has `parsed_row_may_be_dlp` (without msgspec): the
    rows that cannot be DLP are only counted."""
    may_be_dlp = decoder.parsed_row_may_be_dlp  # type: ignore[attr-defined]
    candidates = [index for index, row in enumerate(rows) if may_be_dlp(row)]
    out = Decoded(format=decoder.name, records=len(rows), skipped=len(rows) - len(candidates))
    if not candidates:
        return out
    output = _Output(out, limits)
    for index in candidates:
        row = rows[index]
        try:  # the shortcuts from the row's own bytes (a few rows of a body): a Subject elsewhere scrubs nothing here
            raw = orjson.dumps(row)
        except orjson.JSONEncodeError:  # nested past orjson's 254 levels: no shortcut
            clean = checked = False
        else:
            clean, checked = _shortcuts(raw, limits)
        _decode_row(decoder, output, index, row, limits, clean=clean, checked=checked, keep=keep)
    return out


def _decode_row(decoder: Decoder, output: _Output, index: int, row: Any, limits: Limits, *, clean: bool, checked: bool, keep: bool = False) -> None:
    """One envelope row the whole way: limits (unless `checked`), the free text kept when asked
    (before the scrub), scrub (unless `clean`), decoder."""
    out = output.decoded
    if not checked and not _within_record_limits(out, index, row, limits):
        return
    output.index = index
    try:
        output.free_text = _free_text(decoder, row, keep)
        row = row if clean else common.scrub(row)
        output.record = row
        decoder.decode(row, output)
    except Exception as exc:  # a decoder bug must cost one record, never the message
        out.rejected.append(_reject(index, "decoder_error", type(exc).__name__, row))


def _decode_envelope(decoder: Decoder, rows: list[Any], limits: Limits, *, clean: bool, checked: bool, keep: bool = False) -> Decoded:
    out = Decoded(format=decoder.name, records=len(rows))
    output = _Output(out, limits)
    for index, row in enumerate(rows):
        _decode_row(decoder, output, index, row, limits, clean=clean, checked=checked, keep=keep)
    return out


def _reject(index: int, reason: str, detail: str, record: Any) -> RejectedRecord:
    return RejectedRecord(index=index, reason=reason, detail=detail, record=orjson.dumps(common.scrub(record)))
