"""Defender XDR Streaming API envelope: `{"records": [{time, tenantId, category, properties}, ...]}`.

AlertInfo and AlertEvidence rows are *parts* of one alert (joined later by the assembler, see
pipeline/assemble/join.py); CloudAppEvents rows whose RawEventData is a DLP rule match are complete
activities in the Management Activity shape.

A streaming hub carries every table the tenant streams, DLP rows a small fraction: `row_may_be_dlp`
tells from four fields of a row that it cannot be one, so the decode loop skips it without building,
checking or scrubbing it (pipeline/ingest/decode.py, "Fast skip").
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pipeline.ingest.formats import common as c
from pipeline.ingest.formats import management_activity
from pipeline.ingest.formats.contract import RANK_ALERT_INFO, RANK_EVIDENCE, AlertPart, RecordOutput
from pipeline.ingest.formats.registry import register
from pipeline.ingest.limits import has_unicode_escape
from pipeline.models import SourceFormat

ALERT_INFO = "AdvancedHunting-AlertInfo"
ALERT_EVIDENCE = "AdvancedHunting-AlertEvidence"
CLOUD_APP_EVENTS = "AdvancedHunting-CloudAppEvents"


def row_may_be_dlp(category: Any, service_source: Any, detection_source: Any, raw_event_data: Any) -> bool:
    """False only when a row with these fields is surely skipped by `DefenderStreamingDecoder.decode`
    (the fast skip, pipeline/ingest/decode.py), so it need not be scrubbed, checked or decoded.
    The three fields are those of the row's `properties` object (a row without one goes on: the
    callers send it the whole way, where it is rejected as malformed).

    The same tests as `decode`, on the same decoded values: a row without a category string goes on (it is rejected as malformed, as before); AlertInfo / AlertEvidence
    rows go on when they name the DLP service; CloudAppEvents rows when their RawEventData may be a
    DLP rule match (the operation spelled in any ASCII casing, or a \\u escape of the embedded JSON
    that could spell it; a RawEventData already an object is tested exactly); every other row is
    skipped."""
    if not isinstance(category, str):
        return True
    if category == CLOUD_APP_EVENTS:
        if isinstance(raw_event_data, str):
            return _OPERATION_MARKER in raw_event_data.lower() or has_unicode_escape(raw_event_data)
        return isinstance(raw_event_data, dict) and management_activity.is_dlp(raw_event_data)
    if category == ALERT_INFO or category == ALERT_EVIDENCE:
        return c.is_dlp_service(service_source, detection_source)
    return False


def parsed_row_may_be_dlp(row: Any) -> bool:
    """`row_may_be_dlp` of a parsed row."""
    if not isinstance(row, dict):
        return True  # not an object: rejected as malformed
    properties = row.get("properties")
    if not isinstance(properties, dict):
        return True
    return row_may_be_dlp(
        row.get("category"), properties.get("ServiceSource"), properties.get("DetectionSource"), properties.get("RawEventData")
    )


_OPERATION_MARKER = management_activity.DLP_RULE_MATCH  # lowercase


def looks_like(body: Any) -> bool:
    return isinstance(body, dict) and isinstance(body.get("records"), list)


def is_dlp_row(properties: dict[str, Any]) -> bool:
    return c.is_dlp_service(properties.get("ServiceSource"), properties.get("DetectionSource"))


def info_part(record: dict[str, Any], properties: dict[str, Any]) -> dict[str, Any]:
    """Alert-level fields of one AlertInfo row."""
    get, text = properties.get, c.text
    title = text(get("Title"))
    return _drop_none({
        "alert_id": text(get("AlertId")),
        "tenant_id": text(record.get("tenantId")),
        "title": title,
        "severity": c.severity(get("Severity")),
        "category": text(get("Category")),
        "created_at": text(get("Timestamp")),
        "rule_name": c.rule_from_title(title),
        "workload": c.workload_from_text(title),
    })


def evidence_part(record: dict[str, Any], properties: dict[str, Any], *, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Entity fields of one AlertEvidence row (user, file, device or cloud app).

    `extra`: the row's AdditionalFields already parsed (`common.json_object`) from a record that
    `decode` got, so already scrubbed or proved clean (the decoder contract); without it they are
    parsed here and scrubbed when their text could name a removed key."""
    get, text = properties.get, c.text
    if extra is None:
        raw_extra = get("AdditionalFields")
        extra = c.json_object(raw_extra)
        if not isinstance(raw_extra, str) or c.mentions_removed_key(raw_extra):  # the text cannot spell a removed key otherwise
            extra = c.scrub(extra)
    extra_get = extra.get
    entity = str(get("EntityType") or "").lower()
    title = text(get("Title"))
    part: dict[str, Any] = {
        "alert_id": text(get("AlertId")),
        "tenant_id": text(record.get("tenantId")),
        "title": title,
        "severity": c.severity(get("Severity")),
        "category": _first_category(get("Categories")),
        "created_at": text(get("Timestamp")),
        "rule_name": text(extra_get("DlpRuleName")) or c.rule_from_title(title),
        "policy_name": text(extra_get("DlpPolicyName")),
    }
    if entity in ("user", "account", "mailbox"):
        account_upn = c.upn(get("AccountUpn"))
        if not account_upn and extra_get("Name") and extra_get("UPNSuffix"):
            account_upn = f"{extra['Name']}@{extra['UPNSuffix']}"
        part["user"] = {
            "upn": account_upn,
            "object_id": text(get("AccountObjectId")) or text(extra_get("AadUserId")),
            "display_name": text(extra_get("DisplayName")),
        }
    elif entity == "file":
        part["files"] = [_drop_none({
            "name": c.url_decoded(get("FileName")),
            "path": c.url_decoded(get("FolderPath")),
            "size": c.integer(get("FileSize")),
            "sha256": text(get("SHA256")),
            "sensitivity_label_id": text(extra_get("SensitivityLabelId")),
        })]
        part["sensitive_info"] = c.sensitive_types_from_text(extra_get("SensitiveInfoTypes"))
        part["workload"] = c.workload_from_text(get("Application"))
    elif entity in ("machine", "device", "host"):
        part["device"] = _drop_none({"name": text(get("DeviceName")), "device_id": text(get("DeviceId"))})
        part["workload"] = "Endpoint"
    elif entity in ("cloudapplication", "cloud-application", "cloudapp"):
        part["workload"] = c.workload_from_text(get("Application"), extra_get("Name"))
    return _drop_none(part)


