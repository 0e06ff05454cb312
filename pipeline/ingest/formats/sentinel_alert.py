"""Microsoft Sentinel `SecurityAlert` rows. `Entities` and `ExtendedProperties` are JSON strings."""

from __future__ import annotations

from typing import Any

from pipeline.ingest.formats import common as c
from pipeline.ingest.formats.contract import RecordOutput
from pipeline.ingest.formats.registry import register
from pipeline.models import SourceFormat


def looks_like(record: dict[str, Any]) -> bool:
    return record.get("Type") == "SecurityAlert" or ("SystemAlertId" in record and ("AlertName" in record or "ProductName" in record))


def is_dlp(record: dict[str, Any]) -> bool:
    return c.is_dlp_service(record.get("ProductName"), record.get("ProviderName"))


def to_alert(record: dict[str, Any]) -> dict[str, Any]:
    extended = c.json_object(record.get("ExtendedProperties"))
    title = c.text(record.get("AlertName")) or c.text(record.get("DisplayName"))
    user: dict[str, Any] | None = None
    files: list[dict[str, Any]] = []
    device: dict[str, Any] | None = None
    app_name: str | None = None
    tenant_id: str | None = None
    for entity in c.json_list(record.get("Entities")):
        if not isinstance(entity, dict):
            continue
        kind = str(entity.get("Type") or "").lower()
        if kind == "account" and user is None:
            name, suffix = c.text(entity.get("Name")), c.text(entity.get("UPNSuffix"))
            user = {
                "upn": f"{name}@{suffix}" if name and suffix else c.upn(name),
                "object_id": c.text(entity.get("AadUserId")),
                "display_name": c.text(entity.get("DisplayName")),
            }
            tenant_id = c.text(entity.get("AadTenantId"))
        elif kind == "mailbox" and user is None:
            user = {"upn": c.upn(entity.get("Upn")) or c.upn(entity.get("MailboxPrimaryAddress")), "object_id": c.text(entity.get("AadId")), "display_name": c.text(entity.get("DisplayName"))}
        elif kind == "file":
            files.append({"name": c.text(entity.get("Name")), "path": c.text(entity.get("Directory")), "size": c.integer(entity.get("SizeInBytes"))})
        elif kind == "host" and device is None:
            device = {"name": c.text(entity.get("FQDN")) or c.text(entity.get("HostName")), "device_id": c.text(entity.get("MdatpDeviceId")), "platform": c.text(entity.get("OSFamily"))}
        elif kind == "cloud-application":
            app_name = c.text(entity.get("Name"))
    if user is None and c.upn(record.get("CompromisedEntity")):
        user = {"upn": c.upn(record.get("CompromisedEntity"))}
    return {
        "alert_id": c.text(record.get("VendorOriginalId")) or c.text(record.get("SystemAlertId")),
        "tenant_id": tenant_id or c.text(record.get("TenantId")),
        "source_format": "sentinel_alert",
        "title": title,
        "severity": c.severity(record.get("AlertSeverity")),
        "status": (c.text(record.get("Status")) or "").lower() or None,
        "category": c.text(record.get("Tactics")),
        "created_at": c.text(record.get("TimeGenerated")),
        "first_activity_at": c.text(record.get("StartTime")),
        "last_activity_at": c.text(record.get("EndTime")),
        "policy_name": c.text(extended.get("PolicyName")),
        "rule_name": c.text(extended.get("RuleName")) or c.rule_from_title(title),
        "policies": c.named_policies(c.text(extended.get("PolicyName")), c.text(extended.get("RuleName")) or c.rule_from_title(title)),
        "workload": c.workload_from_text(extended.get("Workload"), app_name, title),
        "user": user,
        "files": files,
        "device": device,
        "sensitive_info": c.sensitive_types_from_text(extended.get("SensitiveInformationTypes")),
        "incident_id": c.text(extended.get("IncidentId")),
        "alert_url": c.text(record.get("AlertLink")),
    }


class SentinelAlertDecoder:
    """Sentinel SecurityAlert rows, one record each; the evidence counted against the limit is `Entities`."""

    name: SourceFormat = "sentinel_alert"

    def envelope_rows(self, body: Any) -> list[Any] | None:
        return None

    owns_record = staticmethod(looks_like)

    def decode(self, record: Any, out: RecordOutput) -> None:
        if not is_dlp(record):
            out.skip()
        elif out.within_evidence_limit(len(c.json_list(record.get("Entities"))), "entities"):
            out.alert(to_alert(record))


register(SentinelAlertDecoder())
