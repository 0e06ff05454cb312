"""The shared state store on Azure Table Storage (pipeline/state/azure_table.py), against Azurite.

The behaviour every state store shares runs against the SQLite store and the Table store alike
(`store` fixture); then what only a shared store must do: claims by ETag (two claimers of one
alert, in tasks and in processes), leases that run out, mark_emitted only by the lease holder, late
parts between claim and mark, the entity and property limits, Table errors as StoreUnavailable,
and a runner that never saw an alert's parts emitting it on flush.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from pipeline.config import StateSettings, load_config
from pipeline.errors import ConfigError, StoreUnavailable
from pipeline.ingest.formats import AlertPart
from pipeline.runner import Message, Runner
from pipeline.state import StateStore, open_state_store
from pipeline.state.azure_table import MAX_PART_BYTES, SHARDS, TableStateStore, shard_of
from pipeline.state.sqlite import SqliteStateStore
from tests.support.paths import ROOT
from tests.support.table_state import ENV, FlakyProxy, RequestCounter, as_message, content_id_of, lake_lines, reference_content_ids, split_alert_records, state_toml, table_name, table_settings

SETTLE, HOLD, LEASE = 30.0, 600.0, 300.0


def part(alert_id: str, rank: int = 1, **data) -> AlertPart:
    return AlertPart(alert_id=alert_id, rank=rank, data={"alert_id": alert_id, **data})


async def claim(store: StateStore, now: float, *, force: bool = False, limit: int | None = None, lease: float = LEASE):
    return await store.claim_due(now=now, settle_seconds=SETTLE, max_hold_seconds=HOLD, lease_seconds=lease, force=force, limit=limit)


@pytest.fixture
async def tables(azurite, monkeypatch):
    """Opens Table stores on one fresh table of Azurite; each call gives a store of its own, as another
    instance would have. All are closed at the end."""
    monkeypatch.setenv(ENV, azurite.connection_string)
    name = table_name()
    opened: list[TableStateStore] = []

    def open_one(**options) -> TableStateStore:
        opened.append(TableStateStore(table_settings(name), **options))
        return opened[-1]

    open_one.table = name  # type: ignore[attr-defined]
    yield open_one
    for store in opened:
        await store.aclose()


@pytest.fixture(params=["sqlite", "azure_table"])
async def store(request, tmp_path, azurite, monkeypatch):
    if request.param == "sqlite":
        opened: StateStore = SqliteStateStore(tmp_path / "state.sqlite")
    else:
        monkeypatch.setenv(ENV, azurite.connection_string)
        opened = TableStateStore(table_settings(table_name()))
    yield opened
    await opened.aclose()


# -- what every state store does -------------------------------------------------------------------


async def test_parts_are_stored_once_and_duplicates_counted(store):
    first = await store.add_parts([part("a1", 0, title="x"), part("a1", 1, files=["f"]), part("a2", 0, title="y")], now=100)
    assert (first.new, first.duplicate) == (3, 0)
    again = await store.add_parts([part("a1", 0, title="x"), part("a1", 0, title="x"), part("a2", 0, title="y")], now=101)
    assert (again.new, again.duplicate) == (0, 3)
    assert await store.pending_count() == 2


async def test_an_alert_is_due_when_settled_or_held_too_long_and_comes_back_whole(store):
    await store.add_parts([part("a1", 1, files=["b"]), part("a1", 0, title="t")], now=100)
    assert await claim(store, now=100 + SETTLE - 1) == []
    (due,) = await claim(store, now=100 + SETTLE)
    assert due.alert_id == "a1" and [(p.rank, p.data) for p in due.parts] == [(0, {"alert_id": "a1", "title": "t"}), (1, {"alert_id": "a1", "files": ["b"]})]
    assert due.parts[0].digest == part("a1", 0, title="t").digest
    await store.mark_emitted(["a1"], now=100 + SETTLE)
    # a busy alert (a part every few seconds) is emitted at the latest max_hold after its first part
    for tick in range(0, int(HOLD) + 1, 20):
        await store.add_parts([part("busy", 1, n=tick)], now=1000 + tick)
        emitted = [a.alert_id for a in await claim(store, now=1000 + tick)]
        if emitted:
            break
    assert emitted == ["busy"] and tick >= HOLD


async def test_a_claim_is_leased_and_taken_again_only_when_the_lease_ran_out(store):
    await store.add_parts([part("a1")], now=0)
    assert [a.alert_id for a in await claim(store, now=SETTLE)] == ["a1"]
    assert await claim(store, now=SETTLE + LEASE - 1) == []
    assert [a.alert_id for a in await claim(store, now=SETTLE + LEASE)] == ["a1"]  # the holder died: at-least-once
    assert await store.pending_count() == 1


async def test_mark_emitted_ends_it_and_release_gives_it_back_at_once(store):
    await store.add_parts([part("a1"), part("a2")], now=0)
    claimed = await claim(store, now=SETTLE)
    assert sorted(a.alert_id for a in claimed) == ["a1", "a2"]
    await store.mark_emitted(["a1"], now=SETTLE)
    await store.release(["a2"])
    assert [a.alert_id for a in await claim(store, now=SETTLE + 1)] == ["a2"]
    await store.mark_emitted(["a2"], now=SETTLE + 1)
    assert await store.pending_count() == 0 and await claim(store, now=10_000, force=True) == []


async def test_force_takes_every_pending_alert_oldest_first_in_bounded_chunks(store):
    for index in range(5):
        await store.add_parts([part(f"a{index}")], now=index)
    first = await claim(store, now=5, force=True, limit=2)
    assert [a.alert_id for a in first] == ["a0", "a1"]
    rest = await claim(store, now=5, force=True)
    assert [a.alert_id for a in rest] == ["a0", "a1", "a2", "a3", "a4"]  # force takes leased ones too (end of a run)


async def test_a_late_part_makes_an_emitted_alert_pending_again_with_every_part(store):
    await store.add_parts([part("a1", 0, title="t")], now=0)
    (first,) = await claim(store, now=SETTLE)
    await store.mark_emitted(["a1"], now=SETTLE)
    redelivered = await store.add_parts([part("a1", 0, title="t")], now=SETTLE + 1)
    assert redelivered.duplicate == 1 and await store.pending_count() == 0  # a redelivery changes nothing
    late = await store.add_parts([part("a1", 1, files=["late"])], now=SETTLE + 2)
    assert late.new == 1 and await store.pending_count() == 1
    (revised,) = await claim(store, now=2 * SETTLE + 2)
    assert [p.data for p in revised.parts] == [{"alert_id": "a1", "title": "t"}, {"alert_id": "a1", "files": ["late"]}]


async def test_parts_over_the_limit_are_refused_and_returned(store):
    added = await store.add_parts([part("a1", 1, n=i) for i in range(5)], now=0, max_parts_per_alert=3)
    assert added.new == 3 and [p.data["n"] for p in added.over_limit] == [3, 4]
    more = await store.add_parts([part("a1", 1, n=9)], now=1, max_parts_per_alert=3)
    assert more.new == 0 and len(more.over_limit) == 1
    (due,) = await claim(store, now=100)
    assert len(due.parts) == 3


async def test_purge_forgets_emitted_alerts_and_keeps_pending_ones(store):
    await store.add_parts([part("old"), part("kept")], now=0)
    await claim(store, now=SETTLE)
    await store.mark_emitted(["old"], now=SETTLE)
    assert await store.purge(emitted_before=SETTLE + 1) == 1
    assert await store.pending_count() == 1
    again = await store.add_parts([part("old")], now=SETTLE + 2)  # forgotten: new again
    assert again.new == 1


# -- what only the shared store must do -------------------------------------------------------------


async def test_two_claimers_of_one_settled_alert_exactly_one_wins(tables):
    writer = tables()
    await writer.add_parts([part(f"c{i}", 0, title=str(i)) for i in range(60)], now=0)
    claimers = [tables() for _ in range(4)]

    async def one(store: TableStateStore) -> list[str]:
        return [a.alert_id for a in await claim(store, now=SETTLE)]

    for _ in range(3):  # three rounds, each alert must be won by one claimer only
        results = await asyncio.gather(*(one(store) for store in claimers))
        won = Counter(alert_id for ids in results for alert_id in ids)
        assert set(won) <= {f"c{i}" for i in range(60)} and max(won.values(), default=1) == 1
        for store, ids in zip(claimers, results):
            await store.mark_emitted(ids, now=SETTLE)
        if not won:
            break
    assert await writer.pending_count() == 0


async def test_mark_emitted_counts_only_for_the_lease_holder(tables):
    writer, first, second = tables(), tables(), tables()
    await writer.add_parts([part("a1")], now=0)
    assert [a.alert_id for a in await claim(first, now=SETTLE)] == ["a1"]
    assert [a.alert_id for a in await claim(second, now=SETTLE + LEASE)] == ["a1"]  # first's lease ran out
    await first.mark_emitted(["a1"], now=SETTLE + LEASE)  # too late: not the holder any more
    assert await writer.pending_count() == 1
    await second.mark_emitted(["a1"], now=SETTLE + LEASE)
    assert await writer.pending_count() == 0


async def test_a_part_arriving_between_claim_and_mark_keeps_the_alert_pending_as_a_revision(tables):
    claimer, writer = tables(), tables()
    await claimer.add_parts([part("a1", 0, title="t")], now=0)
    (claimed,) = await claim(claimer, now=SETTLE)
    assert len(claimed.parts) == 1
    await writer.add_parts([part("a1", 1, files=["late"])], now=SETTLE + 1)  # another instance, same alert
    await claimer.mark_emitted(["a1"], now=SETTLE + 2)
    assert await writer.pending_count() == 1, "marking emitted must not swallow the part that came after the claim"
    (revised,) = await claim(writer, now=2 * SETTLE + 1)
    assert [p.rank for p in revised.parts] == [0, 1]


async def test_writers_of_one_alert_in_several_instances_at_once_lose_no_part(tables):
    writers = [tables() for _ in range(5)]
    alerts = [f"w{i}" for i in range(20)]
    await asyncio.gather(*(w.add_parts([part(a, index, n=index) for a in alerts], now=1) for index, w in enumerate(writers)))
    due = await claim(writers[0], now=SETTLE + 1)
    assert sorted(a.alert_id for a in due) == sorted(alerts)
    assert all(sorted(p.data["n"] for p in a.parts) == [0, 1, 2, 3, 4] for a in due)


async def test_alert_ids_with_characters_keys_may_not_hold(tables):
    store = tables()
    odd = ["a/b", "c#d?e", "back\\slash", "tab\tid", "x" * 400, "ümlaut|pipe}"]
    await store.add_parts([part(alert_id) for alert_id in odd], now=0)
    assert sorted(a.alert_id for a in await claim(store, now=SETTLE)) == sorted(odd)


async def test_a_part_larger_than_a_property_is_split_and_one_larger_than_an_entity_is_refused(tables):
    store = tables()
    big = "x" * (300 * 1024)  # several 64 KiB properties, and too big to be kept inline with the pending entry
    added = await store.add_parts([part("big", 0, blob=big), part("big", 1, title="small"), part("huge", 0, blob="y" * MAX_PART_BYTES)], now=0)
    assert added.new == 2 and [p.alert_id for p in added.too_large] == ["huge"]
    (due,) = await claim(store, now=SETTLE)
    assert due.alert_id == "big" and due.parts[0].data["blob"] == big and due.parts[1].data["title"] == "small"
    await store.mark_emitted(["big"], now=SETTLE)
    await store.add_parts([part("big", 2, files=["late"])], now=SETTLE + 1)  # a revision reads every part back
    (revised,) = await claim(store, now=2 * SETTLE + 1)
    assert [p.rank for p in revised.parts] == [0, 1, 2] and revised.parts[0].data["blob"] == big


async def test_an_alert_with_more_parts_than_a_transaction_holds(tables):
    store = tables()
    # 200 parts fit in the head; the other 200 get entities of their own: 202 operations, more than a transaction holds
    parts = [part("many", 1, n=i) for i in range(400)]
    assert (await store.add_parts(parts, now=0)).new == 400
    assert (await store.add_parts(parts[:10], now=1)).duplicate == 10
    (due,) = await claim(store, now=SETTLE + 1)
    assert sorted(p.data["n"] for p in due.parts) == list(range(400))


async def test_redelivery_counts_are_shared_durable_and_forgotten(tables):
    first, second = tables(), tables()
    assert await first.count_redelivery("fp1", now=0) == 1
    assert await second.count_redelivery("fp1", now=1) == 2  # another instance sees the count
    counts = await asyncio.gather(*(tables().count_redelivery("fp2", now=2) for _ in range(5)))
    assert sorted(counts) == [1, 2, 3, 4, 5]  # concurrent counters never lose one
    await first.forget_redelivery("fp1")
    assert await second.count_redelivery("fp1", now=3) == 1
    assert await first.count_redelivery("fp1", now=3 + 8 * 86400) == 1  # untouched for the forget window: starts again
    assert first.local_history(retention_days=1) is None


async def test_the_table_service_unreachable_raises_store_unavailable(monkeypatch):
    monkeypatch.setenv("DOWN_TABLES", "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;TableEndpoint=http://127.0.0.1:9/devstoreaccount1;")
    store = TableStateStore(table_settings("downtable", env="DOWN_TABLES"), client_options={"retry_total": 0})
    with pytest.raises(StoreUnavailable, match=r"state table: could not open the state table downtable \(ServiceRequestError\); the batch will be run again"):
        await store.add_parts([part("a1")], now=0)
    await store.aclose()


async def test_requests_per_split_alert_at_a_batch_of_100(tables):
    counter = RequestCounter()
    store = tables(client_options=counter.options())
    await store.pending_count()  # the table is created once per store, not per batch
    counter.requests = 0
    parts = [part(f"r{i:03d}", rank, n=rank) for i in range(100) for rank in range(4)]
    await store.add_parts(parts, now=0)
    claimed = await claim(store, now=SETTLE)
    await store.mark_emitted([a.alert_id for a in claimed], now=SETTLE)
    await store.pending_count()
    assert len(claimed) == 100
    assert counter.requests <= 2 * 100, counter.by_method
    assert counter.requests <= 5 * SHARDS, "one request per shard for each of add, claim query, claim, mark, count"


# -- through the runner ------------------------------------------------------------------------------

LAKE = """
[assembly]
settle_seconds = 0
lease_seconds = 5

