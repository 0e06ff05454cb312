"""Office 365 Management Activity API `DLP.All` records (also the RawEventData of CloudAppEvents rows).

Operations: `DlpRuleMatch` (a rule matched; for Exchange and Endpoint it may carry the user's
override or false-positive report in `ExceptionInfo`), `DlpInfo` (a false-positive report, nothing
undone) and `DlpRuleUndo` (a policy action was undone). Each is one *event* of a match: the decoder
gives it as an `AlertPart` of rank `RANK_LIFECYCLE`, keyed by the match it belongs to
(`match_key`), and the assemble stage folds every event of a match into one alert
(pipeline/assemble/join.py, `merge_lifecycle`): a new event is a revision of the same alert.

Shapes: SharePoint/OneDrive (`SharePointMetaData`), Exchange (`ExchangeMetaData`), Teams and
Endpoint (`EndpointMetaData` with `SensitiveInfoTypeData`). `Operation` is compared
case-insensitively (`DLPRuleMatch` and `DlpRuleMatch` are both observed).
"""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic import ValidationError

from pipeline.ingest.formats import common as c
from pipeline.ingest.formats.contract import RANK_LIFECYCLE, AlertPart, RecordOutput
from pipeline.ingest.formats.registry import register
from pipeline.models import LifecycleState, SourceFormat, clean_alert_fields, validation_summary

DLP_RULE_MATCH = "dlprulematch"
DLP_RULE_UNDO = "dlpruleundo"
DLP_INFO = "dlpinfo"
# The DLP operations, lowercase, and how the schema spells them.
OPERATIONS = {DLP_RULE_MATCH: "DlpRuleMatch", DLP_INFO: "DlpInfo", DLP_RULE_UNDO: "DlpRuleUndo"}
_WORKLOAD_NAMES = {"microsoftteams": "Teams", "onedrive": "OneDrive", "sharepoint": "SharePoint", "exchange": "Exchange", "endpoint": "Endpoint"}
_PLATFORMS = {1: "Windows", 2: "macOS", 3: "Linux"}


def looks_like(record: dict[str, Any]) -> bool:
    """A Management Activity record has the common schema's Operation and RecordType."""
    return "Operation" in record and ("RecordType" in record or "CreationTime" in record)


def is_dlp(record: dict[str, Any]) -> bool:
    """A rule match (the only operation a CloudAppEvents row is decoded for)."""
    return operation_of(record) == DLP_RULE_MATCH


def operation_of(record: dict[str, Any]) -> str | None:
    """The record's DLP operation, lowercase (`dlprulematch`, `dlpinfo`, `dlpruleundo`), or None."""
    operation = record.get("Operation")
    lowered = operation.lower() if isinstance(operation, str) else None
    return lowered if lowered in OPERATIONS else None


def exception_of(record: dict[str, Any], *, justification: str | None = None) -> dict[str, Any] | None:
    """The canonical `exception` of a record's `ExceptionInfo` (an object, or the same as a JSON string),
    or None when it has none. `justification` is the user's text, given only when it is kept."""
    info = c.json_object(record.get("ExceptionInfo"))
    operation = operation_of(record)
    reason = c.text(info.get("Reason"))
    false_positive = info.get("FalsePositive") is True or (isinstance(info.get("FalsePositive"), str) and info["FalsePositive"].strip().lower() == "true")
    rule_ids = [rule for value in c.as_list(info.get("Rules")) if (rule := c.text(value))]
    if not info and operation != DLP_INFO:
        return None
    if operation == DLP_INFO:
        false_positive = True
    # An exception that is not a false-positive report is an override (Reason "Override", or a user's
    # justification); an undo's Reason says why the action was undone.
    override = not false_positive and (operation == DLP_RULE_MATCH or (reason or "").lower() == "override")
    return {"override": override, "false_positive": false_positive, "reason": reason, "rule_ids": rule_ids, "justification": justification}


def lifecycle_state(operation: str | None, exception: dict[str, Any] | None) -> LifecycleState:
    """The state one event puts its match in."""
    if operation == DLP_RULE_UNDO:
        return "undone"
    if operation == DLP_INFO or (exception is not None and exception["false_positive"]):
        return "reported_false_positive"
    if exception is not None and exception["override"]:
        return "overridden"
    return "matched"


