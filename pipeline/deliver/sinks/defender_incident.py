"""The enrichment on the Defender XDR incident, through the Microsoft Graph security API v1.0: custom
tags the incident queue filters on, and one comment per alert revision with the enrichment summary.

For each record:
1. the incident id: the alert's `incident_id` (Graph alerts carry it); for Streaming API rows, which
   do not, `GET /security/alerts_v2/{alert id}` → `incidentId` (remembered);
2. `GET /security/incidents/{id}`: its `customTags` and `comments`;
3. `PATCH /security/incidents/{id}` with `customTags` = the existing tags plus the configured ones
   (the property replaces the list: tags others set are kept by reading first), and the fields of
   the first matching `updates` rule (`assignedTo`, `status`, `classification`, `determination`);
   skipped when nothing would change;
4. `POST /security/incidents/{id}/comments` with the summary, ending with the line
   `[dlp-pipeline record <record id>]`; skipped when a comment of the incident already carries it.
The API has no ETag for incidents: writes to one incident are serialised within the process, and
the read-merge-write keeps others' tags unless they write between our read and our write.
Auth: an azure-identity token for `scope` (the runner's shared credential). Permissions:
SecurityIncident.ReadWrite.All, and SecurityAlert.Read.All for the alert lookup (docs/deploy.md).
408/429/5xx are retryable with Retry-After; 401/403/404 and other 4xx are rejected with a reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal
from urllib.parse import quote

import httpx
from pydantic import Field

from pipeline.config import StrictModel
from pipeline.deliver.minimise import alert_key, record_document
from pipeline.deliver.sinks import Outcome
from pipeline.deliver.sinks.itsm import CallBudget, KeyLocks, TicketMemory, check_url, upsert_each
from pipeline.deliver.sinks.writeback import (
    DEFAULT_TAGS,
    AlertIncidents,
    BearerToken,
    TagRule,
    alert_lookup_check,
    answer,
    answer_object,
    bounded,
    doctor_client,
    graph_read_check,
    marker,
    merge_tags,
    render_tags,
    send,
)
from pipeline.deliver.summary import SummarySettings, render_text
from pipeline.plugins import shared_credential

log = logging.getLogger("pipeline.deliver.sinks.defender_incident")

GRAPH_URL = "https://graph.microsoft.com/v1.0"
GRAPH_SCOPE = "https://graph.microsoft.com/.default"
INCIDENT_PERMISSION = "SecurityIncident.ReadWrite.All"
INCIDENT_READ_PERMISSION = "SecurityIncident.Read.All"


class IncidentUpdate(StrictModel):
    """Fields set on the incident when the alert's triage band is one of `when_band` (every band when empty)."""

    when_band: list[Literal["low", "medium", "high"]] = Field(default_factory=list)
    assigned_to: str | None = Field(None, description="a user principal name")
    status: Literal["active", "resolved", "inProgress", "redirected"] | None = None
    classification: Literal["unknown", "falsePositive", "truePositive", "informationalExpectedActivity"] | None = None
    determination: str | None = Field(None, max_length=64, description="e.g. \"multiStagedAttack\", \"other\"")

    def fields(self) -> dict[str, str]:
        values = {"assignedTo": self.assigned_to, "status": self.status, "classification": self.classification, "determination": self.determination}
        return {k: v for k, v in values.items() if v is not None}


