"""The report stage: counters of one batch, merged into the whole run's, and the CLI summary.

A report holds counters only (and the record ids of its batch), never records or payload content.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


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
    # Broken optional fields set to null (the records were kept; each alert lists its own in decode_warnings).
    field_warnings: int = 0
    delivered: Counter[str] = field(default_factory=Counter)
    dead_lettered: Counter[str] = field(default_factory=Counter)
    enrichment: Counter[tuple[str, str]] = field(default_factory=Counter)
    # The records of this one batch (logs, tests). Never merged: a report merged over a run holds
    # counters only, so a run of any length holds bounded memory (issue 19).
    record_ids: list[str] = field(default_factory=list)

    def merge(self, other: BatchReport) -> None:
        """Add `other`'s counters to these; `record_ids` stay those of this report's own batch."""
        for name in ("messages", "records", "skipped", "alerts", "duplicate_parts", "emitted_split", "unrouted", "field_warnings"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.pending = other.pending
        self.delivered.update(other.delivered)
        self.dead_lettered.update(other.dead_lettered)
        self.enrichment.update(other.enrichment)

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
        if self.field_warnings:
            lines.append(f"fields nulled:       {self.field_warnings} (broken optional fields; see each alert's decode_warnings)")
        if self.unrouted:
            lines.append(f"matched no sink:     {self.unrouted}")
        for name in sorted(states):
            lines.append(f"  {name}: {counts(states[name])}")
        return lines
