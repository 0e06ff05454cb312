"""The runner: one batch of message bodies in, enriched records delivered or dead-lettered out.

It serves every entry point (Functions trigger, CLI, replay, benchmarks). For one batch it
guarantees, in this order:
1. every message is decoded on its own; a bad body or record is dead-lettered with its reason and
   position, and the rest of the batch goes on; non-DLP records are counted as skipped;
2. parts of split alerts are stored in the state store before anything else, and alerts whose
   parts have settled are claimed (see pipeline/assemble.py);
3. every alert runs through the enricher chain: dependency-ordered waves over the whole batch, each
   enricher under its own timeout (per batch call for `enrich_batch`, per alert for `enrich`, at most
   `max_concurrent_alerts` alerts in flight), a failure recorded in `enrichment_status` and never
   dropping the alert;
4. every record is offered to every sink whose `when` matches; transient failures are retried
   with jittered exponential backoff honouring Retry-After, within the delivery budget; what is
   rejected or still failing is dead-lettered with the sink and the reason;
5. only then are the claimed alerts marked emitted in the state store.
If the state or dead-letter store fails, `process_batch` raises StoreUnavailable: nothing can be
accounted for, so the caller must retry the batch (the Functions host does, before checkpointing).
If a sink took none of the records the batch offered it (every call failed transiently until the
budget ran out: the sink is down, not a record), `process_batch` raises SinkOutage without
dead-lettering them and releases its claimed split alerts, so the caller runs the batch again; after
`delivery.max_batch_redeliveries` such runs of the same records (counted in the state store), or
with `delivery.on_outage = "dead_letter"`, they are dead-lettered instead (docs/delivery.md).
Every sink and enricher sits behind a circuit breaker (pipeline/breaker.py): an open one is not
called; its records stay retryable, its enrichment is `failed` with "circuit open".
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from time import perf_counter
from typing import Any, Callable, Sequence

import orjson
from pydantic import BaseModel, ValidationError

from pipeline import __version__
from pipeline import telemetry
from pipeline.assemble import assemble, merge_parts
from pipeline.config import LoadedConfig, SinkConfig
from pipeline.breaker import CircuitBreaker
from pipeline.deadletter import DeadLetter, DeadLetterStore, open_dead_letter_store
from pipeline.enricher import EnrichmentContext
from pipeline.errors import DecodeError, EnricherError, EnricherTimeout, PipelineError, SinkOutage, SinkUnavailable, translate
from pipeline.formats import decode_message, stored_body, validation_summary
from pipeline.models import DlpAlert, EnrichedRecord, EnrichmentStatus
from pipeline.secrets import install_log_redaction
from pipeline.registry import EnricherChain, EnricherSlot, Services, build_enricher_chain, build_sinks
from pipeline.retry import RedeliveryCounter, backoff_wait, fingerprint
from pipeline.sinks import Outcome
from pipeline.state import StateStore, open_state_store

log = logging.getLogger("pipeline")

_PURGE_EVERY_SECONDS = 600.0


@dataclass(slots=True)
class Message:
    """One Event Hub message body and where it came from (file:line, partition/sequence, …)."""

    body: bytes
    source: str = ""
    enqueued_time: datetime | None = None


@dataclass
class BatchReport:
    """Counters of one batch or, merged, of a whole run."""

    messages: int = 0
    records: int = 0
    skipped: int = 0
    alerts: int = 0
    duplicate_parts: int = 0
    emitted_split: int = 0
    pending: int = 0
    unrouted: int = 0
    delivered: Counter[str] = field(default_factory=Counter)
    dead_lettered: Counter[str] = field(default_factory=Counter)
    enrichment: Counter[tuple[str, str]] = field(default_factory=Counter)
    record_ids: list[str] = field(default_factory=list)

    def merge(self, other: "BatchReport") -> None:
        for name in ("messages", "records", "skipped", "alerts", "duplicate_parts", "emitted_split", "unrouted"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.pending = other.pending
        self.delivered.update(other.delivered)
        self.dead_lettered.update(other.dead_lettered)
        self.enrichment.update(other.enrichment)
        self.record_ids.extend(other.record_ids)

    @property
    def enrichment_failures(self) -> Counter[str]:
        failures: Counter[str] = Counter()
        for (name, state), count in self.enrichment.items():
            if state in ("failed", "timed_out"):
                failures[name] += count
        return failures

    def summary_lines(self) -> list[str]:
        def counts(counter: Counter[Any]) -> str:
            return ", ".join(f"{k}={v}" for k, v in sorted(counter.items())) or "none"

        states: dict[str, Counter[str]] = {}
        for (name, state), count in self.enrichment.items():
            states.setdefault(name, Counter())[state] += count
        lines = [
            f"messages:            {self.messages}",
            f"records read:        {self.records}",
            f"skipped (not DLP):   {self.skipped}",
            f"alerts enriched:     {self.alerts}",
            f"pending assembly:    {self.pending}" + (f" (duplicate parts ignored: {self.duplicate_parts})" if self.duplicate_parts else ""),
            f"delivered:           {counts(self.delivered)}",
            f"dead-lettered:       {sum(self.dead_lettered.values())} ({counts(self.dead_lettered)})",
            f"enrichment failures: {sum(self.enrichment_failures.values())} ({counts(self.enrichment_failures)})",
        ]
        if self.unrouted:
            lines.append(f"matched no sink:     {self.unrouted}")
        for name in sorted(states):
            lines.append(f"  {name}: {counts(states[name])}")
        return lines


class Runner:
    """Build once (plugins validated, stores opened), then `process_batch` as often as needed."""

    def __init__(
        self,
        config: LoadedConfig,
        *,
        clock: Callable[[], float] = time.time,
        state: StateStore | None = None,
        dead_letter: DeadLetterStore | None = None,
        breaker_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.loaded = config
        self.config = config.config
        install_log_redaction(config.secret_env_names)  # secrets never reach a log line (docs/security.md)
        self.clock = clock
        self.state: StateStore = state or open_state_store(_resolved_state(config))
        self.dead_letter: DeadLetterStore = dead_letter or open_dead_letter_store(config)
        self.services = Services(state=self.state, config=config, clock=clock)
        self.chain: EnricherChain = build_enricher_chain(self.config.enrichers, self.services)
        self.sinks: list[tuple[SinkConfig, Any]] = build_sinks(self.config.sinks, self.services)
        self._semaphore = asyncio.Semaphore(self.config.runner.max_concurrent_alerts)
        delivery, runner_settings = self.config.delivery, self.config.runner
        self.sink_breakers: dict[str, CircuitBreaker] = {
            entry.name: CircuitBreaker(entry.name, failure_threshold=delivery.breaker_threshold, cooldown_seconds=delivery.breaker_cooldown_seconds, clock=breaker_clock)
            for entry, _ in self.sinks
        }
        self.enricher_breakers: dict[str, CircuitBreaker] = {
            slot.name: CircuitBreaker(
                slot.name, failure_threshold=runner_settings.enricher_breaker_threshold, cooldown_seconds=runner_settings.enricher_breaker_cooldown_seconds, clock=breaker_clock
            )
            for slot in self.chain.slots
        }
        self._redeliveries = RedeliveryCounter(self.state)
        self._last_purge = 0.0
        self._started = False

    async def start(self) -> None:
        if self._started:
            return
        raise_gc_threshold()
        for slot in self.chain.slots:
            starter = getattr(slot.plugin, "start", None)
            if starter is not None:
                await starter()
        self._started = True

    async def aclose(self) -> None:
        for closer in [getattr(s.plugin, "aclose", None) for s in self.chain.slots] + [getattr(sink, "aclose", None) for _, sink in self.sinks]:
            if closer is not None:
                try:
                    await closer()
                except Exception as exc:  # closing must not hide the run's own result
                    log.warning("error while closing a plugin: %s", type(exc).__name__)
        await self.dead_letter.aclose()
        await self.state.aclose()

    async def __aenter__(self) -> "Runner":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- one batch -----------------------------------------------------------------------------

    async def process_batch(self, messages: Sequence[Message], *, flush: bool = False) -> BatchReport:
        """Decode, assemble, enrich and deliver one batch. `flush` emits every pending alert now."""
        await self.start()
        report = BatchReport(messages=len(messages))
        now = self.clock()
        dead: list[DeadLetter] = []
        alerts: list[DlpAlert] = []
        parts = []
        for index, message in enumerate(messages):
            telemetry.record_lag(message.enqueued_time, now)
            error: DecodeError | None = None
            try:
                decoded = decode_message(message.body, limits=self.config.limits)
            except DecodeError as err:
                error = err.with_traceback(None)  # drop the decoder's frames (and the parsed document) now
                error.__context__ = None
            if error is not None:
                log.warning("message %s (%s) dead-lettered: %s", index, message.source, str(error))
                body = stored_body(message.body, error.reason)  # scrubbed, or withheld (docs/security.md)
                dead.append(DeadLetter(stage="decode", reason=error.reason, detail=error.detail, body=body, source=message.source, message_index=index))
                continue
            report.records += decoded.records
            report.skipped += decoded.skipped
            alerts.extend(decoded.alerts)
            parts.extend(decoded.parts)
            if decoded.rejected:  # one line per message, not per record: hostile input cannot flood the log
                reasons = Counter(rejected.reason for rejected in decoded.rejected)
                first = ", ".join(str(rejected.index) for rejected in decoded.rejected[:5]) + (", ..." if len(decoded.rejected) > 5 else "")
                log.warning(
                    "message %s (%s): %d record(s) dead-lettered (%s; records %s)",
                    index, message.source, len(decoded.rejected), ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())), first,
                )
            for rejected in decoded.rejected:
                dead.append(
                    DeadLetter(stage="decode", reason=rejected.reason, detail=rejected.detail, body=rejected.record, source=message.source, message_index=index, record_index=rejected.index)
                )
        # Bad input is made durable first: from here on, a crash loses nothing that was read.
        await self._dead_letter(dead, report)
        added = await self.state.add_parts(parts, now=now, max_parts_per_alert=self.config.limits.max_evidence_per_alert)
        report.duplicate_parts += added.duplicate
        await self._dead_letter(_over_limit_dead_letters(added.over_limit, self.config.limits.max_evidence_per_alert), report)
        emitted = await self._claim_assembled(alerts, now=now, force=flush, report=report)
        records = await self._enrich_all(alerts, report)
        try:
            await self._deliver(records, report)
        except SinkOutage:
            await self._release(emitted)
            raise
        await self.state.mark_emitted(emitted, now=self.clock())
        report.pending = await self.state.pending_count()
        await self._maybe_purge(now)
        telemetry.record_batch(report)
        return report

    async def process_alerts(self, alerts: Sequence[DlpAlert]) -> BatchReport:
        """Enrich and deliver alerts that were built elsewhere (replay of assemble-stage dead letters)."""
        await self.start()
        report = BatchReport()
        records = await self._enrich_all(list(alerts), report)
        await self._deliver(records, report)
        return report

    async def deliver_records(self, records: Sequence[EnrichedRecord], *, sink: str) -> BatchReport:
        """Offer enriched records to the one sink named (replay of deliver-stage dead letters); never to the others.

        What that sink still does not take is dead-lettered again; no outage is raised here.
        """
        await self.start()
        report = BatchReport()
        for entry, plugin in self.sinks:
            if entry.name == sink:
                await self._dead_letter(await self._deliver_to(entry.name, plugin, list(records), report), report)
                return report
        raise KeyError(sink)

    async def flush(self) -> BatchReport:
        """Emit every pending split alert now (end of a CLI run), in chunks of `assembly.emit_batch_size`
        so that a large backlog never becomes one huge batch in memory."""
        total = BatchReport()
        while True:
            report = await self.process_batch([], flush=True)
            total.merge(report)
            if report.pending == 0 or report.emitted_split == 0:
                return total

    async def _claim_assembled(self, alerts: list[DlpAlert], *, now: float, force: bool, report: BatchReport) -> list[str]:
        settings = self.config.assembly
        claimed = await self.state.claim_due(
            now=now, settle_seconds=settings.settle_seconds, max_hold_seconds=settings.max_hold_seconds, lease_seconds=settings.lease_seconds,
            force=force, limit=settings.emit_batch_size,
        )
        report.emitted_split += len(claimed)
        broken: list[DeadLetter] = []
        for pending in claimed:
            try:
                alerts.append(assemble(pending.parts))
            except ValidationError as exc:
                body = orjson.dumps(merge_parts(pending.parts))
                broken.append(DeadLetter(stage="assemble", reason="invalid_alert", detail=validation_summary(exc), body=body, alert_id=pending.alert_id))
        await self._dead_letter(broken, report)
        return [pending.alert_id for pending in claimed]

    # -- enrichment ----------------------------------------------------------------------------

    async def _enrich_all(self, alerts: list[DlpAlert], report: BatchReport) -> list[EnrichedRecord]:
        """Run the chain over the whole batch, wave by wave: each enricher of a wave sees every alert
        of the batch (one `enrich_batch` call, or `enrich` per alert), then the next wave runs."""
        if not alerts:
            return []
        processed_at = datetime.fromtimestamp(self.clock(), tz=timezone.utc)
        fragments: list[dict[str, BaseModel]] = [{} for _ in alerts]
        statuses: list[dict[str, EnrichmentStatus]] = [{} for _ in alerts]
        for wave in self.chain.waves:
            jobs = [
                run_enricher(slot, alerts, fragments, statuses, clock=self.clock, breaker=self.enricher_breakers.get(slot.name), concurrency=self._semaphore)
                for slot in wave
            ]
            await (jobs[0] if len(jobs) == 1 else asyncio.gather(*jobs))
        unique: dict[str, EnrichedRecord] = {}
        for alert, alert_fragments, alert_statuses in zip(alerts, fragments, statuses):
            record = EnrichedRecord.model_construct(
                record_id=alert.content_id(),
                alert=alert,
                enrichments={name: fragment.model_dump(mode="json") for name, fragment in alert_fragments.items()},
                enrichment_status=alert_statuses,
                pipeline_version=__version__,
                processed_at=processed_at,
            )
            unique.setdefault(record.record_id, record)
            for name, status in alert_statuses.items():
                report.enrichment[(name, status.state)] += 1
        report.alerts += len(unique)
        report.record_ids.extend(unique)
        return list(unique.values())

    # -- delivery ------------------------------------------------------------------------------

    async def _deliver(self, records: list[EnrichedRecord], report: BatchReport) -> None:
        if not records:
            return
        routed: set[str] = set()
        jobs, offered = [], []
        for entry, sink in self.sinks:
            selected = [record for record in records if entry.when.matches(record)]
            routed.update(record.record_id for record in selected)
            if selected:
                jobs.append(self._deliver_to(entry.name, sink, selected, report))
                offered.append((entry.name, selected))
        report.unrouted += sum(1 for record in records if record.record_id not in routed)
        failures = await asyncio.gather(*jobs)
        await self._check_outage(offered, failures)
        await self._dead_letter([entry for batch in failures for entry in batch], report)

    async def _check_outage(self, offered: list[tuple[str, list[EnrichedRecord]]], failures: list[list[DeadLetter]]) -> None:
        """Raise SinkOutage when a sink took none of its records and the batch may still run again."""
        down = [
            (name, selected)
            for (name, selected), dead in zip(offered, failures)
            if len(dead) == len(selected) and all(entry.reason == "retries_exhausted" for entry in dead)
        ]
        if not down:
            return
        settings = self.config.delivery
        key = fingerprint((name, record.record_id) for name, selected in down for record in selected)
        names = tuple(name for name, _ in down)
        if settings.on_outage == "raise" and settings.max_batch_redeliveries > 0:
            runs = self._redeliveries.increment(key, now=self.clock())
            if runs <= settings.max_batch_redeliveries:
                log.warning("sink(s) %s took none of the batch's records: batch to be run again (%d of %d)", ", ".join(names), runs, settings.max_batch_redeliveries)
                retry_after = max(self.sink_breakers[name].remaining_cooldown() for name in names)
                raise SinkOutage(f"sink(s) {', '.join(names)} unavailable for the whole batch (run {runs} of {settings.max_batch_redeliveries})", sinks=names, retry_after=retry_after or None)
            self._redeliveries.forget(key)
        log.warning("sink(s) %s took none of the batch's records: dead-lettering them", ", ".join(names))

    async def _release(self, alert_ids: list[str]) -> None:
        """Give claimed split alerts back (their batch raised), so that running it again claims them."""
        if alert_ids:
            await self.state.release(alert_ids)

    async def _deliver_to(self, name: str, sink: Any, records: list[EnrichedRecord], report: BatchReport) -> list[DeadLetter]:
        settings = self.config.delivery
        deadline = time.monotonic() + settings.budget_seconds
        delay = settings.backoff_initial_seconds
        pending, attempt, dead = records, 0, []
        while pending:
            attempt += 1
            outcomes = await self._publish(name, sink, pending)
            retry: list[tuple[EnrichedRecord, Outcome]] = []
            for record, outcome in zip(pending, outcomes):
                if outcome.status == "delivered":
                    report.delivered[name] += 1
                elif outcome.status == "rejected":
                    dead.append(_delivery_dead_letter(record, name, "sink_rejected", outcome.reason or "rejected", attempt))
                else:
                    retry.append((record, outcome))
            if not retry:
                break
            wait = backoff_wait(delay, [o.retry_after for _, o in retry])
            if attempt >= settings.max_attempts or time.monotonic() + wait > deadline:
                for record, outcome in retry:
                    dead.append(_delivery_dead_letter(record, name, "retries_exhausted", f"{attempt} attempts; last: {outcome.reason}", attempt))
                break
            await asyncio.sleep(wait)
            delay = min(delay * 2, settings.backoff_max_seconds)
            pending = [record for record, _ in retry]
        if dead:
            log.warning("sink %s: %d record(s) dead-lettered (%s)", name, len(dead), dead[0].reason)
        return dead

    async def _publish(self, name: str, sink: Any, records: list[EnrichedRecord]) -> list[Outcome]:
        breaker = self.sink_breakers.get(name)
        if breaker is not None and not breaker.allow():
            return [Outcome.retryable("circuit open", breaker.remaining_cooldown() or None)] * len(records)
        outcomes = await self._call_sink(name, sink, records)
        if breaker is not None:
            breaker.record_failure() if all(o.status == "retryable" for o in outcomes) else breaker.record_success()
        return outcomes

    async def _call_sink(self, name: str, sink: Any, records: list[EnrichedRecord]) -> list[Outcome]:
        try:
            outcomes = list(await sink.publish(records))
        except Exception as exc:
            error = translate(exc, role="sink")
            log.debug("sink %s raised", name, exc_info=exc)
            if isinstance(error, SinkUnavailable):
                return [Outcome.retryable(str(error), error.retry_after)] * len(records)
            return [Outcome.rejected(str(error))] * len(records)
        if len(outcomes) != len(records):
            reason = f"sink returned {len(outcomes)} outcomes for {len(records)} records"
            return [Outcome.retryable(reason)] * len(records)
        return outcomes

    async def _dead_letter(self, entries: list[DeadLetter], report: BatchReport) -> None:
        if entries:
            await self.dead_letter.put(entries)
            report.dead_lettered.update(entry.stage for entry in entries)
            telemetry.record_dead_letters(entries)

    async def _maybe_purge(self, now: float) -> None:
        if now - self._last_purge < _PURGE_EVERY_SECONDS:
            return
        self._last_purge = now
        await self.state.purge(emitted_before=now - self.config.assembly.retention_hours * 3600)


async def run_enricher(
    slot: EnricherSlot,
    alerts: Sequence[DlpAlert],
    fragments: Sequence[dict[str, BaseModel]],
    statuses: Sequence[dict[str, EnrichmentStatus]],
    *,
    clock: Callable[[], float],
    breaker: Any = None,
    concurrency: asyncio.Semaphore | None = None,
) -> None:
    """Run one enricher on a batch of alerts, as the runner does; `fragments[i]` and `statuses[i]`
    belong to `alerts[i]`. A plugin with `enrich_batch` gets one call for the whole batch under its
    timeout (`_run_batch`); any other gets one `enrich` per alert, each under its own timeout
    (`_run_step`), at most `concurrency` at a time. Never raises for the enricher's failure.
    (Also used by pipeline.testing.run_enricher, so plugin tests exercise this exact path.)"""
    if getattr(slot.plugin, "enrich_batch", None) is not None:
        await _run_batch(slot, alerts, fragments, statuses, clock=clock, breaker=breaker)
        return

    limit = concurrency or contextlib.nullcontext()

    async def one(index: int) -> None:  # its own task: its log records carry this alert's ids
        async with limit:
            telemetry.bind_alert(alerts[index])
            await _run_step(slot, alerts[index], fragments[index], statuses[index], clock=clock, breaker=breaker)

    await asyncio.gather(*(one(index) for index in range(len(alerts))))


async def _run_step(
    slot: EnricherSlot,
    alert: DlpAlert,
    fragments: dict[str, BaseModel],
    statuses: dict[str, EnrichmentStatus],
    *,
    clock: Callable[[], float],
    breaker: Any = None,
) -> None:
    """Run one enricher's `enrich` on one alert: under its timeout and circuit breaker, recording
    ok / skipped / failed / timed_out with the duration in `statuses[slot.name]` and the fragment in
    `fragments[slot.name]`. Never raises for the enricher's failure."""
    if breaker is not None and not breaker.allow():
        statuses[slot.name] = _circuit_open()
        return
    ctx = EnrichmentContext(alert, fragments=fragments, statuses=statuses, cache=slot.cache, clock=clock)
    started = perf_counter()
    result: Any
    try:
        async with asyncio.timeout(slot.timeout):
            result = await slot.plugin.enrich(alert, ctx)
    except Exception as exc:  # TimeoutError included: _outcome tells them apart
        result = exc
    state, error = _outcome(slot, alert, result, fragments)
    if error is not None:
        log.warning("enricher %s %s for alert %s: %s", slot.name, state, alert.alert_id, error)
    if breaker is not None:
        breaker.record_failure() if state in ("failed", "timed_out") else breaker.record_success()
    duration_ms = round((perf_counter() - started) * 1000, 3)
    statuses[slot.name] = EnrichmentStatus.model_construct(state=state, error=error, duration_ms=duration_ms)
    telemetry.record_enricher(slot.name, state, duration_ms / 1000)


