"""user_context: who the user is (directory / HR fields, manager) and whether they are leaving.

Sources, all optional, combined:
- Microsoft Graph (a `graph` table in the settings): `GET /users/{id or upn}?$select=<HR fields>&$expand=manager(...)`
  sent through JSON `$batch` (at most 20 requests each), with a token from azure-identity
  (managed identity / DefaultAzureCredential, scope https://graph.microsoft.com/.default);
  429/503 are retried honouring Retry-After, for the `$batch` call and for each inner request;
- a local users directory (`directory`): a JSON file of Graph-user-shaped objects (array, `{"value":
  [...]}` or JSON lines), the embedded default when Graph is not configured;
- an HR file (`hr.path`): a CSV in the layout of the Purview Insider Risk Management HR connector
  (EmailAddress, ResignationDate, LastWorkingDate, ...), reloaded when the file changes.

A user missing from every source gives `found: false` (state ok), not a failure. A source that is
down fails the enricher for that alert; the alert is still delivered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from pydantic import BaseModel, Field, model_validator

from enrichers._files import WatchedFile, parse_datetime, read_csv, read_json_records
from pipeline.enrich.batching import MicroBatcher
from pipeline.enrich.cache import CachePolicy, load_many
from pipeline.enrich.contract import BatchEnricher, EnrichmentContext
from pipeline.enrich.http import BearerToken, HttpClient, check_base_url
from pipeline.errors import EnricherUnavailable
from pipeline.models import DlpAlert
from pipeline.plugins import shared_credential
from pipeline.resilience.retry import parse_retry_after

if TYPE_CHECKING:
    from pipeline.doctor import Check

log = logging.getLogger("pipeline.enrichers.user_context")

GRAPH_SCOPE = "https://graph.microsoft.com/.default"
HR_FIELDS = (
    "id",
    "userPrincipalName",
    "displayName",
    "mail",
    "department",
    "jobTitle",
    "employeeType",
    "employeeHireDate",
    "employeeLeaveDateTime",
    "accountEnabled",
    "officeLocation",
    "companyName",
    "employeeOrgData",
)
MANAGER_FIELDS = ("id", "displayName", "userPrincipalName", "mail", "jobTitle")
GRAPH_BATCH_LIMIT = 20  # documented maximum of requests in one JSON $batch
#: The query of every user lookup (the doctor sends the same one): employeeLeaveDateTime needs
#: User-LifeCycleInfo.Read.All besides User.Read.All.
GRAPH_USER_QUERY = "$select=" + ",".join(HR_FIELDS) + "&$expand=manager($select=" + ",".join(MANAGER_FIELDS) + ")"


class GraphSettings(BaseModel):
    model_config = {"extra": "forbid"}

    url: str = Field("https://graph.microsoft.com/v1.0", description="Graph base URL (a local server in tests)")
    managed_identity_client_id: str | None = Field(None, description="user-assigned identity; else DefaultAzureCredential")
    scope: str = Field(GRAPH_SCOPE, description="token scope (national clouds: https://graph.microsoft.us/.default, ...)")
    batch_window_ms: float = Field(5.0, ge=0, le=1000, description="how long lookups are collected into one $batch")
    request_timeout_seconds: float = Field(5.0, gt=0)
    max_retries: int = Field(3, ge=0, le=10, description="retries of a throttled $batch or inner request")
    max_retry_after_seconds: float = Field(5.0, ge=0, description="a longer Retry-After fails the lookup instead of waiting")
    allow_private_hosts: list[str] = Field(default_factory=list, description="hosts allowed over http/private addresses (tests)")

    @model_validator(mode="after")
    def _https(self):
        check_base_url(self.url, self.allow_private_hosts)
        return self


class HrColumns(BaseModel):
    model_config = {"extra": "forbid"}

    email: str = "EmailAddress"
    resignation_date: str = "ResignationDate"
    last_working_date: str = "LastWorkingDate"


class HrSettings(BaseModel):
    model_config = {"extra": "forbid"}

    path: str = Field(description="CSV in the IRM HR connector layout, relative to the config file")
    columns: HrColumns = Field(default_factory=HrColumns)
    check_seconds: float = Field(5.0, ge=0, description="how often the file's size/mtime is checked")


class Manager(BaseModel):
    id: str | None = None
    display_name: str | None = None
    upn: str | None = None
    mail: str | None = None
    job_title: str | None = None


class UserContext(BaseModel):
    found: bool
    sources: list[str]
    display_name: str | None = None
    department: str | None = None
    job_title: str | None = None
    employee_type: str | None = None
    company_name: str | None = None
    office_location: str | None = None
    division: str | None = None
    cost_center: str | None = None
    account_enabled: bool | None = None
    hire_date: datetime | None = None
    leave_date: datetime | None = None
    manager: Manager | None = None
    resignation_date: datetime | None = None
    last_working_date: datetime | None = None
    departing: bool = False
    departed: bool = False
    days_until_departure: int | None = Field(None, description="from the alert's time to the last working day; negative once gone")


class UserContextEnricher(BatchEnricher["UserContextEnricher.Settings"]):
    name = "user_context"
    timeout = 10.0
    cache_policy = CachePolicy(ttl_seconds=900, max_entries=50_000)

    class Settings(BatchEnricher.Settings):
        graph: GraphSettings | None = Field(None, description="look users up in Microsoft Graph (`graph = {}` for the defaults)")
        directory: str | None = Field(None, description="local users file (Graph user JSON), used when graph is not configured")
        hr: HrSettings | None = None

    credential: Any = None  # an azure-core async credential; the services' shared one (start()) unless given

    def __init__(self, settings=None, services=None) -> None:
        super().__init__(settings, services)
        s = self.settings
        self._directory: WatchedFile[dict[str, dict[str, Any]]] | None = None
        self._hr: WatchedFile[dict[str, dict[str, Any]]] | None = None
        if s.directory and s.graph is None:
            path = services.input_path(s.directory) if services else Path(s.directory)
            self._directory = WatchedFile(path, _index_directory)
            self._directory.get()  # a missing or broken file is a start-up error
        if s.hr is not None:
            path = services.input_path(s.hr.path) if services else Path(s.hr.path)
            columns = s.hr.columns
            self._hr = WatchedFile(path, lambda data: _index_hr(data, columns), check_seconds=s.hr.check_seconds)
            self._hr.get()
        self._http: HttpClient | None = None
        self._token: BearerToken | None = None
        self._batcher: MicroBatcher[str, dict[str, Any] | None] | None = None
        self.batch_requests = 0  # $batch calls sent (retries included)

    async def start(self) -> None:
        if self.settings.graph is None or self._http is not None:
            return
        g = self.settings.graph
        if self.credential is None:
            self.credential = shared_credential(self.services, g.managed_identity_client_id)
        self._token = BearerToken(self.credential, g.scope)
        self._http = HttpClient(
            timeout=g.request_timeout_seconds,
            total_seconds=min(self.timeout, g.request_timeout_seconds * (g.max_retries + 1)),
            max_retries=g.max_retries,
            max_retry_after=g.max_retry_after_seconds,
            allow_private_hosts=g.allow_private_hosts,
        )
        self._batcher = MicroBatcher(self._fetch_graph, max_size=GRAPH_BATCH_LIMIT, window_seconds=g.batch_window_ms / 1000)

    async def aclose(self) -> None:
        if self._batcher is not None:
            await self._batcher.aclose()
        if self._http is not None:
            await self._http.aclose()

    @classmethod
    async def doctor(cls, settings: UserContextEnricher.Settings, services: Any) -> list[Check]:
        """The users file and the HR file (readable, in the expected columns); Graph: a token and one
        user looked up with the enricher's own `$select` (which permission is missing, on a 403)."""
        from pipeline.doctor import csv_columns_check, input_file_check

        checks: list[Check] = []
        if settings.directory and settings.graph is None:
            checks.append(input_file_check("users file", services.input_path(settings.directory), _describe_directory))
        if settings.hr is not None:
            columns = settings.hr.columns
            expected = {"hr.columns.email": columns.email, "hr.columns.resignation_date": columns.resignation_date, "hr.columns.last_working_date": columns.last_working_date}
            checks.append(csv_columns_check("HR file", services.input_path(settings.hr.path), expected))
        if settings.graph is not None:
            checks += await _graph_checks(settings.graph, services)
        return checks

    # -- the contract --------------------------------------------------------------------------

    async def enrich_batch(self, alerts: list[DlpAlert], contexts: list[EnrichmentContext]) -> list[UserContext | None | Exception]:
        """Every distinct user of the batch is looked up once (ceil(M/20) Graph `$batch` calls for M
        users not cached yet); an alert whose lookup failed gets that failure, the others go on."""
        cache = contexts[0].cache if contexts else None
        keys = [_user_key(alert) for alert in alerts]
        users: dict[str, Any] = {}
        if self._batcher is not None or self._directory is not None:
            users = await load_many(cache, (key for key in keys if key is not None), self._lookup_directory, timeout=self.lookup_timeout)
            # Not found by object id: try the UPN the alert also names.
            fallback = [alert.user.upn for alert, key in zip(alerts, keys) if key is not None and users[key] is None and alert.user and alert.user.upn and key != alert.user.upn]
            if fallback:
                users.update((f"upn:{upn}", value) for upn, value in (await load_many(cache, fallback, self._lookup_directory, timeout=self.lookup_timeout)).items())
        results: list[UserContext | None | Exception] = []
        # Alerts of one user on one day get the same fragment: made once per batch and shared
        # (fragments are read-only), keyed by what it is made of.
        made: dict[tuple[str, str | None, date], UserContext] = {}
        for alert, key, ctx in zip(alerts, keys, contexts):
            if key is None:
                results.append(None)
                continue
            upn_key = alert.user.upn if alert.user else None
            user = users.get(key)
            if user is None and upn_key:
                user = users.get(f"upn:{upn_key}")
            if isinstance(user, Exception):
                results.append(user)
                continue
            sources = ["graph" if self._batcher is not None else "directory"] if user is not None else []
            hr = None
            if self._hr is not None:
                upn = upn_key or (str(user.get("userPrincipalName") or "").lower() if user else None)
                hr = self._hr.get().get(upn) if upn else None
                if hr is not None:
                    sources.append("hr")
            at = _alert_time(alert, ctx)
            made_key = (key, upn_key, at.date())  # the user, and so the HR row, follow from the two keys in a batch
            fragment = made.get(made_key)
            if fragment is None:
                fragment = made[made_key] = _fragment(user, hr, sources, at)
            results.append(fragment)
        return results

    # -- sources -------------------------------------------------------------------------------

    async def _lookup_directory(self, key: str) -> dict[str, Any] | None:
        if self._batcher is not None:
            return await self._batcher.load(key)
        assert self._directory is not None
        return self._directory.get().get(key.lower())

    async def _fetch_graph(self, keys: list[str]) -> dict[str, Any]:
        """One `$batch` of at most 20 user lookups; throttled inner requests are sent again."""
        g = self.settings.graph
        assert self._http is not None and self._token is not None and g is not None  # only called with a [graph] table
        query = GRAPH_USER_QUERY
        results: dict[str, Any] = {}
        todo = list(keys)
        deadline = time.monotonic() + self.timeout
        for attempt in range(g.max_retries + 1):
            ids = {str(i): key for i, key in enumerate(todo, 1)}
            body = {"requests": [{"id": i, "method": "GET", "url": f"/users/{quote(key, safe='@')}?{query}"} for i, key in ids.items()]}
            self.batch_requests += 1
            payload = await self._http.json("POST", g.url.rstrip("/") + "/$batch", json=body, headers=await self._token.headers())
            responses = payload.get("responses") if isinstance(payload, dict) else None
            if not isinstance(responses, list):
                raise EnricherUnavailable("Graph $batch: malformed response (no 'responses' array)")
            retry: list[str] = []
            waits: list[float] = []
            seen: set[str] = set()
            for item in responses:
                if not isinstance(item, dict) or str(item.get("id")) not in ids:
                    continue
                request_id = str(item["id"])
                seen.add(request_id)
                key = ids[request_id]
                status = item.get("status")
                inner = item.get("body")
                if status == 200 and isinstance(inner, dict):
                    results[key] = inner
                elif status == 404:
                    results[key] = None  # not in the directory: found=false, not a failure
                elif status in (429, 503):
                    retry.append(key)
                    headers = nested if isinstance(nested := item.get("headers"), dict) else {}
                    wait = parse_retry_after(next((v for k, v in headers.items() if k.lower() == "retry-after"), None))
                    waits.append(min(0.5 * 2**attempt, 4.0) if wait is None else wait)
                else:
                    results[key] = EnricherUnavailable(f"Graph user lookup: HTTP {status}")
            for request_id, key in ids.items():
                if request_id not in seen:
                    results[key] = EnricherUnavailable("Graph $batch: no response for a request")
            if not retry:
                return results
            wait = max(waits)
            if attempt == g.max_retries or wait > g.max_retry_after_seconds or time.monotonic() + wait >= deadline:
                for key in retry:
                    results[key] = EnricherUnavailable(f"Graph user lookup throttled; retry after {wait:g}s does not fit")
                return results
            log.debug("Graph $batch: %d inner request(s) throttled, retrying in %.2fs", len(retry), wait)
            await asyncio.sleep(wait)
            todo = retry
        return results