def _first_category(value: Any) -> str | None:
    """The first of an evidence row's Categories (a JSON list in a string, or a list)."""
    if type(value) is str and len(value) <= 256:  # (a long text is not kept)
        return _first_category_in(value)
    return _category_of(value)


def _category_of(value: Any) -> str | None:
    categories = c.json_list(value)
    return c.text(categories[0]) if categories else None


# The Categories of an alert's rows are one of a few texts (`["Exfiltration"]`): worked out once.
_first_category_in = lru_cache(maxsize=256)(_category_of)


def cloud_app_dlp_activity(record: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    """The DLP rule match carried by a CloudAppEvents row, given its parsed RawEventData (`raw`, a
    Management Activity record that `management_activity.is_dlp`)."""
    return management_activity.to_alert(raw, source_format="defender_streaming", tenant_id=c.text(record.get("tenantId")))


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    """`values` less its None, empty-list and "unknown" values."""
    return {k: v for k, v in values.items() if v is not None and v != "unknown" and (v.__class__ is not list or v)}


class DefenderStreamingDecoder:
    """Streaming API envelopes: each row is an AlertInfo or AlertEvidence part, a CloudAppEvents DLP
    activity, or something else (skipped)."""

    name: SourceFormat = "defender_streaming"

    def envelope_rows(self, body: Any) -> list[Any] | None:
        return body["records"] if looks_like(body) else None

    def owns_record(self, record: dict[str, Any]) -> bool:
        return False

    row_may_be_dlp = staticmethod(row_may_be_dlp)
    parsed_row_may_be_dlp = staticmethod(parsed_row_may_be_dlp)

    def decode(self, record: Any, out: RecordOutput) -> None:
        properties = record.get("properties") if isinstance(record, dict) else None
        category = record.get("category") if isinstance(record, dict) else None
        if not isinstance(properties, dict) or not isinstance(category, str):
            out.reject("malformed_record", "streaming record without category or properties")
            return
        if category == CLOUD_APP_EVENTS:
            raw = c.json_object(properties.get("RawEventData"))
            if not management_activity.is_dlp(raw):
                out.skip()
            elif out.within_evidence_limit(management_activity.sensitive_info_entries(raw), "sensitive information entries"):
                out.alert(cloud_app_dlp_activity(record, raw))
            return
        if category != ALERT_INFO and category != ALERT_EVIDENCE or not is_dlp_row(properties):
            out.skip()
            return
        extra = c.json_object(properties.get("AdditionalFields"))  # parsed once: the limit below and the evidence fields
        types = extra.get("SensitiveInfoTypes")
        if not out.within_evidence_limit(len(types) if isinstance(types, list) else 0, "sensitive information types"):
            return
        if category == ALERT_INFO:
            rank, data = RANK_ALERT_INFO, info_part(record, properties)
        else:
            rank, data = RANK_EVIDENCE, evidence_part(record, properties, extra=extra)
        alert_id = data.get("alert_id")
        if not alert_id:
            out.reject("invalid_record", "alert row without AlertId")
            return
        out.part(AlertPart(alert_id=alert_id, rank=rank, data=data))


register(DefenderStreamingDecoder())