async def _run_batch(
    slot: EnricherSlot,
    alerts: Sequence[DlpAlert],
    fragments: Sequence[dict[str, BaseModel]],
    statuses: Sequence[dict[str, EnrichmentStatus]],
    *,
    clock: Callable[[], float],
    breaker: Any = None,
) -> None:
    """Run one enricher's `enrich_batch` on a batch: one call under the enricher's timeout and circuit
    breaker. Each alert gets its own outcome from its own element of the answer (a fragment, None or
    an exception); a call that raises or times out fails (or times out) every alert of the batch; an
    answer of the wrong length fails them all. `duration_ms` is the batch call's. Never raises for
    the enricher's failure."""
    if breaker is not None and not breaker.allow():
        for alert_statuses in statuses:
            alert_statuses[slot.name] = _circuit_open()
        return
    contexts = [
        EnrichmentContext(alert, fragments=alert_fragments, statuses=alert_statuses, cache=slot.cache, clock=clock)
        for alert, alert_fragments, alert_statuses in zip(alerts, fragments, statuses)
    ]
    started = perf_counter()
    results: list[Any]
    try:
        async with asyncio.timeout(slot.timeout):
            results = list(await slot.plugin.enrich_batch(list(alerts), contexts))
        if len(results) != len(alerts):
            results = [EnricherError(f"enrich_batch returned {len(results)} results for {len(alerts)} alerts")] * len(alerts)
    except Exception as exc:  # TimeoutError included: _outcome tells them apart
        results = [exc] * len(alerts)
    duration_ms = round((perf_counter() - started) * 1000, 3)
    failed: list[tuple[DlpAlert, str, str]] = []
    counts: Counter[str] = Counter()
    made: dict[tuple[str, str | None], EnrichmentStatus] = {}  # alerts of one outcome share one (never changed) status
    for alert, result, alert_fragments, alert_statuses in zip(alerts, results, fragments, statuses):
        state, error = _outcome(slot, alert, result, alert_fragments)
        counts[state] += 1
        if error is not None:
            failed.append((alert, state, error))
        status = made.get((state, error))
        if status is None:
            status = made[(state, error)] = EnrichmentStatus.model_construct(state=state, error=error, duration_ms=duration_ms)
        alert_statuses[slot.name] = status
    if failed:  # one line per batch, not per alert
        alert, state, error = failed[0]
        log.warning("enricher %s %s for %d of %d alert(s) (first: alert %s): %s", slot.name, state, len(failed), len(alerts), alert.alert_id, error)
    if breaker is not None and alerts:
        breaker.record_failure() if len(failed) == len(alerts) else breaker.record_success()
    for state, count in counts.items():
        telemetry.record_enricher(slot.name, state, duration_ms / 1000, count=count)


