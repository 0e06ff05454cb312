"""Enriched records for sink tests, built from the shared Graph alert fixture (no sink code involved),
and the records a run left in its local JSONL lake."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pipeline.ingest.decode import decode_message
from pipeline.models import EnrichedRecord, EnrichmentStatus
from tests.support.paths import FIXTURES

if TYPE_CHECKING:
    from pipeline.runner import Runner

FIXTURE = FIXTURES / "graph_alert_v2_dlp.json"
PROCESSED_AT = datetime(2025, 3, 14, 9, 30, tzinfo=UTC)


def make_record(alert_id: str = "alert-1", *, padding: int = 0, enrichments: dict[str, Any] | None = None, **alert_changes: Any) -> EnrichedRecord:
    """A record of the fixture alert with another id (and optional changes); `padding` adds that many
    bytes of enrichment so the record's size can be controlled."""
    document = json.loads(FIXTURE.read_bytes())
    document["id"] = alert_id
    (alert,) = decode_message(json.dumps(document).encode()).alerts
    if alert_changes:
        alert = alert.model_copy(update=alert_changes)
    fragments = dict(enrichments or {"triage": {"score": 72.5, "reasons": ["external share"]}})
    if padding:
        fragments["padding"] = {"data": "p" * padding}
    return EnrichedRecord(
        record_id=alert.content_id() + (f"-{padding}" if padding else ""),
        alert=alert,
        enrichments=fragments,
        enrichment_status={name: EnrichmentStatus(state="ok") for name in fragments},
        pipeline_version="0.1.0",
        processed_at=PROCESSED_AT,
    )


def lake_lines(runner: Runner) -> list[dict]:
    """Every line of the run's local JSONL lake (sink "lake"), parsed, files in path order."""
    root = runner.loaded.data_path("lake")
    return [json.loads(line) for path in sorted(root.rglob("*.jsonl")) for line in path.read_text().splitlines()]
