"""Defender XDR Streaming API envelope: `{"records": [{time, tenantId, category, properties}, ...]}`.

AlertInfo and AlertEvidence rows are *parts* of one alert (joined later by the assembler, see
pipeline/assemble/join.py); CloudAppEvents rows whose RawEventData is a DLP rule match are complete
activities in the Management Activity shape.
"""

from __future__ import annotations

from typing import Any

from pipeline.ingest.formats import common as c
from pipeline.ingest.formats import management_activity

ALERT_INFO = "AdvancedHunting-AlertInfo"
ALERT_EVIDENCE = "AdvancedHunting-AlertEvidence"
CLOUD_APP_EVENTS = "AdvancedHunting-CloudAppEvents"


def looks_like(body: Any) -> bool:
    return isinstance(body, dict) and isinstance(body.get("records"), list)


def is_dlp_row(properties: dict[str, Any]) -> bool:
    return c.is_dlp_service(properties.get("ServiceSource"), properties.get("DetectionSource"))


def info_part(record: dict[str, Any], properties: dict[str, Any]) -> dict[str, Any]:
    """Alert-level fields of one AlertInfo row."""
    title = c.text(properties.get("Title"))
    return _drop_none({
        "alert_id": c.text(properties.get("AlertId")),
        "tenant_id": c.text(record.get("tenantId")),
        "title": title,
        "severity": c.severity(properties.get("Severity")),
        "category": c.text(properties.get("Category")),
        "created_at": c.text(properties.get("Timestamp")),
        "rule_name": c.rule_from_title(title),
        "workload": c.workload_from_text(title),
    })


def evidence_part(record: dict[str, Any], properties: dict[str, Any]) -> dict[str, Any]:
    """Entity fields of one AlertEvidence row (user, file, device or cloud app)."""
    raw_extra = properties.get("AdditionalFields")
    extra = c.json_object(raw_extra)
    if not isinstance(raw_extra, str) or c.mentions_removed_key(raw_extra):  # the text cannot spell a removed key otherwise
        extra = c.scrub(extra)
    entity = str(properties.get("EntityType") or "").lower()
    title = c.text(properties.get("Title"))
    categories = c.json_list(properties.get("Categories"))
    part: dict[str, Any] = {
        "alert_id": c.text(properties.get("AlertId")),
        "tenant_id": c.text(record.get("tenantId")),
        "title": title,
        "severity": c.severity(properties.get("Severity")),
        "category": c.text(categories[0]) if categories else None,
        "created_at": c.text(properties.get("Timestamp")),
        "rule_name": c.text(extra.get("DlpRuleName")) or c.rule_from_title(title),
        "policy_name": c.text(extra.get("DlpPolicyName")),
    }
    if entity in ("user", "account", "mailbox"):
        account_upn = c.upn(properties.get("AccountUpn"))
        if not account_upn and extra.get("Name") and extra.get("UPNSuffix"):
            account_upn = f"{extra['Name']}@{extra['UPNSuffix']}"
        part["user"] = {
            "upn": account_upn,
            "object_id": c.text(properties.get("AccountObjectId")) or c.text(extra.get("AadUserId")),
            "display_name": c.text(extra.get("DisplayName")),
        }
    elif entity == "file":
        part["files"] = [_drop_none({
            "name": c.url_decoded(properties.get("FileName")),
            "path": c.url_decoded(properties.get("FolderPath")),
            "size": c.integer(properties.get("FileSize")),
            "sha256": c.text(properties.get("SHA256")),
            "sensitivity_label_id": c.text(extra.get("SensitivityLabelId")),
        })]
        part["sensitive_info"] = c.sensitive_types_from_text(extra.get("SensitiveInfoTypes"))
        part["workload"] = c.workload_from_text(properties.get("Application"))
    elif entity in ("machine", "device", "host"):
        part["device"] = _drop_none({"name": c.text(properties.get("DeviceName")), "device_id": c.text(properties.get("DeviceId"))})
        part["workload"] = "Endpoint"
    elif entity in ("cloudapplication", "cloud-application", "cloudapp"):
        part["workload"] = c.workload_from_text(properties.get("Application"), extra.get("Name"))
    return _drop_none(part)


def cloud_app_dlp_activity(record: dict[str, Any], properties: dict[str, Any]) -> dict[str, Any] | None:
    """The DLP rule match carried by a CloudAppEvents row, or None when the row is something else."""
    raw = c.json_object(properties.get("RawEventData"))
    if not management_activity.is_dlp(raw):
        return None
    return management_activity.to_alert(raw, source_format="defender_streaming", tenant_id=c.text(record.get("tenantId")))


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None and v != [] and v != "unknown"}