def _outcome(slot: EnricherSlot, alert: DlpAlert, result: Any, fragments: dict[str, BaseModel]) -> tuple[str, str | None]:
    """(state, error) of one alert's result; a fragment is stored in `fragments[slot.name]`."""
    if result is None:
        return "skipped", None
    if isinstance(result, BaseModel):
        fragments[slot.name] = result
        return "ok", None
    if isinstance(result, TimeoutError):
        return "timed_out", f"no result within {slot.timeout:g}s"
    if isinstance(result, Exception):
        translated = translate(result, role="enricher")
        state = "timed_out" if isinstance(translated, EnricherTimeout) else "failed"
        log.debug("enricher %s failed for alert %s", slot.name, alert.alert_id, exc_info=result)
        return state, (str(translated) if isinstance(result, PipelineError) else type(result).__name__)
    return "failed", f"returned {type(result).__name__}, expected a pydantic model or None"


def _circuit_open() -> EnrichmentStatus:
    return EnrichmentStatus.model_construct(state="failed", error="circuit open", duration_ms=0.0)


# Python collects its youngest generation every 700 allocations by default; a batch allocates
# hundreds of thousands of short-lived objects (parsed JSON, models), and each collection also
# scans the long-lived caches it reaches. 20,000 measured 10-20 % more alerts/s (README, Performance).
GC_GEN0_THRESHOLD = 20_000


