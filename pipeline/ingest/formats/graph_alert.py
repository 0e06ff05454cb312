"""Microsoft Graph security alerts (alerts_v2, `microsoft.graph.security.alert`)."""

from __future__ import annotations

from typing import Any

from pipeline.ingest.formats import common as c
from pipeline.ingest.formats.contract import RecordOutput
from pipeline.ingest.formats.registry import register
from pipeline.models import SourceFormat

_MARKERS = ("serviceSource", "alertWebUrl", "providerAlertId", "detectionSource", "evidence")


def looks_like(record: dict[str, Any]) -> bool:
    odata = record.get("@odata.type")
    if isinstance(odata, str) and odata.endswith("security.alert"):
        return True
    return "id" in record and sum(marker in record for marker in _MARKERS) >= 2


def is_dlp(record: dict[str, Any]) -> bool:
    return (
        record.get("serviceSource") == "dataLossPrevention"
        or record.get("detectionSource") == "microsoftDataLossPrevention"
        or c.is_dlp_service(record.get("productName"))
    )


def to_alert(record: dict[str, Any]) -> dict[str, Any]:
    extra = nested if isinstance(nested := record.get("additionalData"), dict) else {}
    title = c.text(record.get("title"))
    user: dict[str, Any] | None = None
    files: list[dict[str, Any]] = []
    device: dict[str, Any] | None = None
    app_name: str | None = None
    for evidence in c.as_list(record.get("evidence")):
        if not isinstance(evidence, dict):
            continue
        kind = str(evidence.get("@odata.type") or "")
        if kind.endswith("userEvidence") or kind.endswith("mailboxEvidence"):
            account = nested if isinstance(nested := evidence.get("userAccount"), dict) else {}
            candidate = {
                "upn": c.upn(account.get("userPrincipalName")) or c.upn(evidence.get("upn")) or c.upn(evidence.get("primaryAddress")),
                "object_id": c.text(account.get("azureAdUserId")),
                "display_name": c.text(account.get("displayName")) or c.text(evidence.get("displayName")),
            }
            if user is None or "policyViolator" in c.as_list(evidence.get("roles")):
                user = candidate
        elif kind.endswith("fileEvidence"):
            details = nested if isinstance(nested := evidence.get("fileDetails"), dict) else {}
            files.append({
                "name": c.text(details.get("fileName")),
                "path": c.text(details.get("filePath")),
                "size": c.integer(details.get("fileSize")),
                "sha256": c.text(details.get("sha256")),
            })
        elif kind.endswith("deviceEvidence"):
            device = {
                "name": c.text(evidence.get("deviceDnsName")) or c.text(evidence.get("hostName")),
                "device_id": c.text(evidence.get("mdeDeviceId")),
                "platform": c.text(evidence.get("osPlatform")),
            }
        elif kind.endswith("cloudApplicationEvidence"):
            app_name = c.text(evidence.get("displayName")) or c.text(evidence.get("instanceName"))
    return {
        "alert_id": c.text(record.get("id")),
        "tenant_id": c.text(record.get("tenantId")),
        "source_format": "graph_alert",
        "title": title,
        "severity": c.severity(record.get("severity")),
        "status": (c.text(record.get("status")) or "").lower() or None,
        "category": c.text(record.get("category")),
        "created_at": c.text(record.get("createdDateTime")),
        "first_activity_at": c.text(record.get("firstActivityDateTime")),
        "last_activity_at": c.text(record.get("lastActivityDateTime")),
        "policy_name": c.text(extra.get("PolicyName")),
        "rule_name": c.text(extra.get("RuleName")) or c.rule_from_title(title),
        "policies": c.named_policies(c.text(extra.get("PolicyName")), c.text(extra.get("RuleName")) or c.rule_from_title(title)),
        "workload": c.workload_from_text(extra.get("Workload"), app_name, title),
        "user": user,
        "files": files,
        "device": device,
        "sensitive_info": c.sensitive_types_from_text(extra.get("SensitiveInformationTypes")),
        "incident_id": c.text(record.get("incidentId")),
        "alert_url": c.text(record.get("alertWebUrl")),
        "incident_url": c.text(record.get("incidentWebUrl")),
    }


class GraphAlertDecoder:
    """Graph alerts, one record each; the evidence counted against the limit is `evidence`."""

    name: SourceFormat = "graph_alert"

    def envelope_rows(self, body: Any) -> list[Any] | None:
        return None

    owns_record = staticmethod(looks_like)

    def decode(self, record: Any, out: RecordOutput) -> None:
        if not is_dlp(record):
            out.skip()
        elif out.within_evidence_limit(len(c.as_list(record.get("evidence"))), "evidence items"):
            out.alert(to_alert(record))


register(GraphAlertDecoder())
