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
embedded default) and DLP_PIPELINE_DATA_DIR (default: the config's data_dir).
"""

from __future__ import annotations

import asyncio
import logging

import azure.functions as func
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.runner import Message, Runner

log = logging.getLogger("pipeline.entrypoints.functions")
bp = func.Blueprint()


class FunctionSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DLP_PIPELINE_", extra="ignore")

    config: str | None = None
    data_dir: str | None = None


_runner: tuple[asyncio.AbstractEventLoop, Runner] | None = None
_lock: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None


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
            from pipeline.config import load_config

            observability.configure_from_env()  # Azure Monitor only when APPLICATIONINSIGHTS_CONNECTION_STRING is set
            settings = FunctionSettings()
            runner = Runner(load_config(settings.config, data_dir=settings.data_dir))
            await runner.start()
            _runner = (loop, runner)
    return _runner[1]


async def reset_runner() -> None:
    """Close and forget the cached runner (tests, or a config change)."""
    global _runner
    if _runner is not None:
        await _runner[1].aclose()
        _runner = None


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
    runner = await get_runner()
    report = await runner.process_batch([to_message(event) for event in events])
    log.info(
        "batch: messages=%d alerts=%d skipped=%d dead_lettered=%d delivered=%s",
        report.messages, report.alerts, report.skipped, sum(report.dead_lettered.values()), dict(report.delivered),
    )


@bp.function_name("flush_pending_alerts")
@bp.timer_trigger(arg_name="timer", schedule="0 */1 * * * *", run_on_startup=False, use_monitor=False)
async def flush_pending_alerts(timer: func.TimerRequest) -> None:
    runner = await get_runner()
    report = await runner.process_batch([])
    if report.alerts:
        log.info("settled split alerts emitted: %d", report.alerts)
