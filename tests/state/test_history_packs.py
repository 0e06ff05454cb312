"""Packs of the SQLite history (pipeline/state/history.py, `_PACK_TABLE`): a user's rows in one blob,
what a first read takes instead of the rows one by one. A pack only saves time: a first read returns
the rows the table holds, in write order, whatever packs exist, are stale, damaged or made by other
processes at the same time."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.state.history import HistoryEntry, SqliteHistoryStore, _stored_rows

ROOT = Path(__file__).resolve().parents[2]
DAY = 86400.0


def table_rows(path: Path, kind: str, user: str, since: float) -> list[tuple]:
    """What a first read must return, read from the table itself (no pack): (entry id, content id,
    at, content fields) of the user's rows with at >= since, in write order."""
    db = sqlite3.connect(path)
    try:
        rows = db.execute(
            f"SELECT rowid, entry_id, content_id, at, data FROM history_{kind}s WHERE user = ? AND at >= ? ORDER BY rowid", (user, since)
        ).fetchall()
    finally:
        db.close()
    return _stored_rows(rows)


def entry(number: int, user: str, at: float, *, content: int = 0) -> HistoryEntry:
    return HistoryEntry(
        entry_id=f"e{number}", content_id=f"c{number}-{content}", user=user, at=at, policy=f"P{number % 3}", severity="high",
        files=[f"f{number % 5}.xlsx"], sensitive_info=[{"name": "IBAN", "count": 1 + content, "confidence": 85}], labels=[],
    )


async def write_in_batches(store: SqliteHistoryStore, kind: str, user: str, *, batches: int, size: int, start: float = 1000.0) -> None:
    """`batches` writes of `size` new entries each (numbered from 0, a second apart from `start`)."""
    for batch in range(batches):
        await store.record(kind, [entry(batch * size + i, user, start + batch * size + i) for i in range(size)])


async def test_a_first_read_takes_the_pack_and_reads_only_the_rows_written_after_it(tmp_path):
    """A process that writes a user's rows makes their pack as they grow; the next process's first
    read takes the pack and reads one by one only the rows written after it (at most about a quarter
    of them), and returns exactly what the table holds."""
    path = tmp_path / "history.sqlite"
    writer = SqliteHistoryStore(path=path, pack_min_rows=64)
    await write_in_batches(writer, "alert", "u@contoso.com", batches=20, size=50)
    await writer.aclose()

    reader = SqliteHistoryStore(path=path)
    rows, cursor = await reader.stored_after("alert", "u@contoso.com", None, since=0.0)
    assert rows == table_rows(path, "alert", "u@contoso.com", 0.0)
    assert len(rows) == 1000
    assert reader.pack_rows_read >= 750 and reader.rows_read <= 250
    assert reader.pack_rows_read + reader.rows_read == 1000
    entries, _ = await reader.entries_after("alert", "u@contoso.com", None, since=1500.0)
    assert [(e.entry_id, e.at, e.files) for e in entries] == [(r[0], r[2], r[3][2]) for r in table_rows(path, "alert", "u@contoso.com", 1500.0)]
    await reader.record("alert", [entry(5000, "u@contoso.com", 9000.0)])
    later, _ = await reader.stored_after("alert", "u@contoso.com", cursor, since=0.0)
    assert [row[0] for row in later] == ["e5000"]  # a later read: only what was written since
    await reader.aclose()


