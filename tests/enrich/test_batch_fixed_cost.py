"""The fixed cost of a batch (issue 19, item 5): batch enrichers that answer from local data run inline,
without a task or a timer; one sink is awaited without a task; a SQLite claim with nothing due is a read,
not a write transaction. The enricher's timeout still counts from the call's start. History reads of
users held and fresh make no task; on SQLite a batch's history writes are held and committed with its
mark (one commit), never lost by a commit that failed, and committed before the batch returns."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from contextlib import closing, contextmanager
from datetime import timedelta

import orjson
import pytest

from pipeline.plugin_kit.testing import make_alerts
from pipeline.runner import Message, Runner
from pipeline.state import sqlite as sqlite_state
from pipeline.state.sqlite import SqliteStateStore
from tests.support.config import enricher_entry, pipeline_toml, sink_entry
from tests.support.records import lake_lines
from tests.support.streaming import envelope, streaming_records


@contextmanager
def counting_tasks():
    """Counts the asyncio tasks made on the running loop while the block runs."""
    loop = asyncio.get_running_loop()
    made: list[asyncio.Task] = []
    previous = loop.get_task_factory()

    def factory(loop, coro, **kwargs):
        task = previous(loop, coro, **kwargs) if previous is not None else asyncio.Task(coro, loop=loop, **kwargs)
        made.append(task)
        return task

    loop.set_task_factory(factory)
    try:
        yield made
    finally:
        loop.set_task_factory(previous)


def two_local_batch_enrichers() -> str:
    return pipeline_toml(enrichers=[enricher_entry("one", "tests.plugins:PerBatch"), enricher_entry("two", "tests.plugins:PerBatch")])


async def test_batch_enrichers_that_answer_without_waiting_run_without_a_task(write_config):
    alerts = make_alerts("graph_alert") * 3
    async with Runner(write_config(two_local_batch_enrichers())) as runner:
        assert [[slot.name for slot in wave] for wave in runner.chain.waves] == [["one", "two"]]  # siblings of one wave
        with counting_tasks() as made:
            enriched = await runner.engine.enrich(alerts)
    assert made == []
    assert enriched.states == {("one", "ok"): 3, ("two", "ok"): 3}
    (record,) = enriched.records  # the same alert three times: one record
    assert record.enrichments["one"]["value"] == record.alert.alert_id
    assert record.enrichment_status["two"].state == "ok" and record.enrichment_status["two"].duration_ms >= 0


async def test_one_sink_is_awaited_without_a_task(write_config):
    async with Runner(write_config(pipeline_toml(sinks=[{"name": "flaky", "kind": "tests.plugins:FlakySink"}]))) as runner:
        enriched = await runner.engine.enrich(make_alerts("graph_alert"))
        with counting_tasks() as made:
            delivered = await runner.delivery.deliver(enriched.records)
    assert made == [] and delivered.delivered == {"flaky": 1}


async def test_a_timeout_counts_from_the_start_of_the_call_not_from_its_first_wait(write_config, fixture_bytes):
    config = pipeline_toml(enrichers=[enricher_entry("busy", "tests.plugins:BusyThenWaits", {"busy_seconds": 0.15, "wait_seconds": 5.0})])
    async with Runner(write_config(config)) as runner:
        started = time.perf_counter()
        await runner.process_batch([Message(fixture_bytes("graph_alert_v2_dlp.json"))])
        elapsed = time.perf_counter() - started
        (line,) = lake_lines(runner)
    status = line["enrichment_status"]["busy"]
    assert status["state"] == "timed_out" and status["error"] == "no result within 0.2s"
    assert 150 <= status["duration_ms"] < 320 and elapsed < 2  # 0.2 s from the start, not 0.15 + 0.2


async def test_a_batch_enricher_that_raises_before_waiting_fails_its_alerts_and_the_batch_goes_on(write_config, fixture_bytes):
    config = pipeline_toml(enrichers=[enricher_entry("per_batch", "tests.plugins:PerBatch", {"mode": "raise"})])
    async with Runner(write_config(config)) as runner:
        report = await runner.process_batch([Message(fixture_bytes("graph_alert_v2_dlp.json"))])
        (line,) = lake_lines(runner)
    assert report.delivered["lake"] == 1
    assert line["enrichment_status"]["per_batch"]["state"] == "failed" and line["enrichment_status"]["per_batch"]["error"] == "RuntimeError"


async def test_a_batch_enricher_failing_batches_of_one_alert_opens_its_breaker(write_config, fixture_bytes, caplog):
    """Batches of one alert that fail: the status, the warning ("1 of 1") and the breaker's count are
    those of a larger batch whose alerts all failed."""
    config = pipeline_toml(runner={"enricher_breaker_threshold": 2}, enrichers=[enricher_entry("one", "tests.plugins:PerBatch", {"mode": "raise"})])
    async with Runner(write_config(config)) as runner:
        breaker = runner.enricher_breakers["one"]
        for expected in ("closed", "open"):  # two failed batches open it
            report = await runner.process_batch([Message(fixture_bytes("graph_alert_v2_dlp.json"))])
            assert report.enrichment == {("one", "failed"): 1} and breaker.state == expected
        (line,) = lake_lines(runner)
    assert (line["enrichment_status"]["one"]["state"], line["enrichment_status"]["one"]["error"]) == ("failed", "RuntimeError")
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("enricher one failed")]
    assert len(warnings) == 2 and all(w.startswith("enricher one failed for 1 of 1 alert(s) (first: alert ") for w in warnings)


async def test_a_claim_with_nothing_due_does_not_wait_for_another_writer(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_state, "BUSY_WAIT_SECONDS", 0.3)
    store = SqliteStateStore(tmp_path / "state.sqlite")
    other = sqlite3.connect(tmp_path / "state.sqlite", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        started = time.perf_counter()
        assert await store.claim_due(now=1000.0, settle_seconds=0, max_hold_seconds=60, lease_seconds=30) == []
        assert await store.claim_due(now=1000.0, settle_seconds=0, max_hold_seconds=60, lease_seconds=30, force=True) == []
        assert time.perf_counter() - started < 0.25
        other.execute("ROLLBACK")
    finally:
        other.close()
        await store.aclose()


async def test_a_claim_with_alerts_due_still_leases_them_once(tmp_path):
    from pipeline.ingest.formats.contract import AlertPart

    store = SqliteStateStore(tmp_path / "state.sqlite")
    second = SqliteStateStore(tmp_path / "state.sqlite")
    try:
        part = AlertPart(alert_id="a1", rank=0, data={"AlertId": "a1"}, digest="d1")
        await store.add_parts([part], now=1000.0)
        (claimed,) = await store.claim_due(now=1001.0, settle_seconds=0, max_hold_seconds=60, lease_seconds=30)
        assert claimed.alert_id == "a1" and [p.digest for p in claimed.parts] == ["d1"]
        assert await second.claim_due(now=1002.0, settle_seconds=0, max_hold_seconds=60, lease_seconds=30) == []  # leased
    finally:
        await store.aclose()
        await second.aclose()


def _part(alert_id: str, digest: str):
    from pipeline.ingest.formats.contract import AlertPart

    return AlertPart(alert_id=alert_id, rank=0, data={"AlertId": alert_id}, digest=digest)


async def test_a_batchs_parts_and_claim_are_committed_together_when_the_block_ends(tmp_path):
    store = SqliteStateStore(tmp_path / "state.sqlite")
    reader = sqlite3.connect(tmp_path / "state.sqlite", isolation_level=None)
    try:
        with store.joined_writes():
            await store.add_parts([_part("a1", "d1")], now=1000.0)
            await store.add_parts([_part("a2", "d2")], now=1000.0)
            claimed = await store.claim_due(now=1001.0, settle_seconds=0, max_hold_seconds=60, lease_seconds=30)
            assert reader.execute("SELECT count(*) FROM alert_parts").fetchone() == (0,)  # nothing committed yet
        assert sorted(alert.alert_id for alert in claimed) == ["a1", "a2"]  # the claim saw the block's own parts
        assert reader.execute("SELECT count(*) FROM alert_parts").fetchone() == (2,)
        assert reader.execute("SELECT count(*) FROM alerts WHERE lease_until > 0").fetchone() == (2,)
    finally:
        reader.close()
        await store.aclose()


async def test_a_joined_block_that_raises_commits_none_of_its_writes(tmp_path):
    store = SqliteStateStore(tmp_path / "state.sqlite")
    try:
        with pytest.raises(LookupError), store.joined_writes():
            await store.add_parts([_part("a1", "d1")], now=1000.0)
            raise LookupError("the batch failed")
        assert await store.pending_count() == 0
        with store.joined_writes():  # nothing written: no transaction left open, the next block works
            assert await store.claim_due(now=1001.0, settle_seconds=0, max_hold_seconds=60, lease_seconds=30) == []
        assert (await store.add_parts([_part("a1", "d1")], now=1000.0)).new == 1
    finally:
        await store.aclose()


async def test_siblings_that_wait_each_go_on_in_the_task_they_started_in_and_overlap(write_config):
    """Two siblings that open their own timer before waiting: each timer fires in its own call only
    (neither cancels the batch), and the two waits overlap."""
    config = pipeline_toml(enrichers=[
        enricher_entry("one", "tests.plugins:TimesItself", {"own_timeout": 0.3}),
        enricher_entry("two", "tests.plugins:TimesItself", {"own_timeout": 0.3}),
        enricher_entry("three", "tests.plugins:PerBatch"),
    ])
    async with Runner(write_config(config)) as runner:
        assert [[slot.name for slot in wave] for wave in runner.chain.waves] == [["one", "two", "three"]]
        started = time.perf_counter()
        enriched = await runner.engine.enrich(make_alerts("graph_alert"))
        elapsed = time.perf_counter() - started
    assert enriched.states == {("one", "ok"): 1, ("two", "ok"): 1, ("three", "ok"): 1}
    assert elapsed < 0.55  # 0.3 s each, side by side


def _alert_of_the_same_user(alert, alert_id: str):
    """Another alert of the alert's user, an hour later (a window ends just before an alert's own time)."""
    later = {name: getattr(alert, name) + timedelta(hours=1) for name in ("first_activity_at", "created_at", "last_activity_at") if getattr(alert, name)}
    return alert.model_copy(update={"alert_id": alert_id, **later})


async def test_a_batch_whose_users_histories_are_held_makes_no_task(write_config):
    """The history enrichers read a user's history at most every `store.reuse_seconds`; a batch whose
    users were read within it answers inline (no task, no wait on the loop), and so do their siblings."""
    config = pipeline_toml(enrichers=[enricher_entry("prior_incidents"), enricher_entry("sensitive_info"), enricher_entry("triage")])
    (alert,) = make_alerts("graph_alert")
    async with Runner(write_config(config)) as runner:
        first = await runner.engine.enrich([alert])
        with counting_tasks() as made:
            second = await runner.engine.enrich([_alert_of_the_same_user(alert, "second")])
    assert made == []
    assert first.records[0].enrichments["prior_incidents"]["last_90_days"] == 0
    assert second.records[0].enrichments["prior_incidents"]["recent"][0]["alert_id"] == alert.alert_id  # the first one counted


async def test_a_batch_that_reads_one_users_history_from_the_local_store_makes_no_task(write_config):
    config = pipeline_toml(enrichers=[enricher_entry("prior_incidents", settings={"store": {"reuse_seconds": 0}})])
    (alert,) = make_alerts("graph_alert")
    async with Runner(write_config(config)) as runner:
        await runner.engine.enrich([alert])
        with counting_tasks() as made:
            second = await runner.engine.enrich([_alert_of_the_same_user(alert, "second")])
    assert made == []
    assert second.records[0].enrichments["prior_incidents"]["last_90_days"] == 1


async def test_a_batch_that_reads_several_users_histories_from_the_local_store_makes_no_task(write_config):
    """SQLite reads never wait: the histories of a batch's users read for the first time are read one
    after another in the enricher's task, and the batch's siblings answer inline too."""
    from pipeline.models import UserRef

    config = pipeline_toml(enrichers=[enricher_entry("prior_incidents"), enricher_entry("sensitive_info"), enricher_entry("triage")])
    (alert,) = make_alerts("graph_alert")
    batch = [alert.model_copy(update={"alert_id": f"u{i}", "user": UserRef(upn=f"user{i}@contoso.com")}) for i in range(3)]
    async with Runner(write_config(config)) as runner:
        await runner.engine.enrich([alert])
        with counting_tasks() as made:
            records = (await runner.engine.enrich(batch)).records
        second = (await runner.engine.enrich([_alert_of_the_same_user(batch[1], "later")])).records
    assert made == []
    assert [r.enrichments["prior_incidents"]["last_90_days"] for r in records] == [0, 0, 0]
    assert second[0].enrichments["prior_incidents"]["recent"][0]["alert_id"] == "u1"


def _split_alert(fixture_bytes, alert_id: str) -> Message:
    """The shared batch's first split alert (AlertInfo and its evidence rows), renamed `alert_id`, in one message."""
    info, user, file_, app, _ = streaming_records(fixture_bytes)
    parts = orjson.loads(orjson.dumps([info, user, file_, app]).replace(info["properties"]["AlertId"].encode(), alert_id.encode()))
    return envelope(*parts)