def _describe_directory(data: bytes) -> str:
    users = read_json_records(data)
    keyed = [user for user in users if any(isinstance(user.get(f), str) and user.get(f) for f in ("id", "userPrincipalName", "mail"))]
    if not keyed:
        raise ValueError(f"{len(users)} records, none with id, userPrincipalName or mail (Graph user objects expected)")
    return f"{len(keyed)} users"


async def _graph_checks(g: GraphSettings, services: Any) -> list[Check]:
    """Token, then `GET /users?$top=1&$select=id` (User.Read.All), then that user with GRAPH_USER_QUERY
    (User-LifeCycleInfo.Read.All for employeeLeaveDateTime). Reads only."""
    import httpx

    from pipeline.doctor import ROLE_DELAY, Check, token_check

    credential = shared_credential(services, g.managed_identity_client_id)
    token = await token_check("Graph token", credential, g.scope)
    if token.status != "ok":
        return [token, Check.skipped("Graph user lookup", "no token")]
    grant = f"grant the application permission in Entra ID (App registrations or Enterprise applications > API permissions), then admin consent; {ROLE_DELAY}"
    base = g.url.rstrip("/")
    headers = {"Authorization": f"Bearer {(await credential.get_token(g.scope)).token}", "Accept": "application/json"}
    async with httpx.AsyncClient(timeout=g.request_timeout_seconds) as client:
        try:
            listed = await client.get(f"{base}/users", params={"$top": "1", "$select": "id"}, headers=headers)
            if listed.status_code in (401, 403):
                why = "token refused (HTTP 401): wrong tenant or audience" if listed.status_code == 401 else "HTTP 403 listing users: User.Read.All is missing"
                return [token, Check.failed("Graph user lookup", why, grant if listed.status_code == 403 else f"check the scope ({g.scope}) and the tenant of the identity")]
            if listed.status_code != 200:
                return [token, Check.failed("Graph user lookup", f"HTTP {listed.status_code} listing users", f"check the Graph URL ({base})")]
            users = listed.json().get("value") or []
            if not users or not isinstance(users[0], dict) or not users[0].get("id"):
                return [token, Check.skipped("Graph user lookup", "the directory returned no user to look up")]
            user = await client.get(f"{base}/users/{quote(str(users[0]['id']), safe='@')}?{GRAPH_USER_QUERY}", headers=headers)
        except httpx.HTTPError as exc:
            return [token, Check.failed("Graph user lookup", f"cannot reach {base} ({type(exc).__name__})", "check the Graph URL, DNS, proxy and firewall rules")]
    if user.status_code == 403:
        why = "HTTP 403 reading a user with the enricher's $select: User-LifeCycleInfo.Read.All is missing (employeeLeaveDateTime)"
        return [token, Check.failed("Graph user lookup", why, grant)]
    if user.status_code != 200:
        return [token, Check.failed("Graph user lookup", f"HTTP {user.status_code} reading one user", f"check the Graph URL ({base})")]
    return [token, Check.ok("Graph user lookup", f"one user read with the enricher's $select ({len(HR_FIELDS)} fields, manager expanded)")]


