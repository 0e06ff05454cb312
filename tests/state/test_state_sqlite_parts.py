"""The SQLite store's claim of split-alert parts (issue 19, DLP-dense path): parts a handle stored are
not parsed again when it claims them, and a claim in the transaction that stored every part of an
alert does not read them; whatever another handle (another process) wrote, or a transaction that was
rolled back left behind, the claim still gives exactly the rows the file holds."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipeline.ingest.formats.contract import AlertPart
from pipeline.state import sqlite as sqlite_state
from pipeline.state.sqlite import SqliteStateStore, StoredParts


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[tuple[SqliteStateStore, SqliteStateStore]]:
    """Two handles on one file, as two processes have."""
    first, second = SqliteStateStore(tmp_path / "state.sqlite"), SqliteStateStore(tmp_path / "state.sqlite")
    yield first, second
    await first.aclose()
    await second.aclose()


def part(alert_id: str, rank: int = 0, **data: object) -> AlertPart:
    return AlertPart(alert_id=alert_id, rank=rank, data={"alert_id": alert_id, **data})


async def claim(store: SqliteStateStore, now: float = 100.0) -> dict[str, list[tuple[int, dict, str]]]:
    claimed = await store.claim_due(now=now, settle_seconds=0, max_hold_seconds=600, lease_seconds=30)
    return {alert.alert_id: [(p.rank, p.data, p.digest) for p in alert.parts] for alert in claimed}


def whole(parts: list[AlertPart]) -> list[tuple[int, dict, str]]:
    return [(p.rank, p.data, p.digest) for p in sorted(parts, key=lambda p: (p.rank, p.digest))]


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The JSON of every part the SQLite store parses."""
    seen: list[bytes] = []
    real = sqlite_state.orjson.loads

    def loads(data: bytes) -> object:
        seen.append(data)
        return real(data)

    monkeypatch.setattr(sqlite_state.orjson, "loads", loads)
    return seen


def part_reads(store: SqliteStateStore) -> list[str]:
    """The statements that read the parts' JSON, from now on."""
    reads: list[str] = []
    store._db.set_trace_callback(lambda sql: reads.append(sql) if "data FROM alert_parts" in sql else None)
    return reads


async def test_parts_a_handle_stored_are_not_parsed_again_when_it_claims_them(stores, parsed) -> None:
    store, _ = stores
    stored = [part("a", 0, title="t"), part("a", 1, files=[{"name": "x.docx"}]), part("b", 0)]
    await store.add_parts(stored, now=0)
    assert await claim(store) == {"a": whole(stored[:2]), "b": whole(stored[2:])}
    assert parsed == []


async def test_a_claim_in_the_transaction_that_stored_every_part_reads_none(stores, parsed) -> None:
    store, _ = stores
    stored = [part("a", 1, files=[{"name": "x.docx"}]), part("a", 0, title="t")]
    reads = part_reads(store)
    with store.joined_writes():
        await store.add_parts(stored[:1], now=0)
        await store.add_parts(stored[1:], now=0)  # a second call of the same transaction
        claimed = await claim(store)
    assert claimed == {"a": whole(stored)}  # in (rank, digest) order
    assert reads == [] and parsed == []


async def test_parts_stored_by_another_handle_are_read_beside_the_own(stores) -> None:
    store, other = stores
    theirs, ours = part("a", 1, user={"upn": "u@contoso.com"}), part("a", 0, title="t")
    await other.add_parts([theirs], now=0)
    with store.joined_writes():
        await store.add_parts([ours], now=1)
        claimed = await claim(store)
    assert claimed == {"a": whole([ours, theirs])}
    await store.release(["a"])
    await store.add_parts([part("b")], now=2)
    assert (await claim(store))["a"] == whole([ours, theirs])  # outside a joined block too


async def test_a_row_rewritten_by_another_handle_is_read_not_the_part_kept(stores, parsed) -> None:
    """Rows are keyed by alert id and digest; a digest given by the caller need not hash the content,
    and another process may purge the alert and store other JSON under the same key."""
    store, other = stores
    await store.add_parts([AlertPart(alert_id="a", rank=0, data={"v": 1}, digest="d")], now=0)
    assert list(await claim(other)) == ["a"]
    await other.mark_emitted(["a"], now=100)
    assert await other.purge(emitted_before=200) == 1
    await other.add_parts([AlertPart(alert_id="a", rank=0, data={"v": 2}, digest="d")], now=300)
    parsed.clear()
    assert await claim(store, now=400) == {"a": [(0, {"v": 2}, "d")]}
    assert parsed == [b'{"v":2}']


@pytest.mark.parametrize("joined", [True, False], ids=["same transaction", "later claim"])
async def test_data_that_are_not_plain_json_come_back_as_their_json_reads(stores, joined) -> None:
    store, _ = stores
    at = datetime(2025, 3, 14, 9, 12, tzinfo=UTC)
    given = AlertPart(alert_id="a", rank=0, data={"alert_id": "a", "at": at})
    if joined:
        with store.joined_writes():
            await store.add_parts([given, part("a", 1)], now=0)
            claimed = await claim(store)
    else:
        await store.add_parts([given, part("a", 1)], now=0)
        claimed = await claim(store)
    assert claimed["a"][0] == (0, {"alert_id": "a", "at": "2025-03-14T09:12:00+00:00"}, given.digest)


