"""The sink contract.

A sink delivers enriched records somewhere (a lake, Sentinel, an ITSM). Guarantees it must give:
- `publish(records)` returns exactly one `Outcome` per record, in order:
  `delivered`, `rejected` (permanent: the router dead-letters it at once) or `retryable`
  (transient: the router retries it with backoff, then dead-letters it);
- it may raise instead; the router then treats every record of the call as the raised error says
  (see pipeline.errors.translate);
- it is idempotent: publishing a record whose `record_id` it already holds delivers nothing new
  (an ITSM updates its ticket, a lake skips or overwrites the same key);
- `aclose()` releases its clients;
- a sink that retries inside a call stops by `publish_deadline` (the end of the batch's budget for
  it, set by the deliver stage), so the router still decides what becomes a dead letter.

Built-in kinds are listed here as `module:Class`; third-party sinks register under the entry point
group `dlp_pipeline.sinks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from pipeline.models import EnrichedRecord

BUILTIN_SINKS: dict[str, str] = {
    "jsonl": "pipeline.deliver.sinks.jsonl_lake:JsonlLakeSink",
    "sentinel": "pipeline.deliver.sinks.sentinel:SentinelSink",
    "blob": "pipeline.deliver.sinks.blob_lake:BlobLakeSink",
    "servicenow": "pipeline.deliver.sinks.servicenow:ServiceNowSink",
    "jira": "pipeline.deliver.sinks.jira:JiraSink",
    "eventhub": "pipeline.deliver.sinks.eventhub:EventHubSink",
    "defender_incident": "pipeline.deliver.sinks.defender_incident:DefenderIncidentSink",
    "sentinel_incident": "pipeline.deliver.sinks.sentinel_incident:SentinelIncidentSink",
}


publish_deadline: ContextVar[float | None] = ContextVar("publish_deadline", default=None)
"""`time.monotonic()` by which the current `publish` call should return: the end of the batch's
`delivery.budget_seconds` for this sink, set by the deliver stage around each call (None outside it)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    status: Literal["delivered", "rejected", "retryable"]
    reason: str | None = None
    retry_after: float | None = None

    @classmethod
    def delivered(cls) -> Outcome:
        return _DELIVERED

    @classmethod
    def rejected(cls, reason: str) -> Outcome:
        return cls("rejected", reason)

    @classmethod
    def retryable(cls, reason: str, retry_after: float | None = None) -> Outcome:
        return cls("retryable", reason, retry_after)


_DELIVERED = Outcome("delivered")


@runtime_checkable
class Sink(Protocol):
    async def publish(self, records: Sequence[EnrichedRecord]) -> Sequence[Outcome]: ...

    async def aclose(self) -> None: ...