[[sinks]]
name = "lake"
kind = "jsonl"
[sinks.settings]
fsync = false
"""


async def test_a_runner_that_never_saw_the_parts_emits_them_on_the_timer_flush(tables, tmp_path):
    records, ids = split_alert_records(12, tag="flush")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "pipeline.toml").write_text(state_toml(tables.table) + LAKE.replace("settle_seconds = 0", "settle_seconds = 30"))
    clock = [1000.0]
    writer = Runner(load_config(tmp_path / "a" / "pipeline.toml", data_dir=tmp_path / "a" / "out"), clock=lambda: clock[0])
    flusher = Runner(load_config(tmp_path / "b" / "pipeline.toml", data_dir=tmp_path / "b" / "out"), clock=lambda: clock[0])
    async with writer, flusher:
        report = await writer.process_batch([Message(as_message(record)) for record in records])
        assert report.alerts == 0 and report.pending == 12  # parts stored, not settled yet
        clock[0] += 31
        timer = await flusher.process_batch([])  # what flush_pending_alerts runs, here on another instance
        assert timer.alerts == 12 and timer.pending == 0
    reference = reference_content_ids(records)
    lines = lake_lines(tmp_path / "b" / "out")
    assert sorted(line["alert"]["alert_id"] for line in lines) == sorted(ids)
    assert all(content_id_of(line) == reference[line["alert"]["alert_id"]] for line in lines), "a record is not the whole alert"
    assert lake_lines(tmp_path / "a" / "out") == []


async def test_the_table_service_failing_mid_batch_raises_and_the_rerun_loses_nothing(azurite, monkeypatch, tmp_path):
    from tests.support.azurite import ACCOUNT, KEY

    records, ids = split_alert_records(30, tag="fail")
    reference = reference_content_ids(records)
    batch = [Message(as_message(record)) for record in records]
    with FlakyProxy(azurite.table_url.rsplit("/", 1)[0]) as proxy:
        monkeypatch.setenv("PROXIED_TABLES", proxy.connection_string(KEY, ACCOUNT))
        # The Table service fails after a varying number of requests (of about 90 for the batch): part-way through
        # add_parts, the claim's queries, the claim's transactions, mark_emitted, pending_count, the purge.
        for budget in (0, 7, 20, 36, 50, 65, 80):
            (tmp_path / "pipeline.toml").write_text(state_toml(table_name(), env="PROXIED_TABLES") + LAKE)
            clock = [10_000.0]
            out = tmp_path / f"out{budget}"
            async with Runner(load_config(tmp_path / "pipeline.toml", data_dir=out), clock=lambda clock=clock: clock[0]) as runner:
                await runner.state.pending_count()  # the table exists
                proxy.fail_after(budget)
                with pytest.raises(StoreUnavailable, match=r"state table: could not .* \(HTTP 503\); the batch will be run again and nothing is lost"):
                    await runner.process_batch(batch)
                proxy.heal()
                clock[0] += 10  # past the lease of what the failed run claimed
                await runner.process_batch(batch)  # the host runs the same batch again
                await runner.flush()
                assert await runner.state.pending_count() == 0
            lines = lake_lines(out)
            assert Counter(line["alert"]["alert_id"] for line in lines) == Counter(ids), f"failing after {budget} requests: an alert lost or written twice"
            assert all(content_id_of(line) == reference[line["alert"]["alert_id"]] for line in lines), f"failing after {budget} requests: a partial record"


# -- settings ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("body,key,needle", [
    ('[state]\nkind = "azure_table"\n', "state", "kind 'azure_table' needs account_url or connection_string_env"),
    ('[state]\nkind = "azure_table"\naccount_url = "https://a.table.core.windows.net"\nconnection_string_env = "X"\n', "state.connection_string_env", "not both"),
    ('[state]\naccount_url = "https://a.table.core.windows.net"\n', "state.account_url", "a setting of kind 'azure_table'"),
    ('[state]\nkind = "azure_table"\naccount_url = "https://a.table.core.windows.net"\npath = "x.sqlite"\n', "state.path", "a setting of kind 'sqlite'"),
    ('[state]\nkind = "azure_table"\naccount_url = "https://a"\ntable = "no-dashes"\n', "state.table", "String should match pattern"),
    ('[state]\nkind = "azure_table"\naccount_url = "https://a"\ntabel = "x"\n', "state.tabel", "unknown key"),
])
def test_bad_state_settings_fail_at_start_up_naming_the_key(tmp_path, body, key, needle):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert f"bad.toml, key '{key}'" in str(caught.value) and needle in str(caught.value)


def test_open_state_store_builds_the_kind_named_and_a_missing_variable_names_its_key(monkeypatch):
    monkeypatch.delenv("NOT_SET_TABLES", raising=False)
    with pytest.raises(ConfigError, match="key 'state.connection_string_env'.*NOT_SET_TABLES is not set"):
        open_state_store(StateSettings(kind="azure_table", connection_string_env="NOT_SET_TABLES"))
    store = open_state_store(StateSettings(kind="azure_table", account_url="https://account.table.core.windows.net", managed_identity_client_id="c1"))
    assert isinstance(store, TableStateStore) and store.table_name == "dlpstate"
    asyncio.run(store.aclose())


def test_alerts_spread_over_every_shard():
    assert {shard_of(f"dl{i:06d}") for i in range(2000)} == {f"s{i:02d}" for i in range(SHARDS)}


# -- several processes -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.integration
def test_two_processes_claiming_one_table_each_alert_is_won_once(azurite, tmp_path):
    table = table_name()
    env = {**os.environ, ENV: azurite.connection_string, "PYTHONPATH": str(ROOT)}
    driver = [sys.executable, "-m", "tests.support.state_claimer", table]
    subprocess.run([*driver, "fill", "200"], env=env, cwd=ROOT, check=True, timeout=60)
    processes = [subprocess.Popen([*driver, "claim", str(tmp_path)], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("ready-*"))) < 3 and time.monotonic() < deadline and all(p.poll() is None for p in processes):
        time.sleep(0.01)
    (tmp_path / "go").touch()  # every claimer starts at once
    # Until every alert is won (or a minute passed); then the claimers stop.
    while time.monotonic() < deadline and all(p.poll() is None for p in processes):
        if len({line for path in tmp_path.glob("won-*") for line in path.read_text().split()}) >= 200:
            break
        time.sleep(0.05)
    (tmp_path / "stop").touch()
    outputs = [p.communicate(timeout=60) for p in processes]
    assert all(p.returncode == 0 for p in processes), [err.decode()[-500:] for _, err in outputs]
    won = Counter(line for out, _ in outputs for line in out.decode().split())
    assert len(won) == 200 and max(won.values()) == 1, "an alert was claimed by two processes, or by none"
    assert sum(1 for out, _ in outputs if out.split()) >= 2, "the processes did not race: one took everything"


async def test_a_part_too_large_for_the_table_is_dead_lettered_with_its_reason(tables, tmp_path):
    records, ids = split_alert_records(2, tag="large")
    records[4]["properties"]["Title"] = "T" * (MAX_PART_BYTES + 10)  # the second alert's AlertInfo row
    limits = "[limits]\nmax_body_bytes = 4194304\nmax_string_length = 2000000\n"
    (tmp_path / "pipeline.toml").write_text(state_toml(tables.table) + LAKE + limits)
    async with Runner(load_config(tmp_path / "pipeline.toml", data_dir=tmp_path / "out")) as runner:
        report = await runner.process_batch([Message(as_message(record)) for record in records])
        await runner.flush()
    assert report.dead_lettered == {"assemble": 1}
    (dead,) = [orjson.loads(path.read_bytes()) for path in (tmp_path / "out" / "dead-letter").glob("*.json")]
    assert dead["reason"] == "part_too_large" and dead["alert_id"] == ids[1] and "larger than the state store holds" in dead["detail"]
    assert sorted(line["alert"]["alert_id"] for line in lake_lines(tmp_path / "out")) == ids  # the alert goes on from its other parts


PROCESS_CONFIG = """
[runner]
batch_size = 8

