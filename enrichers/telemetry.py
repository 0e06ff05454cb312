"""telemetry: what non-Microsoft sources say about the alert's user or device.

Three kinds of source, any number of each, every one named (its name is its key in the fragment):
- `http`: a generic JSON lookup (Okta System Log, CrowdStrike, a proxy API...): URL, query and body
  templated from alert fields, only the mapped response fields kept, hosts restricted to an
  allow-list, auth headers read from environment variables named in the settings, timeouts and
  Retry-After-aware retries (pipeline/enrich/http.py);
- `tables`: lookup tables from CSV or JSON lines keyed by upn, ip or device, reloaded when the file
  changes (the embedded default);
- `log_analytics`: a KQL query (azure-monitor-query) over third-party logs already in the Sentinel
  workspace (CommonSecurityLog, Syslog, custom tables) in a window around the alert.

Template fields: {upn} {object_id} {user} (UPN local part) {domain} {device} {device_id} {ip}
{alert_id} {policy} {workload} {start} {end} (ISO 8601, the window around the alert). In URLs,
values are percent-encoded; in KQL they become string literals; a template whose field has no
value makes that source "not applicable" for the alert. Sources run in order http, log_analytics,
tables; a mapped output field named `ip` or `device` is available to the sources after it.

The enricher fails only when every applicable source failed; otherwise failed sources are listed
in `errors` (reason only, never content).
"""

from __future__ import annotations

import functools
import logging
import os
import string
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, model_validator

from enrichers._files import WatchedFile, read_csv, read_json_records
from enrichers._hunting import kql_string
from pipeline.enrich.cache import CachePolicy, load_many
from pipeline.enrich.contract import BatchEnricher, EnrichmentContext
from pipeline.enrich.http import HttpClient, check_base_url, host_matches
from pipeline.errors import EnricherError, EnricherTimeout, EnricherUnavailable, PipelineError, translate
from pipeline.models import DlpAlert
from pipeline.plugins import shared_credential
from pipeline.secrets import SecretEnv

log = logging.getLogger("pipeline.enrichers.telemetry")
_FORMATTER = string.Formatter()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HttpLookup(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,40}$")
    method: Literal["GET", "POST"] = "GET"
    url: str = Field(description="template, e.g. https://{{okta}}/api/v1/logs?filter=actor.alternateId eq \"{upn}\"")
    params: dict[str, str] = Field(default_factory=dict, description="query parameters (templates)")
    body: dict[str, Any] | None = Field(None, description="JSON body; its strings are templates")
    headers_from_env: dict[str, SecretEnv] = Field(default_factory=dict, description="header name -> environment variable holding its value")
    allowed_hosts: list[str] = Field(min_length=1, description="hosts this lookup may call (exact or *.suffix)")
    allow_private_hosts: list[str] = Field(default_factory=list, description="hosts allowed over http/private addresses (tests)")
    results_path: str | None = Field(None, description="dotted path to the list of results; none: the whole answer is one result")
    fields: dict[str, str] = Field(default_factory=dict, description="output field -> dotted path in the first result")
    timeout_seconds: float = Field(3.0, gt=0)
    max_retries: int = Field(1, ge=0, le=5)
    not_found_statuses: list[int] = Field(default_factory=lambda: [404], description="statuses that mean 'nothing known'")

    @model_validator(mode="after")
    def _hosts(self) -> HttpLookup:
        host = _static_host(self.url)
        if host is not None and not host_matches(host, self.allowed_hosts):
            raise ValueError(f"url host {host} is not in allowed_hosts")
        return self


class LookupTable(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,40}$")
    path: str = Field(description="CSV (header row) or JSON lines / array, relative to the config file")
    key: Literal["upn", "ip", "device"]
    key_column: str = Field(description="column / field holding the key")
    columns: list[str] | None = Field(None, description="columns to output (default: all but the key)")
    check_seconds: float = Field(5.0, ge=0)


