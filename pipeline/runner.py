"""The runner: one batch of message bodies in, enriched records delivered or dead-lettered out.

It composes the stages and holds none of their logic; it serves every entry point (Functions
trigger, CLI, consumer, replay, benchmarks). One batch walks, in this order:

1. ingest (pipeline/ingest/stage.py): decode every message on its own; bad input is dead-lettered
   and made durable before anything else;
2. assemble (pipeline/assemble/stage.py): parts of split alerts stored in the state store, settled
   alerts claimed;
3. enrich (pipeline/enrich/engine.py): the enricher chain over the whole batch, wave by wave;
4. deliver (pipeline/deliver/stage.py): routing, minimisation, retries, breakers, the outage rule;
5. report (pipeline/report.py): counters of the batch; only now are claimed alerts marked emitted.

If the state or dead-letter store fails, `process_batch` raises StoreUnavailable: nothing can be
accounted for, so the caller must retry the batch (the Functions host does, before checkpointing).
If delivery raises SinkOutage, the claimed split alerts are released first, so running the batch
again claims them again (docs/delivery.md).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from pipeline import observability
from pipeline.assemble.stage import Assembler
from pipeline.config import LoadedConfig, SinkConfig
from pipeline.deadletter import DeadLetter, DeadLetterStore, open_dead_letter_store
from pipeline.deliver.stage import Delivery
from pipeline.enrich.engine import EnrichmentEngine, run_enricher
from pipeline.errors import SinkOutage
from pipeline.ingest.message import Message
from pipeline.ingest.stage import ingest
from pipeline.models import DlpAlert, EnrichedRecord
from pipeline.plugins import CredentialFactory, EnricherChain, Services, azure_identity_credential, build_enricher_chain, build_sinks
from pipeline.process import raise_gc_threshold
from pipeline.report import BatchReport
from pipeline.resilience.breaker import CircuitBreaker
from pipeline.secrets import install_log_redaction
from pipeline.state import StateStore, open_state_store

__all__ = ["BatchReport", "Message", "Runner", "run_enricher"]

log = logging.getLogger("pipeline")

_PURGE_EVERY_SECONDS = 600.0


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
        credential_factory: CredentialFactory = azure_identity_credential,
    ) -> None:
        """`credential_factory` builds the one Azure credential per identity that every client shares
        (`Services.credential`); the default is azure-identity's."""
        self.loaded = config
        self.config = config.config
        install_log_redaction(config.secret_env_names)  # secrets never reach a log line (docs/security.md)
        self.clock = clock
        settings = self.config
        self.services = Services(state=None, config=config, clock=clock, credential_factory=credential_factory)
        self.state: StateStore = state or self._open_state()
        self.services.state = self.state
        self.dead_letter: DeadLetterStore = dead_letter or open_dead_letter_store(config, self.services)
        self.assembler = Assembler(self.state, settings.assembly, max_parts_per_alert=settings.limits.max_evidence_per_alert)
        self.engine = EnrichmentEngine(
            build_enricher_chain(settings.enrichers, self.services), max_concurrent_alerts=settings.runner.max_concurrent_alerts,
            breaker_threshold=settings.runner.enricher_breaker_threshold, breaker_cooldown_seconds=settings.runner.enricher_breaker_cooldown_seconds,
            clock=clock, breaker_clock=breaker_clock,
        )
        self.delivery = Delivery(
            build_sinks(settings.sinks, self.services), config, state=self.state, clock=clock, breaker_clock=breaker_clock,
        )
        self._last_purge = 0.0
        self._started = False

    # What tests and tools inspect: the built chain, the sinks as (entry, plugin), the breakers.
    @property
    def chain(self) -> EnricherChain:
        return self.engine.chain

    @property
    def sinks(self) -> list[tuple[SinkConfig, Any]]:
        return [(slot.entry, slot.plugin) for slot in self.delivery.slots]

    @property
    def sink_breakers(self) -> dict[str, CircuitBreaker]:
        return {slot.name: slot.breaker for slot in self.delivery.slots}

    def _open_state(self) -> StateStore:
        """The configured state store: a relative SQLite path under the data dir; the Table store
        signed in with the shared credential (only built when it signs in with an identity)."""
        settings = self.config.state.model_copy(update={"path": str(self.loaded.data_path(self.config.state.path))})
        credential = self.services.credential(settings.managed_identity_client_id) if settings.kind == "azure_table" and settings.account_url else None
        return open_state_store(settings, credential=credential)

    @property
    def enricher_breakers(self) -> dict[str, CircuitBreaker]:
        return self.engine.breakers

    async def start(self) -> None:
        if not self._started:
            raise_gc_threshold()
            await self.engine.start()
            self._started = True

    async def aclose(self) -> None:
        for closer in self.engine.closers() + self.delivery.closers():
            try:
                await closer()
            except Exception as exc:  # closing must not hide the run's own result
                log.warning("error while closing a plugin: %s", type(exc).__name__)
        try:
            await self.dead_letter.aclose()
            await self.state.aclose()
        finally:
            await self.services.aclose()  # last: the credentials every client above shared

    async def __aenter__(self) -> Runner:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def process_batch(self, messages: Sequence[Message], *, flush: bool = False) -> BatchReport:
        """Decode, assemble, enrich and deliver one batch. `flush` emits every pending alert now."""
        await self.start()
        report = BatchReport(messages=len(messages))
        now = self.clock()
        ingested = ingest(messages, limits=self.config.limits, now=now, keep_user_justification=self.config.lifecycle.keep_user_justification)
        report.records, report.skipped, report.field_warnings = ingested.records, ingested.skipped, ingested.warnings
        await self._dead_letter(ingested.dead, report)  # bad input is durable first: a crash loses nothing read
        with self.state.joined_writes():  # the parts and the claim: one commit (SQLite), before any enrichment
            report.duplicate_parts, over_limit = await self.assembler.store(ingested.parts, now=now)
            claimed = await self.assembler.claim(now=now, force=flush)
        await self._dead_letter(over_limit, report)
        report.emitted_split = len(claimed.alert_ids)
        report.field_warnings += claimed.warnings
        await self._dead_letter(claimed.dead, report)
        # The enrichers' history writes (SQLite: in the state file) ride with the mark of the batch's
        # split alerts, or the release of an outage: one commit, made before the batch returns.
        with self.state.holding_history_writes():
            records = await self._enrich(ingested.alerts + claimed.alerts, report)
            try:
                await self._deliver(records, report)
            except SinkOutage:
                await self.assembler.release(claimed.alert_ids)
                raise
            await self.assembler.mark_emitted(claimed.alert_ids, now=self.clock())
        report.pending = await self.state.pending_count()
        await self._maybe_purge(now)
        observability.record_batch(report)
        return report

    async def process_alerts(self, alerts: Sequence[DlpAlert]) -> BatchReport:
        """Enrich and deliver alerts that were built elsewhere (replay of assemble-stage dead letters)."""
        await self.start()
        report = BatchReport()
        await self._deliver(await self._enrich(list(alerts), report), report)
        return report

    async def deliver_records(self, records: Sequence[EnrichedRecord], *, sink: str) -> BatchReport:
        """Offer enriched records to the one sink named (replay of deliver-stage dead letters); never to the others.

        What that sink still does not take is dead-lettered again; no outage is raised here.
        """
        await self.start()
        report = BatchReport()
        dead = await self.delivery.deliver_to(self.delivery.slot(sink), list(records), report.delivered)
        await self._dead_letter(dead, report)
        return report

    async def flush(self) -> BatchReport:
        """Emit every pending split alert now (end of a CLI run), in chunks of `assembly.emit_batch_size`
        so that a large backlog never becomes one huge batch in memory. The report names the records
        flushed (`record_ids`), like one batch's."""
        total = BatchReport()
        while True:
            report = await self.process_batch([], flush=True)
            total.merge(report)
            total.record_ids.extend(report.record_ids)  # the flushed records (merge keeps counters only)
            if report.pending == 0 or report.emitted_split == 0:
                return total

    async def _enrich(self, alerts: list[DlpAlert], report: BatchReport) -> list[EnrichedRecord]:
        enriched = await self.engine.enrich(alerts)
        report.enrichment.update(enriched.states)
        report.alerts += len(enriched.records)
        report.record_ids.extend(record.record_id for record in enriched.records)
        return enriched.records

    async def _deliver(self, records: list[EnrichedRecord], report: BatchReport) -> None:
        delivered = await self.delivery.deliver(records)
        report.delivered.update(delivered.delivered)
        report.unrouted += delivered.unrouted
        await self._dead_letter(delivered.dead, report)

    async def _dead_letter(self, entries: list[DeadLetter], report: BatchReport) -> None:
        if entries:
            await self.dead_letter.put(entries)  # raises StoreUnavailable having said how many it wrote
            report.dead_lettered.update(entry.stage for entry in entries)
            observability.record_dead_letters(entries)
            reasons = Counter(f"{entry.stage}/{entry.reason}" for entry in entries)
            log.warning("%d dead letter(s) written (%s)", len(entries), ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())))

    async def _maybe_purge(self, now: float) -> None:
        if now - self._last_purge >= _PURGE_EVERY_SECONDS:
            self._last_purge = now
            await self.state.purge(emitted_before=now - self.config.assembly.retention_hours * 3600)
