"""Fan-out to an Event Hub (azure.eventhub.aio producer), for other consumers of enriched records.

Records are packed into as few `EventDataBatch`es as fit (`create_batch` / `add` until full), each
event the record's JSON (as projected for this sink) with `message_id` = record_id and application
properties `record_id`, `alert_key` and `schema`. A record too large for an empty batch is rejected;
a failed send fails exactly the records of that batch (retryable unless the service refused us).
Event Hubs is at-least-once: a retry after an ambiguous send can deliver an event twice, so
consumers deduplicate by `record_id`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.config import StrictModel
from pipeline.deliver.minimise import alert_key
from pipeline.deliver.sinks import Outcome
from pipeline.errors import SinkUnavailable, translate
from pipeline.plugins import shared_credential
from pipeline.secrets import SecretEnv

log = logging.getLogger("pipeline.deliver.sinks.eventhub")

SCHEMA = "dlp-enriched-record/1"


def make_event(record: Any):
    from azure.eventhub import EventData

    event = EventData(record.to_json())
    event.content_type = "application/json"
    event.message_id = record.record_id
    event.properties = {"record_id": record.record_id, "alert_key": alert_key(record), "schema": SCHEMA}
    return event


async def pack(records: Sequence[Any], new_batch: Callable[[], Awaitable[Any]]) -> tuple[list[tuple[Any, list[int]]], dict[int, str]]:
    """Fill batches in order: (batch, record indexes) pairs, and the indexes too large for any batch."""
    batches: list[tuple[Any, list[int]]] = []
    too_large: dict[int, str] = {}
    members: list[int]
    batch, members = None, []
    for index, record in enumerate(records):
        event = make_event(record)
        if batch is None:
            batch, members = await new_batch(), []
        added = _add(batch, event)
        if not added and members:  # full: start another and try there
            batches.append((batch, members))
            batch, members = await new_batch(), []
            added = _add(batch, event)
        if added:
            members.append(index)
        else:
            too_large[index] = f"event of {len(record.to_json())} bytes does not fit an Event Hub batch of {batch.max_size_in_bytes} bytes"
    if batch is not None and members:
        batches.append((batch, members))
    return batches, too_large


def _add(batch: Any, event: Any) -> bool:
    """Add `event` to `batch`; False when it does not fit (the SDK raises ValueError)."""
    try:
        batch.add(event)
    except ValueError:
        return False
    return True


class EventHubSink:
    class Settings(StrictModel):
        fully_qualified_namespace: str | None = Field(None, description="<namespace>.servicebus.windows.net (the shared credential)")
        eventhub_name: str | None = Field(None, description="the event hub (optional when the connection string names it)")
        connection_string_env: SecretEnv | None = Field(None, description="environment variable with a connection string (emulator, dev)")
        managed_identity_client_id: str | None = None
        partition_key: Literal["none", "tenant"] = Field("none", description="'tenant' keeps one tenant's records on one partition")
        max_batch_bytes: int | None = Field(None, gt=1024, description="default: the hub's maximum message size")
        sdk_retries: int = Field(1, ge=0, le=3, description="AMQP-level retries inside one send (the runner retries the rest)")
        timeout_seconds: float = Field(30.0, gt=0)

        @model_validator(mode="after")
        def _one_connection(self) -> EventHubSink.Settings:
            if (self.fully_qualified_namespace is None) == (self.connection_string_env is None):
                raise ValueError("give exactly one of fully_qualified_namespace and connection_string_env")
            if self.fully_qualified_namespace is not None and not self.eventhub_name:
                raise ValueError("eventhub_name is needed with fully_qualified_namespace")
            return self

    @classmethod
    async def doctor(cls, settings: EventHubSink.Settings, services: Any) -> list[Any]:
        """The hub's properties over AMQP with the sink's sign-in (a management read; no event sent)."""
        from pipeline.doctor import eventhub_check

        credential = None if settings.connection_string_env is not None else shared_credential(services, settings.managed_identity_client_id)
        return [await eventhub_check("hub", fully_qualified_namespace=settings.fully_qualified_namespace, connection_string_env=settings.connection_string_env,
                                     eventhub_name=settings.eventhub_name, credential=credential, role="Azure Event Hubs Data Sender")]

    def __init__(self, settings: EventHubSink.Settings, services: Any, *, credential: Any = None) -> None:
        """`credential`: one to use instead of the services' shared one (tests); never closed here."""
        from azure.eventhub.aio import EventHubProducerClient

        self.settings = settings
        self.credential: Any = None
        options: dict[str, Any] = {"retry_total": settings.sdk_retries}
        if settings.connection_string_env is not None:
            value = settings.connection_string_env.resolve().get_secret_value()
            if settings.eventhub_name:
                options["eventhub_name"] = settings.eventhub_name
            self.producer = EventHubProducerClient.from_connection_string(value, **options)
        else:
            self.credential = credential if credential is not None else shared_credential(services, settings.managed_identity_client_id)
            assert settings.fully_qualified_namespace is not None and settings.eventhub_name is not None  # Settings._one_connection
            self.producer = EventHubProducerClient(settings.fully_qualified_namespace, settings.eventhub_name, self.credential, **options)
        self.batches_sent = 0

    async def publish(self, records: Sequence[Any]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(records)
        groups: dict[str | None, list[int]] = {}
        for index, record in enumerate(records):
            key = (record.alert.tenant_id or "unknown") if self.settings.partition_key == "tenant" else None
            groups.setdefault(key, []).append(index)
        for key, indexes in groups.items():
            subset = [records[i] for i in indexes]
            try:
                batches, too_large = await pack(subset, functools.partial(self._new_batch, key))
            except Exception as exc:  # could not even open the producer
                outcome = self._failure(exc, len(subset))
                for i in indexes:
                    outcomes[i] = outcome
                continue
            for local, reason in too_large.items():
                outcomes[indexes[local]] = Outcome.rejected(reason)
            for batch, members in batches:
                try:
                    await self.producer.send_batch(batch, timeout=self.settings.timeout_seconds)
                    outcome = Outcome.delivered()
                    self.batches_sent += 1
                except Exception as exc:
                    outcome = self._failure(exc, len(members))
                for local in members:
                    outcomes[indexes[local]] = outcome
        return [o if o is not None else Outcome.retryable("not attempted") for o in outcomes]

    async def _new_batch(self, partition_key: str | None):
        options: dict[str, Any] = {}
        if partition_key is not None:
            options["partition_key"] = partition_key
        if self.settings.max_batch_bytes:
            options["max_size_in_bytes"] = self.settings.max_batch_bytes
        return await self.producer.create_batch(**options)

    @staticmethod
    def _failure(exc: Exception, count: int) -> Outcome:
        from azure.eventhub.exceptions import AuthenticationError, EventHubError

        if isinstance(exc, AuthenticationError):
            outcome = Outcome.rejected(f"{type(exc).__name__}: the namespace refused our credential")
        elif isinstance(exc, EventHubError):  # server busy, link detached, connect failures, timeouts
            outcome = Outcome.retryable(type(exc).__name__)
        else:
            error = translate(exc, role="sink")
            outcome = Outcome.retryable(str(error), error.retry_after) if isinstance(error, SinkUnavailable) else Outcome.rejected(str(error))
        log.warning("eventhub: %d record(s) not sent: %s", count, outcome.reason)
        log.debug("eventhub failure", exc_info=exc)
        return outcome

    async def aclose(self) -> None:
        await self.producer.close()