class LogAnalyticsQuery(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,40}$")
    workspace_id: str
    query: str = Field(description="KQL; {upn}, {device}, ... become string literals, {start}/{end} datetime literals")
    window_minutes: float = Field(60, gt=0, le=7 * 24 * 60)
    endpoint: str = Field("https://api.loganalytics.io/v1")
    managed_identity_client_id: str | None = None
    timeout_seconds: float = Field(10.0, gt=0)
    max_retries: int = Field(1, ge=0, le=5)
    max_rows: int = Field(20, ge=1, le=1000)
    fields: list[str] | None = Field(None, description="columns of the first row to output (default: all)")
    allow_private_hosts: list[str] = Field(default_factory=list, description="endpoint hosts allowed over http (tests)")

    @model_validator(mode="after")
    def _https(self) -> LogAnalyticsQuery:
        check_base_url(self.endpoint, self.allow_private_hosts)
        return self


class SourceResult(BaseModel):
    kind: Literal["http", "table", "log_analytics"]
    found: bool
    count: int | None = Field(None, description="results returned (http list, log rows)")
    fields: dict[str, Any] = Field(default_factory=dict)


class Telemetry(BaseModel):
    sources: dict[str, SourceResult]
    found_any: bool
    errors: dict[str, str] = Field(default_factory=dict)