async def test_a_transaction_rolled_back_inside_a_joined_block_leaves_no_part_behind(stores) -> None:
    """A step that raises rolls the block's transaction back; what it stored is not claimed later in
    the block, from what this handle remembers, when the file holds other parts."""
    store, other = stores
    with store.joined_writes():
        await store.add_parts([part("a", 0, title="rolled back")], now=0)
        with pytest.raises(TypeError):  # orjson refuses an integer beyond 64 bits: the step rolls back
            await store.add_parts([AlertPart(alert_id="b", rank=0, data={"n": 2**70}, digest="d")], now=0)
        theirs = part("a", 1, title="committed elsewhere")
        await other.add_parts([theirs], now=0)
        assert await claim(store) == {"a": whole([theirs])}


async def test_a_duplicate_or_a_part_over_the_limit_changes_nothing_claimed(stores) -> None:
    store, _ = stores
    first = [part("a", 0), part("a", 1)]
    with store.joined_writes():
        await store.add_parts(first, now=0)
        added = await store.add_parts([part("a", 0), part("a", 2)], now=0, max_parts_per_alert=2)
        assert (added.duplicate, [p.rank for p in added.over_limit]) == (1, [2])
        assert await claim(store) == {"a": whole(first)}


def test_stored_parts_keep_at_most_their_limit_forgetting_the_oldest_alerts() -> None:
    kept = StoredParts(limit=3)
    for alert_id in ("a", "b", "c"):
        kept.keep({alert_id: {f"{alert_id}{n}": (b"{}", part(alert_id, n)) for n in range(2)}})
        assert kept.count <= 3
    assert list(kept.parts) == ["c"] and kept.count == 2
    kept.keep({"c": {"c0": (b"{}", part("c", 0))}})  # the same part again is counted once
    assert kept.count == 2
    assert kept.take("c") is not None and kept.take("c") is None and kept.count == 0


async def test_a_claim_of_many_alerts_gives_each_its_own_parts(stores) -> None:
    """More alerts than one read takes (500), some stored here, some elsewhere."""
    store, other = stores
    ours = [part(f"a{i:04d}", rank, n=i) for i in range(700) for rank in (1, 0)]
    theirs = [part(f"a{i:04d}", 2, m=i) for i in range(0, 700, 3)]
    await other.add_parts(theirs, now=0)
    with store.joined_writes():
        await store.add_parts(ours, now=0)
        claimed = await claim(store)
    expected: dict[str, list[AlertPart]] = {}
    for p in ours + theirs:
        expected.setdefault(p.alert_id, []).append(p)
    assert claimed == {alert_id: whole(parts) for alert_id, parts in expected.items()}


def test_stored_parts_keep_at_most_their_bytes_and_no_large_part() -> None:
    kept = StoredParts(limit=1000, max_bytes=64 * 100)  # parts of up to 100 bytes are kept
    for number in range(20):
        kept.keep({f"a{number}": {"d": (b"x" * 90, part(f"a{number}"))}})
        assert kept.size <= 64 * 100
    assert len(kept.parts) == 20 and kept.size == 20 * 90  # all fit: 1,800 bytes
    kept.keep({"a0": {"big": (b"x" * 101, part("a0", 1))}})  # a part too large: the alert is not kept at all
    assert "a0" not in kept.parts and kept.count == 19 and kept.size == 19 * 90
    for number in range(100, 180):
        kept.keep({f"a{number}": {"d": (b"x" * 90, part(f"a{number}"))}})
    assert kept.size <= 64 * 100 and len(kept.parts) == 64 * 100 // 90 and "a1" not in kept.parts  # the oldest forgotten


async def test_large_parts_are_not_kept_but_claimed_from_their_rows(stores) -> None:
    """Parts may hold strings up to the record limits: 200 parts of 60,000-character strings would
    keep ~12 MB of JSON (and several times that parsed) if kept; none is kept, all are claimed."""
    store, _ = stores
    parts = [part(f"a{i:03d}", 0, title="t" * 60_000, n=i) for i in range(200)]
    with store.joined_writes():
        await store.add_parts(parts, now=0)
    assert store._stored.size == 0 and not store._stored.parts
    assert await claim(store) == {p.alert_id: whole([p]) for p in parts}


async def test_a_purge_costs_the_alerts_it_forgets_not_every_emitted_one(tmp_path) -> None:
    """The purge finds the alerts emitted before the cutoff through their emission times: the SQLite
    steps it takes do not grow with the emitted alerts it keeps."""
    steps = {}
    for kept in (50, 3_000):
        store = SqliteStateStore(tmp_path / f"kept{kept}.sqlite")
        try:
            rows = [(f"old{i}", 1.0) for i in range(20)] + [(f"new{i}", 1000.0) for i in range(kept)]
            store._db.executemany("INSERT INTO alerts (alert_id, state, first_part_at, last_part_at, emitted_at) VALUES (?, 'emitted', 0, 0, ?)", rows)
            counted = [0]

            def step(counted: list[int] = counted) -> int:
                counted[0] += 1
                return 0

            store._db.set_progress_handler(step, 1)
            assert await store.purge(emitted_before=500.0) == 20
            store._db.set_progress_handler(None, 1)
            steps[kept] = counted[0]
        finally:
            await store.aclose()
    assert steps[3_000] < 1.5 * steps[50], steps


async def test_a_claim_rolled_back_with_its_joined_block_holds_nothing(stores):
    """The claim's lease is remembered for the mark; when the block that made it is rolled back (the
    batch raised before its commit), the lease is not in the file, and the handle must not hold the
    alert back from its next claim until that lease would have run out."""
    store, other = stores
    await store.add_parts([part("a", 0)], now=90.0)
    with pytest.raises(LookupError), store.joined_writes():
        await store.add_parts([part("a", 1)], now=100.0)
        assert list(await claim(store)) == ["a"]
        raise LookupError("the batch failed before its commit")
    assert list(await claim(store, now=100.5)) == ["a"]  # run again at once: claimed again
    assert await claim(other, now=101.0) == {}  # and leased in the file, this time