def raise_gc_threshold(gen0: int = GC_GEN0_THRESHOLD) -> None:
    """Raise the garbage collector's first threshold to `gen0` for this process (every entry point
    runs a Runner); a host that set a higher one keeps it. Collection itself stays on."""
    current = gc.get_threshold()
    if current[0] < gen0:
        gc.set_threshold(gen0, *current[1:])


def _delivery_dead_letter(record: EnrichedRecord, sink: str, reason: str, detail: str, attempts: int) -> DeadLetter:
    return DeadLetter(stage="deliver", reason=reason, detail=detail, body=record.to_json(), sink=sink, alert_id=record.alert.alert_id, record_id=record.record_id, attempts=attempts)


def _over_limit_dead_letters(parts: list[Any], limit: int) -> list[DeadLetter]:
    """One dead letter per alert whose split parts exceeded the evidence limit (parts are canonical, scrubbed)."""
    by_alert: dict[str, list[Any]] = {}
    for part in parts:
        by_alert.setdefault(part.alert_id, []).append(part)
    entries = []
    for alert_id, extra in by_alert.items():
        log.warning("alert %s: %d part(s) over the limit of %d parts per alert dead-lettered", alert_id, len(extra), limit)
        body = orjson.dumps([{"rank": p.rank, "digest": p.digest, "data": p.data} for p in extra])
        detail = f"{len(extra)} part(s) refused: the alert already holds {limit} parts, limit {limit}"
        entries.append(DeadLetter(stage="assemble", reason="too_many_evidence", detail=detail, body=body, alert_id=alert_id))
    return entries


def _resolved_state(config: LoadedConfig):
    settings = config.config.state
    return settings.model_copy(update={"path": str(config.data_path(settings.path))})