def _user_key(alert: DlpAlert) -> str | None:
    if alert.user is None:
        return None
    return alert.user.object_id or alert.user.upn


def _alert_time(alert: DlpAlert, ctx: EnrichmentContext) -> datetime:
    when = alert.created_at or alert.last_activity_at or alert.first_activity_at or ctx.now()
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _index_directory(data: bytes) -> dict[str, dict[str, Any]]:
    index: dict[str, dict[str, Any]] = {}
    for user in read_json_records(data):
        for field in ("id", "userPrincipalName", "mail"):
            value = user.get(field)
            if isinstance(value, str) and value:
                index[value.lower()] = user
    return index


def _index_hr(data: bytes, columns: HrColumns) -> dict[str, dict[str, Any]]:
    rows = read_csv(data)
    if rows and columns.email not in rows[0]:
        raise ValueError(f"HR file has no column {columns.email!r}")
    index: dict[str, dict[str, Any]] = {}
    for row in rows:
        email = row.get(columns.email, "").lower()
        if not email:
            continue
        entry = {
            "resignation_date": parse_datetime(row.get(columns.resignation_date)),
            "last_working_date": parse_datetime(row.get(columns.last_working_date)),
        }
        if entry["resignation_date"] is None and entry["last_working_date"] is None:
            continue
        previous = index.get(email)
        if previous is None or (entry["resignation_date"] or entry["last_working_date"]) >= (previous["resignation_date"] or previous["last_working_date"]):
            index[email] = entry
    return index


