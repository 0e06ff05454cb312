"""Microsoft Sentinel through the Azure Monitor Logs Ingestion API (azure-monitor-ingestion, async).

Rows go to the DCR stream `Custom-DLPEnrichedAlerts` → table `DLPEnrichedAlerts_CL` (see
pipeline/deliver/sinks/sentinel_schema.py and deploy/sentinel/). Guarantees:
- every request body is at most `max_request_bytes` (default and maximum 1,000,000) of uncompressed
  JSON, measured exactly as the SDK serialises it; records are packed first-fit-decreasing, so a
  batch takes close to the fewest requests possible;
- a record whose row alone is larger than that is rejected (dead-lettered) with a reason saying so,
  never sent to collect a 413;
- a request the endpoint refuses as too large (413) is split in halves and each half sent again;
  only a single row that the endpoint refuses alone is rejected, the others are delivered;
- a failed request fails exactly the records of that request: 408/429/5xx and network errors are
  retryable (Retry-After carried to the router), other 4xx rejected; after a throttling or server
  error the requests not yet sent are reported retryable without being sent;
- each row is serialised once: its JSON measures it, and the request body is those JSON texts
  joined, gzipped, and handed to the SDK's `upload` as a stream (sent as it is, with the SDK's
  authentication, transport and errors). The SDK's own chunking of a list does not serve here: it
  measures 1 MiB per chunk without the separators (more than the 1 MB the API takes), serialises
  every row twice more, fills chunks in order rather than packing them, and its `on_error` reports a
  whole chunk without splitting it;
- the SDK's own retries are off (`retry_total=0`): the runner owns retries and backoff.
Log Analytics has no deduplication: a retry after an ambiguous failure may add a second row with the
same RecordId; query through the `DLPEnrichedAlerts` function, which keeps one row per RecordId.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
from collections.abc import Sequence
from typing import Any

from pydantic import Field

from pipeline.config import StrictModel
from pipeline.deliver.minimise import record_document
from pipeline.deliver.sinks import Outcome
from pipeline.deliver.sinks.sentinel_schema import STREAM, to_row
from pipeline.errors import PipelineError, SinkUnavailable, translate
from pipeline.plugins import shared_credential

log = logging.getLogger("pipeline.deliver.sinks.sentinel")

MAX_REQUEST_BYTES = 1_000_000
INGESTION_SCOPE = "https://monitor.azure.com/.default"
DCR_API_VERSION = "2023-03-11"
TABLES_API_VERSION = "2022-10-01"
_TOO_LARGE = "HTTP 413"  # the reason pipeline.errors.translate gives a 413


def _halfway(members: list[int], costs: list[int]) -> int:
    """Where to cut a request in two of about equal bytes (at least one row each side)."""
    total, running = sum(costs[i] for i in members), 0
    for position, index in enumerate(members[:-1], start=1):
        running += costs[index]
        if running * 2 >= total:
            return position
    return len(members) - 1


class SentinelSink:
    class Settings(StrictModel):
        endpoint: str = Field(description="logs ingestion endpoint of the DCR (or a DCE), https://…ingest.monitor.azure.com")
        rule_id: str = Field(min_length=1, description="the DCR's immutable id, dcr-…")
        stream_name: str = Field(STREAM, description="the DCR stream declaration")
        max_request_bytes: int = Field(MAX_REQUEST_BYTES, gt=1000, le=MAX_REQUEST_BYTES, description="uncompressed JSON per request")
        timeout_seconds: float = Field(30.0, gt=0, description="per request")
        managed_identity_client_id: str | None = Field(None, description="user-assigned managed identity (else DefaultAzureCredential)")
        ca_bundle: str | None = Field(None, description="CA bundle to verify the endpoint with (tests, proxies); default: system CAs")
        dcr_resource_id: str | None = Field(
            None, pattern=r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.Insights/dataCollectionRules/[^/]+$",
            description="the DCR's resource id, for `doctor` to compare its stream with the rows (needs Reader on the DCR)",
        )
        management_endpoint: str = Field("https://management.azure.com", description="Azure Resource Manager (national clouds, tests)")

    @classmethod
    async def doctor(cls, settings: SentinelSink.Settings, services: Any) -> list[Any]:
        """A token for the ingestion scope; with `dcr_resource_id`, the DCR read from Resource Manager
        and compared with what the sink sends: immutable id, the stream, its columns and types, a
        data flow that takes it. No row is sent."""
        from pipeline.doctor import Check, token_check

        credential = shared_credential(services, settings.managed_identity_client_id)
        checks = [await token_check("ingestion token", credential, INGESTION_SCOPE)]
        if settings.dcr_resource_id is None:
            checks.append(Check.skipped("DCR stream", "set dcr_resource_id (/subscriptions/.../dataCollectionRules/<name>) to compare the DCR's stream with the rows"))
            return checks
        return checks + await dcr_checks(settings, credential)

    def __init__(self, settings: SentinelSink.Settings, services: Any, *, credential: Any = None) -> None:
        """`credential`: one to use instead of the services' shared one (local endpoints, tests). Either
        way the sink does not close it."""
        from azure.monitor.ingestion.aio import LogsIngestionClient

        self.settings = settings
        self.credential = credential if credential is not None else shared_credential(services, settings.managed_identity_client_id)
        options: dict[str, Any] = {"retry_total": 0, "connection_timeout": min(settings.timeout_seconds, 10), "read_timeout": settings.timeout_seconds}
        if settings.ca_bundle:
            options["connection_verify"] = settings.ca_bundle
        self.client = LogsIngestionClient(endpoint=settings.endpoint, credential=self.credential, **options)
        self.requests = 0  # requests sent, and the largest body (uncompressed JSON bytes): for measurements
        self.largest_request_bytes = 0

    # -- packing -------------------------------------------------------------------------------

    @staticmethod
    def serialised(rows: list[dict[str, Any]]) -> list[bytes]:
        """Each row's JSON, as `json.dumps` writes it inside a list (the body the API takes)."""
        return [json.dumps(row).encode("utf-8") for row in rows]

    def pack(self, costs: list[int]) -> tuple[list[list[int]], list[int]]:
        """Group row indexes into requests of at most max_request_bytes; also the indexes too large alone.

        `costs[i]` is the bytes row i adds to a request body: its JSON plus ", ". A body is
        "[" + rows joined by ", " + "]", so its size is the sum of its rows' costs.
        """
        limit = self.settings.max_request_bytes
        too_large = [i for i, cost in enumerate(costs) if cost > limit]
        order = sorted((i for i, cost in enumerate(costs) if cost <= limit), key=lambda i: -costs[i])
        bins: list[list[int]] = []
        free: list[int] = []
        for index in order:
            cost = costs[index]
            for b, room in enumerate(free):
                if cost <= room:
                    bins[b].append(index)
                    free[b] -= cost
                    break
            else:
                bins.append([index])
                free.append(limit - cost)
        for members in bins:
            members.sort()  # keep the batch's order inside a request
        return bins, too_large

    async def publish(self, records: Sequence[Any]) -> list[Outcome]:
        pieces = self.serialised([to_row(record_document(record)) for record in records])
        costs = [len(piece) + 2 for piece in pieces]
        outcomes: list[Outcome | None] = [None] * len(records)
        requests, too_large = self.pack(costs)
        for index in too_large:
            outcomes[index] = Outcome.rejected(
                f"row of {costs[index] - 2} bytes exceeds the Logs Ingestion limit of {self.settings.max_request_bytes} bytes per request"
            )
        pending = list(requests)  # requests still to send, in order; a 413 puts its halves first
        while pending:
            members = pending.pop(0)
            outcome = await self._send(members, pieces)
            if outcome.status == "rejected" and outcome.reason == _TOO_LARGE and len(members) > 1:
                middle = _halfway(members, costs)
                log.warning("sentinel: request of %d row(s) refused as too large (HTTP 413): sending it again in two", len(members))
                pending[:0] = [members[:middle], members[middle:]]
                continue
            if outcome.reason == _TOO_LARGE:
                outcome = Outcome.rejected(f"row of {costs[members[0]] - 2} bytes refused alone by the endpoint as too large (HTTP 413)")
            for index in members:
                outcomes[index] = outcome
            if outcome.status == "retryable":
                # The endpoint is throttling or failing: do not send the rest of the batch now.
                stop = Outcome.retryable(f"not sent after an earlier request failed ({outcome.reason})", outcome.retry_after)
                for rest in pending:
                    for index in rest:
                        outcomes[index] = stop
                break
        return [o if o is not None else Outcome.retryable("not attempted") for o in outcomes]

    async def _send(self, members: list[int], pieces: list[bytes]) -> Outcome:
        body = b"[" + b", ".join(pieces[i] for i in members) + b"]"
        self.requests += 1
        self.largest_request_bytes = max(self.largest_request_bytes, len(body))
        try:
            await self.client.upload(rule_id=self.settings.rule_id, stream_name=self.settings.stream_name, logs=io.BytesIO(gzip.compress(body, compresslevel=6)))
        except Exception as exc:
            error: PipelineError
            from azure.core.exceptions import ClientAuthenticationError  # loaded with the SDK

            if isinstance(exc, ClientAuthenticationError):  # a 401, or no token at all: token endpoint down or role not yet granted
                error = SinkUnavailable(f"authentication failed: {type(exc).__name__}")
            else:
                error = translate(exc, role="sink")
            log.warning("sentinel: request of %d row(s) failed: %s", len(members), error)
            log.debug("sentinel request failure", exc_info=exc)
            if isinstance(error, SinkUnavailable):
                return Outcome.retryable(str(error), error.retry_after)
            return Outcome.rejected(str(error))
        return Outcome.delivered()

    async def aclose(self) -> None:
        await self.client.close()


