"""Fault injection: every input alert ends delivered or dead-lettered, none is lost, none is written twice.

Sinks fail through real HTTP (pytest-httpserver + httpx): 413, 429, 500, a 500 after the write,
timeouts and dropped connections; enrichers raise and hang; poison messages; the state store is
locked; the lake's append is cut short. Each case checks the same accounting:
- every alert id of the input is in the lake and, per sink, either written or dead-lettered for that sink;
- no ticket was created twice and no record_id is in the lake twice.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter

import orjson
import pytest

from pipeline.errors import SinkOutage, StoreUnavailable
from pipeline.runner import Message, Runner
from tests import faults
from tests.deliver.test_delivery import Tick
from tests.support.config import LAKE, enricher_entry, pipeline_toml, sink_entry


def config(url: str = "http://127.0.0.1:9", *, enrichers: list[dict] | None = None, itsm: str | None = "tests.faults:HttpTicketSink") -> str:
    """Eight alerts at a time through sensitive_info (then `enrichers`) to the lake and, unless `itsm`
    is None, an HTTP ticket sink of that kind at `url`; six fast attempts, a breaker that stays closed."""
    delivery = {"max_attempts": 6, "backoff_initial_seconds": 0.001, "backoff_max_seconds": 0.005, "budget_seconds": 10, "breaker_threshold": 50}
    tickets = [sink_entry("itsm", itsm, {"url": url, "timeout_seconds": 0.3})] if itsm else []
    return pipeline_toml(runner={"max_concurrent_alerts": 8}, delivery=delivery, enrichers=[enricher_entry("sensitive_info"), *(enrichers or [])], sinks=[LAKE, *tickets])


def alerts(fixture_bytes, count: int, prefix: str = "alert") -> list[Message]:
    alert = json.loads(fixture_bytes("graph_alert_v2_dlp.json"))
    return [Message(orjson.dumps(dict(alert, id=f"{prefix}-{i:04d}")), source=f"in:{i}") for i in range(count)]


def lake_records(runner: Runner) -> list[dict]:
    root = runner.loaded.data_path("lake")
    return [json.loads(line) for path in sorted(root.rglob("*.jsonl")) for line in path.read_text().splitlines()]


async def assert_accounted(runner: Runner, server: faults.TicketServer, alert_ids: set[str]) -> None:
    """Nothing lost, nothing twice: see the module docstring."""
    lake = lake_records(runner)
    lake_ids = Counter(line["record_id"] for line in lake)
    assert max(lake_ids.values(), default=1) == 1, "a record is in the lake twice"
    assert {line["alert"]["alert_id"] for line in lake} == alert_ids, "an alert is missing from the lake"
    id_of = {line["record_id"]: line["alert"]["alert_id"] for line in lake}
    assert max(server.created.values(), default=1) == 1, "a ticket was created twice"
    dead = {e.record_id for e in await runner.dead_letter.list() if e.stage == "deliver" and e.sink == "itsm"}
    ticketed = set(server.created)
    assert {id_of[i] for i in ticketed | dead} == alert_ids, "an alert neither got a ticket nor was dead-lettered for the ITSM"


@pytest.fixture
def ticket_server(httpserver):
    server = faults.TicketServer(httpserver, sleep=0.6)
    yield server
    httpserver.clear()


@pytest.mark.parametrize(
    "injected,expect_dead",
    [
        ([413], 1),  # too large: rejected at once, never retried
        ([400, 404], 2),
        ([429, 429, 429], 0),  # throttled: Retry-After honoured, then delivered
        ([500, 503, 502], 0),
        (["500-after-write"], 0),  # written, but the client saw 500: the retry updates, it does not create
        (["timeout"], 0),  # the server wrote late; the retry updates
        (["drop", "drop"], 0),  # connection dropped without an answer
        ([413, 429, "timeout", "drop", "500-after-write", 500], 1),
    ],
    ids=["413", "400-404", "429", "5xx", "500-after-write", "timeout", "dropped", "mixed"],
)
async def test_http_sink_faults_lose_nothing_and_duplicate_no_ticket(write_config, fixture_bytes, ticket_server, injected, expect_dead):
    ticket_server.faults = list(injected)
    async with Runner(write_config(config(ticket_server.url))) as runner:
        report = await runner.process_batch(alerts(fixture_bytes, 12))
        await assert_accounted(runner, ticket_server, {f"alert-{i:04d}" for i in range(12)})
    assert report.dead_lettered.get("deliver", 0) == expect_dead
    assert report.delivered == {"lake": 12, "itsm": 12 - expect_dead}
    rejected = [e for e in await runner.dead_letter.list()]
    assert all(e.reason == "sink_rejected" and e.attempts == 1 for e in rejected)  # 4xx: dead at once, one call


async def test_http_sink_down_for_the_batch_raises_then_the_rerun_delivers_once(write_config, fixture_bytes, ticket_server):
    ticket_server.faults = [500] * 6 * 5  # every call of the first run: 5 records x 6 attempts
    batch = alerts(fixture_bytes, 5)
    async with Runner(write_config(config(ticket_server.url))) as runner:
        with pytest.raises(SinkOutage):
            await runner.process_batch(batch)
        assert await runner.dead_letter.list() == [] and not ticket_server.created
        ticket_server.faults = ["500-after-write", "timeout"]
        report = await runner.process_batch(batch)  # the retry of the batch (Functions retry policy / run again)
        await assert_accounted(runner, ticket_server, {f"alert-{i:04d}" for i in range(5)})
    assert report.delivered == {"lake": 5, "itsm": 5} and sum(ticket_server.created.values()) == 5


POISON = [
    b"",
    b"\x00\xff\xfe binary",
    b"{" * 5000,
    b'{"records": "not a list"}',
    b'{"records": [1, "two", null]}',
    b"[" + b"1," * 20 + b"1]",
    b'{"value": [{"id": "x"}]}',
    b'"just a string"',
    b"null",
]


async def test_poison_messages_failing_enrichers_and_throttling_together(write_config, fixture_bytes, ticket_server):
    enrichers = [enricher_entry("counting_explodes", "tests.faults:CountingExplodes"), enricher_entry("counting_hangs", "tests.faults:CountingHangs")]
    ticket_server.faults = [429, "drop", 500, "timeout"]
    good = alerts(fixture_bytes, 20)
    batch = []
    for i, message in enumerate(good):
        batch.append(message)
        if i < len(POISON):
            batch.append(Message(POISON[i], source=f"poison:{i}"))
    async with Runner(write_config(config(ticket_server.url, enrichers=enrichers))) as runner:
        report = await runner.process_batch(batch)
        await assert_accounted(runner, ticket_server, {f"alert-{i:04d}" for i in range(20)})
        entries = await runner.dead_letter.list()
    decode_dead = [e for e in entries if e.stage == "decode"]
    assert report.messages == 29 and report.alerts == 20
    # every poison message is dead-lettered (whole or per record) or counted as not DLP: none vanishes
    assert {e.source for e in decode_dead} == {f"poison:{i}" for i in range(len(POISON))}
    assert report.enrichment_failures["counting_explodes"] == 20 and report.enrichment_failures["counting_hangs"] == 20


async def test_state_store_locked_raises_and_the_rerun_delivers_once(write_config, fixture_bytes, ticket_server):
    loaded = write_config(config(ticket_server.url))
    batch = alerts(fixture_bytes, 6) + [Message(fixture_bytes("streaming_dlp_batch.json"), source="split")]
    async with Runner(loaded) as runner:
        runner.state._db.execute("PRAGMA busy_timeout=50")  # the SQLite file itself: fail fast on its lock
        blocker = sqlite3.connect(runner.state.path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # another process holds the state store
        try:
            with pytest.raises(StoreUnavailable):
                await runner.process_batch(batch)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert not ticket_server.created  # it failed before delivering anything
        report = await runner.process_batch(batch)
        lake = lake_records(runner)
        await assert_accounted(runner, ticket_server, {line["alert"]["alert_id"] for line in lake})
    assert report.alerts == 7 and len(lake) == 7 and report.pending == 0


async def test_state_store_failing_after_delivery_reruns_without_duplicates(write_config, fixture_bytes, ticket_server):
    """The store fails right after the sink wrote, before mark_emitted: nothing is lost, no ticket is created twice."""
    clock = Tick()
    batch = [Message(fixture_bytes("streaming_dlp_batch.json"), source="split")] + alerts(fixture_bytes, 3)
    async with Runner(write_config(config(ticket_server.url, itsm="tests.faults:HttpTicketSinkThenStateDown")), clock=clock) as runner:
        runner.state._db.execute("PRAGMA busy_timeout=50")  # the SQLite file itself: fail fast on its lock
        try:
            with pytest.raises(StoreUnavailable):
                await runner.process_batch(batch)
        finally:
            faults.release_blockers()
        assert len(ticket_server.created) == 4  # the sink wrote before the store failed
        report = await runner.process_batch(batch)  # the batch again: its split alert is still leased to the failed run
        assert report.pending == 1
        clock.now += runner.config.assembly.lease_seconds + 1
        late = await runner.process_batch([])  # the lease ran out: claimed again and redelivered
        lake = lake_records(runner)
        await assert_accounted(runner, ticket_server, {line["alert"]["alert_id"] for line in lake})
    assert late.alerts == 1 and late.pending == 0 and len(lake) == 4 and sum(ticket_server.updated.values()) == 4


async def test_lake_append_cut_short_is_repaired_on_open(write_config, fixture_bytes):
    """What a crash between the append and the index write leaves behind is cut back, then written once."""
    loaded = write_config(config(itsm=None))
    batch = alerts(fixture_bytes, 3)
    async with Runner(loaded) as runner:
        await runner.process_batch(batch[:1])
        lake = runner.loaded.data_path("lake")
        (path,) = list(lake.rglob("records.jsonl"))
        size = path.stat().st_size
    # The state a SIGKILL after the append and before the index commit leaves: journal row + lines.
    index = sqlite3.connect(lake / "_delivered.sqlite", isolation_level=None)
    index.execute("INSERT INTO pending_append (path, size) VALUES (?, ?)", (str(path.relative_to(lake)), size))
    index.close()
    with open(path, "ab") as handle:
        handle.write(b'{"record_id": "half-written", "alert": {"alert_id": "al')
    async with Runner(loaded) as runner:
        await runner.process_batch(batch)
        records = lake_records(runner)
    assert sorted(r["alert"]["alert_id"] for r in records) == ["alert-0000", "alert-0001", "alert-0002"]