[assembly]
settle_seconds = 0
lease_seconds = 2

[[enrichers]]
name = "sensitive_info"

[[sinks]]
name = "lake"
kind = "jsonl"
[sinks.settings]
fsync = false
"""


@pytest.mark.slow
@pytest.mark.integration
def test_runner_processes_sharing_one_table_killed_and_started_again_lose_no_alert(azurite, tmp_path, monkeypatch):
    """Three `python -m pipeline run` processes share one Table store; the rows of 100 split alerts are
    spread over them at random; two are SIGKILLed mid-run and started again. Every alert ends with its
    complete record in a lake, earlier records of it only with fewer parts (a part came late)."""
    rng = random.Random(16)
    records, ids = split_alert_records(100, tag="procs")
    reference = reference_content_ids(records)
    workers = [tmp_path / f"w{index}" for index in range(3)]
    shares: list[list[bytes]] = [[] for _ in workers]
    for record in records:
        shares[rng.randrange(len(workers))].append(as_message(record))
    table = table_name()
    for folder, share in zip(workers, shares):
        folder.mkdir()
        rng.shuffle(share)
        (folder / "in.jsonl").write_bytes(b"\n".join(share) + b"\n")
        (folder / "pipeline.toml").write_text(state_toml(table) + PROCESS_CONFIG)
    env = {**os.environ, ENV: azurite.connection_string, "PYTHONPATH": str(ROOT)}

    def start(folder: Path) -> subprocess.Popen:
        command = [sys.executable, "-m", "pipeline", "run", "in.jsonl", "--config", "pipeline.toml", "--out", "out"]
        return subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    running = [start(folder) for folder in workers]
    killed = []
    for index in (0, 1):  # kill two of them once they have delivered something, a moment later
        deadline = time.monotonic() + 40
        while not lake_lines(workers[index] / "out") and running[index].poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        running[index].send_signal(signal.SIGKILL)
        running[index].communicate(timeout=30)
        killed.append(running[index].returncode)
    assert killed == [-signal.SIGKILL, -signal.SIGKILL], "a run ended before it was killed"
    again = [start(workers[0]), start(workers[1])]
    for process in [running[2], *again]:
        stdout, stderr = process.communicate(timeout=90)
        assert process.returncode == 0, stderr.decode()[-2000:]

    lines = [line for folder in workers for line in lake_lines(folder / "out")]
    by_alert: dict[str, set[str]] = {}
    for line in lines:
        by_alert.setdefault(line["alert"]["alert_id"], set()).add(content_id_of(line))
    assert set(by_alert) == set(ids), "an alert was lost"
    assert all(reference[alert_id] in contents for alert_id, contents in by_alert.items()), "an alert has no complete record"
    for folder in workers:
        per_record = Counter(line["record_id"] for line in lake_lines(folder / "out"))
        assert max(per_record.values()) == 1, "a lake holds a record twice"
    whole = {content_id_of(line): line["alert"] for line in lines}
    for line in lines:  # a record that is not the complete one is an earlier revision: some parts had not come yet
        complete = whole[reference[line["alert"]["alert_id"]]]
        assert line["alert"] == complete or is_part_of(line["alert"], complete), "a record that is neither complete nor a part of the whole"
    monkeypatch.setenv(ENV, azurite.connection_string)
    store = TableStateStore(table_settings(table))

    async def pending() -> int:
        try:
            return await store.pending_count()
        finally:
            await store.aclose()

    assert asyncio.run(pending()) == 0


def is_part_of(partial: object, whole: object) -> bool:
    """Every value `partial` holds is in `whole` too (lists: every item is part of an item of whole,
    e.g. a policy known by its rule before the part that names it came; objects: key by key)."""
    if partial is None or partial == whole:
        return True
    if isinstance(partial, dict) and isinstance(whole, dict):
        return all(is_part_of(value, whole.get(key)) for key, value in partial.items())
    if isinstance(partial, list) and isinstance(whole, list):
        return all(any(is_part_of(item, candidate) for candidate in whole) for item in partial)
    return False


def test_the_state_benchmark_skips_with_its_reason_without_azurite(tmp_path, monkeypatch):
    import benchmarks.state

    monkeypatch.setattr(benchmarks.state, "ROOT", tmp_path)  # a checkout without .tools/
    monkeypatch.setenv("PATH", str(tmp_path))
    result = asyncio.run(benchmarks.state.table_vs_sqlite(100))
    assert list(result) == ["table_state_skipped"] and "Azurite is not installed" in result["table_state_skipped"]


async def test_an_instance_that_marked_another_instances_revision_still_keeps_every_part(tables):
    """The instance that marks an alert emitted may know an older list of its parts than the table holds
    (another instance added one since it last wrote): a part it adds later must not drop that one."""
    mine, other, claimer = tables(), tables(), tables()
    await mine.add_parts([part("a1", 0, title="t")], now=0)
    (first,) = await claim(claimer, now=SETTLE)
    await claimer.mark_emitted(["a1"], now=SETTLE)
    await other.add_parts([part("a1", 1, files=["second"])], now=SETTLE + 1)  # a revision, written by another instance
    (revised,) = await claim(mine, now=2 * SETTLE + 1)
    assert len(revised.parts) == 2
    await mine.mark_emitted(["a1"], now=2 * SETTLE + 1)
    await mine.add_parts([part("a1", 2, files=["third"])], now=2 * SETTLE + 2)
    (last,) = await claim(claimer, now=3 * SETTLE + 2)
    assert [p.rank for p in last.parts] == [0, 1, 2], "a part was dropped from the alert"