class TelemetryEnricher(BatchEnricher["TelemetryEnricher.Settings"]):
    name = "telemetry"
    timeout = 10.0
    cache_policy = CachePolicy(ttl_seconds=120, max_entries=20_000)

    class Settings(BatchEnricher.Settings):
        window_minutes: float = Field(60, gt=0, description="{start}/{end}: this long before and after the alert")
        http: list[HttpLookup] = Field(default_factory=list)
        log_analytics: list[LogAnalyticsQuery] = Field(default_factory=list)
        tables: list[LookupTable] = Field(default_factory=list)

        @model_validator(mode="after")
        def _unique(self) -> TelemetryEnricher.Settings:
            names = [*(s.name for s in self.http), *(s.name for s in self.log_analytics), *(s.name for s in self.tables)]
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"source names must be unique: {', '.join(duplicates)}")
            return self

    @classmethod
    async def doctor(cls, settings: TelemetryEnricher.Settings, services: Any) -> list[Any]:
        """Each lookup table readable with its key column; Log Analytics: a token; HTTP lookups: their
        header variables set (their APIs are not called: a lookup is per user)."""
        from pipeline.doctor import Check, input_file_check, token_check

        checks: list[Check] = []
        for table in settings.tables:
            checks.append(input_file_check(f"table {table.name}", services.input_path(table.path), functools.partial(_describe_table, table=table)))
        for query in settings.log_analytics:
            credential = shared_credential(services, query.managed_identity_client_id)
            checks.append(await token_check(f"log_analytics {query.name} token", credential, "https://api.loganalytics.io/.default"))
        for lookup in settings.http:
            unset = [variable for variable in lookup.headers_from_env.values() if variable not in os.environ]
            if unset:
                checks.append(Check.failed(f"http {lookup.name}", f"environment variable {', '.join(unset)} is not set", "set it (an app setting, its value may be a Key Vault reference)"))
            else:
                checks.append(Check.skipped(f"http {lookup.name}", "its API is called per user and not by the doctor"))
        return checks

    credential: Any = None  # for Log Analytics: given (tests), else each query's identity from the services

    def __init__(self, settings=None, services=None) -> None:
        super().__init__(settings, services)
        s = self.settings
        for lookup in s.http:
            for header, variable in lookup.headers_from_env.items():
                if variable not in os.environ:
                    raise ValueError(f"http lookup {lookup.name}: environment variable {variable} (header {header}) is not set")
        self._tables: dict[str, WatchedFile[dict[str, dict[str, Any]]]] = {}
        for table in s.tables:
            path = services.input_path(table.path) if services is not None else Path(table.path)
            self._tables[table.name] = WatchedFile(path, functools.partial(_index_table, table=table), check_seconds=table.check_seconds)
            self._tables[table.name].get()
        self._http: dict[str, HttpClient] = {}
        self._logs: dict[str, Any] = {}

    async def start(self) -> None:
        for lookup in self.settings.http:
            if lookup.name not in self._http:
                self._http[lookup.name] = HttpClient(
                    timeout=lookup.timeout_seconds,
                    total_seconds=lookup.timeout_seconds * (lookup.max_retries + 1),
                    max_retries=lookup.max_retries,
                    max_retry_after=lookup.timeout_seconds,
                    allowed_hosts=lookup.allowed_hosts,
                    allow_private_hosts=lookup.allow_private_hosts,
                )
        if self.settings.log_analytics:
            from azure.monitor.query.aio import LogsQueryClient

            for query in self.settings.log_analytics:
                if query.name in self._logs:
                    continue
                credential = self.credential if self.credential is not None else shared_credential(self.services, query.managed_identity_client_id)
                self._logs[query.name] = LogsQueryClient(
                    credential,
                    endpoint=query.endpoint,
                    retry_total=query.max_retries,
                    retry_backoff_factor=0.2,
                    retry_backoff_max=query.timeout_seconds / 2,
                    connection_timeout=query.timeout_seconds,
                    read_timeout=query.timeout_seconds,
                )

    async def aclose(self) -> None:
        for client in self._http.values():
            await client.aclose()
        for client in self._logs.values():
            await client.close()

    async def enrich_batch(self, alerts: list[DlpAlert], contexts: list[EnrichmentContext]) -> list[Telemetry | None | Exception]:
        """Source by source over the whole batch: each distinct HTTP request is sent once (through the
        cache), the batch's Log Analytics queries run together, tables are read in memory."""
        cache = contexts[0].cache if contexts else None
        window = bool(self.settings.http or self.settings.log_analytics)  # {start}/{end} are for their templates only
        progress = [_Progress(_variables(alert, ctx, self.settings.window_minutes, window=window)) for alert, ctx in zip(alerts, contexts)]
        for lookup in self.settings.http:
            requests: dict[int, tuple[str, str, str]] = {}
            planned: dict[tuple[str, str, str], dict[str, Any]] = {}
            for index, item in enumerate(progress):
                try:
                    request = _render_http(lookup, item.values)
                except KeyError:
                    continue
                key = ("http", lookup.name, repr(request))
                requests[index] = key
                planned[key] = request
            # Loop values bound as defaults; a lambda with defaults cannot be typed.
            async def call_http(key: tuple[str, str, str], lookup: HttpLookup = lookup, planned: dict[tuple[str, str, str], dict[str, Any]] = planned) -> SourceResult:
                return await self._call_http(lookup, planned[key])

            answers = await load_many(cache, planned, call_http, timeout=self.lookup_timeout)
            for index, key in requests.items():
                progress[index].take(lookup.name, answers[key])
        for query in self.settings.log_analytics:
            queries: dict[int, str] = {}
            for index, item in enumerate(progress):
                try:
                    queries[index] = _render_kql(query.query, item.values)
                except KeyError:
                    continue
            async def query_logs(index: int, query: LogAnalyticsQuery = query, queries: dict[int, str] = queries) -> SourceResult:
                return await self._query_logs(query, queries[index], progress[index].values["_at"])

            answered = await load_many(None, queries, query_logs, timeout=self.lookup_timeout)
            for index, answer in answered.items():
                progress[index].take(query.name, answer)
        for table in self.settings.tables:
            rows = self._tables[table.name].get()
            looked_up: dict[str, SourceResult] = {}  # one result per key and batch, shared by its alerts (fragments are read-only)
            for item in progress:
                value = item.values.get(table.key)
                if not value:
                    continue
                row_key = str(value).lower()
                found = looked_up.get(row_key)
                if found is None:
                    row = rows.get(row_key)
                    if row is None and table.key == "device":
                        row = rows.get(row_key.split(".", 1)[0])
                    fields = {} if row is None else {k: v for k, v in row.items() if k != table.key_column and (table.columns is None or k in table.columns)}
                    found = looked_up[row_key] = SourceResult(kind="table", found=row is not None, fields=fields)
                item.take(table.name, found)
        made: dict[tuple[Any, ...], Telemetry] = {}
        return [item.result(made) for item in progress]

    async def _call_http(self, lookup: HttpLookup, request: dict[str, Any]) -> SourceResult:
        client = self._http[lookup.name]
        headers = {header: os.environ.get(variable, "") for header, variable in lookup.headers_from_env.items()}
        headers.setdefault("Accept", "application/json")
        response = await client.request(
            lookup.method, request["url"], params=request["params"] or None, json=request["body"], headers=headers, ok_statuses=tuple(lookup.not_found_statuses)
        )
        if response.status_code in lookup.not_found_statuses:
            return SourceResult(kind="http", found=False, count=0)
        from pipeline.enrich.http import parse_json

        payload = parse_json(response)
        items: Any = payload if lookup.results_path is None else _path(payload, lookup.results_path)
        if lookup.results_path is not None and not isinstance(items, list):
            raise EnricherUnavailable(f"{lookup.name}: no list at '{lookup.results_path}' in the answer")
        if isinstance(items, list):
            first, count = (items[0] if items else None), len(items)
        else:
            first, count = items, None
        fields = {out: _scalar(_path(first, path)) for out, path in lookup.fields.items()} if first is not None else {}
        return SourceResult(kind="http", found=first is not None, count=count, fields={k: v for k, v in fields.items() if v is not None})

    async def _query_logs(self, query: LogAnalyticsQuery, kql: str, at: datetime) -> SourceResult:
        from azure.core.exceptions import AzureError
        from azure.monitor.query import LogsQueryStatus

        client = self._logs[query.name]
        window = timedelta(minutes=query.window_minutes)
        try:
            response = await client.query_workspace(
                query.workspace_id,
                kql,
                timespan=(at - window, at + window),
                server_timeout=int(max(1, query.timeout_seconds)),
                enforce_https=not query.endpoint.startswith("http://"),
            )
        except AzureError as exc:
            status = getattr(exc, "status_code", None)
            if isinstance(translate(exc, role="enricher"), EnricherTimeout):  # by type: pipeline.errors.LIBRARY_ERRORS
                raise EnricherTimeout(f"{query.name}: Log Analytics timed out") from exc
            raise EnricherUnavailable(f"{query.name}: Log Analytics " + (f"HTTP {status}" if status else type(exc).__name__)) from exc
        except (ValueError, KeyError, TypeError) as exc:  # an answer the client cannot read
            raise EnricherUnavailable(f"{query.name}: malformed Log Analytics answer") from exc
        if response.status == LogsQueryStatus.FAILURE:
            raise EnricherUnavailable(f"{query.name}: Log Analytics query failed")
        tables = response.tables if response.status == LogsQueryStatus.SUCCESS else response.partial_data
        if not tables:
            return SourceResult(kind="log_analytics", found=False, count=0)
        table = tables[0]
        rows = [dict(zip(table.columns, row)) for row in table.rows[: query.max_rows]]
        first = rows[0] if rows else {}
        fields = {k: _scalar(v) for k, v in first.items() if query.fields is None or k in query.fields}
        return SourceResult(kind="log_analytics", found=bool(rows), count=len(table.rows), fields={k: v for k, v in fields.items() if v is not None})