class DefenderIncidentSink:
    class Settings(StrictModel):
        graph_url: str = Field(GRAPH_URL, description="Graph base URL (national clouds: https://graph.microsoft.us/v1.0, ...; a local server in tests)")
        scope: str = Field(GRAPH_SCOPE, description="token scope (national clouds: https://graph.microsoft.us/.default, ...)")
        managed_identity_client_id: str | None = Field(None, description="user-assigned managed identity (else the shared credential)")
        tags: list[TagRule] = Field(default_factory=lambda: [TagRule(**t) for t in DEFAULT_TAGS], description="custom tags to add (templates)")
        comment: bool = Field(True, description="add one comment per alert revision with the enrichment summary")
        summary: SummarySettings = Field(default_factory=SummarySettings)
        max_comment_chars: int = Field(10_000, ge=200, le=30_000, description="a longer summary is cut (the record marker is kept)")
        updates: list[IncidentUpdate] = Field(default_factory=list, description="the first rule whose when_band matches sets its fields")
        timeout_seconds: float = Field(15.0, gt=0)
        ca_bundle: str | None = None

    @classmethod
    async def doctor(cls, settings: DefenderIncidentSink.Settings, services: Any) -> list[Any]:
        """A Graph token for `scope`, then two documented list calls of one item each:
        `GET /security/incidents?$top=1` (SecurityIncident.Read.All or .ReadWrite.All) and
        `GET /security/alerts_v2?$top=1` (SecurityAlert.Read.All, the lookup of rows without an
        incident id). Nothing is written, so the reads prove read access only: the ok line says
        that the sink needs SecurityIncident.ReadWrite.All."""
        from pipeline.doctor import Check, token_check

        try:
            base = check_url(settings.graph_url, "graph_url")
        except ValueError as exc:
            return [Check.failed("settings", str(exc), "set graph_url to Graph's https:// URL, or remove it (the default: https://graph.microsoft.com/v1.0)")]
        credential = shared_credential(services, settings.managed_identity_client_id)
        token = await token_check("Graph token", credential, settings.scope)
        if token.status != "ok":
            return [token, Check.skipped("incident read", "no Graph token"), Check.skipped("alert lookup", "no Graph token")]
        async with doctor_client(settings.timeout_seconds, settings.ca_bundle) as client:
            incidents = await graph_read_check(
                "incident read", client, credential, scope=settings.scope, base=base, collection="incidents",
                missing=f"the identity lacks the application permission {INCIDENT_PERMISSION} ({INCIDENT_READ_PERMISSION} would pass this read, but the sink updates incidents and comments on them)",
                ok=f"incidents readable; the sink also updates incidents and comments on them, which needs {INCIDENT_PERMISSION}: a read cannot prove it ({INCIDENT_READ_PERMISSION} passes this check)",
            )
            alerts = await alert_lookup_check(client, credential, scope=settings.scope, base=base)
        return [token, incidents, alerts]

    def __init__(self, settings: DefenderIncidentSink.Settings, services: Any, *, credential: Any = None) -> None:
        """`credential`: one to use instead of the services' shared one (tests); not closed by the sink."""
        self.settings = settings
        self.base = check_url(settings.graph_url, "graph_url")
        self.token = BearerToken(credential if credential is not None else shared_credential(services, settings.managed_identity_client_id), settings.scope)
        self.client = httpx.AsyncClient(timeout=settings.timeout_seconds, verify=settings.ca_bundle or True, headers={"Accept": "application/json"})
        self._locks = KeyLocks()
        self._incident_locks = KeyLocks()
        self._incidents = TicketMemory()  # alert key → incident id and the record last written to it
        self._lookup = AlertIncidents(self.base, self._request)

    async def publish(self, records: Sequence[Any]) -> list[Outcome]:
        return await upsert_each(records, self._write, locks=self._locks, name="defender_incident")

    async def _write(self, record: Any, _budget: CallBudget) -> None:  # under the alert's lock; a retry by upsert_each starts over with the read
        key = alert_key(record)
        if self._incidents.delivered(key, record.record_id):
            return  # this very record is on its incident already (a redelivered batch)
        incident_id = self._incidents.ticket(key) or await self._lookup.incident_of(record)
        async with self._incident_locks.hold(incident_id):
            document = record_document(record)
            url = f"{self.base}/security/incidents/{quote(incident_id, safe='')}"
            incident = answer_object(await self._request("GET", url), ok=(200,), action="read incident", permission=INCIDENT_PERMISSION)
            existing = [t for t in incident.get("customTags") or [] if isinstance(t, str)]
            patch: dict[str, Any] = {}
            tags = merge_tags(existing, render_tags(self.settings.tags, document))
            if tags != existing:
                patch["customTags"] = tags
            for name, value in self._update_fields(document).items():
                if incident.get(name) != value:
                    patch[name] = value
            if patch:
                answer(await self._request("PATCH", url, json=patch), ok=(200, 204), action="update incident", permission=INCIDENT_PERMISSION)
            line = marker(record.record_id)
            written = any(line in (c.get("comment") or "") for c in incident.get("comments") or [] if isinstance(c, dict))
            if self.settings.comment and not written:
                text = bounded(render_text(document, record_id=record.record_id, settings=self.settings.summary), self.settings.max_comment_chars, line)
                body = {"@odata.type": "microsoft.graph.security.alertComment", "comment": text}
                answer(await self._request("POST", f"{url}/comments", json=body), ok=(200, 201), action="comment on incident", permission=INCIDENT_PERMISSION)
            self._incidents.remember(key, incident_id, record.record_id)
            log.info("defender_incident: incident %s: %d tag(s) added, %s", incident_id, len(tags) - len(existing), "comment already there" if written else "comment added" if self.settings.comment else "no comment")

    def _update_fields(self, document: dict[str, Any]) -> dict[str, str]:
        band = ((document.get("enrichments") or {}).get("triage") or {}).get("band")
        for rule in self.settings.updates:
            if not rule.when_band or band in rule.when_band:
                return rule.fields()
        return {}

    async def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return await send(self.client, self.token, method, url, **kwargs)

    async def aclose(self) -> None:
        await self.client.aclose()
