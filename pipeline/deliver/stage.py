"""The deliver stage: enriched records routed, minimised and published to every sink, with retries.

Guarantees, per batch:
- every record is offered to every sink whose `when` matches (pipeline/deliver/routing.py); routing
  reads the full record;
- a sink with `fields` or `pseudonymise` receives the minimised record only (pipeline/deliver/minimise.py);
  dead letters keep the full record, so a replay can send it again;
- transient failures (`retryable` outcomes, or a raised error that maps to SinkUnavailable) are
  retried with jittered exponential backoff honouring Retry-After, at most `delivery.max_attempts`
  calls and within `delivery.budget_seconds` per sink; what is rejected or still failing becomes a
  dead letter (stage "deliver") naming the sink and the reason;
- every sink sits behind a circuit breaker: an open one is not called and its records stay retryable;
- the outage rule: when a sink took none of the records the batch offered it (every call failed
  transiently until the budget ran out), `deliver` raises SinkOutage without dead-lettering them, so
  the caller runs the batch again; after `delivery.max_batch_redeliveries` runs of the same records
  (counted in the state store), or with `delivery.on_outage = "dead_letter"`, they are dead-lettered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import DeliverySettings, LoadedConfig, SinkConfig
from pipeline.deadletter import DeadLetter
from pipeline.deliver.minimise import Minimiser, minimiser_for
from pipeline.deliver.routing import route
from pipeline.deliver.sinks import Outcome, publish_deadline
from pipeline.errors import PathUnusable, SinkOutage, SinkUnavailable, StoreDamaged, translate
from pipeline.models import EnrichedRecord
from pipeline.resilience.breaker import CircuitBreaker
from pipeline.resilience.retry import backoff_wait, fingerprint
from pipeline.state import StateStore

log = logging.getLogger("pipeline")


@dataclass
class SinkSlot:
    """One configured sink, ready to publish: its entry, the plugin, its minimiser and its breaker."""

    entry: SinkConfig
    plugin: Any
    minimiser: Minimiser | None
    breaker: CircuitBreaker

    @property
    def name(self) -> str:
        return self.entry.name


@dataclass
class Delivered:
    """What delivering one batch did: records delivered per sink, dead letters, records no sink matched."""

    delivered: Counter[str] = field(default_factory=Counter)
    dead: list[DeadLetter] = field(default_factory=list)
    unrouted: int = 0



def _refused_whole(offered: list[tuple[SinkSlot, list[EnrichedRecord]]], failures: list[list[DeadLetter]]) -> list[tuple[str, list[EnrichedRecord]]]:
    """The sinks (name, records offered) that took none of their records, every one after its retries:
    what the outage rule acts on."""
    return [
        (slot.name, selected)
        for (slot, selected), dead in zip(offered, failures)
        if len(dead) == len(selected) and all(entry.reason == "retries_exhausted" for entry in dead)
    ]

class Delivery:
    """Delivers batches of records to the configured sinks; holds their breakers across batches."""

    def __init__(
        self, sinks: list[tuple[SinkConfig, Any]], config: LoadedConfig, *, state: StateStore,
        clock: Callable[[], float], breaker_clock: Callable[[], float],
    ) -> None:
        self.settings: DeliverySettings = config.config.delivery
        self.state = state  # counts the runs of a batch that raised for an outage
        self.clock = clock
        settings = self.settings
        self.slots: list[SinkSlot] = [
            SinkSlot(
                entry, plugin, minimiser_for(entry, config, f"sinks[{config.config.sinks.index(entry)}]"),
                CircuitBreaker(entry.name, failure_threshold=settings.breaker_threshold, cooldown_seconds=settings.breaker_cooldown_seconds, clock=breaker_clock),
            )
            for entry, plugin in sinks
        ]

    def slot(self, name: str) -> SinkSlot:
        for slot in self.slots:
            if slot.name == name:
                return slot
        raise KeyError(name)

    def closers(self) -> list[Callable[[], Any]]:
        return [closer for closer in (getattr(slot.plugin, "aclose", None) for slot in self.slots) if closer is not None]

    async def deliver(self, records: list[EnrichedRecord]) -> Delivered:
        """Route and deliver one batch; raises SinkOutage by the outage rule (nothing dead-lettered then)."""
        out = Delivered()
        if not records:
            return out
        selected, out.unrouted = route([(slot.name, slot.entry.when) for slot in self.slots], records)
        offered = [(slot, selected[slot.name]) for slot in self.slots if slot.name in selected]
        if len(offered) == 1:  # one sink: no task for it
            slot, chosen = offered[0]
            failures = [await self.deliver_to(slot, chosen, out.delivered)]
        else:
            failures = list(await asyncio.gather(*(self.deliver_to(slot, chosen, out.delivered) for slot, chosen in offered)))
        down = _refused_whole(offered, failures)
        if down:
            await self._outage(down)
        out.dead = [entry for batch in failures for entry in batch]
        return out

    async def deliver_to(self, slot: SinkSlot, records: list[EnrichedRecord], delivered: Counter[str]) -> list[DeadLetter]:
        """Publish to one sink with retries; counts deliveries in `delivered`, returns the dead letters."""
        settings = self.settings
        deadline = time.monotonic() + settings.budget_seconds
        delay = settings.backoff_initial_seconds
        sent: list[Any] = records if slot.minimiser is None else [slot.minimiser.apply(record) for record in records]
        pending = list(range(len(records)))
        attempt, dead = 0, []
        while pending:
            attempt += 1
            outcomes = await self._publish(slot, [sent[index] for index in pending], deadline)
            retry: list[tuple[int, Outcome]] = []
            for index, outcome in zip(pending, outcomes):
                if outcome.status == "delivered":
                    delivered[slot.name] += 1
                elif outcome.status == "rejected":
                    dead.append(_dead_letter(records[index], slot.name, "sink_rejected", outcome.reason or "rejected", attempt))
                else:
                    retry.append((index, outcome))
            if not retry:
                break
            wait = backoff_wait(delay, [o.retry_after for _, o in retry])
            if attempt >= settings.max_attempts or time.monotonic() + wait > deadline:
                for index, outcome in retry:
                    dead.append(_dead_letter(records[index], slot.name, "retries_exhausted", f"{attempt} attempts; last: {outcome.reason}", attempt))
                break
            await asyncio.sleep(wait)
            delay = min(delay * 2, settings.backoff_max_seconds)
            pending = [index for index, _ in retry]
        if dead:
            log.warning("sink %s: %d record(s) not taken (%s)", slot.name, len(dead), dead[0].reason)
        return dead

    async def _outage(self, down: list[tuple[str, list[EnrichedRecord]]]) -> None:
        """`down`: the sinks that took none of their records (`_refused_whole`). Raise SinkOutage when
        the batch may still run again; else say that their records are dead-lettered."""
        settings = self.settings
        key = fingerprint((name, record.record_id) for name, selected in down for record in selected)
        names = tuple(name for name, _ in down)
        if settings.on_outage == "raise" and settings.max_batch_redeliveries > 0:
            runs = await self.state.count_redelivery(key, now=self.clock())
            if runs <= settings.max_batch_redeliveries:
                log.warning("sink(s) %s took none of the batch's records: batch to be run again (%d of %d)", ", ".join(names), runs, settings.max_batch_redeliveries)
                retry_after = max(self.slot(name).breaker.remaining_cooldown() for name in names)
                raise SinkOutage(f"sink(s) {', '.join(names)} unavailable for the whole batch (run {runs} of {settings.max_batch_redeliveries})", sinks=names, retry_after=retry_after or None)
            await self.state.forget_redelivery(key)
        log.warning("sink(s) %s took none of the batch's records: dead-lettering them", ", ".join(names))

    async def _publish(self, slot: SinkSlot, records: list[Any], deadline: float) -> list[Outcome]:
        breaker = slot.breaker
        if not breaker.allow():
            return [Outcome.retryable("circuit open", breaker.remaining_cooldown() or None)] * len(records)
        token = publish_deadline.set(deadline)  # a sink that retries inside the call stops there
        try:
            outcomes = await _call_sink(slot.name, slot.plugin, records)
        finally:
            publish_deadline.reset(token)
        breaker.record_failure() if all(o.status == "retryable" for o in outcomes) else breaker.record_success()
        return outcomes


async def _call_sink(name: str, sink: Any, records: list[Any]) -> list[Outcome]:
    """One `publish` call; whatever it raises or returns becomes one Outcome per record."""
    try:
        outcomes = list(await sink.publish(records))
    except (StoreDamaged, PathUnusable):
        raise  # a local sink's file that retrying or dead-lettering cannot help: the run stops, naming it
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


def _dead_letter(record: EnrichedRecord, sink: str, reason: str, detail: str, attempts: int) -> DeadLetter:
    return DeadLetter(stage="deliver", reason=reason, detail=detail, body=record.to_json(), sink=sink, alert_id=record.alert.alert_id, record_id=record.record_id, attempts=attempts)