class _Progress:
    """One alert's way through the sources: template values (learning `ip` / `device`), results, errors."""

    __slots__ = ("values", "results", "errors", "timeouts", "applicable", "failure")

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values
        self.results: dict[str, SourceResult] = {}
        self.errors: dict[str, str] = {}
        self.timeouts = 0
        self.applicable = 0
        self.failure: Exception | None = None  # not a source's documented failure: fails the alert

    def take(self, name: str, answer: SourceResult | BaseException) -> None:
        self.applicable += 1
        if isinstance(answer, TimeoutError):  # the enricher's lookup budget ran out for this source
            answer = EnricherTimeout(f"{name}: no answer in time")
        if isinstance(answer, (EnricherError, PipelineError)):
            self.errors[name] = str(answer)
            self.timeouts += isinstance(answer, EnricherTimeout)
        elif isinstance(answer, Exception):
            self.failure = self.failure or answer
        elif isinstance(answer, SourceResult):
            self.results[name] = answer
            for key in ("ip", "device"):
                value = answer.fields.get(key)
                if isinstance(value, str) and value and key not in self.values:
                    self.values[key] = value

    def result(self, made: dict[tuple[Any, ...], Telemetry]) -> Telemetry | None | Exception:
        """The alert's fragment; `made`: the fragments of the batch so far, by the results they hold
        (the same results, shared by several alerts, give one shared fragment: fragments are read-only)."""
        if self.failure is not None:
            return self.failure
        if self.applicable == 0:
            return None
        if self.errors and not self.results:
            first = next(iter(self.errors.values()))
            error = EnricherTimeout if self.timeouts == len(self.errors) else EnricherUnavailable
            return error(f"every telemetry source failed ({len(self.errors)}); first: {first}")
        key = (tuple((name, id(result)) for name, result in self.results.items()), tuple(self.errors.items()))
        fragment = made.get(key)
        if fragment is None:
            fragment = made[key] = Telemetry(sources=self.results, found_any=any(r.found for r in self.results.values()), errors=self.errors)
        return fragment