def _fragment(user: dict[str, Any] | None, hr: dict[str, Any] | None, sources: list[str], at: datetime) -> UserContext:
    fields: dict[str, Any] = {"found": bool(sources), "sources": sources}
    if user is not None:
        org = nested if isinstance(nested := user.get("employeeOrgData"), dict) else {}
        manager = user.get("manager") if isinstance(user.get("manager"), dict) else None
        fields.update(
            display_name=user.get("displayName"),
            department=user.get("department"),
            job_title=user.get("jobTitle"),
            employee_type=user.get("employeeType"),
            company_name=user.get("companyName"),
            office_location=user.get("officeLocation"),
            division=org.get("division"),
            cost_center=org.get("costCenter"),
            account_enabled=user.get("accountEnabled") if isinstance(user.get("accountEnabled"), bool) else None,
            hire_date=parse_datetime(user.get("employeeHireDate")),
            leave_date=parse_datetime(user.get("employeeLeaveDateTime")),
            manager=Manager(
                id=manager.get("id"),
                display_name=manager.get("displayName"),
                upn=(manager.get("userPrincipalName") or "").lower() or None,
                mail=manager.get("mail"),
                job_title=manager.get("jobTitle"),
            )
            if manager
            else None,
        )
    if hr is not None:
        fields["resignation_date"] = hr["resignation_date"]
        fields["last_working_date"] = hr["last_working_date"]
    leaving = fields.get("last_working_date") or fields.get("leave_date")
    if leaving is not None:
        days = (leaving.date() - at.date()).days
        fields.update(days_until_departure=days, departed=days < 0, departing=days >= 0)
    elif fields.get("resignation_date") is not None:  # resigned, last day not known yet
        fields["departing"] = True
    return UserContext(**fields)
