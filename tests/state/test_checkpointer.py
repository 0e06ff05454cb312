"""The background checkpointer of the local SQLite stores: the log is folded by its thread, not by
the batches' commits, and the thread ends with its store."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from pipeline.state.history import HistoryEntry, SqliteHistoryStore
from pipeline.state.sqlite import SqliteStateStore, WalCheckpointer


class _Owner:
    """A store stand-in (the checkpointer's owner must be weakly referenceable)."""


def _wait_for_rounds(checkpointer: WalCheckpointer, rounds: int, timeout: float = 10.0) -> None:
    target = checkpointer.checkpoints + rounds
    deadline = time.monotonic() + timeout
    while checkpointer.checkpoints < target:
        if time.monotonic() > deadline:
            pytest.fail(f"the background checkpointer folded the log {checkpointer.checkpoints} times, waited for {target}")
        time.sleep(0.005)


def _commits(db: sqlite3.Connection, start: int, count: int) -> None:
    for number in range(start, start + count):
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO t VALUES (?, randomblob(3000))", (number,))
        db.execute("COMMIT")


def test_the_log_is_folded_by_the_thread_and_stays_small(tmp_path: Path) -> None:
    """The writer's own automatic checkpoint is off here: only the thread can fold and reset the log.
    3,000 commits of a page each, the thread given time every 100: the log never holds more than a
    few hundred pages, and the database file holds the rows (they were folded into it)."""
    path = tmp_path / "state.sqlite"
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
    owner = _Owner()
    checkpointer = WalCheckpointer(path, owner=owner, every_seconds=0.01)
    try:
        largest = 0
        for start in range(0, 3000, 100):
            _commits(writer, start, 100)
            _wait_for_rounds(checkpointer, 2)
            largest = max(largest, (tmp_path / "state.sqlite-wal").stat().st_size)
        assert largest < 4 * 1024 * 1024, f"the log grew to {largest} bytes"
        assert path.stat().st_size > 3000 * 3000  # the rows are in the database file itself
    finally:
        checkpointer.close()
        writer.close()
    assert not checkpointer._thread.is_alive()


def test_without_the_thread_the_log_is_not_folded(tmp_path: Path) -> None:
    """The same writes with no thread: the log holds them all (what the test above measures is the
    thread's work)."""
    path = tmp_path / "state.sqlite"
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
    try:
        _commits(writer, 0, 1000)
        assert (tmp_path / "state.sqlite-wal").stat().st_size > 1000 * 3000
    finally:
        writer.close()


def test_the_stores_run_one_and_stop_it_when_closed(tmp_path: Path) -> None:
    async def scenario() -> tuple[WalCheckpointer, WalCheckpointer]:
        state = SqliteStateStore(tmp_path / "state.sqlite")
        history = SqliteHistoryStore(path=tmp_path / "history.sqlite")
        await history.record("alert", [HistoryEntry(entry_id="a1", content_id="c1", user="u@contoso.com", at=1.0)])
        assert state._checkpointer._thread.is_alive() and history._checkpointer is not None and history._checkpointer._thread.is_alive()
        await state.aclose()
        await history.aclose()
        assert history._checkpointer is not None
        return state._checkpointer, history._checkpointer

    for checkpointer in asyncio.run(scenario()):
        assert not checkpointer._thread.is_alive()


def test_a_store_dropped_without_closing_ends_its_thread(tmp_path: Path) -> None:
    import gc

    state = SqliteStateStore(tmp_path / "state.sqlite")
    thread = state._checkpointer._thread
    del state
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_a_history_store_on_the_state_connection_has_none_of_its_own(tmp_path: Path) -> None:
    state = SqliteStateStore(tmp_path / "state.sqlite")
    try:
        shared = SqliteHistoryStore(connection=state._db, path=state.path)
        assert shared._checkpointer is None
    finally:
        asyncio.run(state.aclose())
