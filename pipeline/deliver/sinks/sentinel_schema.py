"""The row shape of the Sentinel custom table `DLPEnrichedAlerts_CL` (also the Parquet lake's columns).

Flat columns for what analysts filter on, `dynamic` (JSON) columns for the nested parts. Names avoid
the Log Analytics reserved ones (`TenantId`, `Type`, `Title`, `id`, `UniqueId`, `_ResourceId`,
`_SubscriptionId`): the alert's tenant is `AlertTenantId`, its title `AlertTitle`.

`TimeGenerated` is the alert's own time (its first activity, else its creation, else its last
activity: the time the history enrichers use), so time-range queries and workbook bins count alerts
when they happened; a record without any of them gets its processing time. `ProcessedTime` is always
when the pipeline processed the record: revisions of one alert share its TimeGenerated and differ in
ProcessedTime. Log Analytics accepts TimeGenerated only within a window around the time it receives
the row (see the Logs Ingestion API documentation); a backfill of old alerts may be stamped with the
ingestion time by the service, and ProcessedTime and AlertCreatedTime still hold the truth.
`RecordId` is the idempotency key: Log Analytics has no deduplication, so a retry after an ambiguous
failure can add a second row with the same RecordId; the KQL function in deploy/sentinel/ keeps the
latest per RecordId (by ProcessedTime).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pipeline.deliver.minimise import get_path

TABLE = "DLPEnrichedAlerts_CL"
STREAM = "Custom-DLPEnrichedAlerts"

# (column, Log Analytics type, dotted path in the enriched record or a computed name)
COLUMNS: list[tuple[str, str, str]] = [
    ("TimeGenerated", "datetime", "=alert_time"),
    ("ProcessedTime", "datetime", "processed_at"),
    ("RecordId", "string", "record_id"),
    ("AlertId", "string", "alert.alert_id"),
    ("AlertTenantId", "string", "alert.tenant_id"),
    ("SourceFormat", "string", "alert.source_format"),
    ("AlertKind", "string", "alert.kind"),
    ("AlertTitle", "string", "alert.title"),
    ("Severity", "string", "alert.severity"),
    ("AlertStatus", "string", "alert.status"),
    ("AlertCategory", "string", "alert.category"),
    ("AlertCreatedTime", "datetime", "alert.created_at"),
    ("FirstActivityTime", "datetime", "alert.first_activity_at"),
    ("LastActivityTime", "datetime", "alert.last_activity_at"),
    ("PolicyName", "string", "alert.policy_name"),
    ("RuleName", "string", "alert.rule_name"),
    ("Workload", "string", "alert.workload"),
    ("UserPrincipalName", "string", "alert.user.upn"),
    ("UserObjectId", "string", "alert.user.object_id"),
    ("UserDisplayName", "string", "alert.user.display_name"),
    ("DeviceName", "string", "alert.device.name"),
    ("SharedExternally", "boolean", "alert.shared_externally"),
    ("IncidentId", "string", "alert.incident_id"),
    ("AlertUrl", "string", "alert.alert_url"),
    ("IncidentUrl", "string", "alert.incident_url"),
    ("LifecycleState", "string", "alert.lifecycle.state"),
    ("FileCount", "int", "=file_count"),
    ("SensitiveInfoCount", "int", "=sensitive_count"),
    ("TriageScore", "real", "enrichments.triage.score"),
    ("Files", "dynamic", "alert.files"),
    ("Device", "dynamic", "alert.device"),
    ("SensitiveInfo", "dynamic", "=sensitive_info"),
    ("Policies", "dynamic", "alert.policies"),
    ("DlpException", "dynamic", "alert.exception"),
    ("DecodeWarnings", "dynamic", "alert.decode_warnings"),
    ("Enrichments", "dynamic", "enrichments"),
    ("EnrichmentStatus", "dynamic", "enrichment_status"),
    ("PipelineVersion", "string", "pipeline_version"),
]

# The alert's own time, in order of preference (pipeline/state/history.py `event_time` uses the same).
_ALERT_TIMES = ("alert.first_activity_at", "alert.created_at", "alert.last_activity_at")

RESERVED = frozenset({"_ResourceId", "id", "_SubscriptionId", "TenantId", "Type", "UniqueId", "Title"})


def to_row(document: dict[str, Any]) -> dict[str, Any]:
    """One row of the table from a (possibly projected) record document. Absent values are omitted."""
    row: dict[str, Any] = {}
    for column, kind, path in COLUMNS:
        if path == "=alert_time":
            value = next((found for name in _ALERT_TIMES if (found := get_path(document, name))), None) or get_path(document, "processed_at")
        elif path == "=file_count":
            files = get_path(document, "alert.files")
            value = len(files) if isinstance(files, list) else None
        elif path == "=sensitive_info":
            value = named_sensitive_info(document)
        elif path == "=sensitive_count":
            infos = get_path(document, "alert.sensitive_info")
            value = sum(i.get("count") or 0 for i in infos if isinstance(i, dict)) if isinstance(infos, list) else None
        else:
            value = get_path(document, path)
        if kind == "real" and isinstance(value, bool):
            value = None
        if value is not None and value != [] and value != {}:
            row[column] = value
    if "TimeGenerated" not in row:  # no alert time, and processed_at projected away: ingestion time
        row["TimeGenerated"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return row


def named_sensitive_info(document: dict[str, Any]) -> Any:
    """The alert's sensitive types, each named: its own name, else the name the sensitive_info
    enrichment gave its type id (the bundled table of built-in types, the config or the tenant's list)."""
    infos = get_path(document, "alert.sensitive_info")
    types = get_path(document, "enrichments.sensitive_info.types")
    if not isinstance(infos, list) or not isinstance(types, list):
        return infos
    names = {str(t["type_id"]).lower(): t["name"] for t in types if isinstance(t, dict) and t.get("type_id") and isinstance(t.get("name"), str)}
    return [
        {**info, "name": names.get(str(info.get("type_id") or "").lower())} if isinstance(info, dict) and not info.get("name") and info.get("type_id") else info
        for info in infos
    ]


def table_schema() -> dict[str, Any]:
    """The ARM/REST body of the custom table (PUT .../tables/DLPEnrichedAlerts_CL)."""
    return {
        "properties": {
            "schema": {
                "name": TABLE,
                "columns": [{"name": name, "type": kind} for name, kind, _ in COLUMNS],
            },
            "retentionInDays": 90,
            "totalRetentionInDays": 365,
        }
    }


def stream_columns() -> list[dict[str, str]]:
    """The DCR stream declaration's columns (same names and types as the table)."""
    return [{"name": name, "type": kind} for name, kind, _ in COLUMNS]
