"""The local data lake: JSON lines under `<data_dir>/lake/tenant=<id>/date=<YYYY-MM-DD>/records.jsonl`.

Idempotent by record_id: an index of delivered ids (SQLite, `<lake>/_delivered.sqlite`) is checked
before appending, and written after the lines are flushed to disk. The window between the two is
closed by a journal in the same index: before appending, the size of each file is recorded; the
ids are inserted and the journal cleared in one transaction after the append. When the sink opens
(or publishes after a failed append) and finds a journal, the append did not complete: the files are
cut back to their recorded size, so the records are written again whole, once. A record is thus
either in the index and its file exactly once, or in neither.

Order (with `fsync`, the default): journal committed; lines written and fsynced; for a file the
append created, its folder (and each folder it created) fsynced, since a new file's lines are not
durable before its name is; only then the ids committed to the index. A record is never marked
delivered before its line is on stable storage. With `fsync = false` a power cut (not a crash of
the process) can lose lines the index already holds.

One process writes a lake at a time: the entry points hold the data folder's lock
(pipeline/state/folder_lock.py) before they open this sink, whose recovery would otherwise cut off
another writer's lines.
"""

from __future__ import annotations

import os
import sqlite3
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from pydantic import Field

from pipeline.config import StrictModel
from pipeline.deliver.sinks import Outcome
from pipeline.durable import fsync_folder
from pipeline.errors import BUSY_WAIT_SECONDS, PathUnusable, StoreDamaged, store_error
from pipeline.models import EnrichedRecord

DAMAGED_INDEX_ADVICE = (
    "restore it from a backup, or move it (and its -wal and -shm files) aside and run again: a new index is "
    "created, and records already in the lake are then written to it again (readers dedupe by record_id)"
)


class JsonlLakeSink:
    class Settings(StrictModel):
        path: str = Field("lake", description="folder of the lake, relative to the data dir")
        fsync: bool = Field(True, description="flush each batch to stable storage before reporting delivered")

    @classmethod
    async def doctor(cls, settings: JsonlLakeSink.Settings, services) -> list:
        """The lake's folder is (or can be created) writable; nothing is opened or recovered."""
        from pipeline.doctor import folder_check

        return [folder_check("lake folder", services.data_path(settings.path))]

    def __init__(self, settings: JsonlLakeSink.Settings, services) -> None:
        self.settings = settings
        self.root: Path = services.data_path(settings.path)
        self.index_path = self.root / "_delivered.sqlite"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._index = sqlite3.connect(self.index_path, isolation_level=None, timeout=BUSY_WAIT_SECONDS)
            self._index.execute("PRAGMA journal_mode=WAL")
            self._index.execute("CREATE TABLE IF NOT EXISTS delivered (record_id TEXT PRIMARY KEY) WITHOUT ROWID")
            self._index.execute("CREATE TABLE IF NOT EXISTS pending_append (path TEXT PRIMARY KEY, size INTEGER NOT NULL) WITHOUT ROWID")
            self._recover()
        except (OSError, sqlite3.Error) as exc:
            raise store_error(exc, path=self.index_path if isinstance(exc, sqlite3.Error) else self.root, operation="open the lake", advice=DAMAGED_INDEX_ADVICE) from exc

    def _recover(self) -> None:
        """Cut files back to their size before an append that did not complete (see the module docstring)."""
        rows = self._index.execute("SELECT path, size FROM pending_append").fetchall()
        for relative, size in rows:
            path = self.root / relative
            if path.exists() and path.stat().st_size > size:
                with open(path, "r+b") as handle:
                    handle.truncate(size)
                    handle.flush()
                    os.fsync(handle.fileno())
        if rows:
            self._index.execute("DELETE FROM pending_append")

    def partition_of(self, record: EnrichedRecord) -> Path:
        alert = record.alert
        day = (alert.created_at or record.processed_at).strftime("%Y-%m-%d")
        return self.root / f"tenant={alert.tenant_id or 'unknown'}" / f"date={day}" / "records.jsonl"

    async def publish(self, records: Sequence[EnrichedRecord]) -> list[Outcome]:
        """A damaged index or a lake path that cannot be written raises StoreDamaged / PathUnusable (the
        run stops: retrying or dead-lettering cannot help); a busy index or a full disk raises the
        library's error, which the router retries (pipeline.errors.translate)."""
        try:
            return self._publish(records)
        except (OSError, sqlite3.Error) as exc:
            error = store_error(exc, path=self.index_path if isinstance(exc, sqlite3.Error) else self.root, operation="append to the lake", advice=DAMAGED_INDEX_ADVICE)
            if isinstance(error, (StoreDamaged, PathUnusable)):
                raise error from exc
            raise

    def _publish(self, records: Sequence[EnrichedRecord]) -> list[Outcome]:
        known = self._known({r.record_id for r in records})
        by_file: dict[Path, list[bytes]] = defaultdict(list)
        fresh: list[str] = []
        for record in records:
            if record.record_id in known:
                continue
            known.add(record.record_id)
            fresh.append(record.record_id)
            by_file[self.partition_of(record)].append(record.to_json() + b"\n")
        if self._index.execute("SELECT 1 FROM pending_append LIMIT 1").fetchone():
            self._recover()  # an earlier append of this process failed part-way
        self._index.execute("BEGIN")
        self._index.executemany(
            "INSERT OR REPLACE INTO pending_append (path, size) VALUES (?, ?)",
            [(str(path.relative_to(self.root)), path.stat().st_size if path.exists() else 0) for path in by_file],
        )
        self._index.execute("COMMIT")
        changed_folders: set[Path] = set()  # folders that gained an entry: a new file or folder
        for path, lines in by_file.items():
            changed_folders |= _make_folders(path.parent)
            if not path.exists():
                changed_folders.add(path.parent)
            with open(path, "ab") as handle:
                handle.write(b"".join(lines))
                if self.settings.fsync:
                    handle.flush()
                    os.fsync(handle.fileno())
        if self.settings.fsync:
            for folder in sorted(changed_folders, key=lambda p: len(p.parts), reverse=True):
                fsync_folder(folder)
        self._index.execute("BEGIN")
        self._index.executemany("INSERT OR IGNORE INTO delivered (record_id) VALUES (?)", [(i,) for i in fresh])
        self._index.execute("DELETE FROM pending_append")
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


def _make_folders(folder: Path) -> set[Path]:
    """Create `folder` and its missing parents; the folders that gained an entry by it."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    if missing:
        missing[0].mkdir(parents=True, exist_ok=True)
    return {created.parent for created in missing}

