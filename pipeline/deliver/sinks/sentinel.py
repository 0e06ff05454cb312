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
            outcome = await self._send(members, pieces, costs)
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

    async def _send(self, members: list[int], pieces: list[bytes], costs: list[int]) -> Outcome:
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