# -- templates -----------------------------------------------------------------------------------


def _variables(alert: DlpAlert, ctx: EnrichmentContext, window_minutes: float, *, window: bool = True) -> dict[str, Any]:
    """The template values of one alert; `window`: with {start} and {end} (only templates use them)."""
    at = alert.created_at or alert.last_activity_at or alert.first_activity_at or ctx.now()
    at = at if at.tzinfo else at.replace(tzinfo=UTC)
    span = timedelta(minutes=window_minutes)
    upn = alert.user.upn if alert.user else None
    values: dict[str, Any] = {
        "_at": at,
        "start": (at - span).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if window else None,
        "end": (at + span).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if window else None,
        "alert_id": alert.alert_id,
        "policy": alert.policy_name,
        "workload": alert.workload,
        "upn": upn,
        "object_id": alert.user.object_id if alert.user else None,
        "user": upn.split("@", 1)[0] if upn else None,
        "domain": upn.split("@", 1)[1] if upn and "@" in upn else None,
        "device": alert.device.name.lower() if alert.device and alert.device.name else None,
        "device_id": alert.device.device_id if alert.device else None,
    }
    return {k: v for k, v in values.items() if v is not None}


def _fill(template: str, values: dict[str, Any], encode: Any) -> str:
    out = []
    for literal, field, _, _ in _FORMATTER.parse(template):
        out.append(literal)
        if field is not None:
            if field == "" or field.startswith("_") or field not in values:
                raise KeyError(field)
            out.append(encode(str(values[field])))
    return "".join(out)


def _render_http(lookup: HttpLookup, values: dict[str, Any]) -> dict[str, Any]:
    url = _fill(lookup.url, values, lambda v: quote(v, safe="@"))
    params = {k: _fill(v, values, str) for k, v in lookup.params.items()}

    def body(value: Any) -> Any:
        if isinstance(value, str):
            return _fill(value, values, str)
        if isinstance(value, dict):
            return {k: body(v) for k, v in value.items()}
        if isinstance(value, list):
            return [body(v) for v in value]
        return value

    return {"url": url, "params": params, "body": body(lookup.body) if lookup.body is not None else None}


def _render_kql(template: str, values: dict[str, Any]) -> str:
    def literal(field_value: str) -> str:
        return kql_string(field_value)

    out = []
    for literal_text, field, _, _ in _FORMATTER.parse(template):
        out.append(literal_text)
        if field is None:
            continue
        if field in ("start", "end") and field in values:
            out.append(f"datetime({values[field]})")
        elif field and not field.startswith("_") and field in values:
            out.append(literal(str(values[field])))
        else:
            raise KeyError(field)
    return "".join(out)


def _static_host(url: str) -> str | None:
    """The host of a URL template when it is not itself templated."""
    try:
        rest = url.split("://", 1)[1]
    except IndexError:
        return None
    host = rest.split("/", 1)[0].split("?", 1)[0].rsplit("@", 1)[-1].split(":", 1)[0]
    return None if "{" in host else host.lower()


def _path(value: Any, path: str) -> Any:
    for part in [p for p in path.split(".") if p]:
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.lstrip("-").isdigit():
            index = int(part)
            value = value[index] if -len(value) <= index < len(value) else None
        else:
            return None
    return value


def _scalar(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list) and all(isinstance(v, (str, int, float, bool)) for v in value):
        return value[:50]
    return str(value)[:500]


def _describe_table(data: bytes, table: LookupTable) -> str:
    index = _index_table(data, table)
    if not index:
        return "empty"
    if table.columns:
        have = set().union(*(row.keys() for row in index.values()))
        missing = [column for column in table.columns if column not in have]
        if missing:
            raise ValueError(f"no row has the column {', '.join(repr(c) for c in missing)} (columns)")
    return f"{len(index)} key{'' if len(index) == 1 else 's'} in column {table.key_column!r}"


def _index_table(data: bytes, table: LookupTable) -> dict[str, dict[str, Any]]:
    text = data.lstrip()
    rows = read_json_records(data) if text[:1] in (b"{", b"[") else read_csv(data)
    index = {}
    for row in rows:
        key = row.get(table.key_column)
        if key not in (None, ""):
            index[str(key).strip().lower()] = row
    if rows and not index:
        raise ValueError(f"lookup table {table.name}: no row has the column {table.key_column!r}")
    return index
