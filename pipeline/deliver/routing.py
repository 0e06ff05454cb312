"""Routing: which records a sink gets (`[sinks.when]`).

Every condition given must hold; an empty `when` takes every record. Conditions read the full record
(routing happens before minimisation), so a sink can route on a field it never receives.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline.models import SEVERITY_RANK, AlertKind, EnrichedRecord, Severity, SourceFormat


class When(BaseModel):
    """A sink's filter over the enriched record: every condition given must hold."""

    model_config = ConfigDict(extra="forbid")

    severity_at_least: Severity | None = None
    policy_in: list[str] | None = None
    workload_in: list[str] | None = None
    source_format_in: list[SourceFormat] | None = None
    kind_in: list[AlertKind] | None = None
    enrichment_at_least: dict[str, float] = Field(
        default_factory=dict,
        description="enrichment value (`<enricher name>.<field>`, e.g. `triage.score`) at least this; a record without it does not match",
    )
    triage_score_at_least: float | None = Field(None, description="shorthand for enrichment_at_least = { \"triage.score\" = N }")

    def model_post_init(self, context: Any) -> None:
        thresholds = dict(self.enrichment_at_least)
        if self.triage_score_at_least is not None:
            thresholds.setdefault("triage.score", self.triage_score_at_least)
        self._thresholds = [(path.split("."), minimum) for path, minimum in thresholds.items()]

    def matches(self, record: EnrichedRecord) -> bool:
        alert = record.alert
        if self.severity_at_least and SEVERITY_RANK[alert.severity] < SEVERITY_RANK[self.severity_at_least]:
            return False
        if self.policy_in is not None and alert.policy_name not in self.policy_in:
            return False
        if self.workload_in is not None and alert.workload not in self.workload_in:
            return False
        if self.source_format_in is not None and alert.source_format not in self.source_format_in:
            return False
        if self.kind_in is not None and alert.kind not in self.kind_in:
            return False
        for path, minimum in self._thresholds:
            value: Any = record.enrichments
            for part in path:
                value = value.get(part) if isinstance(value, dict) else None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
                return False
        return True


def route(sinks: list[tuple[str, When]], records: list[EnrichedRecord]) -> tuple[dict[str, list[EnrichedRecord]], int]:
    """The records each sink gets (sinks that get none are left out), and how many records matched no sink."""
    selected: dict[str, list[EnrichedRecord]] = {}
    routed: set[str] = set()
    for name, when in sinks:
        chosen = [record for record in records if when.matches(record)]
        if chosen:
            selected[name] = chosen
            routed.update(record.record_id for record in chosen)
    return selected, sum(1 for record in records if record.record_id not in routed)
