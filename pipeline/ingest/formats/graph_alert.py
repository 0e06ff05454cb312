"""Microsoft Graph security alerts (alerts_v2, `microsoft.graph.security.alert`), alone or in incidents.

A Graph incident (`microsoft.graph.security.incident`, read with `$expand=alerts`) is an envelope:
a body that is one incident, or a list or `{"value": [...]}` page of incidents (Graph alerts may sit
beside them), is unpacked into its alerts. Each alert is a row of its own (skipped, rejected and
limited alone) and carries its incident: `incidentId` is the incident's id (or, for an incident
merged into another, its `redirectIncidentId`), and the incident's `incidentWebUrl` (not a merged
one's) and `tenantId` fill the alert's when it has none. A rejected alert is stored with
them, so that it replays alone as the same alert.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import DecodeError
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


def looks_like_incident(value: Any) -> bool:
    """A Graph security incident: typed so by `@odata.type`, or an object with an id and incident
    fields (`incidentWebUrl`, `redirectIncidentId`, `displayName`) and an `alerts` list that is not an alert."""
    if not isinstance(value, dict):
        return False
    odata = value.get("@odata.type")
    if isinstance(odata, str):
        return odata.endswith("security.incident")
    return (
        "id" in value
        and isinstance(value.get("alerts"), list)
        and any(key in value for key in ("incidentWebUrl", "redirectIncidentId", "displayName"))
        and not looks_like(value)
    )


_INCIDENT_FILLS = ("incidentWebUrl", "tenantId")  # the incident's, where its alert has none


def incident_alerts(incident: dict[str, Any]) -> list[Any]:
    """The alerts of one incident, each a copy carrying the incident's id (and URL and tenant where
    it has none). DecodeError for an incident read without its alerts."""
    alerts = incident.get("alerts")
    if not isinstance(alerts, list):
        raise DecodeError("unrecognised_shape", "a Graph incident without its alerts: read incidents with $expand=alerts")
    # A merged incident (status "redirected") names the incident its alerts now belong to.
    redirected_to = c.text(incident.get("redirectIncidentId"))
    incident_id = redirected_to or c.text(incident.get("id"))
    fills = ("tenantId",) if redirected_to else _INCIDENT_FILLS  # the old incident's page is not the alert's
    rows: list[Any] = []
    for alert in alerts:
        if not isinstance(alert, dict):
            rows.append(alert)  # rejected as a row of its own
            continue
        row = dict(alert)
        if incident_id is not None:
            row["incidentId"] = incident_id
        for key in fills:
            if not c.text(row.get(key)) and c.text(incident.get(key)):
                row[key] = incident[key]
        rows.append(row)
    return rows


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
    """Graph alerts, one record each, and incidents as envelopes of their alerts (module docstring);
    the evidence counted against the limit is `evidence`."""

    name: SourceFormat = "graph_alert"

    def envelope_rows(self, body: Any) -> list[Any] | None:
        """The alerts of a body holding Graph incidents (each alert with its incident, see
        `incident_alerts`); None for a body without one, or holding anything but incidents and Graph alerts."""
        if isinstance(body, dict):
            items = body["value"] if isinstance(body.get("value"), list) else [body]
        elif isinstance(body, list):
            items = body
        else:
            return None
        if not any(looks_like_incident(item) for item in items):
            return None
        if not all(looks_like_incident(item) or (isinstance(item, dict) and looks_like(item)) for item in items):
            return None
        rows: list[Any] = []
        for item in items:
            if looks_like_incident(item):
                rows.extend(incident_alerts(item))
            else:
                rows.append(item)
        return rows

    owns_record = staticmethod(looks_like)

    def decode(self, record: Any, out: RecordOutput) -> None:
        if not isinstance(record, dict) or not looks_like(record):  # an incident's `alerts` entry that is no alert
            out.reject("unrecognised_record", "an entry of an incident's alerts is not a Graph alert")
        elif not is_dlp(record):
            out.skip()
        elif out.within_evidence_limit(len(c.as_list(record.get("evidence"))), "evidence items"):
            out.alert(to_alert(record))


register(GraphAlertDecoder())