async def dcr_checks(settings: SentinelSink.Settings, credential: Any) -> list[Any]:
    """GET the DCR (ARM, api-version 2023-03-11) and compare it with `stream_columns()`."""
    import httpx

    from pipeline.deliver.sinks.itsm import check_url
    from pipeline.deliver.sinks.sentinel_schema import stream_columns
    from pipeline.doctor import ROLE_DELAY, Check, token_check

    arm = check_url(settings.management_endpoint, "management_endpoint")
    scope = f"{arm}/.default"
    token = await token_check("Resource Manager token", credential, scope)
    if token.status != "ok":
        return [token]
    headers = {"Authorization": f"Bearer {(await credential.get_token(scope)).token}", "Accept": "application/json"}
    name = "DCR stream"
    try:
        async with httpx.AsyncClient(timeout=settings.timeout_seconds, verify=settings.ca_bundle or True) as client:
            response = await client.get(f"{arm}{settings.dcr_resource_id}", params={"api-version": DCR_API_VERSION}, headers=headers)
    except httpx.HTTPError as exc:
        return [Check.failed(name, f"cannot reach {arm} ({type(exc).__name__})", "check management_endpoint, DNS, proxy and firewall rules")]
    if response.status_code in (401, 403):
        return [Check.failed(name, f"cannot read the DCR (HTTP {response.status_code})", f"run the doctor as an identity with Reader on the DCR; {ROLE_DELAY}")]
    if response.status_code == 404:
        return [Check.failed(name, "no DCR at dcr_resource_id (HTTP 404)", "check the subscription, resource group and name in dcr_resource_id")]
    if response.status_code != 200:
        return [Check.failed(name, f"HTTP {response.status_code} reading the DCR", "check dcr_resource_id")]
    properties = (response.json() or {}).get("properties") or {}
    checks: list[Check] = [token]
    immutable = properties.get("immutableId")
    if immutable != settings.rule_id:
        checks.append(Check.failed("DCR immutable id", f"the DCR's is {immutable}, rule_id is {settings.rule_id}", "set rule_id to the DCR's immutableId (or dcr_resource_id to the DCR the sink sends to)"))
    else:
        checks.append(Check.ok("DCR immutable id", f"{immutable} matches rule_id"))
    logs_endpoint = ((properties.get("endpoints") or {}).get("logsIngestion") or "").rstrip("/")
    if logs_endpoint and not properties.get("dataCollectionEndpointId") and logs_endpoint != settings.endpoint.rstrip("/"):
        checks.append(Check.failed("DCR endpoint", f"the DCR ingests at {logs_endpoint}, endpoint is {settings.endpoint}", "set endpoint to the DCR's logsIngestion endpoint"))
    declared = (properties.get("streamDeclarations") or {}).get(settings.stream_name)
    fix = "deploy deploy/sentinel/dcr.json, or update the stream with `python -m pipeline schema sentinel --dcr`"
    if not isinstance(declared, dict):
        names = ", ".join(sorted(properties.get("streamDeclarations") or {})) or "none"
        return [*checks, Check.failed(name, f"no stream {settings.stream_name} in the DCR (it declares: {names})", fix)]
    have = {c.get("name"): c.get("type") for c in declared.get("columns") or [] if isinstance(c, dict)}
    sent = {c["name"]: c["type"] for c in stream_columns()}
    missing = [column for column in sent if column not in have]
    wrong = [f"{column} ({have[column]}, rows send {kind})" for column, kind in sent.items() if column in have and have[column] != kind]
    if missing or wrong:
        parts = ([f"columns the rows send but the stream lacks (dropped silently): {', '.join(missing)}"] if missing else []) + (
            [f"types that differ: {', '.join(wrong)}"] if wrong else [])
        checks.append(Check.failed(name, "; ".join(parts), fix))
    else:
        extra = len([column for column in have if column not in sent])
        checks.append(Check.ok(name, f"{settings.stream_name} declares the {len(sent)} columns the rows send" + (f" (and {extra} more)" if extra else "")))
    flows = [flow for flow in properties.get("dataFlows") or [] if isinstance(flow, dict) and settings.stream_name in (flow.get("streams") or [])]
    if not flows:
        checks.append(Check.failed("DCR data flow", f"no data flow takes {settings.stream_name}: uploads succeed (204) but no row reaches a table", fix))
    else:
        outputs = ", ".join(str(flow.get("outputStream") or settings.stream_name) for flow in flows)
        checks.append(Check.ok("DCR data flow", f"{settings.stream_name} -> {outputs}"))
    workspaces = {d.get("name"): d.get("workspaceResourceId") for d in (properties.get("destinations") or {}).get("logAnalytics") or [] if isinstance(d, dict)}
    for flow in flows:
        for destination in flow.get("destinations") or []:
            checks.append(await _table_check(settings, arm, headers, flow, workspaces.get(destination), destination))
    return checks