@contextmanager
def counting_commits(store: SqliteStateStore):
    commits: list[str] = []
    store._db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    try:
        yield commits
    finally:
        store._db.set_trace_callback(None)


HISTORY_AND_SINK_DOWN = dict(
    enrichers=[enricher_entry("prior_incidents")],
    delivery={"max_attempts": 1, "budget_seconds": 5, "max_batch_redeliveries": 3},
    sinks=[sink_entry("flaky", "tests.plugins:FlakySink", {"failures": 100})],
)


async def test_a_split_alerts_batch_is_two_commits_its_parts_and_claim_then_its_history_and_mark(write_config, fixture_bytes):
    async with Runner(write_config(pipeline_toml(enrichers=[enricher_entry("prior_incidents")]))) as runner:
        await runner.process_batch([_split_alert(fixture_bytes, "dl-first")])  # the user's history is read (and held) now
        with counting_commits(runner.state) as commits:
            report = await runner.process_batch([_split_alert(fixture_bytes, "dl-second")])
        assert report.emitted_split == 1 and report.delivered == {"lake": 1}
        assert len(commits) == 2
        with closing(sqlite3.connect(runner.state.path)) as other:  # both committed when the batch returned
            assert other.execute("SELECT count(*) FROM history_alerts WHERE entry_id = 'dl-second'").fetchone() == (1,)
            assert other.execute("SELECT state FROM alerts WHERE alert_id = 'dl-second'").fetchone() == ("emitted",)


