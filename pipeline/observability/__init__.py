"""Metrics and structured logs, through OpenTelemetry.

The runner calls the few `record_*` functions below; they go to an OpenTelemetry Meter. Without a
configured SDK the OpenTelemetry API is a no-op, so the pipeline pays almost nothing. When
`APPLICATIONINSIGHTS_CONNECTION_STRING` is set, `configure_from_env()` (called by the Functions
adapter and the CLI) loads `azure-monitor-opentelemetry` — lazily, only then — which exports
metrics, traces and logs to Application Insights.

Metrics (all names prefixed `dlp.`):

| name | kind | unit | attributes | what |
|---|---|---|---|---|
| `dlp.messages.in` | counter | {message} | | message bodies received |
| `dlp.alerts.in` | counter | {record} | | records read from those messages (DLP or not) |
| `dlp.records.skipped` | counter | {record} | | records of a known format that are not DLP |
| `dlp.alerts.enriched` | counter | {alert} | | alerts that went through the enricher chain |
| `dlp.enricher.duration` | histogram | s | `enricher`, `state` | one enricher on one alert |
| `dlp.enricher.failures` | counter | {alert} | `enricher`, `state` | enricher outcomes `failed` / `timed_out` |
| `dlp.sink.delivered` | counter | {record} | `sink` | records a sink accepted |
| `dlp.sink.failed` | counter | {record} | `sink`, `reason` | records a sink rejected or never took (dead-lettered) |
| `dlp.dead_lettered` | counter | {entry} | `stage`, `reason` | dead-letter entries written |
| `dlp.fields.nulled` | counter | {field} | | broken optional fields set to null (their records kept) |
| `dlp.lag` | histogram | s | | from a message's Event Hub enqueued time to its processing |

Structured logs: while an alert is being enriched, every log record (the runner's and a plugin's)
gets the attributes `alert_id` and `record_id` (see `AlertContextFilter`); `JsonFormatter` writes
one JSON object per line (`python -m pipeline --log-format json`). Payload content is never logged
above DEBUG.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.deadletter import DeadLetter
    from pipeline.models import DlpAlert
    from pipeline.report import BatchReport

METER_NAME = "dlp_pipeline"
CONNECTION_STRING_SETTING = "APPLICATIONINSIGHTS_CONNECTION_STRING"

log = logging.getLogger("pipeline.observability")


# Bucket boundaries in seconds (the SDK's defaults suit milliseconds).
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LAG_BUCKETS = (0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 21600.0, 86400.0)


class _Instruments:
    def __init__(self, meter: Any) -> None:
        self.messages_in = meter.create_counter("dlp.messages.in", unit="{message}", description="message bodies received")
        self.alerts_in = meter.create_counter("dlp.alerts.in", unit="{record}", description="records read from messages (DLP or not)")
        self.skipped = meter.create_counter("dlp.records.skipped", unit="{record}", description="records of a known format that are not DLP")
        self.enriched = meter.create_counter("dlp.alerts.enriched", unit="{alert}", description="alerts that went through the enricher chain")
        self.enricher_duration = meter.create_histogram("dlp.enricher.duration", unit="s", description="one enricher call: one alert, or a batch for enrich_batch", explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self.enricher_failures = meter.create_counter("dlp.enricher.failures", unit="{alert}", description="enricher outcomes failed or timed_out")
        self.sink_delivered = meter.create_counter("dlp.sink.delivered", unit="{record}", description="records a sink accepted")
        self.sink_failed = meter.create_counter("dlp.sink.failed", unit="{record}", description="records a sink rejected or never took")
        self.dead_lettered = meter.create_counter("dlp.dead_lettered", unit="{entry}", description="dead-letter entries written")
        self.fields_nulled = meter.create_counter("dlp.fields.nulled", unit="{field}", description="broken optional fields set to null (records kept)")
        self.lag = meter.create_histogram("dlp.lag", unit="s", description="from Event Hub enqueued time to processing", explicit_bucket_boundaries_advisory=LAG_BUCKETS)


class _NoInstrument:
    def add(self, *args: Any, **kwargs: Any) -> None:
        pass

    record = add


class _NoMeter:
    def create_counter(self, *args: Any, **kwargs: Any) -> _NoInstrument:
        return _NoInstrument()

    create_histogram = create_counter


_instruments: _Instruments | None = None
_meter_provider: Any = None  # None: the global one of opentelemetry.metrics


def _get() -> _Instruments:
    global _instruments
    if _instruments is None:
        try:
            from opentelemetry import metrics
        except ImportError:  # the API is a runtime dependency, but never let metrics break a run
            meter: Any = _NoMeter()
        else:
            provider = _meter_provider or metrics.get_meter_provider()
            meter = provider.get_meter(METER_NAME, _version())
        _instruments = _Instruments(meter)
    return _instruments


def _version() -> str:
    from pipeline import __version__

    return __version__


def use_meter_provider(provider: Any | None) -> None:
    """Send metrics to this MeterProvider (tests: one with an InMemoryMetricReader); None: the global one."""
    global _meter_provider, _instruments
    _meter_provider = provider
    _instruments = None


_configured = False


def configure_from_env(environ: dict[str, str] | None = None) -> bool:
    """Configure Azure Monitor when APPLICATIONINSIGHTS_CONNECTION_STRING is set; True when it did.

    Idempotent. Imports `azure-monitor-opentelemetry` only in that case (it is heavy), and installs
    the alert context filter on the root logger's handlers so App Insights traces carry alert_id.
    """
    global _configured, _instruments
    env = os.environ if environ is None else environ
    if _configured or not env.get(CONNECTION_STRING_SETTING):
        return _configured
    try:
        from azure.monitor.opentelemetry import configure_azure_monitor
    except ImportError:
        log.warning("%s is set but azure-monitor-opentelemetry is not installed: no telemetry is exported", CONNECTION_STRING_SETTING)
        return False
    configure_azure_monitor(connection_string=env[CONNECTION_STRING_SETTING], logger_name="pipeline")
    _configured = True
    _instruments = None  # re-create the instruments on the provider just installed
    install_log_context(logging.getLogger())
    install_log_context(logging.getLogger("pipeline"))
    return True


# -- hooks called by the runner ----------------------------------------------------------------


def record_lag(enqueued_time: datetime | None, now: float) -> None:
    """Seconds from a message's enqueued time (Event Hub) to now; nothing when unknown (files)."""
    if enqueued_time is None:
        return
    if enqueued_time.tzinfo is None:
        enqueued_time = enqueued_time.replace(tzinfo=UTC)
    _get().lag.record(max(0.0, now - enqueued_time.timestamp()))


