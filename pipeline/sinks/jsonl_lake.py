"""The local data lake: JSON lines under `<data_dir>/lake/tenant=<id>/date=<YYYY-MM-DD>/records.jsonl`.

Idempotent by record_id: an index of delivered ids (SQLite, `<lake>/_delivered.sqlite`) is checked
before appending, and written after the lines are flushed to disk. A crash between the two can
repeat a line on the next run (at-least-once); readers deduplicate by record_id.
"""

from __future__ import annotations

import os
import sqlite3
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from pydantic import Field

from pipeline.config import StrictModel
from pipeline.models import EnrichedRecord
from pipeline.sinks import Outcome


class JsonlLakeSink:
    class Settings(StrictModel):
        path: str = Field("lake", description="folder of the lake, relative to the data dir")
        fsync: bool = Field(True, description="flush each batch to stable storage before reporting delivered")

    def __init__(self, settings: "JsonlLakeSink.Settings", services) -> None:
        self.settings = settings
        self.root: Path = services.data_path(settings.path)
        self.root.mkdir(parents=True, exist_ok=True)
        self._index = sqlite3.connect(self.root / "_delivered.sqlite", isolation_level=None)
        self._index.execute("PRAGMA journal_mode=WAL")
        self._index.execute("CREATE TABLE IF NOT EXISTS delivered (record_id TEXT PRIMARY KEY) WITHOUT ROWID")

    def partition_of(self, record: EnrichedRecord) -> Path:
        alert = record.alert
        day = (alert.created_at or record.processed_at).strftime("%Y-%m-%d")
        return self.root / f"tenant={alert.tenant_id or 'unknown'}" / f"date={day}" / "records.jsonl"

    async def publish(self, records: Sequence[EnrichedRecord]) -> list[Outcome]:
        known = self._known({r.record_id for r in records})
        by_file: dict[Path, list[bytes]] = defaultdict(list)
        fresh: list[str] = []
        for record in records:
            if record.record_id in known:
                continue
            known.add(record.record_id)
            fresh.append(record.record_id)
            by_file[self.partition_of(record)].append(record.to_json() + b"\n")
        for path, lines in by_file.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as handle:
                handle.write(b"".join(lines))
                if self.settings.fsync:
                    handle.flush()
                    os.fsync(handle.fileno())
        self._index.execute("BEGIN")
        self._index.executemany("INSERT OR IGNORE INTO delivered (record_id) VALUES (?)", [(i,) for i in fresh])
        self._index.execute("COMMIT")
        return [Outcome.delivered()] * len(records)

    def _known(self, ids: set[str]) -> set[str]:
        found: set[str] = set()
        pending = list(ids)
        for start in range(0, len(pending), 500):
            chunk = pending[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(row[0] for row in self._index.execute(f"SELECT record_id FROM delivered WHERE record_id IN ({marks})", chunk))
        return found

    async def aclose(self) -> None:
        self._index.close()