async def test_a_batch_whose_user_is_read_for_the_first_time_is_two_commits_too(write_config, fixture_bytes):
    """prior_incidents reads a user's history before it writes the batch's alerts (and counts them in
    the tally read): the read finds no write of the batch held, so none is committed ahead of the mark."""
    async with Runner(write_config(pipeline_toml(enrichers=[enricher_entry("prior_incidents")]))) as runner:
        await runner.process_batch([_split_alert(fixture_bytes, "dl-first")])  # megan.bowen's history is read (and held) now
        other_user = Message(_split_alert(fixture_bytes, "dl-adele").body.replace(b"megan.bowen@", b"adele.vance@"))
        with counting_commits(runner.state) as commits:
            report = await runner.process_batch([other_user])
        assert report.emitted_split == 1 and report.delivered == {"lake": 1}
        assert len(commits) == 2
        with closing(sqlite3.connect(runner.state.path)) as other:  # committed with the mark
            assert other.execute("SELECT count(*) FROM history_alerts WHERE entry_id = 'dl-adele'").fetchone() == (1,)


async def test_a_batch_that_raises_for_a_sink_outage_has_committed_its_history_and_released_its_alert(write_config, fixture_bytes):
    from pipeline.errors import SinkOutage

    async with Runner(write_config(pipeline_toml(**HISTORY_AND_SINK_DOWN))) as runner:
        with pytest.raises(SinkOutage):
            await runner.process_batch([_split_alert(fixture_bytes, "dl-outage")])
        with closing(sqlite3.connect(runner.state.path)) as other:
            assert other.execute("SELECT count(*) FROM history_alerts WHERE entry_id = 'dl-outage'").fetchone() == (1,)
            assert other.execute("SELECT state, lease_until FROM alerts WHERE alert_id = 'dl-outage'").fetchone() == ("pending", 0)
            assert other.execute("SELECT attempts FROM batch_redeliveries").fetchall() == [(1,)]  # the outage rule's count too


