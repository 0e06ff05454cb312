"""The enrichment on the Microsoft Sentinel incident that mirrors the Defender XDR incident, through
the Microsoft.SecurityInsights REST API (api-version 2025-09-01, plain httpx, azure-identity token).

For each record:
1. the Defender incident id (the alert's `incident_id`, else `alerts_v2/{id}.incidentId` through
   Graph, as defender_incident does);
2. the Sentinel incident: `GET {workspace}/providers/Microsoft.SecurityInsights/incidents` with
   `$filter=properties/providerIncidentId eq '<id>'`; the answer is checked (provider id, and
   provider "Microsoft 365 Defender" or "Microsoft Defender XDR"), never trusted; remembered;
3. labels: `GET` the incident with its `etag`, merge the configured labels into the existing ones,
   `PUT` the whole incident (title, severity and status are required) with that etag; a 409 (newer
   version exists) reads it again, merges again and retries, up to `max_conflict_retries` times;
   skipped when every label is already there;
4. the comment: `PUT …/comments/{id}` with an id derived from the record id (uuid5), so a re-run
   updates the same comment instead of adding one; at most 30,000 characters (cut, the marker kept);
   not written when the incident already holds 100 comments (Sentinel's limit) and this one is not
   among them, nor when the same comment already says the same.
Role: Microsoft Sentinel Responder on the workspace (infra/). 408/429/5xx retryable with Retry-After;
401/403/404 and other 4xx rejected with a reason saying what to do.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
from pydantic import Field

from pipeline.config import StrictModel
from pipeline.deliver.minimise import alert_key, record_document
from pipeline.deliver.sinks import Outcome
from pipeline.deliver.sinks.itsm import CallBudget, KeyLocks, TicketError, TicketMemory, check_url, not_documented, upsert_each
from pipeline.deliver.sinks.writeback import (
    DEFAULT_TAGS,
    GRANT_DOCS,
    AlertIncidents,
    BearerToken,
    TagRule,
    alert_lookup_check,
    answer,
    answer_object,
    bounded,
    comment_id,
    doctor_client,
    is_list,
    marker,
    merge_tags,
    read_one,
    render_tags,
    send,
    status_text,
)
from pipeline.deliver.summary import SummarySettings, render_text
from pipeline.errors import is_retryable_status
from pipeline.plugins import shared_credential

if TYPE_CHECKING:
    from pipeline.doctor import Check

log = logging.getLogger("pipeline.deliver.sinks.sentinel_incident")

API_VERSION = "2025-09-01"
ARM_URL = "https://management.azure.com"
ARM_SCOPE = "https://management.azure.com/.default"
ROLE = "the Microsoft Sentinel Responder role on the workspace"
MAX_COMMENT_CHARS = 30_000
MAX_COMMENTS = 100
# Incident properties a PUT may carry (the rest are read-only: number, additionalData, times, provider).
WRITABLE = ("title", "description", "severity", "status", "classification", "classificationReason", "classificationComment", "owner", "firstActivityTimeUtc", "lastActivityTimeUtc")


class SentinelIncidentSink:
    class Settings(StrictModel):
        workspace_resource_id: str = Field(
            pattern=r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.OperationalInsights/workspaces/[^/]+$",
            description="/subscriptions/<id>/resourceGroups/<rg>/providers/Microsoft.OperationalInsights/workspaces/<name>",
        )
        arm_url: str = Field(ARM_URL, description="Azure Resource Manager (national clouds: https://management.usgovcloudapi.net, ...; a local server in tests)")
        scope: str = Field(ARM_SCOPE, description="token scope for arm_url")
        api_version: str = Field(API_VERSION, pattern=r"^\d{4}-\d{2}-\d{2}(-preview)?$")
        graph_url: str = Field("https://graph.microsoft.com/v1.0", description="for the alert → incident lookup of rows without an incident id")
        graph_scope: str = Field("https://graph.microsoft.com/.default")
        provider_names: list[str] = Field(default_factory=lambda: ["Microsoft 365 Defender", "Microsoft Defender XDR"], description="providers of the mirrored incident")
        managed_identity_client_id: str | None = None
        labels: list[TagRule] = Field(default_factory=lambda: [TagRule(**t) for t in DEFAULT_TAGS], description="labels to add (templates)")
        comment: bool = Field(True, description="write one comment per alert revision with the enrichment summary")
        summary: SummarySettings = Field(default_factory=SummarySettings)
        max_comment_chars: int = Field(MAX_COMMENT_CHARS, ge=200, le=MAX_COMMENT_CHARS)
        max_conflict_retries: int = Field(3, ge=0, le=10, description="re-reads after a 409 (someone else changed the incident)")
        max_list_pages: int = Field(5, ge=1, le=100, description="pages of the incident list searched when the filter is not applied")
        timeout_seconds: float = Field(15.0, gt=0)
        ca_bundle: str | None = None

    @classmethod
    async def doctor(cls, settings: SentinelIncidentSink.Settings, services: Any) -> list[Any]:
        """A token for `scope`, then one documented list call of one item:
        `GET {arm_url}{workspace}/providers/Microsoft.SecurityInsights/incidents?api-version=…&$top=1`;
        a token for `graph_scope`, then `GET {graph_url}/security/alerts_v2?$top=1` (the lookup of
        rows without an incident id, SecurityAlert.Read.All). Nothing is written, so the incident
        read proves read access only: the ok line says the sink needs Microsoft Sentinel Responder."""
        from pipeline.doctor import Check, token_check

        try:
            arm = check_url(settings.arm_url, "arm_url")
            graph = check_url(settings.graph_url, "graph_url")
        except ValueError as exc:
            return [Check.failed("settings", str(exc), "use an https:// URL, or remove the setting (the default is the public cloud's)")]
        credential = shared_credential(services, settings.managed_identity_client_id)
        arm_token = await token_check("Resource Manager token", credential, settings.scope)
        graph_token = await token_check("Graph token", credential, settings.graph_scope)
        async with doctor_client(settings.timeout_seconds, settings.ca_bundle) as client:
            if arm_token.status == "ok":
                read = await _incident_read_check(settings, client, credential, arm)
            else:
                read = Check.skipped("incident read", "no Resource Manager token")
            if graph_token.status == "ok":
                lookup = await alert_lookup_check(client, credential, scope=settings.graph_scope, base=graph)
            else:
                lookup = Check.skipped("alert lookup", "no Graph token")
        return [arm_token, read, graph_token, lookup]

    def __init__(self, settings: SentinelIncidentSink.Settings, services: Any, *, credential: Any = None) -> None:
        """`credential`: one to use instead of the services' shared one (tests); not closed by the sink."""
        self.settings = settings
        base = check_url(settings.arm_url, "arm_url")
        self.incidents_url = f"{base}{settings.workspace_resource_id}/providers/Microsoft.SecurityInsights/incidents"
        credential = credential if credential is not None else shared_credential(services, settings.managed_identity_client_id)
        self.token = BearerToken(credential, settings.scope)
        self.graph_token = BearerToken(credential, settings.graph_scope)
        self.client = httpx.AsyncClient(timeout=settings.timeout_seconds, verify=settings.ca_bundle or True, headers={"Accept": "application/json"})
        self._lookup = AlertIncidents(check_url(settings.graph_url, "graph_url"), self._graph_request)
        self._locks = KeyLocks()
        self._incident_locks = KeyLocks()
        self._written = TicketMemory()  # alert key → Sentinel incident name and the record last written
        self._names = TicketMemory()  # Defender incident id → Sentinel incident name

    async def publish(self, records: Sequence[Any]) -> list[Outcome]:
        return await upsert_each(records, self._write, locks=self._locks, name="sentinel_incident")

    async def _write(self, record: Any, _budget: CallBudget) -> None:  # under the alert's lock; a retry by upsert_each starts over with the read
        key = alert_key(record)
        if self._written.delivered(key, record.record_id):
            return
        name = self._written.ticket(key) or await self._incident_name(await self._lookup.incident_of(record))
        document = record_document(record)
        async with self._incident_locks.hold(name):
            added = await self._label(name, render_tags(self.settings.labels, document))
            commented = await self._comment(name, record, document) if self.settings.comment else "off"
        self._written.remember(key, name, record.record_id)
        log.info("sentinel_incident: incident %s: %d label(s) added, comment %s", name, added, commented)

    async def _incident_name(self, provider_incident_id: str) -> str:
        known = self._names.ticket(provider_incident_id)
        if known is not None:
            return known
        params: dict[str, str] | None = {"api-version": self.settings.api_version, "$filter": f"properties/providerIncidentId eq '{provider_incident_id.replace(chr(39), chr(39) * 2)}'", "$top": "50"}
        url: str | None = self.incidents_url
        for _ in range(self.settings.max_list_pages):
            if url is None:
                break
            page = answer_object(await self._request("GET", url, params=params), ok=(200,), action="find Sentinel incident", permission=ROLE)
            for incident in page.get("value") or []:
                properties = (incident.get("properties") or {}) if isinstance(incident, dict) else {}
                if str(properties.get("providerIncidentId")) == provider_incident_id and properties.get("providerName") in self.settings.provider_names:
                    if not isinstance(incident.get("name"), str):
                        raise not_documented("find Sentinel incident")
                    self._names.remember(provider_incident_id, incident["name"], None)
                    return str(incident["name"])
            url, params = page.get("nextLink"), None
        raise TicketError(Outcome.retryable(f"no Sentinel incident mirrors Defender incident {provider_incident_id} yet (is the Defender XDR connector on?)", 60.0))

    async def _label(self, name: str, wanted: list[str]) -> int:
        """Merge `wanted` into the incident's labels; the number added."""
        url = f"{self.incidents_url}/{quote(name, safe='')}"
        for attempt in range(self.settings.max_conflict_retries + 1):
            incident = answer_object(await self._request("GET", url, params=self._version), ok=(200,), action="read Sentinel incident", permission=ROLE)
            properties = incident.get("properties") or {}
            existing = [label["labelName"] for label in properties.get("labels") or [] if isinstance(label, dict) and label.get("labelName")]
            labels = merge_tags(existing, wanted)
            if labels == existing:
                return 0
            body = {
                "etag": incident.get("etag"),
                "properties": {**{k: properties[k] for k in WRITABLE if properties.get(k) is not None}, "labels": [{"labelName": label} for label in labels]},
            }
            response = await self._request("PUT", url, params=self._version, json=body)
            if response.status_code == 409 and attempt < self.settings.max_conflict_retries:
                log.debug("sentinel_incident: incident %s changed meanwhile (409), reading it again", name)
                continue
            if response.status_code == 409:
                raise TicketError(Outcome.retryable(f"update Sentinel incident: still changing after {attempt + 1} tries (HTTP 409)"))
            answer(response, ok=(200, 201), action="update Sentinel incident", permission=ROLE)
            return len(labels) - len(existing)
        return 0  # not reached: the last attempt returns or raises

    async def _comment(self, name: str, record: Any, document: dict[str, Any]) -> str:
        text = bounded(render_text(document, record_id=record.record_id, settings=self.settings.summary), self.settings.max_comment_chars, marker(record.record_id))
        comments_url = f"{self.incidents_url}/{quote(name, safe='')}/comments"
        ours = comment_id(record.record_id)
        comments: list[dict[str, Any]] = []
        url: str | None = comments_url
        params: dict[str, str] | None = self._version
        while url is not None and len(comments) <= MAX_COMMENTS:  # every page (at most 100 comments exist)
            page = answer_object(await self._request("GET", url, params=params), ok=(200,), action="list incident comments", permission=ROLE)
            comments.extend(c for c in page.get("value") or [] if isinstance(c, dict))
            url, params = page.get("nextLink"), None
        mine = next((c for c in comments if c.get("name") == ours), None)
        if mine is not None and (mine.get("properties") or {}).get("message") == text:
            return "already there"
        if mine is None and len(comments) >= MAX_COMMENTS:
            log.warning("sentinel_incident: incident %s holds %d comments (the limit): no comment added", name, MAX_COMMENTS)
            return "skipped (100 comments)"
        answer(
            await self._request("PUT", f"{comments_url}/{ours}", params=self._version, json={"properties": {"message": text}}),
            ok=(200, 201), action="comment on Sentinel incident", permission=ROLE,
        )
        return "written"

    @property
    def _version(self) -> dict[str, str]:
        return {"api-version": self.settings.api_version}

    async def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return await send(self.client, self.token, method, url, **kwargs)

    async def _graph_request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return await send(self.client, self.graph_token, method, url, **kwargs)

    async def aclose(self) -> None:
        await self.client.aclose()


