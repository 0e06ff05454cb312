"""The enrich stage's engine: the enricher chain over a batch of alerts, wave by wave.

Guarantees:
- waves run in dependency order (`depends_on`, `runs_after`); the enrichers of one wave run
  concurrently and each sees every alert of the batch;
- an enricher with `enrich_batch` gets one call per batch under its timeout; one with only `enrich`
  gets one call per alert, each under its own timeout, at most `max_concurrent_alerts` at a time;
- a batch call that answers without waiting (local data) runs inline: no task and no timer are made
  for it; one that waits continues, in the task it started in, under a timer that counts from the
  call's start, so the enricher's timeout means what it meant before; the siblings of a wave after
  the first one that waits start at once, each in its own task;
- every alert gets a status per enricher (ok / skipped / failed / timed_out, with `duration_ms`); an
  enricher's failure, timeout, wrong answer or open circuit breaker never drops an alert;
- records carry the alert's content id as `record_id`; alerts of one batch with the same content
  become one record; a fragment shared by several alerts is dumped once, and their records share
  that dump (read a record's `enrichments`, do not change them: `to_dict()` gives a copy to change);
  the fragments of an enricher with `fragments_unchanged` are dumped once across batches (at most
  `KEPT_DUMPS` dumps kept, each with its fragment, so no other fragment takes its identity).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from time import perf_counter
from types import CoroutineType
from typing import Any

from pydantic import BaseModel

from pipeline import __version__, observability
from pipeline.enrich.contract import EnrichmentContext
from pipeline.errors import EnricherError, EnricherTimeout, PipelineError, translate
from pipeline.models import DlpAlert, EnrichedRecord, EnrichmentState, EnrichmentStatus
from pipeline.plugins import EnricherChain, EnricherSlot
from pipeline.resilience.breaker import CircuitBreaker

log = logging.getLogger("pipeline")

KEPT_DUMPS = 512  # dumps of `fragments_unchanged` enrichers' fragments kept across batches, at most (then emptied)


@dataclass
class Enriched:
    """The records of one batch, one per distinct alert, and how often each enricher ended in each state."""

    records: list[EnrichedRecord] = field(default_factory=list)
    states: Counter[tuple[str, str]] = field(default_factory=Counter)


class EnrichmentEngine:
    """Runs a built chain; holds one circuit breaker per enricher across batches."""

    def __init__(self, chain: EnricherChain, *, max_concurrent_alerts: int, breaker_threshold: int, breaker_cooldown_seconds: float,
                 clock: Callable[[], float], breaker_clock: Callable[[], float]) -> None:
        self.chain = chain
        self.clock = clock
        self._semaphore = asyncio.Semaphore(max_concurrent_alerts)
        self.breakers: dict[str, CircuitBreaker] = {
            slot.name: CircuitBreaker(slot.name, failure_threshold=breaker_threshold, cooldown_seconds=breaker_cooldown_seconds, clock=breaker_clock)
            for slot in chain.slots
        }
        self._unchanged = frozenset(slot.name for slot in chain.slots if getattr(slot.plugin, "fragments_unchanged", False) is True)
        self._kept: dict[int, tuple[BaseModel, dict[str, Any]]] = {}  # id(fragment) -> (fragment, its dump)

    async def start(self) -> None:
        for slot in self.chain.slots:
            starter = getattr(slot.plugin, "start", None)
            if starter is not None:
                await starter()

    def closers(self) -> list[Callable[[], Any]]:
        return [closer for closer in (getattr(slot.plugin, "aclose", None) for slot in self.chain.slots) if closer is not None]

    async def enrich(self, alerts: list[DlpAlert]) -> Enriched:
        """Run the chain over the whole batch, wave by wave: each enricher of a wave sees every alert
        of the batch (one `enrich_batch` call, or `enrich` per alert), then the next wave runs."""
        out = Enriched()
        if not alerts:
            return out
        processed_at = datetime.fromtimestamp(self.clock(), tz=UTC)
        fragments: list[dict[str, BaseModel]] = [{} for _ in alerts]
        statuses: list[dict[str, EnrichmentStatus]] = [{} for _ in alerts]
        for wave in self.chain.waves:
            await self._run_wave(wave, alerts, fragments, statuses)
        unique: dict[str, EnrichedRecord] = {}
        # A fragment shared by several alerts (made once per user, say) is dumped once, and its records
        # share the dump; the fragments, alive until the loop ends, are told apart by identity.
        dumps: dict[int, dict[str, Any]] = {}
        kept, unchanged = self._kept, self._unchanged

        def dumped(name: str, fragment: BaseModel) -> dict[str, Any]:
            dump = dumps.get(id(fragment))
            if dump is None:
                if name in unchanged:  # its dump from an earlier batch, if kept (held with it: the identity is its own)
                    found = kept.get(id(fragment))
                    if found is not None and found[0] is fragment:
                        dump = found[1]
                    else:
                        if len(kept) >= KEPT_DUMPS:
                            kept.clear()
                        dump = fragment.model_dump(mode="json")
                        kept[id(fragment)] = (fragment, dump)
                else:
                    dump = fragment.model_dump(mode="json")
                dumps[id(fragment)] = dump
            return dump

        for alert, alert_fragments, alert_statuses in zip(alerts, fragments, statuses):
            record = EnrichedRecord.model_construct(
                record_id=alert.content_id(),
                alert=alert,
                enrichments={name: dumped(name, fragment) for name, fragment in alert_fragments.items()},
                enrichment_status=alert_statuses,
                pipeline_version=__version__,
                processed_at=processed_at,
            )
            unique.setdefault(record.record_id, record)
            for name, status in alert_statuses.items():
                out.states[(name, status.state)] += 1
        out.records = list(unique.values())
        return out


    async def _run_wave(
        self, wave: list[EnricherSlot], alerts: list[DlpAlert], fragments: list[dict[str, BaseModel]], statuses: list[dict[str, EnrichmentStatus]],
    ) -> None:
        """The wave's enrichers, concurrently. They start one after another in this task while each
        answers without waiting; the first that waits goes on in this task (a call always ends in the
        task it started in: a timer or task group it opened is bound to that task), and the siblings
        after it start at once, each in a task of its own, as every sibling did before."""
        waiting: Awaitable[None] | None = None
        others: list[asyncio.Future[None]] = []
        for slot in wave:
            breaker = self.breakers.get(slot.name)
            if waiting is not None:
                others.append(asyncio.ensure_future(
                    run_enricher(slot, alerts, fragments, statuses, clock=self.clock, breaker=breaker, concurrency=self._semaphore)
                ))
            elif getattr(slot.plugin, "enrich_batch", None) is not None:
                waiting = _begin_batch(slot, alerts, fragments, statuses, clock=self.clock, breaker=breaker)
            else:
                waiting = run_enricher(slot, alerts, fragments, statuses, clock=self.clock, breaker=breaker, concurrency=self._semaphore)
        try:
            if waiting is not None:
                await waiting
        except BaseException:  # cancelled: the siblings' tasks end with it
            for task in others:
                task.cancel()
            raise
        if others:
            await asyncio.gather(*others)


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
    timeout (`_begin_batch`: inline when it answers without waiting); any other gets one `enrich` per alert, each under its own timeout
    (`_run_step`), at most `concurrency` at a time. Never raises for the enricher's failure.
    (Also used by pipeline.plugin_kit.testing.run_enricher, so plugin tests exercise this exact path.)"""
    if getattr(slot.plugin, "enrich_batch", None) is not None:
        rest = _begin_batch(slot, alerts, fragments, statuses, clock=clock, breaker=breaker)
        if rest is not None:
            await rest
        return

    limit = concurrency or contextlib.nullcontext()

    async def one(index: int) -> None:  # its own task: its log records carry this alert's ids
        async with limit:
            observability.bind_alert(alerts[index])
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
    statuses[slot.name] = _status(state, error, duration_ms)
    observability.record_enricher(slot.name, state, duration_ms / 1000)