def _entry(entry_id: str, at: float = 1000.0):
    from pipeline.state.history import HistoryEntry

    return HistoryEntry(entry_id=entry_id, content_id="c-" + entry_id, user="u@contoso.com", at=at)


async def test_history_writes_held_by_a_batch_are_read_back_within_it_and_committed_by_its_mark(tmp_path):
    store = SqliteStateStore(tmp_path / "state.sqlite")
    history = store.local_history(retention_days=1)
    other = sqlite3.connect(tmp_path / "state.sqlite", isolation_level=None)
    try:
        await store.add_parts([_part("a1", "d1")], now=1000.0)
        assert [a.alert_id for a in await store.claim_due(now=1000.0, settle_seconds=0, max_hold_seconds=60, lease_seconds=30)] == ["a1"]
        with store.holding_history_writes():
            await history.record("alert", [_entry("e1")])
            assert other.execute("SELECT count(*) FROM history_alerts").fetchone() == (0,)  # held
            await store.mark_emitted(["a1"], now=1001.0)
            assert other.execute("SELECT count(*) FROM history_alerts").fetchone() == (1,)  # with the mark
            await history.record("alert", [_entry("e2")])
            entries, _ = await history.entries_after("alert", "u@contoso.com", None, since=0.0)
            assert [e.entry_id for e in entries] == ["e1", "e2"]  # a read sees every write before it
        await history.record("alert", [_entry("e3")])  # no batch holds writes: committed at once
        assert other.execute("SELECT entry_id FROM history_alerts ORDER BY rowid").fetchall() == [("e1",), ("e2",), ("e3",)]
    finally:
        other.close()
        await store.aclose()