async def test_a_damaged_pack_is_read_around_and_made_again(tmp_path):
    """A pack whose blob is not one (a disk fault, a later version's layout) is ignored: the read
    takes the rows one by one, returns what the table holds, and makes the pack again."""
    path = tmp_path / "history.sqlite"
    store = SqliteHistoryStore(path=path, pack_min_rows=16)
    # the pack is made at the second write (a write makes it of the rows before it)
    await write_in_batches(store, "activity", "m@contoso.com", batches=2, size=20, start=100.0)
    await store.aclose()
    db = sqlite3.connect(path)
    assert db.execute("SELECT count(*) FROM history_activity_packs").fetchone() == (1,)
    with db:
        db.execute("UPDATE history_activity_packs SET data = ?", (b'{"version": 1, "entry_ids": [1, 2]',))
    db.close()

    reader = SqliteHistoryStore(path=path, pack_min_rows=16)
    rows, _ = await reader.stored_after("activity", "m@contoso.com", None, since=0.0)
    assert rows == table_rows(path, "activity", "m@contoso.com", 0.0) and len(rows) == 40
    assert reader.pack_rows_read == 0
    await reader.aclose()
    again = SqliteHistoryStore(path=path)
    assert (await again.stored_after("activity", "m@contoso.com", None, since=0.0))[0] == rows
    assert again.pack_rows_read == 40  # the read above made it again
    await again.aclose()


async def test_a_read_older_than_the_pack_reads_the_table(tmp_path):
    """A pack holds the rows from its own `since` on: a read that asks for older ones (an alert that
    comes late) does not take it."""
    path = tmp_path / "history.sqlite"
    store = SqliteHistoryStore(path=path, pack_min_rows=8)
    await store.record("alert", [entry(i, "u", 1000.0 + i) for i in range(20)])
    rows, _ = await store.stored_after("alert", "u", None, since=1005.0)  # makes a pack from 1005 on
    assert len(rows) == 15
    await store.aclose()
    reader = SqliteHistoryStore(path=path)
    rows, _ = await reader.stored_after("alert", "u", None, since=0.0)
    assert rows == table_rows(path, "alert", "u", 0.0) and len(rows) == 20
    await reader.aclose()