async def _table_check(settings: SentinelSink.Settings, arm: str, headers: dict[str, str], flow: dict[str, Any], workspace: str | None, destination: str) -> Any:
    """The Log Analytics table a data flow writes to exists and holds every column of the stream."""
    import httpx

    from pipeline.deliver.sinks.sentinel_schema import stream_columns
    from pipeline.doctor import ROLE_DELAY, Check

    output = str(flow.get("outputStream") or settings.stream_name)
    if not output.startswith("Custom-"):
        return Check.skipped("workspace table", f"{output} is a built-in table")
    table = output.removeprefix("Custom-")
    name = f"table {table}"
    if not workspace:
        return Check.failed(name, f"the data flow names destination {destination}, which the DCR does not declare", "fix the DCR's destinations.logAnalytics")
    fix = "create it with `python -m pipeline schema sentinel --table` (deploy/sentinel/table.json)"
    try:
        async with httpx.AsyncClient(timeout=settings.timeout_seconds, verify=settings.ca_bundle or True) as client:
            response = await client.get(f"{arm}{workspace}/tables/{table}", params={"api-version": TABLES_API_VERSION}, headers=headers)
    except httpx.HTTPError as exc:
        return Check.failed(name, f"cannot reach {arm} ({type(exc).__name__})", "check management_endpoint, DNS, proxy and firewall rules")
    if response.status_code in (401, 403):
        return Check.failed(name, f"cannot read the workspace's table (HTTP {response.status_code})", f"run the doctor as an identity with Reader on the workspace; {ROLE_DELAY}")
    if response.status_code == 404:
        return Check.failed(name, "not in the workspace: uploads are accepted (204) but no row is kept", fix)
    if response.status_code != 200:
        return Check.failed(name, f"HTTP {response.status_code} reading the table", "check the DCR's workspaceResourceId")
    schema = ((response.json() or {}).get("properties") or {}).get("schema") or {}
    have = {c.get("name") for key in ("columns", "standardColumns") for c in schema.get(key) or [] if isinstance(c, dict)}
    missing = [c["name"] for c in stream_columns() if c["name"] not in have]
    if missing and str(flow.get("transformKql") or "source").strip() == "source":
        return Check.failed(name, f"lacks columns the stream sends (dropped): {', '.join(missing)}", "add them to the table (PUT the body of `python -m pipeline schema sentinel --table`)")
    return Check.ok(name, f"in the workspace with the stream's {len(stream_columns())} columns")