async def test_history_writes_whose_commit_failed_stay_held_until_a_commit_succeeds(tmp_path, monkeypatch):
    """The enricher remembers what it wrote and does not write it again: a held write must never be
    dropped by a commit that failed (the store busy), whether the batch goes on or raises."""
    from pipeline.errors import PipelineError

    monkeypatch.setattr(sqlite_state, "BUSY_WAIT_SECONDS", 0.05)
    store = SqliteStateStore(tmp_path / "state.sqlite")
    history = store.local_history(retention_days=1)
    other = sqlite3.connect(tmp_path / "state.sqlite", isolation_level=None)
    try:
        await store.add_parts([_part("a1", "d1")], now=1000.0)
        assert [a.alert_id for a in await store.claim_due(now=1000.0, settle_seconds=0, max_hold_seconds=60, lease_seconds=30)] == ["a1"]
        with store.holding_history_writes():
            await history.record("alert", [_entry("e1")])
            other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
            with pytest.raises(PipelineError):
                await store.mark_emitted(["a1"], now=1001.0)
            other.execute("ROLLBACK")
        assert other.execute("SELECT entry_id FROM history_alerts").fetchall() == [("e1",)]  # committed when the block ended

        with pytest.raises(LookupError), store.holding_history_writes():
            await history.record("alert", [_entry("e2")])
            other.execute("BEGIN IMMEDIATE")
            raise LookupError("the batch failed")  # and the commit at the block's end fails too: not raised
        other.execute("ROLLBACK")
        assert other.execute("SELECT count(*) FROM history_alerts WHERE entry_id = 'e2'").fetchone() == (0,)
        await store.mark_emitted(["a1"], now=1002.0)  # the next write commits it
        assert other.execute("SELECT count(*) FROM history_alerts WHERE entry_id = 'e2'").fetchone() == (1,)
    finally:
        other.close()
        await store.aclose()


async def test_a_write_outside_a_batch_is_committed_after_the_held_ones_whose_commit_failed(tmp_path, monkeypatch):
    """A batch raised and the commit at its end failed: its writes stay held. A write made afterwards
    outside any batch must go in behind them, not before, or the older revision of an entry gets
    the later rowid and readers take it for the latest one written."""
    monkeypatch.setattr(sqlite_state, "BUSY_WAIT_SECONDS", 0.05)
    store = SqliteStateStore(tmp_path / "state.sqlite")
    history = store.local_history(retention_days=1)
    other = sqlite3.connect(tmp_path / "state.sqlite", isolation_level=None)
    try:
        with pytest.raises(LookupError), store.holding_history_writes():
            await history.record("alert", [_entry("e1")])  # content c-e1
            other.execute("BEGIN IMMEDIATE")
            raise LookupError("the batch failed")
        other.execute("ROLLBACK")
        revised = _entry("e1")
        revised.content_id = "c-e1-revised"
        await history.record("alert", [revised])  # no batch holds writes
        assert other.execute("SELECT content_id FROM history_alerts ORDER BY rowid").fetchall() == [("c-e1",), ("c-e1-revised",)]
    finally:
        other.close()
        await store.aclose()


async def test_batches_running_side_by_side_each_return_with_their_history_committed(write_config, fixture_bytes):
    """Two batches of one runner at once (the consumer's partitions): the history one holds may be
    committed by the other's mark; each returns with its own committed, and both alerts are delivered."""
    config = pipeline_toml(enrichers=[enricher_entry("prior_incidents"), enricher_entry("waits", "tests.plugins:TimesItself", {"own_timeout": 0.05})])
    async with Runner(write_config(config)) as runner:
        with closing(sqlite3.connect(runner.state.path)) as other:

            async def batch(alert_id: str) -> int:
                report = await runner.process_batch([_split_alert(fixture_bytes, alert_id)])
                assert report.emitted_split == 1
                return other.execute("SELECT count(*) FROM history_alerts WHERE entry_id = ?", (alert_id,)).fetchone()[0]

            assert await asyncio.gather(batch("dl-one"), batch("dl-two")) == [1, 1]
            assert other.execute("SELECT alert_id, state FROM alerts ORDER BY alert_id").fetchall() == [("dl-one", "emitted"), ("dl-two", "emitted")]
        assert sorted(line["alert"]["alert_id"] for line in lake_lines(runner)) == ["dl-one", "dl-two"]