async def _incident_read_check(settings: SentinelIncidentSink.Settings, client: httpx.AsyncClient, credential: Any, arm: str) -> Check:
    """Incidents - List with `$top=1` as a check: 200 ok (read access only); 401 a refused token; 403
    no role on the workspace; 404 no workspace, or no Sentinel on it; 400 an api_version refused."""
    from pipeline.doctor import ROLE_DELAY, Check

    name = "incident read"
    workspace = settings.workspace_resource_id.rsplit("/", 1)[-1]
    url = f"{arm}{settings.workspace_resource_id}/providers/Microsoft.SecurityInsights/incidents"
    try:
        response = await read_one(client, credential, settings.scope, url, {"api-version": settings.api_version, "$top": "1"})
    except httpx.HTTPError as exc:
        return Check.failed(name, f"cannot reach {arm} ({type(exc).__name__})", "check arm_url, DNS, proxy and firewall rules (the app needs outbound HTTPS to Azure Resource Manager)")
    status, shown = response.status_code, status_text(response)
    if status == 200 and is_list(response):
        return Check.ok(name, f"incidents of workspace {workspace} readable; the sink also writes labels and comments, which needs {ROLE}: a read cannot prove it (Microsoft Sentinel Reader passes this check)")
    if status == 401:
        return Check.failed(name, f"token refused ({shown}): wrong tenant or audience", f"check that scope ({settings.scope}) is the .default of arm_url, and the identity's tenant")
    if status == 403:
        return Check.failed(name, f"cannot read the incidents of workspace {workspace} ({shown})", f"give the identity {ROLE} ({GRANT_DOCS}); {ROLE_DELAY}")
    if status == 404:
        return Check.failed(name, f"no workspace at workspace_resource_id, or Microsoft Sentinel is not onboarded on it ({shown})",
                            "check the subscription, resource group and workspace name in workspace_resource_id, and that Microsoft Sentinel is added to that workspace")
    if status == 400 and "ApiVersion" in shown:
        return Check.failed(name, f"api_version {settings.api_version} refused ({shown})", f"remove api_version (the default: {API_VERSION}), or set a version the provider lists")
    if is_retryable_status(status):
        return Check.failed(name, f"{shown}: Resource Manager is busy or down", "run the doctor again in a few minutes")
    if status == 200:
        return Check.failed(name, "HTTP 200 but not a list of incidents", "check that arm_url is Azure Resource Manager")
    return Check.failed(name, shown, "check workspace_resource_id, and that Microsoft Sentinel is added to that workspace")
