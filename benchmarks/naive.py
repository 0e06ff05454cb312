"""The same work as the pipeline's CPU path, written the straightforward way.

stdlib `json`, plain dicts, one alert at a time and one `await` after another: no batching of
lookups, no cache, no concurrency, per-alert writes. It reuses the project's field extraction
(`pipeline.ingest.formats.*.to_alert`), its removal of matched content and input limits (`common.scrub`,
`limits.check_record`: required work, done on every record — without the pipeline's shortcut of
proving from the body's bytes that a record needs neither) and its enricher classes, so the
comparison measures orchestration, parsing and serialisation — not different business logic.
The harness switches the enrichers' history reuse off for it (`store.reuse_seconds = 0`): each
alert reads its user's history, as straightforward code would.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from datetime import UTC, datetime
from typing import Any

from pipeline.assemble.join import merge_parts
from pipeline.enrich.contract import EnrichmentContext
from pipeline.ingest.formats import defender_streaming as ds
from pipeline.ingest.formats import graph_alert, management_activity, sentinel_alert
from pipeline.ingest.formats.common import scrub
from pipeline.ingest.formats.contract import AlertPart
from pipeline.ingest.limits import DEFAULT_LIMITS, check_record
from pipeline.models import DlpAlert


def _safe(record: Any) -> Any:
    """Limits checked, matched content removed: before any field is read (the pipeline's rules)."""
    check_record(record, DEFAULT_LIMITS)
    return scrub(record)


def naive_alerts(body: bytes, db: sqlite3.Connection) -> list[DlpAlert]:
    document = json.loads(body)
    alerts: list[dict[str, Any]] = []
    if isinstance(document, dict) and "records" in document:
        parts: dict[str, list[AlertPart]] = {}
        for record in map(_safe, document["records"]):
            properties = record.get("properties") or {}
            if not ds.is_dlp_row(properties):
                continue
            if record.get("category") == ds.ALERT_INFO:
                data, rank = ds.info_part(record, properties), 0
            elif record.get("category") == ds.ALERT_EVIDENCE:
                data, rank = ds.evidence_part(record, properties), 1
            else:
                continue
            part = AlertPart(alert_id=data["alert_id"], rank=rank, data=data)
            # Durable like the pipeline's state store, written the straightforward way: a commit per row.
            db.execute("INSERT OR IGNORE INTO parts VALUES (?, ?, ?, ?)", (part.alert_id, part.digest, rank, json.dumps(data)))
            db.commit()
            parts.setdefault(part.alert_id, [])
        for alert_id in parts:
            rows = db.execute("SELECT digest, rank, data FROM parts WHERE alert_id = ?", (alert_id,)).fetchall()
            alerts.append(merge_parts(AlertPart(alert_id=alert_id, rank=r, data=json.loads(d), digest=g) for g, r, d in rows))
    else:
        items = document if isinstance(document, list) else [document]
        for item in map(_safe, items):
            if graph_alert.looks_like(item) and graph_alert.is_dlp(item):
                alerts.append(graph_alert.to_alert(item))
            elif sentinel_alert.looks_like(item) and sentinel_alert.is_dlp(item):
                alerts.append(sentinel_alert.to_alert(item))
            elif management_activity.looks_like(item) and management_activity.is_dlp(item):
                alerts.append(management_activity.to_alert(item))
    return [DlpAlert(**fields) for fields in alerts]


async def naive_run(bodies: list[bytes], enrichers: list[tuple[str, Any]], state_file: str) -> int:
    """Process every body; returns the number of records serialised."""
    db = sqlite3.connect(state_file)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE IF NOT EXISTS parts (alert_id TEXT, digest TEXT, rank INTEGER, data TEXT, PRIMARY KEY (alert_id, digest))")
    written = 0
    for body in bodies:
        for alert in naive_alerts(body, db):
            fragments: dict[str, Any] = {}
            statuses: dict[str, Any] = {}
            for name, plugin in enrichers:
                started = time.perf_counter()
                ctx = EnrichmentContext(alert, fragments=fragments, statuses=statuses, cache=None, clock=time.time)
                try:
                    fragment = await plugin.enrich(alert, ctx)
                    state = "ok" if fragment is not None else "skipped"
                except Exception as exc:  # the straightforward version still must not drop the alert
                    fragment, state = None, f"failed: {type(exc).__name__}"
                if fragment is not None:
                    fragments[name] = fragment
                statuses[name] = {"state": state, "duration_ms": (time.perf_counter() - started) * 1000}
            alert_json = alert.model_dump(mode="json")
            record = {
                "record_id": hashlib.sha256(json.dumps(alert_json, sort_keys=True).encode()).hexdigest()[:32],
                "alert": alert_json,
                "enrichments": {name: fragment.model_dump(mode="json") for name, fragment in fragments.items()},
                "enrichment_status": statuses,
                "processed_at": datetime.now(UTC).isoformat(),
            }
            json.dumps(record)
            written += 1
    db.close()
    return written
