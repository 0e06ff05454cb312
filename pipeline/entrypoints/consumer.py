"""The standalone Event Hub consumer: azure-eventhub's async EventHubConsumerClient with the Blob checkpoint store.

For every batch of a partition, `BatchHandler.on_event_batch`:
1. runs the batch through the same Runner as the CLI and the Functions app;
2. only when `process_batch` returned (every record delivered, skipped or dead-lettered) moves the
   partition's checkpoint to the batch's last event;
3. when it raises (a store is down, or a sink took none of the batch: SinkOutage), does NOT
   checkpoint: it waits (exponential backoff, `retry_initial_seconds` .. `retry_max_seconds`) and
   runs the same batch again, for as long as it takes. A sink outage ends by itself after
   `delivery.max_batch_redeliveries` runs (the runner then dead-letters); a store outage blocks the
   partition until the store is back, which is the point: nothing read is lost.
If the process dies at any point before the checkpoint, the events are read again from the last
checkpoint, by this or another consumer, and the sinks' idempotency absorbs the repeat.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from pipeline.config import ConsumerSettings
from pipeline.errors import ConfigError, PipelineError, StoreUnavailable
from pipeline.runner import BatchReport, Message, Runner

log = logging.getLogger("pipeline.entrypoints.consumer")

_FLUSH_EVERY_SECONDS = 30.0
_STOP_GRACE_SECONDS = 5.0  # after close(), then the receiving task is cancelled (a batch cut short is not checkpointed)


def event_body(event: Any) -> bytes:
    body = event.body
    if isinstance(body, (bytes, bytearray)):
        return bytes(body)
    if isinstance(body, str):
        return body.encode()
    return b"".join(bytes(part) for part in body)


def to_message(partition_id: str, event: Any) -> Message:
    return Message(
        body=event_body(event),
        source=f"eventhub:partition={partition_id};sequence={event.sequence_number};offset={event.offset}",
        enqueued_time=event.enqueued_time,
    )


class BatchHandler:
    """`on_event_batch` for EventHubConsumerClient.receive_batch; see the module docstring."""

    def __init__(
        self,
        runner: Runner,
        *,
        retry_initial_seconds: float = 1.0,
        retry_max_seconds: float = 60.0,
        max_runs: int | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.runner = runner
        self.retry_initial_seconds = retry_initial_seconds
        self.retry_max_seconds = retry_max_seconds
        self.max_runs = max_runs  # None: retry until accounted for; a number: then raise (the SDK re-reads from the checkpoint)
        self.sleep = sleep
        self.total = BatchReport()
        self.batches = 0
        self.failed_runs = 0
        self.last_event_at = time.monotonic()
        self.busy = False

    async def on_event_batch(self, partition_context: Any, events: Sequence[Any]) -> None:
        if not events:
            return
        self.last_event_at = time.monotonic()
        self.busy = True
        try:
            await self._handle(partition_context, events)
        finally:
            self.busy = False
            self.last_event_at = time.monotonic()

    async def _handle(self, partition_context: Any, events: Sequence[Any]) -> None:
        partition = partition_context.partition_id
        messages = [to_message(partition, event) for event in events]
        delay, runs = self.retry_initial_seconds, 0
        while True:
            runs += 1
            try:
                report = await self.runner.process_batch(messages)
                break
            except PipelineError as exc:
                self.failed_runs += 1
                if self.max_runs is not None and runs >= self.max_runs:
                    log.warning("partition %s: batch not accounted for (%s); not checkpointed, giving the partition back", partition, exc)
                    raise
                wait = max(delay, getattr(exc, "retry_after", None) or 0.0)
                log.warning("partition %s: batch not accounted for (%s); not checkpointed, running it again in %.1fs", partition, exc, wait)
                await self.sleep(wait)
                delay = min(delay * 2, self.retry_max_seconds)
        await partition_context.update_checkpoint(events[-1])
        self.batches += 1
        self.total.merge(report)


def _secret(env_name: str, what: str) -> str:
    value = os.environ.get(env_name)
    if not value:
        raise ConfigError(f"environment variable {env_name} ({what}) is not set", key="consumer")
    return value


def build_client(settings: ConsumerSettings, credential: Callable[[], Any]) -> Any:
    """The EventHubConsumerClient with its BlobCheckpointStore. `credential()` gives the shared Azure
    credential (the runner's `Services.credential`), asked for only where no connection string is set."""
    from azure.eventhub.aio import EventHubConsumerClient
    from azure.eventhub.extensions.checkpointstoreblobaio import BlobCheckpointStore

    if settings.checkpoint_connection_string_env:
        store = BlobCheckpointStore.from_connection_string(_secret(settings.checkpoint_connection_string_env, "checkpoint storage"), settings.checkpoint_container)
    else:
        store = BlobCheckpointStore(_required(settings.checkpoint_account_url, "checkpoint_account_url"), settings.checkpoint_container, credential=credential())
    if settings.connection_string_env:
        client = EventHubConsumerClient.from_connection_string(
            _secret(settings.connection_string_env, "Event Hubs connection"),
            consumer_group=settings.consumer_group,
            eventhub_name=settings.eventhub_name,
            checkpoint_store=store,
        )
    else:
        client = EventHubConsumerClient(
            _required(settings.fully_qualified_namespace, "fully_qualified_namespace"),
            settings.eventhub_name,
            settings.consumer_group,
            credential(),
            checkpoint_store=store,
        )
    return client


def _required(value: str | None, key: str) -> str:
    if not value:  # the settings' own validator already insists on one of the pair
        raise ConfigError(f"{key} is not set", key=f"consumer.{key}")
    return value


async def ensure_container(settings: ConsumerSettings, credential: Callable[[], Any]) -> None:
    """Create the checkpoint container when it is missing (the checkpoint store does not).

    A start-up probe: it fails fast (no retries), so a wrong account shows at once as one line."""
    from azure.core.exceptions import AzureError, ResourceExistsError
    from azure.storage.blob.aio import ContainerClient

    if settings.checkpoint_connection_string_env:
        container = ContainerClient.from_connection_string(_secret(settings.checkpoint_connection_string_env, "checkpoint storage"), settings.checkpoint_container, retry_total=0)
    else:
        container = ContainerClient(_required(settings.checkpoint_account_url, "checkpoint_account_url"), settings.checkpoint_container, credential=credential(), retry_total=0)
    try:
        await container.create_container()
    except ResourceExistsError:
        pass
    except AzureError as exc:
        raise StoreUnavailable(f"checkpoint store: cannot reach container {settings.checkpoint_container}: {type(exc).__name__}") from exc
    finally:
        await container.close()


async def _flush_settled(runner: Runner, *, every: float) -> None:
    """Emit split alerts whose parts settled while the hub is quiet (the Functions app has a timer for this)."""
    while True:
        await asyncio.sleep(every)
        try:
            report = await runner.process_batch([])
        except PipelineError as exc:  # their parts stay in the state store: the next round emits them
            log.warning("emitting settled split alerts failed: %s", exc)
            continue
        if report.alerts:
            log.info("settled split alerts emitted: %d", report.alerts)


async def consume(runner: Runner, settings: ConsumerSettings, *, idle_exit_seconds: float | None = None) -> BatchHandler:
    """Receive until cancelled (or, with `idle_exit_seconds`, until no event came for that long).
    Azure sign-in uses the runner's shared default credential, which the runner closes."""
    credential = runner.services.credential
    await ensure_container(settings, credential)
    client = build_client(settings, credential)
    handler = BatchHandler(runner, retry_initial_seconds=settings.retry_initial_seconds, retry_max_seconds=settings.retry_max_seconds)

    async def on_error(partition_context: Any, error: Exception) -> None:
        where = partition_context.partition_id if partition_context is not None else "-"
        log.warning("event hub partition %s: %s: %s", where, type(error).__name__, error)

    receiving = asyncio.create_task(
        client.receive_batch(
            on_event_batch=handler.on_event_batch,
            on_error=on_error,
            max_batch_size=settings.max_batch_size,
            max_wait_time=settings.max_wait_seconds,
            starting_position=settings.starting_position,
        )
    )
    flushing = asyncio.create_task(_flush_settled(runner, every=_FLUSH_EVERY_SECONDS))
    try:
        if idle_exit_seconds is None:
            await receiving
        else:
            while not receiving.done() and (handler.busy or time.monotonic() - handler.last_event_at < idle_exit_seconds):
                await asyncio.sleep(0.2)
    finally:
        flushing.cancel()
        await client.close()  # stops receive_batch; a batch not checkpointed yet is read again next time
        try:
            await asyncio.wait_for(receiving, timeout=_STOP_GRACE_SECONDS)
        except (TimeoutError, asyncio.CancelledError):
            receiving.cancel()
    return handler