def match_key(record: dict[str, Any]) -> str:
    """The id of the match an event belongs to: tenant, workload and the item DLP looked at (the
    SharePoint/OneDrive document, the Exchange message); an Endpoint event is a match of its own
    (its override comes in the same record). Events of one match give the same key."""
    sharepoint = nested if isinstance(nested := record.get("SharePointMetaData"), dict) else {}
    exchange = nested if isinstance(nested := record.get("ExchangeMetaData"), dict) else {}
    item = None
    if sharepoint:
        item = c.text(sharepoint.get("UniqueID")) or c.text(sharepoint.get("FileID")) or c.text(sharepoint.get("FilePathUrl"))
    elif exchange:
        item = c.text(exchange.get("MessageID")) or c.text(exchange.get("UniqueID")) or c.text(exchange.get("UniqueId"))
    if item is None and not isinstance(record.get("EndpointMetaData"), dict):
        item = c.text(record.get("ObjectId"))
    if item is None:
        item = "record:" + (c.text(record.get("Id")) or "")
    parts = (c.text(record.get("OrganizationId")) or "", (c.text(record.get("Workload")) or "").lower(), item)
    return "dlpmatch-" + hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def policies_of(policies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every policy and every rule of `PolicyDetails`, in the record's order."""
    out = []
    for policy in policies:
        rules = []
        for rule in c.as_list(policy.get("Rules")):
            if not isinstance(rule, dict):
                continue
            rules.append({
                "name": c.text(rule.get("RuleName")),
                "rule_id": c.text(rule.get("RuleId")),
                "severity": c.severity(rule.get("Severity")),
                "mode": c.text(rule.get("RuleMode")),
                "actions": [a for value in c.as_list(rule.get("Actions")) if (a := c.text(value))],
                "overridden_actions": [a for value in c.as_list(rule.get("OverriddenActions")) if (a := c.text(value))],
            })
        out.append({"name": c.text(policy.get("PolicyName")), "policy_id": c.text(policy.get("PolicyId")), "rules": rules})
    return out


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


def to_alert(
    record: dict[str, Any], *, source_format: str = "management_activity", tenant_id: str | None = None, justification: str | None = None
) -> dict[str, Any]:
    """The canonical alert fields of one DLP record: every policy and rule, the severity of the
    highest rule, the exception when there is one. Matched values are never read; `justification`
    is the user's text, passed only when it is kept."""
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
        "policies": policies_of(policies),
        "exception": exception_of(record, justification=justification),
    }


def lifecycle_part(record: dict[str, Any], *, justification: str | None = None) -> AlertPart:
    """One lifecycle event as a part of the alert of its match: the record's canonical fields (broken
    optional ones nulled, with a warning) plus the event itself under `lifecycle_event`."""
    fields = clean_alert_fields(to_alert(record, justification=justification))
    operation = operation_of(record)
    key = match_key(record)
    fields["alert_id"] = key
    fields["lifecycle_event"] = {
        "record_id": c.text(record.get("Id")),
        "operation": OPERATIONS.get(operation or "", "DlpRuleMatch"),
        "state": lifecycle_state(operation, fields.get("exception")),
        "at": fields.get("created_at"),
    }
    return AlertPart(alert_id=key, rank=RANK_LIFECYCLE, data=fields)


class ManagementActivityDecoder:
    """Management Activity DLP records, one record each; the evidence counted against the limit is
    their sensitive information entries."""

    name: SourceFormat = "management_activity"

    def envelope_rows(self, body: Any) -> list[Any] | None:
        return None

    owns_record = staticmethod(looks_like)

    def kept_free_text(self, record: dict[str, Any]) -> dict[str, str]:
        """The user's override justification of a record not scrubbed yet (`ExceptionInfo.Justification`,
        object or JSON string); the decode loop asks only when `keep_user_justification` is set."""
        justification = c.text(c.json_object(record.get("ExceptionInfo")).get("Justification"))
        return {"justification": justification} if justification else {}

    def decode(self, record: Any, out: RecordOutput) -> None:
        if operation_of(record) is None:
            out.skip()
        elif out.within_evidence_limit(sensitive_info_entries(record), "sensitive information entries"):
            try:
                part = lifecycle_part(record, justification=getattr(out, "free_text", {}).get("justification"))
            except ValidationError as exc:  # a required field (the record's Id) is missing or broken
                out.reject("invalid_record", validation_summary(exc))
                return
            out.part(part)


register(ManagementActivityDecoder())