def _begin_batch(
    slot: EnricherSlot,
    alerts: Sequence[DlpAlert],
    fragments: Sequence[dict[str, BaseModel]],
    statuses: Sequence[dict[str, EnrichmentStatus]],
    *,
    clock: Callable[[], float],
    breaker: Any = None,
) -> Awaitable[None] | None:
    """Start one enricher's `enrich_batch` on a batch: one call under the enricher's timeout and
    circuit breaker. Returns None when the call is over (it answered without waiting, from local
    data: then no task and no timer were made for it), else the awaitable that finishes it under a
    timer counting from the call's start.

    Each alert gets its own outcome from its own element of the answer (a fragment, None or an
    exception); a call that raises or times out fails (or times out) every alert of the batch; an
    answer of the wrong length fails them all. `duration_ms` is the batch call's. Never raises for
    the enricher's failure."""
    if breaker is not None and not breaker.allow():
        for alert_statuses in statuses:
            alert_statuses[slot.name] = _circuit_open()
        return None
    contexts = [
        EnrichmentContext(alert, fragments=alert_fragments, statuses=alert_statuses, cache=slot.cache, clock=clock)
        for alert, alert_fragments, alert_statuses in zip(alerts, fragments, statuses)
    ]
    started = perf_counter()
    try:
        call = slot.plugin.enrich_batch(list(alerts), contexts)
        if type(call) is not CoroutineType and not isinstance(call, Coroutine):  # an awaitable of another kind: awaited under the timer
            return _finish_batch(slot, alerts, fragments, statuses, call, None, _deadline(slot, started), started, breaker)
        yielded = call.send(None)  # as far as it goes without waiting
    except StopIteration as answered:
        _settle_batch(slot, alerts, fragments, statuses, answered.value, started, breaker)
        return None
    except Exception as exc:
        _settle_batch(slot, alerts, fragments, statuses, exc, started, breaker)
        return None
    return _finish_batch(slot, alerts, fragments, statuses, call, _Resumed(call, yielded), _deadline(slot, started), started, breaker)


