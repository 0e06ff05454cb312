"""Azure Functions adapter (Python v2 programming model): thin triggers over the same Runner as the CLI.

- `dlp_alerts`: Event Hub trigger, cardinality many, binary bodies. One invocation is one batch.
  Bad messages are dead-lettered by the runner and never fail the batch. The function raises only
  when the batch as a whole cannot be accounted for (state or dead-letter store down, or a sink that
  took none of the batch: SinkOutage); the function-level retry policy then runs the same batch
  again before the checkpoint moves. Keep `delivery.max_batch_redeliveries` at most the policy's
  `max_retry_count`, so the last run dead-letters instead of raising (docs/delivery.md).
- `flush_pending_alerts`: a one-minute timer that emits split alerts whose parts have settled,
  so that they do not wait for the next message on a quiet hub. With the shared state store
  (`[state] kind = "azure_table"`, as deploy/function.toml sets) that is every settled alert of the
  deployment, whichever instance stored its parts: the claim scans every shard of the table.

Settings (app settings / local.settings.json): DLP_PIPELINE_CONFIG (TOML file, default: the
embedded default), DLP_PIPELINE_DATA_DIR (default: the config's data_dir) and
DLP_PIPELINE_LOCK_WAIT_SECONDS (60: see `writing_alone`).

Local data folder, several worker processes (`func start`, FUNCTIONS_WORKER_PROCESS_COUNT > 1, or
the instance's /tmp): the SQLite state, JSONL lake and dead-letter folder take one writer at a time
(pipeline/state/folder_lock.py). A worker cannot refuse an invocation the way the CLI refuses a
run, and it must not hold the folder for its whole life (the other workers' batches would fail until
their retries ran out). So each invocation takes the folder's lock for as long as it runs, waiting
up to DLP_PIPELINE_LOCK_WAIT_SECONDS for the worker that has it; if it cannot get it, it raises
DataFolderBusy and the retry policy runs the batch again before the checkpoint moves. Workers on one
folder thus serialise instead of corrupting it; invocations of one worker serialise too. Stores that
are not local (Blob dead letters, Blob lake) take no lock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import azure.functions as func
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.runner import Message, Runner
from pipeline.state.folder_lock import held_waiting, local_folders

if TYPE_CHECKING:
    from pipeline.config import LoadedConfig

log = logging.getLogger("pipeline.entrypoints.functions")
bp = func.Blueprint()


class FunctionSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DLP_PIPELINE_", extra="ignore")

    config: str | None = None
    data_dir: str | None = None
    lock_wait_seconds: float = Field(60.0, ge=0, description="how long an invocation waits for another worker to let go of the local data folder")


_runner: tuple[asyncio.AbstractEventLoop, Runner] | None = None
_lock: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
_gate: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
_loaded: LoadedConfig | None = None


def loaded_config() -> LoadedConfig:
    """The config of this worker process, read once."""
    global _loaded
    if _loaded is None:
        from pipeline.config import load_config

        settings = FunctionSettings()
        _loaded = load_config(settings.config, data_dir=settings.data_dir)
    return _loaded


@asynccontextmanager
async def writing_alone() -> AsyncIterator[None]:
    """While the block runs, this invocation is the only writer of the local data folders (module
    docstring): one invocation of this worker at a time, and no other process. Raises DataFolderBusy
    when another process keeps them longer than DLP_PIPELINE_LOCK_WAIT_SECONDS."""
    global _gate
    loop = asyncio.get_running_loop()
    if _gate is None or _gate[0] is not loop:
        _gate = (loop, asyncio.Lock())
    async with _gate[1]:
        wait = FunctionSettings().lock_wait_seconds
        advice = f"waited {wait:g} s (DLP_PIPELINE_LOCK_WAIT_SECONDS); the batch runs again (retry policy)"
        async with held_waiting(local_folders(loaded_config()), wait_seconds=wait, advice=advice):
            yield


async def get_runner() -> Runner:
    """The runner of this worker process, built on first use and reused while the event loop lives."""
    global _runner, _lock
    loop = asyncio.get_running_loop()
    if _runner is not None and _runner[0] is loop:
        return _runner[1]
    if _lock is None or _lock[0] is not loop:
        _lock = (loop, asyncio.Lock())
    async with _lock[1]:
        if _runner is None or _runner[0] is not loop:
            from pipeline import observability

            observability.configure_from_env()  # Azure Monitor only when APPLICATIONINSIGHTS_CONNECTION_STRING is set
            runner = Runner(loaded_config())
            await runner.start()
            _runner = (loop, runner)
    return _runner[1]


async def reset_runner() -> None:
    """Close and forget the cached runner and config (tests, or a config change)."""
    global _runner, _loaded
    if _runner is not None:
        await _runner[1].aclose()
        _runner = None
    _loaded = None


def to_message(event: func.EventHubEvent) -> Message:
    where = f"eventhub:sequence={event.sequence_number};offset={event.offset}"
    if event.partition_key:  # chosen by the sender: printable characters only, bounded (it is logged)
        where += ";partition_key=" + "".join(ch if ch.isprintable() else "?" for ch in str(event.partition_key)[:128])
    return Message(body=event.get_body(), source=where, enqueued_time=event.enqueued_time)


@bp.function_name("dlp_alerts")
@bp.retry(strategy="exponential_backoff", max_retry_count="5", minimum_interval="00:00:10", maximum_interval="00:15:00")
@bp.event_hub_message_trigger(
    arg_name="events",
    event_hub_name="%EventHubName%",
    connection="EventHubConnection",
    consumer_group="%EventHubConsumerGroup%",
    cardinality="many",
    data_type="binary",
)
async def dlp_alerts(events: list[func.EventHubEvent]) -> None:
    async with writing_alone():  # the runner is built under the lock too: the lake recovers its journal on open
        runner = await get_runner()
        report = await runner.process_batch([to_message(event) for event in events])
    log.info(
        "batch: messages=%d alerts=%d skipped=%d dead_lettered=%d delivered=%s",
        report.messages, report.alerts, report.skipped, sum(report.dead_lettered.values()), dict(report.delivered),
    )


@bp.function_name("flush_pending_alerts")
@bp.timer_trigger(arg_name="timer", schedule="0 */1 * * * *", run_on_startup=False, use_monitor=False)
async def flush_pending_alerts(timer: func.TimerRequest) -> None:
    async with writing_alone():
        runner = await get_runner()
        report = await runner.process_batch([])
    if report.alerts:
        log.info("settled split alerts emitted: %d", report.alerts)
