"""Office 365 Management Activity API `DLP.All` records (also the RawEventData of CloudAppEvents rows).

Shapes: SharePoint/OneDrive (`SharePointMetaData`), Exchange (`ExchangeMetaData`), Teams and
Endpoint (`EndpointMetaData` with `SensitiveInfoTypeData`). `Operation` is compared
case-insensitively (`DLPRuleMatch` and `DlpRuleMatch` are both observed).
"""

from __future__ import annotations

from typing import Any

from pipeline.ingest.formats import common as c
from pipeline.ingest.formats.contract import RecordOutput
from pipeline.ingest.formats.registry import register
from pipeline.models import SourceFormat

DLP_RULE_MATCH = "dlprulematch"
_WORKLOAD_NAMES = {"microsoftteams": "Teams", "onedrive": "OneDrive", "sharepoint": "SharePoint", "exchange": "Exchange", "endpoint": "Endpoint"}
_PLATFORMS = {1: "Windows", 2: "macOS", 3: "Linux"}


def looks_like(record: dict[str, Any]) -> bool:
    """A Management Activity record has the common schema's Operation and RecordType."""
    return "Operation" in record and ("RecordType" in record or "CreationTime" in record)


def is_dlp(record: dict[str, Any]) -> bool:
    operation = record.get("Operation")
    return isinstance(operation, str) and operation.lower() == DLP_RULE_MATCH


def sensitive_info_entries(record: dict[str, Any]) -> int:
    """How many sensitive information entries a record carries (what the evidence limit counts)."""
    count = 0
    for policy in c.as_list(record.get("PolicyDetails")):
        for rule in c.as_list(policy.get("Rules") if isinstance(policy, dict) else None):
            matched = rule.get("ConditionsMatched") if isinstance(rule, dict) else None
            if isinstance(matched, dict):
                count += len(c.as_list(matched.get("SensitiveInformation")))
    endpoint = record.get("EndpointMetaData")
    if isinstance(endpoint, dict):
        count += len(c.as_list(endpoint.get("SensitiveInfoTypeData")))
    return count


def to_alert(record: dict[str, Any], *, source_format: str = "management_activity", tenant_id: str | None = None) -> dict[str, Any]:
    """The canonical alert fields of one DLPRuleMatch record. Matched values are never read."""
    policies = [p for p in c.as_list(record.get("PolicyDetails")) if isinstance(p, dict)]
    rules = [r for p in policies for r in c.as_list(p.get("Rules")) if isinstance(r, dict)]
    sensitive: list[dict[str, Any]] = []
    shared_externally: bool | None = None
    severities = []
    for rule in rules:
        severities.append(c.severity(rule.get("Severity")))
        matched = rule.get("ConditionsMatched") or {}
        if not isinstance(matched, dict):
            continue
        for sit in c.as_list(matched.get("SensitiveInformation")):
            if isinstance(sit, dict):
                c.add_sensitive_info(sensitive, sit.get("SensitiveInformationTypeName"), sit.get("SensitiveType"), sit.get("Count"), sit.get("Confidence"))
        for condition in c.as_list(matched.get("OtherConditions")):
            if isinstance(condition, dict) and condition.get("Name") == "AccessScope":
                shared_externally = condition.get("Value") == "IncludeExternalUsers" or shared_externally

    sharepoint = nested if isinstance(nested := record.get("SharePointMetaData"), dict) else {}
    exchange = nested if isinstance(nested := record.get("ExchangeMetaData"), dict) else {}
    endpoint = nested if isinstance(nested := record.get("EndpointMetaData"), dict) else {}
    for sit in c.as_list(endpoint.get("SensitiveInfoTypeData")):
        if isinstance(sit, dict):
            c.add_sensitive_info(sensitive, sit.get("SensitiveInfoTypeName"), sit.get("SensitiveInfoTypeId"), sit.get("Count"), sit.get("Confidence"))
    if isinstance(sharepoint.get("IsViewableByExternalUsers"), bool):
        shared_externally = bool(shared_externally) or sharepoint["IsViewableByExternalUsers"]

    files = []
    if sharepoint:
        labels = sharepoint.get("SensitivityLabelIds") or []
        files.append({
            "name": c.text(sharepoint.get("FileName")),
            "path": c.text(sharepoint.get("FilePathUrl")) or c.text(record.get("ObjectId")),
            "size": c.integer(sharepoint.get("FileSize")),
            "sensitivity_label_id": c.text(labels[0]) if isinstance(labels, list) and labels else None,
        })
    elif endpoint:
        path = c.text(record.get("ObjectId")) or c.text(endpoint.get("TargetFilePath"))
        files.append({
            "name": path.replace("\\", "/").rsplit("/", 1)[-1] if path else None,
            "path": path,
            "size": c.integer(endpoint.get("FileSize")),
            "sha256": c.text(endpoint.get("Sha256")),
        })
    device = None
    if endpoint:
        device = {
            "name": c.text(endpoint.get("DeviceName")),
            "device_id": c.text(endpoint.get("MDATPDeviceId")),
            "platform": _PLATFORMS.get(platform) if isinstance(platform := endpoint.get("Platform"), int) else c.text(platform),
        }

    user_upn = c.upn(record.get("UserId")) or c.upn(sharepoint.get("From")) or c.upn(exchange.get("From"))
    workload_raw = c.text(record.get("Workload"))
    workload = _WORKLOAD_NAMES.get(workload_raw.lower(), workload_raw) if workload_raw else None
    policy_name = c.text(policies[0].get("PolicyName")) if policies else None
    rule_name = c.text(rules[0].get("RuleName")) if rules else None
    ranked = sorted(severities, key=lambda s: ("unknown", "informational", "low", "medium", "high").index(s))
    return {
        "alert_id": c.text(record.get("Id")),
        "tenant_id": c.text(record.get("OrganizationId")) or tenant_id,
        "source_format": source_format,
        "kind": "activity",
        "title": f"DLP rule match: {rule_name or policy_name or 'unknown rule'}" + (f" in {workload}" if workload else ""),
        "severity": ranked[-1] if ranked else "unknown",
        "created_at": c.utc_timestamp(record.get("CreationTime")),
        "policy_name": policy_name,
        "rule_name": rule_name,
        "workload": workload,
        "user": {"upn": user_upn, "object_id": c.guid(record.get("UserKey"))} if user_upn else None,
        "files": files,
        "device": device,
        "sensitive_info": sensitive,
        "shared_externally": shared_externally,
        "incident_id": c.text(record.get("IncidentId")),
    }


class ManagementActivityDecoder:
    """Management Activity DLP records, one record each; the evidence counted against the limit is
    their sensitive information entries."""

    name: SourceFormat = "management_activity"

    def envelope_rows(self, body: Any) -> list[Any] | None:
        return None

    owns_record = staticmethod(looks_like)

    def decode(self, record: Any, out: RecordOutput) -> None:
        if not is_dlp(record):
            out.skip()
        elif out.within_evidence_limit(sensitive_info_entries(record), "sensitive information entries"):
            out.alert(to_alert(record))


register(ManagementActivityDecoder())