def _deadline(slot: EnricherSlot, started: float) -> float | None:
    """The loop time at which a batch call begun at `started` (perf_counter) times out: its timeout
    counts from the call's start (computed only for a call that waits)."""
    if slot.timeout is None:
        return None
    return asyncio.get_running_loop().time() - (perf_counter() - started) + slot.timeout


async def _finish_batch(
    slot: EnricherSlot,
    alerts: Sequence[DlpAlert],
    fragments: Sequence[dict[str, BaseModel]],
    statuses: Sequence[dict[str, EnrichmentStatus]],
    call: Any,
    resumed: _Resumed | None,
    deadline: float | None,
    started: float,
    breaker: Any,
) -> None:
    """The rest of a batch call that waits: under a timer ending at `deadline` (loop time)."""
    answer: Any
    try:
        async with asyncio.timeout_at(deadline):
            answer = await (resumed if resumed is not None else call)
    except Exception as exc:  # TimeoutError included: _outcome tells them apart
        answer = exc
    _settle_batch(slot, alerts, fragments, statuses, answer, started, breaker)


class _Resumed:
    """Awaiting it drives a coroutine already started (its first step ran and yielded `yielded`) to
    its end, as `await coroutine` would have: every later step, value and exception (a timer's
    cancellation included) goes through to it."""

    __slots__ = ("coroutine", "yielded")

    def __init__(self, coroutine: Coroutine[Any, Any, Any], yielded: Any) -> None:
        self.coroutine = coroutine
        self.yielded = yielded

    def __await__(self) -> Generator[Any, Any, Any]:
        coroutine, yielded = self.coroutine, self.yielded
        while True:
            try:
                sent = yield yielded
            except GeneratorExit:
                coroutine.close()
                raise
            except BaseException as exc:  # a cancellation (the timer's) or an error thrown in: passed on
                try:
                    yielded = coroutine.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    yielded = coroutine.send(sent)
                except StopIteration as done:
                    return done.value


def _settle_batch(
    slot: EnricherSlot,
    alerts: Sequence[DlpAlert],
    fragments: Sequence[dict[str, BaseModel]],
    statuses: Sequence[dict[str, EnrichmentStatus]],
    answer: Any,
    started: float,
    breaker: Any,
) -> None:
    """Record each alert's outcome of one batch call's answer (a sequence of results, or the
    exception the call ended with)."""
    results: list[Any]
    if isinstance(answer, Exception):
        results = [answer] * len(alerts)
    else:
        try:
            results = list(answer)
        except Exception as exc:
            results = [exc] * len(alerts)
        if len(results) != len(alerts):
            results = [EnricherError(f"enrich_batch returned {len(results)} results for {len(alerts)} alerts")] * len(alerts)
    duration_ms = round((perf_counter() - started) * 1000, 3)
    failed: list[tuple[DlpAlert, EnrichmentState, str]] = []
    counts: dict[EnrichmentState, int] = {}
    made: dict[tuple[str, str | None], EnrichmentStatus] = {}  # alerts of one outcome share one (never changed) status
    for alert, result, alert_fragments, alert_statuses in zip(alerts, results, fragments, statuses):
        state, error = _outcome(slot, alert, result, alert_fragments)
        counts[state] = counts.get(state, 0) + 1
        if error is not None:
            failed.append((alert, state, error))
        status = made.get((state, error))
        if status is None:
            status = made[(state, error)] = _status(state, error, duration_ms)
        alert_statuses[slot.name] = status
    if failed:  # one line per batch, not per alert
        alert, state, error = failed[0]
        log.warning("enricher %s %s for %d of %d alert(s) (first: alert %s): %s", slot.name, state, len(failed), len(alerts), alert.alert_id, error)
    if breaker is not None and alerts:
        breaker.record_failure() if len(failed) == len(alerts) else breaker.record_success()
    for state, count in counts.items():
        observability.record_enricher(slot.name, state, duration_ms / 1000, count=count)


def _outcome(slot: EnricherSlot, alert: DlpAlert, result: Any, fragments: dict[str, BaseModel]) -> tuple[EnrichmentState, str | None]:
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
        state: EnrichmentState = "timed_out" if isinstance(translated, EnricherTimeout) else "failed"
        log.debug("enricher %s failed for alert %s", slot.name, alert.alert_id, exc_info=result)
        return state, (str(translated) if isinstance(result, PipelineError) else type(result).__name__)
    return "failed", f"returned {type(result).__name__}, expected a pydantic model or None"


def _circuit_open() -> EnrichmentStatus:
    return _status("failed", "circuit open", 0.0)


def _status(state: EnrichmentState, error: str | None, duration_ms: float) -> EnrichmentStatus:
    # Validated: for three scalar fields pydantic's validator is faster than `model_construct`'s Python loop.
    return EnrichmentStatus(state=state, error=error, duration_ms=duration_ms)
