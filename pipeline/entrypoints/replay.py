"""Replay of dead letters: re-drive each entry through the pipeline; remove it only once it is accounted for.

Per stage:
- `decode`: the stored body (a whole message, or one record of it, wrapped back into a message) is
  run through the runner as a message. If it still does not decode, the entry stays (attempts + 1)
  and nothing reaches any sink.
- `assemble`: the stored merged fields are validated as an alert again; if they now make an alert,
  it is enriched and delivered to every matching sink.
- `deliver`: the stored record goes to the sink named in the entry only (the others already have
  it), grouped per sink.
An entry is removed only after its re-drive returned with nothing of it failing again; one that
fails again keeps the reason, source and indexes of its first failure, and each replay's failure is
appended to it (`replay_attempts`: when and why), attempts + 1; a failure
that is new (e.g. a decoded message whose record a sink now rejects) becomes its own entry. A crash
between delivery and removal re-delivers on the next replay, which the sinks' idempotency by
record_id absorbs: replaying twice writes nothing twice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import orjson
from pydantic import ValidationError

from pipeline.config import LoadedConfig
from pipeline.deadletter import DeadLetter, DeadLetterStore, open_dead_letter_store
from pipeline.ingest.stage import DAMAGED_INPUT
from pipeline.models import DlpAlert, EnrichedRecord
from pipeline.runner import BatchReport, Message, Runner

log = logging.getLogger("pipeline.entrypoints.replay")


class CapturingStore:
    """A dead-letter store in memory: what the runner dead-letters while one entry is re-driven."""

    where = "memory (the entry being replayed)"

    def __init__(self) -> None:
        self.entries: list[DeadLetter] = []

    async def put(self, entries: Sequence[DeadLetter]) -> None:
        self.entries.extend(entries)

    async def list(self) -> list[DeadLetter]:
        return list(self.entries)

    async def remove(self, entry_ids: Sequence[str]) -> None:
        self.entries = [e for e in self.entries if e.entry_id not in set(entry_ids)]

    async def aclose(self) -> None:
        return None


@dataclass
class ReplayReport:
    entries: int = 0
    replayed: int = 0
    still_dead: int = 0
    new_entries: int = 0
    pipeline: BatchReport = field(default_factory=BatchReport)

    def summary_lines(self) -> list[str]:
        delivered = ", ".join(f"{k}={v}" for k, v in sorted(self.pipeline.delivered.items())) or "none"
        return [
            f"dead letters:        {self.entries}",
            f"replayed (removed):  {self.replayed}",
            f"still dead:          {self.still_dead}",
            f"new dead letters:    {self.new_entries}",
            f"delivered:           {delivered}",
        ]


async def replay_dead_letters(loaded: LoadedConfig, *, store: DeadLetterStore | None = None) -> ReplayReport:
    """Re-drive every entry of the configured dead-letter store (or `store`) through the pipeline."""
    # While replaying, a sink that is still down leaves its entries dead instead of stopping the run.
    config = loaded.config.model_copy(update={"delivery": loaded.config.delivery.model_copy(update={"on_outage": "dead_letter"})})
    replay_config = LoadedConfig(config, file=loaded.file, data_dir=loaded.data_dir)
    capture = CapturingStore()
    report = ReplayReport()
    async with Runner(replay_config, dead_letter=capture) as runner:
        real = store or open_dead_letter_store(loaded, runner.services)  # closed before the runner's credentials
        try:
            entries = await real.list()
            report.entries = len(entries)
            by_sink: dict[str, list[DeadLetter]] = {}
            for entry in entries:
                if entry.stage == "deliver":
                    by_sink.setdefault(entry.sink or "", []).append(entry)
                    continue
                capture.entries.clear()
                failed_again = await _redrive(runner, entry, capture, report)
                await _settle(real, [entry], failed_again, capture.entries, report)
            for sink, group in by_sink.items():
                await _redrive_deliveries(runner, real, sink, group, capture, report)
            capture.entries.clear()
            report.pipeline.merge(await runner.flush())
            await _settle(real, [], set(), capture.entries, report)
        finally:
            if store is None:
                await real.aclose()
    return report


async def _redrive(runner: Runner, entry: DeadLetter, capture: CapturingStore, report: ReplayReport) -> set[str]:
    """Run one decode- or assemble-stage entry again; returns the ids of the entries that failed again."""
    if entry.stage == "decode" and entry.reason == DAMAGED_INPUT:
        return {entry.entry_id}  # a note on unread input, not a message: it stays until the input is read again
    if entry.stage == "decode":
        body = entry.body if entry.record_index is None else _as_message(entry.body)
        report.pipeline.merge(await runner.process_batch([Message(body=body, source=entry.source)]))
        return {entry.entry_id} if any(e.stage == "decode" for e in capture.entries) else set()
    try:
        alert = DlpAlert.model_validate(orjson.loads(entry.body))
    except (ValidationError, orjson.JSONDecodeError):
        return {entry.entry_id}
    report.pipeline.merge(await runner.process_alerts([alert]))
    return set()


async def _redrive_deliveries(runner: Runner, real: DeadLetterStore, sink: str, group: list[DeadLetter], capture: CapturingStore, report: ReplayReport) -> None:
    if sink not in {entry.name for entry, _ in runner.sinks}:
        log.warning("%d dead letter(s) for sink %r, which is not configured: left as they are", len(group), sink)
        report.still_dead += len(group)
        return
    size = runner.config.runner.batch_size
    for start in range(0, len(group), size):
        chunk = group[start : start + size]
        records, unreadable = [], set()
        for entry in chunk:
            try:
                records.append(EnrichedRecord.model_validate_json(entry.body))
            except ValidationError:
                unreadable.add(entry.entry_id)
        capture.entries.clear()
        if records:
            report.pipeline.merge(await runner.deliver_records(records, sink=sink))
        failed_again = unreadable | {e.entry_id for e in capture.entries}
        await _settle(real, chunk, failed_again, capture.entries, report)


async def _settle(real: DeadLetterStore, originals: list[DeadLetter], failed_again: set[str], captured: list[DeadLetter], report: ReplayReport) -> None:
    """Count an attempt on what failed again, store new failures, then remove what is accounted for.

    An entry that failed again keeps its first failure's reason, detail, source and indexes; the
    new failure is appended to its `replay_attempts` (when, why)."""
    now = datetime.now(UTC)
    again, done = [], []
    for entry in originals:
        if entry.entry_id in failed_again:
            fresh = next((e for e in captured if e.entry_id == entry.entry_id), None)
            if fresh is None and entry.stage == "decode":
                fresh = next((e for e in captured if e.stage == "decode"), None)  # the re-wrapped record's own entry
            why = fresh or entry
            again.append(replace(entry, attempts=1, last_failure_at=now, replay_attempts=[{"at": now.isoformat(), "reason": why.reason, "detail": why.detail}]))
        else:
            done.append(entry.entry_id)
    original_ids = {entry.entry_id for entry in originals}
    new = [e for e in captured if e.entry_id not in original_ids and not (e.stage == "decode" and failed_again)]
    await real.put(again + new)  # the store adds the attempt to its count and its replay attempts to those it holds
    await real.remove(done)
    report.still_dead += len(again)
    report.replayed += len(done)
    report.new_entries += len(new)


def _as_message(record: bytes) -> bytes:
    """One dead-lettered record as a message body of its own format."""
    try:
        document = orjson.loads(record)
    except orjson.JSONDecodeError:
        return record
    if isinstance(document, dict) and "category" in document and "properties" in document:
        return orjson.dumps({"records": [document]})
    return orjson.dumps([document])
