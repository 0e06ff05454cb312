"""The SQLite state file's schema (issue 19, small batches): alert_parts is a rowid table (its rows are
too large for WITHOUT ROWID) and the alerts table has one index, (state, emitted_at), for the claims,
the pending count and the purge. A file written by an earlier version keeps its parts table (not
copied under the write lock at open), gets the one index, and keeps its pending parts, its emitted
alerts and its idempotence."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import orjson

from pipeline.ingest.formats.contract import AlertPart
from pipeline.state.sqlite import SqliteStateStore

_EARLIER = """
CREATE TABLE alert_parts (alert_id TEXT NOT NULL, digest TEXT NOT NULL, rank INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (alert_id, digest)) WITHOUT ROWID;
CREATE TABLE alerts (alert_id TEXT PRIMARY KEY, state TEXT NOT NULL, first_part_at REAL NOT NULL, last_part_at REAL NOT NULL,
    lease_until REAL NOT NULL DEFAULT 0, emitted_at REAL) WITHOUT ROWID;
CREATE INDEX alerts_pending ON alerts (state, last_part_at);
CREATE INDEX alerts_emitted ON alerts (emitted_at);
CREATE TABLE batch_redeliveries (fingerprint TEXT PRIMARY KEY, attempts INTEGER NOT NULL, last_at REAL NOT NULL) WITHOUT ROWID;
"""


def part(alert_id: str, rank: int) -> AlertPart:
    return AlertPart(alert_id=alert_id, rank=rank, data={"alert_id": alert_id, "rank": rank, "text": "x" * 1500})


def earlier_file(path: Path) -> list[AlertPart]:
    """A state file as earlier versions wrote it: alert 'p' pending with two parts, alert 'e' emitted at 50."""
    parts = [part("p", 1), part("p", 0), part("e", 0)]
    with closing(sqlite3.connect(path)) as old:
        old.executescript(_EARLIER)
        old.executemany("INSERT INTO alert_parts VALUES (?, ?, ?, ?)", [(p.alert_id, p.digest, p.rank, orjson.dumps(p.data)) for p in parts])
        old.execute("INSERT INTO alerts VALUES ('p', 'pending', 10, 10, 0, NULL)")
        old.execute("INSERT INTO alerts VALUES ('e', 'emitted', 10, 10, 0, 50)")
        old.commit()
    return parts


def schema(path: Path) -> tuple[dict[str, str], set[str]]:
    with closing(sqlite3.connect(path)) as db:
        tables = dict(db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall())
        indexes = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'alerts' AND sql IS NOT NULL")}
    return tables, indexes


async def test_a_new_file_has_a_rowid_parts_table_and_one_index_on_alerts(tmp_path):
    store = SqliteStateStore(tmp_path / "state.sqlite")
    await store.aclose()
    tables, indexes = schema(tmp_path / "state.sqlite")
    assert "WITHOUT ROWID" not in tables["alert_parts"].upper()
    assert indexes == {"alerts_state"}


async def test_a_file_of_an_earlier_version_keeps_its_parts_table_and_works_as_before(tmp_path):
    path = tmp_path / "state.sqlite"
    parts = earlier_file(path)
    for _ in range(2):  # opened twice: nothing lost
        store = SqliteStateStore(path)
        await store.aclose()
    tables, indexes = schema(path)
    assert set(tables) == {"alert_parts", "alerts", "batch_redeliveries"}
    assert "WITHOUT ROWID" in tables["alert_parts"].upper() and indexes == {"alerts_state"}

    store = SqliteStateStore(path)
    try:
        assert await store.pending_count() == 1
        again = await store.add_parts([parts[0], part("p", 2)], now=20.0)  # the stored part is still known: idempotent
        assert (again.new, again.duplicate) == (1, 1)
        (claimed,) = await store.claim_due(now=100.0, settle_seconds=0, max_hold_seconds=600, lease_seconds=30)
        assert claimed.alert_id == "p" and [(p.rank, p.data) for p in claimed.parts] == [(r, part("p", r).data) for r in (0, 1, 2)]
        await store.mark_emitted(["p"], now=100.0)
        assert await store.pending_count() == 0
        assert await store.purge(emitted_before=60.0) == 1  # 'e' (emitted at 50), not 'p' (at 100)
        with closing(sqlite3.connect(path)) as db:
            assert db.execute("SELECT alert_id, count(*) FROM alert_parts GROUP BY alert_id").fetchall() == [("p", 3)]
    finally:
        await store.aclose()