def record_enricher(name: str, state: str, seconds: float, count: int = 1) -> None:
    """One enricher call that gave `count` alerts the outcome `state` (`count` > 1: an `enrich_batch` call)."""
    instruments = _get()
    attributes = {"enricher": name, "state": state}
    instruments.enricher_duration.record(seconds, attributes)
    if state in ("failed", "timed_out"):
        instruments.enricher_failures.add(count, attributes)


def record_dead_letters(entries: Iterable[DeadLetter]) -> None:
    instruments = _get()
    for entry in entries:
        instruments.dead_lettered.add(1, {"stage": entry.stage, "reason": entry.reason})
        if entry.sink:
            instruments.sink_failed.add(1, {"sink": entry.sink, "reason": entry.reason})


def record_batch(report: BatchReport) -> None:
    """The counters of one finished batch (messages, records, skipped, enriched, delivered)."""
    instruments = _get()
    if report.messages:
        instruments.messages_in.add(report.messages)
    if report.records:
        instruments.alerts_in.add(report.records)
    if report.skipped:
        instruments.skipped.add(report.skipped)
    if report.alerts:
        instruments.enriched.add(report.alerts)
    if report.field_warnings:
        instruments.fields_nulled.add(report.field_warnings)
    for sink, count in report.delivered.items():
        instruments.sink_delivered.add(count, {"sink": sink})


# -- structured logs -----------------------------------------------------------------------------

_current_alert: contextvars.ContextVar[DlpAlert | None] = contextvars.ContextVar("dlp_current_alert", default=None)


def bind_alert(alert: DlpAlert | None) -> None:
    """Attach this alert to the current task's log records (the runner runs each alert in its own task)."""
    _current_alert.set(alert)


def current_ids() -> tuple[str | None, str | None]:
    alert = _current_alert.get()
    if alert is None:
        return None, None
    return alert.alert_id, alert.content_id()


class AlertContextFilter(logging.Filter):
    """Adds `alert_id` and `record_id` (None outside an alert) to every record it sees.

    `record_id` is computed only when a record is actually emitted, so binding costs nothing.
    Attach it to handlers (a logger's own filters do not see records of its child loggers).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "alert_id"):
            record.alert_id, record.record_id = current_ids()
        return True


def install_log_context(logger: logging.Logger) -> None:
    """Add AlertContextFilter to each handler of this logger (idempotent)."""
    for handler in logger.handlers:
        if not any(isinstance(f, AlertContextFilter) for f in handler.filters):
            handler.addFilter(AlertContextFilter())


_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, alert_id, record_id, and any `extra`.

    Tracebacks are included only for DEBUG records (they may carry payload content).
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info and record.levelno <= logging.DEBUG:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_info and record.exc_info[0] is not None:
            entry["exception_type"] = record.exc_info[0].__name__
        return json.dumps(entry, default=str)