operation = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 2), st.lists(st.tuples(st.integers(0, 40), st.integers(0, 30), st.integers(0, 2)), min_size=1, max_size=12)),
    st.tuples(st.just("read"), st.integers(0, 2), st.integers(0, 2), st.integers(0, 30)),
    st.tuples(st.just("restart"), st.integers(0, 2)),
    st.tuples(st.just("damage"), st.integers(0, 2)),
)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(operation, min_size=1, max_size=40))
def test_first_reads_return_what_the_table_holds_whatever_the_packs(tmp_path_factory, operations):
    """Three stores on one file (three processes' views), writing rows of three users (new entries,
    revisions, redeliveries, at any time), restarted, their packs damaged, and reading: every first
    read, of any store, at any `since`, returns the table's rows in write order, as a read with no
    pack does."""
    path = tmp_path_factory.mktemp("packs") / "history.sqlite"
    users = ["a@contoso.com", "b@contoso.com", "c@contoso.com"]

    async def run() -> None:
        stores = [SqliteHistoryStore(path=path, pack_min_rows=4, retention_days=10) for _ in range(3)]
        newest = 0.0
        try:
            for op in operations:
                if op[0] == "write":
                    _, which, items = op
                    entries = [entry(number, users[number % 3], 1000.0 + day * DAY + number, content=content) for number, day, content in items]
                    newest = max(newest, *(e.at for e in entries))
                    await stores[which].record("alert", entries)
                elif op[0] == "read":
                    _, which, user, day = op
                    # never before what a purge (at most retention_days before the newest written) may have taken
                    since = max(1000.0 + day * DAY, newest - 10 * DAY)
                    rows, _ = await stores[which].stored_after("alert", users[user], None, since=since)
                    assert rows == table_rows(path, "alert", users[user], since)
                elif op[0] == "restart":
                    await stores[op[1]].aclose()
                    stores[op[1]] = SqliteHistoryStore(path=path, pack_min_rows=4, retention_days=10)
                else:
                    db = sqlite3.connect(path)
                    with db:
                        db.execute("UPDATE history_alert_packs SET data = ? WHERE user = ?", (b"[]", users[op[1]]))
                    db.close()
            for user in users:
                since = newest - 10 * DAY
                fresh = SqliteHistoryStore(path=path)
                assert (await fresh.stored_after("alert", user, None, since=since))[0] == table_rows(path, "alert", user, since)
                await fresh.aclose()
        finally:
            for store in stores:
                await store.aclose()

    asyncio.run(run())


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from pipeline.state.history import HistoryEntry, SqliteHistoryStore

    async def main(path, worker, count, pause_at):
        store = SqliteHistoryStore(path=Path(path), pack_min_rows=16)
        for number in range(count):
            if number == pause_at:  # rows 0 .. pause_at - 1 written: wait here to be killed
                print("paused", flush=True)
                sys.stdin.readline()
            user = ("a@contoso.com", "b@contoso.com")[number % 2]
            await store.record("alert", [HistoryEntry(entry_id=f"w{worker}-{number}", content_id="c", user=user, at=1000.0 + number, policy="P")])
            if number % 25 == 0:  # a first read of another store: it may make the pack too
                reader = SqliteHistoryStore(path=Path(path), pack_min_rows=16)
                await reader.stored_after("alert", user, None, since=0.0)
                await reader.aclose()
        await store.aclose()

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
    """
)


@pytest.mark.slow
def test_processes_writing_and_packing_one_file_at_once_hide_no_row(tmp_path):
    """Three processes write the same two users' rows into one file at once, each making packs as it
    writes and reads; one is killed (SIGKILL) halfway and started again. Afterwards a first read takes
    the packs and returns every row the table holds: no pack made by one process hides a row another
    wrote meanwhile."""
    path = tmp_path / "history.sqlite"
    asyncio.run(SqliteHistoryStore(path=path).aclose())  # the tables, before the writers race to make them
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def start(worker: int, *, pause_at: int = -1) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(worker), "300", str(pause_at)],
                                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    writers = [start(0), start(1), start(2, pause_at=150)]
    victim = writers[2]
    assert victim.stdout is not None
    assert victim.stdout.readline() == "paused\n"  # halfway through its rows, the others still writing
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    db = sqlite3.connect(path)
    assert db.execute("SELECT count(*) FROM history_alerts WHERE entry_id LIKE 'w2-%'").fetchone() == (150,)
    db.close()
    writers[2] = start(2)  # started again: its writes are idempotent
    for writer in writers:
        _out, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err[-2000:]

    db = sqlite3.connect(path)
    assert db.execute("SELECT count(*) FROM history_alert_packs").fetchone() == (2,)
    db.close()
    async def first_read(user: str) -> tuple[list, int]:
        reader = SqliteHistoryStore(path=path)
        try:
            rows, _ = await reader.stored_after("alert", user, None, since=0.0)
            return rows, reader.pack_rows_read
        finally:
            await reader.aclose()

    for user in ("a@contoso.com", "b@contoso.com"):
        rows, pack_rows_read = asyncio.run(first_read(user))
        assert rows == table_rows(path, "alert", user, 0.0)
        assert len(rows) == 3 * 150  # each worker's 300 rows, half of them this user's
        assert pack_rows_read > 0


def test_writing_rows_past_a_pack_makes_it_again_within_a_quarter(tmp_path):
    """A long-running process reads a user's history once and then only writes: its writes make the
    pack again once the rows after it are a quarter of it, so the next process's first read reads at
    most about that many rows one by one."""
    path = tmp_path / "history.sqlite"

    async def run() -> tuple[int, int]:
        store = SqliteHistoryStore(path=path, pack_min_rows=32)
        await write_in_batches(store, "alert", "u", batches=40, size=25)
        await store.aclose()
        reader = SqliteHistoryStore(path=path)
        rows, _ = await reader.stored_after("alert", "u", None, since=0.0)
        assert rows == table_rows(path, "alert", "u", 0.0)
        await reader.aclose()
        return reader.pack_rows_read, reader.rows_read

    packed, one_by_one = asyncio.run(run())
    assert packed + one_by_one == 1000
    assert one_by_one <= 1000 // 4 + 25
