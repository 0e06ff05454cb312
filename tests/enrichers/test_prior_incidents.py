"""prior_incidents: history in SQLite (the state file) and in Azure Table Storage (Azurite), plus hunting."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import uuid
from contextlib import closing
from datetime import UTC, datetime

import pytest
from werkzeug import Response

from pipeline.runner import Runner
from pipeline.state.history import HistoryEntry, HistorySettings, TableHistoryStore
from tests.support.alerts import StaticCredential, graph_alert, message
from tests.support.config import LAKE_SINK_TOML


def config(store: str = "", extra: str = "") -> str:
    return f"""
[assembly]
settle_seconds = 0
[[enrichers]]
name = "prior_incidents"
[enrichers.settings]
max_recent = 2
{extra}
{store}
""" + LAKE_SINK_TOML


def lake(runner: Runner) -> dict[str, dict]:
    root = runner.loaded.data_path("lake")
    return {json.loads(line)["alert"]["alert_id"]: json.loads(line) for path in root.rglob("*.jsonl") for line in path.read_text().splitlines()}


def history_alerts():
    upn = "megan.bowen@contoso.com"
    return [
        graph_alert("old-100d", upn=upn, created="2024-12-04T10:00:00Z", policy="Finance PII", sits="Credit Card Number (2)"),
        graph_alert("p-40d", upn=upn, created="2025-02-02T10:00:00Z", policy="HR Data", sits="U.S. Social Security Number (SSN) (4)"),
        graph_alert("p-20d", upn=upn, created="2025-02-22T10:00:00Z", policy="Finance PII", sits="Credit Card Number (1)"),
        graph_alert("p-3d", upn=upn, created="2025-03-11T10:00:00Z", policy="Finance PII", sits="IBAN (1)"),
        graph_alert("now", upn=upn, created="2025-03-14T10:00:00Z", policy="Finance PII", sits="Credit Card Number (9)"),
        graph_alert("later", upn=upn, created="2025-03-20T10:00:00Z", policy="Finance PII"),
        graph_alert("other-user", upn="adele.vance@contoso.com", created="2025-03-13T10:00:00Z"),
    ]


def check_history(records: dict[str, dict]) -> None:
    now = records["now"]["enrichments"]["prior_incidents"]
    assert (now["last_7_days"], now["last_30_days"], now["last_90_days"]) == (1, 2, 3)
    assert now["same_policy_90_days"] == 2
    assert now["sensitive_types"] == ["Credit Card Number", "IBAN", "U.S. Social Security Number (SSN)"]
    assert now["last_alert_at"].startswith("2025-03-11T10:00:00")
    assert [p["alert_id"] for p in now["recent"]] == ["p-3d", "p-20d"]  # bounded by max_recent, newest first
    first = records["old-100d"]["enrichments"]["prior_incidents"]
    assert first["last_90_days"] == 0 and first["last_alert_at"] is None and first["recent"] == []
    assert records["other-user"]["enrichments"]["prior_incidents"]["last_90_days"] == 0
    later = records["later"]["enrichments"]["prior_incidents"]
    assert (later["last_7_days"], later["last_30_days"]) == (1, 3)  # now; now, p-3d, p-20d


async def test_history_of_one_batch_in_the_sqlite_state_file(write_config):
    loaded = write_config(config())
    async with Runner(loaded) as runner:
        await runner.process_batch([message(*history_alerts())])
        records = lake(runner)
        with closing(sqlite3.connect(runner.state.path)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "history_alerts" in tables
    check_history(records)


async def test_alerts_across_batches_and_reruns_count_once(write_config):
    alerts = history_alerts()
    loaded = write_config(config())
    async with Runner(loaded) as runner:
        for alert in alerts[:4]:
            await runner.process_batch([message(alert)])
        await runner.process_batch([message(*alerts[:4])])  # redelivery of the same alerts
        revised = dict(alerts[3], severity="high")  # same alert id, new content: still one alert
        await runner.process_batch([message(revised)])
        await runner.process_batch([message(alerts[4])])
        now = lake(runner)["now"]["enrichments"]["prior_incidents"]
    assert (now["last_7_days"], now["last_30_days"], now["last_90_days"]) == (1, 2, 3)


async def test_activities_see_prior_alerts_but_are_not_counted_as_alerts(write_config, fixture_bytes):
    loaded = write_config(config())
    from pipeline.runner import Message

    async with Runner(loaded) as runner:
        earlier = graph_alert("earlier", upn="megan.bowen@contoso.com", created="2025-03-13T10:00:00Z")
        await runner.process_batch([Message(fixture_bytes("mgmt_api_dlp_rule_match.json")), message(earlier, graph_alert("nobody"))])
        await runner.process_batch([message(graph_alert("after", upn="megan.bowen@contoso.com", created="2025-03-14T12:00:00Z"))])
        records = lake(runner)
    (activity,) = [r for r in records.values() if r["alert"]["kind"] == "activity"]
    assert activity["enrichments"]["prior_incidents"]["last_7_days"] == 1  # "earlier"
    assert [p["alert_id"] for p in records["after"]["enrichments"]["prior_incidents"]["recent"]] == ["earlier"]  # not the activity
    assert records["nobody"]["enrichment_status"]["prior_incidents"]["state"] == "skipped"


class HuntingServer:
    def __init__(self, httpserver, rows):
        self.rows = rows
        self.queries: list[dict] = []
        httpserver.expect_request("/v1.0/security/runHuntingQuery", method="POST").respond_with_handler(self.handle)
        self.url = httpserver.url_for("/v1.0")

    def handle(self, request):
        body = request.get_json()
        self.queries.append(body)
        return Response(json.dumps({"schema": [{"name": "AlertId", "type": "String"}, {"name": "Timestamp", "type": "DateTime"}], "results": self.rows}), content_type="application/json")


async def test_hunting_adds_alerts_older_than_the_pipeline(httpserver, write_config):
    hunting = HuntingServer(
        httpserver,
        [
            {"AlertId": "hunted-1", "Timestamp": "2025-03-10T08:00:00Z", "Severity": "High"},
            {"AlertId": "p-3d", "Timestamp": "2025-03-11T10:00:00Z", "Severity": "Medium"},  # also seen by the pipeline
            {"AlertId": "too-old", "Timestamp": "2024-01-01T00:00:00Z", "Severity": "Low"},
        ],
    )
    extra = f'[enrichers.settings.hunting]\nurl = "{hunting.url}"\nallow_private_hosts = ["localhost", "127.0.0.1"]'
    runner = Runner(write_config(config(extra=extra)))
    runner.chain.slots[0].plugin.credential = StaticCredential()
    alerts = history_alerts()
    async with runner:
        await runner.process_batch([message(alerts[3], alerts[4])])
        records = lake(runner)
    now = records["now"]["enrichments"]["prior_incidents"]
    assert now["last_7_days"] == 2 and now["last_90_days"] == 2 and now["sources"] == ["sqlite", "hunting"]
    assert {p["alert_id"]: p["source"] for p in now["recent"]} == {"p-3d": "pipeline", "hunted-1": "hunting"}
    query = hunting.queries[0]
    assert query["Timespan"] == "P30D" and '"megan.bowen@contoso.com"' in query["Query"] and "AlertEvidence" in query["Query"]
    assert len(hunting.queries) == 1  # one user, cached


async def test_last_alert_at_is_the_newest_alert_counted_even_when_the_list_names_an_older_one(write_config):
    """Six alerts at one time, the four the tally could list for it moved by revisions to an earlier
    time in the window: the list names one of those, last_alert_at is still the newest time counted."""
    upn = "megan.bowen@contoso.com"
    async with Runner(write_config(config().replace("max_recent = 2", "max_recent = 1"))) as runner:  # 4 ids listed per point in time
        await runner.process_batch([message(*(graph_alert(f"a{i}", upn=upn, created="2025-03-12T10:00:00Z") for i in range(1, 7)))])
        await runner.process_batch([message(*(graph_alert(f"a{i}", upn=upn, created="2025-03-01T10:00:00Z") for i in range(3, 7)))])  # revised
        await runner.process_batch([message(graph_alert("now", upn=upn, created="2025-03-14T10:00:00Z"))])
        now = lake(runner)["now"]["enrichments"]["prior_incidents"]
    assert now["last_90_days"] == 6 and [p["alert_id"] for p in now["recent"]][0].startswith("a")
    assert now["last_alert_at"].startswith("2025-03-12T10:00:00"), now


async def test_hunted_alerts_never_hide_a_newer_alert_the_tally_counts_but_cannot_list(httpserver, write_config):
    """last_alert_at is the newest prior alert of either source. Here the pipeline's newest (six
    alerts at one time, the four it could list moved away by revisions) is counted but not listed, and
    hunting lists an older one: the older one must not become last_alert_at."""
    hunting = HuntingServer(httpserver, [{"AlertId": "hunted-1", "Timestamp": "2025-03-10T08:00:00Z", "Severity": "High"}])
    extra = f'[enrichers.settings.hunting]\nurl = "{hunting.url}"\nallow_private_hosts = ["localhost", "127.0.0.1"]'
    runner = Runner(write_config(config(extra=extra).replace("max_recent = 2", "max_recent = 1")))  # 4 ids listed per point in time
    runner.chain.slots[0].plugin.credential = StaticCredential()
    upn = "megan.bowen@contoso.com"
    async with runner:
        await runner.process_batch([message(*(graph_alert(f"a{i}", upn=upn, created="2025-03-12T10:00:00Z") for i in range(1, 7)))])
        await runner.process_batch([message(*(graph_alert(f"a{i}", upn=upn, created="2024-01-01T10:00:00Z") for i in range(3, 7)))])  # revised
        await runner.process_batch([message(graph_alert("now", upn=upn, created="2025-03-14T10:00:00Z"))])
        records = lake(runner)
    now = records["now"]["enrichments"]["prior_incidents"]
    assert now["last_90_days"] == 3  # a1 and a2 (the pipeline's), hunted-1
    assert now["last_alert_at"].startswith("2025-03-12T10:00:00"), now


# -- Azure Table Storage (Azurite) ---------------------------------------------------------------


@pytest.mark.integration
async def test_table_store_is_idempotent_and_reads_a_time_window(azurite, monkeypatch):
    monkeypatch.setenv("TEST_TABLES", azurite.connection_string)
    table = "hist" + uuid.uuid4().hex[:12]
    store = TableHistoryStore(HistorySettings(kind="azure_table", connection_string_env="TEST_TABLES", table_name=table))
    try:
        entries = [HistoryEntry(entry_id=f"a{i}", content_id="c", user="user#ext#@contoso.com", at=1000.0 + i, policy="P") for i in range(5)]
        await store.record("alert", entries)
        await store.record("alert", entries)  # again: nothing new
        await store.record("alert", [HistoryEntry(entry_id="x", content_id="c", user="someone@else.com", at=1002.0)])
        found = await store.entries("alert", "user#ext#@contoso.com", since=1001.0, until=1003.0)
        assert [e.entry_id for e in found] == ["a3", "a2", "a1"]
        assert await store.entries("activity", "user#ext#@contoso.com", since=0, until=5000) == []
    finally:
        await store.aclose()


async def test_table_store_reads_only_what_was_written_after_its_cursor(azurite, monkeypatch):
    """`entries_after` on Table storage: the first read returns the user's entries from `since` on,
    the next one (no slack) only those written after it (and the cursor's own, again), oldest write first."""
    from pipeline.state import history as history_module

    monkeypatch.setenv("TEST_TABLES", azurite.connection_string)
    monkeypatch.setattr(history_module, "TIMESTAMP_SLACK", 0.0)
    store = TableHistoryStore(HistorySettings(kind="azure_table", connection_string_env="TEST_TABLES", table_name="hist" + uuid.uuid4().hex[:12]))
    user = "user#ext#@contoso.com"
    try:
        await store.record("alert", [HistoryEntry(entry_id=f"a{i}", content_id="c", user=user, at=1000.0 + i) for i in range(5)])
        first, cursor = await store.entries_after("alert", user, None, since=1001.0)
        assert sorted(e.entry_id for e in first) == ["a1", "a2", "a3", "a4"]
        await asyncio.sleep(1.1)  # the service's Timestamp moves on
        await store.record("alert", [HistoryEntry(entry_id="a5", content_id="c", user=user, at=1005.0)])
        await asyncio.sleep(1.1)
        await store.record("alert", [HistoryEntry(entry_id="a6", content_id="c", user=user, at=900.0)])  # before `since`: not read
        later, cursor = await store.entries_after("alert", user, cursor, since=1001.0)
        ids = [e.entry_id for e in later]
        # a5, after what was read at the cursor's own Timestamp again (the read asks for Timestamp >= it)
        assert ids[-1] == "a5" and set(ids[:-1]) <= {e.entry_id for e in first} and len(ids) < len(first) + 1
        again, _ = await store.entries_after("alert", user, cursor, since=1001.0)
        assert [e.entry_id for e in again] == ["a5"]  # nothing new: only the cursor's own entity again
    finally:
        await store.aclose()


@pytest.mark.integration
async def test_prior_incidents_on_azure_table_storage(azurite, monkeypatch, write_config):
    monkeypatch.setenv("TEST_TABLES", azurite.connection_string)
    table = "hist" + uuid.uuid4().hex[:12]
    store = f'[enrichers.settings.store]\nkind = "azure_table"\nconnection_string_env = "TEST_TABLES"\ntable_name = "{table}"'
    async with Runner(write_config(config(store))) as runner:
        await runner.process_batch([message(*history_alerts())])
        records = lake(runner)
    check_history(records)
    # a second instance (another Functions host) sees the same history
    loaded = write_config(config(store), name="second.toml")
    loaded.data_dir = loaded.data_dir.parent / "second"
    async with Runner(loaded) as runner:
        await runner.process_batch([message(graph_alert("next", upn="megan.bowen@contoso.com", created="2025-03-15T10:00:00Z"))])
        assert lake(runner)["next"]["enrichments"]["prior_incidents"]["last_7_days"] == 2  # p-3d and now; not itself, not "later"


async def test_table_store_down_fails_the_enricher_and_the_alert_is_delivered(monkeypatch, write_config):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv(
        "DOWN_TABLES",
        f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=Zm9v;TableEndpoint=http://127.0.0.1:{port}/devstoreaccount1;",
    )
    store = '[enrichers.settings.store]\nkind = "azure_table"\nconnection_string_env = "DOWN_TABLES"'
    loaded = write_config(config(store).replace('name = "prior_incidents"', 'name = "prior_incidents"\ntimeout_seconds = 2'))
    runner = Runner(loaded)
    async with runner:
        report = await runner.process_batch([message(graph_alert("a", upn="x@contoso.com"))])
        records = lake(runner)
    assert report.delivered["lake"] == 1
    assert records["a"]["enrichment_status"]["prior_incidents"]["state"] in ("failed", "timed_out")


async def test_enrich_alone_records_and_reads_history(tmp_path):
    """`enrich` alone (a batch of one, as the testing kit and the naive benchmark call it): each alert records itself and reads its history."""
    import time

    from enrichers.prior_incidents import PriorIncidentsEnricher
    from pipeline.enrich.contract import EnrichmentContext
    from pipeline.ingest.decode import decode_message

    settings = PriorIncidentsEnricher.Settings.model_validate({"store": {"path": str(tmp_path / "history.sqlite")}})
    enricher = PriorIncidentsEnricher(settings)
    await enricher.start()
    alerts = decode_message(message(*history_alerts()[:5]).body).alerts
    try:
        for alert in alerts:  # in time order: each sees the ones before it
            fragment = await enricher.enrich(alert, EnrichmentContext(alert, fragments={}, statuses={}, cache=None, clock=time.time))
    finally:
        await enricher.aclose()
    assert (fragment.last_7_days, fragment.last_30_days, fragment.last_90_days) == (1, 2, 3)


async def test_store_reuse_seconds_decides_when_another_instances_writes_are_seen(tmp_path):
    """`store.reuse_seconds`: with the default, a history read is reused and another instance's write
    is not seen by the next alert yet; with 0, the next alert reads the history again and counts it."""
    import time

    from enrichers.prior_incidents import PriorIncidentsEnricher
    from pipeline.enrich.contract import EnrichmentContext
    from pipeline.ingest.decode import decode_message
    from pipeline.state.history import entry_of

    alerts = decode_message(message(*history_alerts()).body).alerts
    by_id = {alert.alert_id: alert for alert in alerts}
    counts = {}
    for reuse in (None, 0):
        store = {"path": str(tmp_path / f"history-{reuse}.sqlite")} | ({} if reuse is None else {"reuse_seconds": reuse})
        enricher = PriorIncidentsEnricher(PriorIncidentsEnricher.Settings.model_validate({"store": store}))
        await enricher.start()
        try:
            for alert_id in ("p-40d", "now"):
                alert = by_id[alert_id]
                fragment = await enricher.enrich(alert, EnrichmentContext(alert, fragments={}, statuses={}, cache=None, clock=time.time))
                if alert_id == "p-40d":  # another instance records p-20d in the shared store meanwhile
                    await enricher.store.record("alert", [entry_of(by_id["p-20d"], now=time.time())])
            counts[reuse] = fragment.last_90_days
        finally:
            await enricher.aclose()
    assert counts == {None: 1, 0: 2}  # p-40d only; p-40d and the other instance's p-20d


async def test_user_histories_are_read_once_kept_current_and_read_again_after_their_ttl(tmp_path, monkeypatch):
    """UserHistories over the real SQLite store: one read per user, this process's writes seen at
    once, another writer's entries seen once the TTL has passed."""
    from pipeline.state import history as history_module
    from pipeline.state.history import SqliteHistoryStore, UserHistories

    store = SqliteHistoryStore(path=tmp_path / "history.sqlite")
    reads: list[str] = []
    entries_after = store.entries_after

    async def counted(kind, user, cursor, **kwargs):
        reads.append(user)
        return await entries_after(kind, user, cursor, **kwargs)

    monkeypatch.setattr(store, "entries_after", counted)
    now = [1000.0]
    monkeypatch.setattr(history_module.time, "monotonic", lambda: now[0])

    def entry(entry_id: str, at: float, user: str = "u@contoso.com") -> HistoryEntry:
        return HistoryEntry(entry_id=entry_id, content_id="c" + entry_id, user=user, at=at)

    await store.record("alert", [entry("old", 50.0), entry("a", 100.0)])
    histories = UserHistories(store, "alert", ttl=30.0)
    await histories.ensure({"u@contoso.com": 60.0})
    assert [e.entry_id for e in histories.rows("u@contoso.com")] == ["a"]  # since 60: "old" is not needed
    await histories.ensure({"u@contoso.com": 70.0})  # fresh and covering: no second read
    assert reads == ["u@contoso.com"]

    mine = entry("b", 200.0)
    await store.record("alert", [mine])
    histories.add([mine])  # this process's own write: seen at once, newest first
    await store.record("alert", [entry("c", 150.0)])  # another instance's write: not seen yet
    assert [e.entry_id for e in histories.rows("u@contoso.com")] == ["b", "a"]

    await histories.ensure({"u@contoso.com": 0.0})  # needs older entries than held: read again
    assert [e.entry_id for e in histories.rows("u@contoso.com")] == ["b", "c", "a", "old"]
    assert len(reads) == 2
    now[0] += 31  # past the TTL: read again
    await histories.ensure({"u@contoso.com": 0.0})
    assert len(reads) == 3
    await store.aclose()


async def test_a_history_file_of_an_earlier_version_is_converted_and_keeps_its_entries(tmp_path):
    """Earlier versions kept the history in WITHOUT ROWID tables; opening such a file converts it once
    (twice opened, still one conversion) and every entry is still read, still written idempotently."""
    import sqlite3

    import orjson

    from pipeline.state.history import SqliteHistoryStore

    path = tmp_path / "history.sqlite"
    old = sqlite3.connect(path)
    for kind in ("alert", "activity"):
        old.executescript(
            f"CREATE TABLE history_{kind}s (user TEXT NOT NULL, entry_id TEXT NOT NULL, content_id TEXT NOT NULL, at REAL NOT NULL,"
            f" data BLOB NOT NULL, PRIMARY KEY (user, entry_id, content_id)) WITHOUT ROWID;"
            f" CREATE INDEX history_{kind}s_user_at ON history_{kind}s (user, at);"
        )
    kept = [HistoryEntry(entry_id=f"a{i}", content_id=f"c{i}", user="u@contoso.com", at=100.0 + i, policy="Finance PII") for i in range(3)]
    old.executemany("INSERT INTO history_alerts VALUES (?, ?, ?, ?, ?)", [(e.user, e.entry_id, e.content_id, e.at, orjson.dumps(e)) for e in kept])
    old.commit()
    old.close()

    for _ in range(2):
        store = SqliteHistoryStore(path=path)
        await store.aclose()
    store = SqliteHistoryStore(path=path)
    tables = dict(store._db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall())
    assert set(tables) == {"history_alerts", "history_activitys", "history_alert_packs", "history_activity_packs"}
    assert not any("WITHOUT ROWID" in sql.upper() for sql in tables.values())
    found = await store.entries("alert", "u@contoso.com", since=0, until=1e12)
    assert [(e.entry_id, e.policy) for e in found] == [("a2", "Finance PII"), ("a1", "Finance PII"), ("a0", "Finance PII")]
    await store.record("alert", kept[:1] + [HistoryEntry(entry_id="a9", content_id="c9", user="u@contoso.com", at=200.0)])
    assert [e.entry_id for e in await store.entries("alert", "u@contoso.com", since=0, until=1e12)] == ["a9", "a2", "a1", "a0"]
    assert store._db.execute("SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = 'history_alerts_user_at'").fetchone() == (1,)
    await store.aclose()


def test_the_tally_agrees_with_counting_every_row(tmp_path):
    """`_summary` answers from the user's `AlertTally` (counters per point in time); a brute-force
    count over every row written, revisions included (an alert counts once, as its latest
    revision), must give the same figures, the alert's own id never counted."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from enrichers.prior_incidents import DAY, PriorIncidentsEnricher, _entry_names
    from pipeline.models import DlpAlert
    from pipeline.state.history import AlertTally

    enricher = PriorIncidentsEnricher(PriorIncidentsEnricher.Settings(store={"path": str(tmp_path / "history.sqlite")}))
    until = 1_750_000_000.0
    row = st.tuples(
        st.sampled_from(["a1", "a2", "a3", "a4", "a5", "a6", "own"]),
        st.one_of(st.sampled_from([0, 1, 6.5, 7, 7.5, 29.5, 30, 30.5, 89.5, 90, 95]), st.floats(0, 100)).map(lambda days: until - days * DAY),
        st.sampled_from([None, "Finance PII", "HR Data"]),
        st.sampled_from([None, "high", "low"]),
        st.sets(st.sampled_from(["IBAN", "Credit Card Number"])).map(tuple),
    )

    @settings(max_examples=500, deadline=None)
    @given(rows=st.lists(row, max_size=12), policy=st.sampled_from([None, "Finance PII"]), in_time_order=st.booleans())
    def agree(rows, policy, in_time_order):
        if in_time_order:  # as a live stream writes them, mostly
            rows = sorted(rows, key=lambda r: r[1])
        tally = AlertTally()
        for number, (entry_id, at, pol, severity, names) in enumerate(rows):  # in write order
            entry = HistoryEntry(entry_id=entry_id, content_id=f"c{number}", user="u", at=at, policy=pol, severity=severity,
                                 sensitive_info=[{"name": n} for n in names])
            tally.apply(entry, _entry_names(entry))
            if number % 2:  # an index built between writes: the next in-order writes grow it at its end
                tally.window(0, until, policy=None, k=0)
        latest: dict[str, tuple[int, tuple]] = {}
        for number, r in enumerate(rows):
            latest[r[0]] = (number, r)
        prior = [(number, r) for number, r in latest.values() if r[0] != "own" and until - 90 * DAY <= r[1] < until]
        prior.sort(key=lambda item: (-item[1][1], -item[0]))  # newest first; at one time, the latest written first
        newest = [r for _, r in prior]
        alert = DlpAlert(alert_id="own", source_format="graph_alert", policy_name=policy)
        got = enricher._summary(alert, until, tally, None)
        assert got.last_90_days == len(newest)
        assert got.last_7_days == sum(r[1] >= until - 7 * DAY for r in newest)
        assert got.last_30_days == sum(r[1] >= until - 30 * DAY for r in newest)
        assert got.same_policy_90_days == (sum(r[2] == policy for r in newest) if policy else 0)
        assert got.sensitive_types == sorted({t for r in newest for t in r[4]})
        expected_recent = newest[: enricher.settings.max_recent]
        assert [(p.alert_id, p.policy, p.severity) for p in got.recent] == [(r[0], r[2], r[3]) for r in expected_recent]
        assert all(abs(p.at.timestamp() - r[1]) < 1e-3 for p, r in zip(got.recent, expected_recent))
        assert got.last_alert_at == (datetime.fromtimestamp(max(r[1] for r in newest), tz=UTC) if newest else None)

    agree()
    asyncio.run(enricher.aclose())


async def test_an_activity_never_counts_the_alert_raised_from_it(write_config, fixture_bytes):
    """The alert raised from a rule match carries the match's time: the activity's windows end before
    it, so neither counts the other (and the alert's own window excludes its own end point)."""
    from pipeline.runner import Message

    activity = json.loads(fixture_bytes("mgmt_api_dlp_rule_match.json"))
    raised = graph_alert("raised", upn="megan.bowen@contoso.com", created="2025-03-14T09:11:02Z")  # the activity's CreationTime
    earlier = graph_alert("earlier", upn="megan.bowen@contoso.com", created="2025-03-13T10:00:00Z")
    async with Runner(write_config(config())) as runner:
        await runner.process_batch([message(earlier, raised), Message(json.dumps(activity).encode())])
        records = lake(runner)
    (own,) = [r for r in records.values() if r["alert"]["kind"] == "activity"]
    assert own["enrichments"]["prior_incidents"]["last_7_days"] == 1  # "earlier", not "raised"
    assert [p["alert_id"] for p in own["enrichments"]["prior_incidents"]["recent"]] == ["earlier"]
    assert records["raised"]["enrichments"]["prior_incidents"]["last_7_days"] == 1


@pytest.mark.parametrize("reuse_seconds", [0, 30])
async def test_the_rows_read_per_batch_follow_the_new_alerts_not_the_history(tmp_path, reuse_seconds):
    """Per-alert work is flat in the history: after the first read of a user, a batch reads from the
    store only what was written since (the rows the store returns counted, not time), whether the history holds
    200 or 2,000 prior alerts, and the figures are still those of the whole history."""
    from enrichers.prior_incidents import DAY, PriorIncidentsEnricher
    from pipeline.models import DlpAlert
    now = 1_750_000_000.0
    read_after_first: dict[int, int] = {}
    for prior in (200, 2_000):
        settings = {"store": {"path": str(tmp_path / f"history-{prior}.sqlite"), "reuse_seconds": reuse_seconds}}
        enricher = PriorIncidentsEnricher(PriorIncidentsEnricher.Settings.model_validate(settings), None)
        await enricher.start()
        try:
            await enricher.store.record("alert", [
                HistoryEntry(entry_id=f"old{i}", content_id="c", user="u@contoso.com", at=now - 80 * DAY + i * 60, policy="P") for i in range(prior)
            ])

            def batch(number: int) -> list[DlpAlert]:
                return [
                    DlpAlert.model_validate({"alert_id": f"new{number}-{i}", "source_format": "graph_alert", "user": {"upn": "u@contoso.com"},
                                             "created_at": datetime.fromtimestamp(now + number * 100 + i, tz=UTC), "policy_name": "P"})
                    for i in range(10)
                ]

            await enricher.enrich_batch(batch(0), [])  # the first read of the user: its whole history, once
            read_before = enricher.store.rows_read
            for number in range(1, 4):
                results = await enricher.enrich_batch(batch(number), [])
            read_after_first[prior] = enricher.store.rows_read - read_before
            last = results[-1]
            assert (last.last_90_days, last.same_policy_90_days) == (prior + 39, prior + 39)  # the whole history, the batches before, this batch's 9 others
        finally:
            await enricher.aclose()
    assert read_after_first[200] == read_after_first[2_000] <= 30  # the 30 new alerts at most, whatever the history


async def test_user_histories_hold_at_most_max_rows_and_never_the_rows_asked_for(tmp_path):
    """Past `max_rows` a user's oldest rows go, cut between two times and never below the `since`
    the latest `ensure` asked for; an older `since` later reads only the range that went."""
    from pipeline.state.history import SqliteHistoryStore, UserHistories

    store = SqliteHistoryStore(path=tmp_path / "history.sqlite")
    user = "u@contoso.com"
    await store.record("alert", [HistoryEntry(entry_id=f"e{i}", content_id="c", user=user, at=float(i)) for i in range(10)])
    histories = UserHistories(store, "alert", ttl=30.0, max_rows=4)
    await histories.ensure({user: 7.0})
    assert [e.entry_id for e in histories.rows(user)] == ["e9", "e8", "e7"]
    mine = [HistoryEntry(entry_id=f"n{i}", content_id="c", user=user, at=20.0 + i) for i in range(5)]
    await store.record("alert", mine)
    histories.add(mine[:4])  # 7 rows, all at or after the 7.0 asked for: kept
    assert len(histories.rows(user)) == 7
    await histories.ensure({user: 21.0})  # a later batch
    histories.add(mine[4:])  # 8 rows: the oldest go, down to the newest half, none of those from 21.0 on
    assert [e.entry_id for e in histories.rows(user)] == ["n4", "n3", "n2", "n1"]
    await histories.ensure({user: 2.0})  # an older alert: the range that went is read again
    assert [e.entry_id for e in histories.rows(user)] == ["n4", "n3", "n2", "n1", "n0", "e9", "e8", "e7", "e6", "e5", "e4", "e3", "e2"]
    await store.aclose()


def test_a_tally_holds_a_few_bytes_per_entry_id_and_not_the_id_strings():
    """Bounded memory (issue 19): a tally of 4N entries holds at most 48 bytes more per added entry
    than one of N (a 32-byte slot and array growth), not a record per id that keeps the id string,
    its time and a tuple alive (about 250 bytes each)."""
    import tracemalloc

    from enrichers.prior_incidents import _entry_names
    from pipeline.state.history import AlertTally

    def entries(first: int, last: int):
        for number in range(first, last):
            entry = HistoryEntry(entry_id=f"da{number:010d}-0000-4000-8000-{number:012d}", content_id=f"content-{number}", user="u",
                                 at=1_750_000_000.0 + number % 3, policy="Finance PII", severity="high", sensitive_info=[{"name": "IBAN"}])
            yield entry, _entry_names(entry)

    small = 2_000
    tally = AlertTally()
    tracemalloc.start()
    try:
        for entry, names in entries(0, small):
            tally.apply(entry, names)
        held_small = tracemalloc.get_traced_memory()[0]
        for entry, names in entries(small, 4 * small):
            tally.apply(entry, names)
        held_large = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(tally) == 4 * small and tally.count(0, 2e9) == 4 * small
    assert (held_large - held_small) / (3 * small) <= 48


@pytest.mark.parametrize("sort_in_min", [4, 64])
def test_a_tally_places_every_revision_however_its_slots_were_sorted_in(monkeypatch, sort_in_min):
    """A tally's slots are sorted in by batches (a few merged into many, or all sorted again): 3,000
    writes of 600 ids, revisions moving them in time and policy, one by one and in bulk, must leave
    each id once at its latest revision, as a dict of every write says."""
    import random

    from enrichers.prior_incidents import _entry_names
    from pipeline.state import history as history_module

    monkeypatch.setattr(history_module, "SORT_IN_MIN", sort_in_min)
    rng = random.Random(19)
    tally, latest = history_module.AlertTally(), {}
    writes = [
        HistoryEntry(entry_id=f"a{rng.randrange(600)}", content_id=f"c{rng.randrange(3)}", user="u", at=float(rng.randrange(40)),
                             policy=rng.choice([None, "Finance PII", "HR Data"]), sensitive_info=[{"name": n} for n in rng.sample(["IBAN", "SSN"], rng.randrange(3))])
        for _ in range(3_000)
    ]
    for start in range(0, len(writes), 500):
        chunk = writes[start : start + 500]
        if start % 1_000:
            tally.apply_all(chunk, _entry_names)
        else:
            for entry in chunk:
                tally.apply(entry, _entry_names(entry))
        for entry in chunk:  # the same (id, content id) again changes nothing: the first write of it stays
            if latest.get(entry.entry_id, (None, None))[0] != entry.content_id:
                latest[entry.entry_id] = (entry.content_id, entry)
    assert len(tally) == len(latest)
    for entry_id, (_, entry) in latest.items():
        assert (tally.at_of(entry_id), tally.policy_of(entry_id), tally.names_of(entry_id)) == (entry.at, entry.policy, _entry_names(entry))
    assert tally.at_of("never") is None
    assert tally.count(0, 40) == len(latest)
    assert tally.count(10, 19) == sum(10 <= entry.at <= 19 for _, entry in latest.values())
    window = tally.window(0, 40, policy="HR Data", k=0)
    assert window.same_policy == sum(entry.policy == "HR Data" for _, entry in latest.values())
    assert window.names == {name: sum(name in _entry_names(entry) for _, entry in latest.values()) for name in ("IBAN", "SSN")}


async def test_the_first_read_gives_each_entry_as_its_stored_json_parsed_whole(tmp_path):
    """A row's ids and time come from its columns and the rest of its JSON is parsed once per
    distinct text: the entries read equal their JSON parsed whole (odd ids and names included), equal
    contents share one list, and a row laid out otherwise (an earlier writer's key order) is parsed whole, its content keys in another order included."""
    import orjson

    from pipeline.state.history import SqliteHistoryStore

    store = SqliteHistoryStore(path=tmp_path / "history.sqlite")
    user = "u@contoso.com"
    types = [{"name": "Credit Card Number", "count": 12}, {"name": 'IBAN ,"policy":"x"', "type_id": "t", "confidence": 85}]
    written = [
        HistoryEntry(entry_id=f'e{i},"policy":"fake"', content_id=f"c{i}", user=user, at=100.0 + i % 3, policy="Finance PII",
                     severity="medium", files=["q1.xlsx"], sensitive_info=types, labels=["label-ü"])
        for i in range(6)
    ] + [HistoryEntry(entry_id="bare", content_id="c", user=user, at=7)]
    await store.record("alert", written)
    odd = {"policy": "HR", "entry_id": "reordered", "content_id": "c", "user": user, "at": 50.0, "files": ["a.docx"]}
    files_first = {"entry_id": "files-first", "content_id": "c", "user": user, "at": 60.0, "files": ["b.docx"], "policy": "HR",
                   "severity": None, "sensitive_info": [], "labels": []}
    swapped = {"entry_id": "swapped", "content_id": "c", "user": user, "at": 70.0, "policy": "HR", "files": ["c.docx"], "severity": "low",
               "sensitive_info": [], "labels": []}  # the content's keys, in another order
    for row in (odd, files_first, swapped):
        store._db.execute("INSERT INTO history_alerts (user, entry_id, content_id, at, data) VALUES (?, ?, ?, ?, ?)",
                          (user, row["entry_id"], row["content_id"], row["at"], orjson.dumps(row)))
    stored = [HistoryEntry(**orjson.loads(data)) for (data,) in store._db.execute("SELECT data FROM history_alerts ORDER BY rowid")]
    read, _cursor = await store.entries_after("alert", user, None, since=0.0)
    assert read == stored and read[:7] == written
    assert read[0].sensitive_info is read[5].sensitive_info and read[0].files is read[5].files  # equal contents: one list
    assert read[-2].files == ["b.docx"] and read[-3].policy == "HR" and (read[-1].files, read[-1].severity) == (["c.docx"], "low")
    newest_first = await store.entries("alert", user, since=0.0, until=1e9, limit=100)
    assert [e.at for e in newest_first] == sorted((e.at for e in stored), reverse=True)
    assert sorted(newest_first, key=lambda e: (e.at, e.entry_id)) == sorted(stored, key=lambda e: (e.at, e.entry_id))
    await store.aclose()


def test_a_tally_keeps_per_point_only_the_newest_ids_that_recent_lists_can_ask_for(tmp_path):
    """Bounded memory (issue 19): prior_incidents' tallies keep `recent_depth(max_recent)` newest ids
    per point in time (twice what one window asks), not 51 whatever `max_recent` is; the `recent`
    lists stay right, even after revisions moved as many of a point's newest entries away as one
    window asks for."""
    import tracemalloc

    from enrichers.prior_incidents import PriorIncidentsEnricher, _entry_names
    from pipeline.state.history import AlertTally, recent_depth

    enricher = PriorIncidentsEnricher(PriorIncidentsEnricher.Settings(max_recent=2, store={"path": str(tmp_path / "history.sqlite")}))
    assert enricher.tallies.recent_per_point == recent_depth(2) == 6

    def entry(number: int, at: float, content: str = "first") -> HistoryEntry:
        return HistoryEntry(entry_id=f"da{number:010d}-0000-4000-8000-{number:012d}", content_id=f"{content}-{number}", user="u",
                            at=at, policy="Finance PII", severity="high", sensitive_info=[{"name": "IBAN"}])

    points, per_point = 100, 60
    tally = AlertTally(recent_depth(2))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for number in range(points * per_point):
            made = entry(number, 1_750_000_000.0 + number % points)
            tally.apply(made, _entry_names(made))
            del made
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # 32–48 bytes of slot per id, the points, and 6 newest ids per point: 82–89 bytes per id here;
    # 51 per point held ~180.
    assert held / (points * per_point) <= 120

    last = 1_750_000_000.0 + points - 1  # the newest point: ids 99, 199, …, 5999 (written in that order)
    newest_first = [number for number in range(points * per_point - 1, -1, -1) if number % points == points - 1]
    moved = newest_first[:3]  # max_recent + 1 of them moved to an older time by a revision
    for number in moved:
        revised = entry(number, 1_700_000_000.0, content="revised")
        tally.apply(revised, _entry_names(revised))
    window = tally.window(last, last, policy="Finance PII", k=3)
    assert [item[0] for item in window.newest] == [entry(number, last).entry_id for number in newest_first[3:6]]
    assert window.count == per_point - 3


async def test_the_history_writer_remembers_what_it_wrote_without_holding_the_id_strings():
    """Bounded memory (issue 19): the writer's memory of the last 4,096 entries written holds a hash
    per entry (about 130 bytes with its place in the order), not the two id strings and a tuple
    (about 300); an entry written again is still not written twice."""
    import tracemalloc

    from pipeline.state.history import HistoryWriter

    class CountingStore:
        def __init__(self) -> None:
            self.written = 0

        async def record(self, kind, entries) -> None:
            self.written += len(entries)

    def entries(first: int, last: int) -> list[HistoryEntry]:
        return [HistoryEntry(entry_id=f"da{n:010d}-0000-4000-8000-{n:012d}", content_id=f"{n:032x}", user="u", at=1.0) for n in range(first, last)]

    store = CountingStore()
    writer = HistoryWriter(store, remember=4_096)  # type: ignore[arg-type]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for first in range(0, 4_000, 100):
            await writer.write("alert", entries(first, first + 100))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert store.written == 4_000
    assert held / 4_000 <= 160
    assert await writer.write("alert", entries(3_900, 4_100)) != [] and store.written == 4_100  # only the 100 new ones


async def test_a_first_history_read_costs_the_range_asked_for_not_the_whole_history(tmp_path):
    """sensitive_info's first read of a user asks for an hour around its alerts: the SQLite store must
    find that range through its (user, at) index, not walk every row the user has retained (counted
    in SQLite's own steps, not time)."""
    from pipeline.state.history import SqliteHistoryStore

    store = SqliteHistoryStore(path=tmp_path / "history.sqlite")
    await store.record("activity", [HistoryEntry(entry_id=f"e{i}", content_id="c", user="u", at=float(i)) for i in range(20_000)])
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    store._db.set_progress_handler(count, 100)

    async def first_read(since: float) -> int:
        steps[0] = 0
        entries, _ = await store.entries_after("activity", "u", None, since=since)
        assert [e.entry_id for e in entries] == [f"e{i}" for i in range(int(since), 20_000)]
        return steps[0]

    whole, last_hour = await first_read(0.0), await first_read(19_900.0)
    store._db.set_progress_handler(None, 0)
    await store.aclose()
    assert last_hour * 20 < whole


async def test_a_batch_asks_each_users_history_from_90_days_before_their_oldest_alert(tmp_path):
    """A user with several alerts in a batch needs their history from 90 days before the oldest one,
    not 90 days more per alert: a later batch of the same user at the same times reads nothing older."""
    from enrichers.prior_incidents import DAY, PriorIncidentsEnricher
    from pipeline.models import DlpAlert

    now = 1_750_000_000.0
    settings = {"store": {"path": str(tmp_path / "history.sqlite")}}
    enricher = PriorIncidentsEnricher(PriorIncidentsEnricher.Settings.model_validate(settings), None)
    await enricher.start()

    def batch(number: int, size: int) -> list[DlpAlert]:
        return [
            DlpAlert.model_validate({"alert_id": f"a{number}-{i}", "source_format": "graph_alert", "user": {"upn": "u@contoso.com"},
                                     "created_at": datetime.fromtimestamp(now + i, tz=UTC)})
            for i in range(size)
        ]

    asked: list[dict[str, float]] = []
    ensure = enricher.tallies.ensure

    async def spy(since: dict[str, float]) -> None:
        asked.append(dict(since))
        await ensure(since)

    enricher.tallies.ensure = spy  # type: ignore[method-assign]
    older_reads = []
    entries = enricher.store.entries

    async def counted(*args, **kwargs):
        older_reads.append(kwargs.get("since"))
        return await entries(*args, **kwargs)

    enricher.store.entries = counted  # type: ignore[method-assign]
    try:
        await enricher.enrich_batch(batch(0, 1), [])
        await enricher.enrich_batch(batch(1, 3), [])
    finally:
        await enricher.aclose()
    assert asked == [{"u@contoso.com": now - 90 * DAY}] * 2
    assert older_reads == []


def test_a_history_entry_holds_each_sensitive_type_as_pydantic_dumps_it_without_nones():
    from pipeline.models import DlpAlert
    from pipeline.state.history import entry_of

    alert = DlpAlert.model_validate({"alert_id": "a", "source_format": "graph_alert", "user": {"upn": "u@contoso.com"}, "sensitive_info": [
        {"name": "Credit Card Number", "type_id": "50842eb7-edc8-4019-85dd-5a5c1f2bb085", "count": 3, "confidence": 85},
        {"name": "IBAN", "count": 1},
        {"type_id": "a44669fe-0d48-453d-a9b1-2cc83f2cba77"},
    ]})
    entry = entry_of(alert, now=0.0)
    assert entry is not None
    assert entry.sensitive_info == [s.model_dump(exclude_none=True) for s in alert.sensitive_info]
    assert [list(s) for s in entry.sensitive_info] == [["name", "type_id", "count", "confidence"], ["name", "count"], ["type_id"]]


async def test_a_batch_whose_history_read_fails_is_still_written(tmp_path):
    """The users' histories are read before the batch is written: a read that fails still leaves the
    batch's alerts in the store (for the alerts after them), and the batch fails."""
    from enrichers.prior_incidents import PriorIncidentsEnricher
    from pipeline.errors import EnricherUnavailable
    from pipeline.models import DlpAlert

    settings = {"store": {"path": str(tmp_path / "history.sqlite")}}
    enricher = PriorIncidentsEnricher(PriorIncidentsEnricher.Settings.model_validate(settings), None)
    await enricher.start()

    async def down(*args, **kwargs):
        raise EnricherUnavailable("history store read failed: OperationalError")

    alert = DlpAlert.model_validate({"alert_id": "a1", "source_format": "graph_alert", "user": {"upn": "u@contoso.com"}, "created_at": "2025-03-14T10:00:00Z"})
    try:
        reads, first_reads = enricher.store.entries_after, enricher.store.stored_after
        enricher.store.entries_after = enricher.store.stored_after = down  # type: ignore[method-assign]
        with pytest.raises(EnricherUnavailable):
            await enricher.enrich_batch([alert], [])
        enricher.store.entries_after, enricher.store.stored_after = reads, first_reads  # type: ignore[method-assign]
        entries, _ = await enricher.store.entries_after("alert", "u@contoso.com", None, since=0.0)
    finally:
        await enricher.aclose()
    assert [e.entry_id for e in entries] == ["a1"]


async def test_reads_one_after_another_stop_at_the_first_that_fails_and_leave_no_read_pending(tmp_path):
    import gc
    import warnings

    from pipeline.errors import EnricherUnavailable
    from pipeline.state.history import SqliteHistoryStore, UserTallies

    store = SqliteHistoryStore(path=tmp_path / "history.sqlite")
    asked: list[str] = []

    async def failing(kind, user, cursor, *, since):
        asked.append(user)
        raise EnricherUnavailable("history store read failed: OperationalError")

    store.entries_after = store.stored_after = failing  # type: ignore[method-assign]
    tallies = UserTallies(store, "alert", names=lambda entry: frozenset())
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(EnricherUnavailable):
                await tallies.ensure({"a@contoso.com": 0.0, "b@contoso.com": 0.0, "c@contoso.com": 0.0})
            gc.collect()
    finally:
        await store.aclose()
    assert asked == ["a@contoso.com"]
    assert not [w for w in caught if "never awaited" in str(w.message)]


def _tally_state(tally) -> dict:
    """Everything a tally holds, its dicts' orders included."""
    from dataclasses import asdict

    state = {name: getattr(tally, name) for name in type(tally).__slots__ if name != "_points"}
    state["_points"] = [(at, asdict(point), list(point.policies), list(point.names)) for at, point in tally._points.items()]
    return state


@pytest.mark.parametrize("depth", [2, 6, 51])
def test_a_first_read_builds_the_tally_at_once_as_applying_each_entry_would(depth):
    """A user's first read (an empty tally, entries of distinct ids) is built at once: the same
    state, dict orders included, as applying the entries one by one (then sorting the slots in), with `names` asked once per
    distinct content (the lists that entries read from the store share), not once per entry."""
    import random

    from enrichers.prior_incidents import _entry_names
    from pipeline.state.history import SORT_IN_MIN, AlertTally

    rng = random.Random(23)
    contents = [
        ([f"f{i}.docx"], [{"name": name} for name in names], [], policy, severity)
        for i, (names, policy, severity) in enumerate(
            [(["IBAN", "SSN"], "Finance PII", "high"), (["SSN"], "HR Data", None), ([], None, "low"), (["IBAN"], "Finance PII", "high"), (["SSN", "IBAN"], "HR Data", "medium")]
        )
    ]
    entries = []
    for number in range(3_000):
        files, infos, labels, policy, severity = rng.choice(contents)
        entries.append(HistoryEntry(entry_id=f"a{number}", content_id=f"c{number}", user="u", at=float(rng.choice([5, 7, 7, 7, 9, rng.randrange(60)])),
                                    policy=policy, severity=severity, files=files, sensitive_info=infos, labels=labels))
    asked = []

    def names(entry):
        asked.append(entry.entry_id)
        return _entry_names(entry)

    def apply_each(tally, batch):  # what apply_all did before it built a first read at once
        for entry in batch:
            tally._apply(entry, _entry_names(entry))
        tally._sort_in_if_due()

    one_by_one = AlertTally(depth)
    apply_each(one_by_one, entries)
    at_once = AlertTally(depth)
    at_once.apply_all(entries, names)
    assert _tally_state(at_once) == _tally_state(one_by_one)
    assert len(asked) == len(contents)
    window = at_once.window(0, 60, policy="HR Data", k=depth)
    assert window == one_by_one.window(0, 60, policy="HR Data", k=depth) and len(window.newest) == depth
    # a revision among them (an id twice), a tally not empty, or a few entries: applied one by one
    revised = [*entries[:100], HistoryEntry(entry_id="a3", content_id="again", user="u", at=61.0, policy="HR Data")]
    for batches in ([revised], [entries[:100], entries[100:]], [entries[: SORT_IN_MIN]]):
        expected, built = AlertTally(depth), AlertTally(depth)
        for batch in batches:
            apply_each(expected, batch)
            built.apply_all(batch, _entry_names)
        assert _tally_state(built) == _tally_state(expected)


@pytest.mark.parametrize("case", ["plain", "revised", "few"])
async def test_a_first_tally_read_of_sqlite_builds_from_the_stored_fields_without_an_entry_per_row(tmp_path, monkeypatch, case):
    """A user's first read into a tally takes the stored rows' fields (`stored_after`), one tuple
    per content text, and makes no entry per row: the tally's state is the one the entries read
    (`entries_after`) applied one by one would leave, rows laid out otherwise (parsed whole), a
    revision among them, or too few rows to build at once included."""
    import orjson

    from enrichers.prior_incidents import _entry_names
    from pipeline.state import history as history_module
    from pipeline.state.history import SORT_IN_MIN, AlertTally, SqliteHistoryStore, UserTallies

    store = SqliteHistoryStore(path=tmp_path / "history.sqlite", pack_min_rows=10**9)  # the rows one by one (packs: tests/state/test_history_packs.py)
    user = "u@contoso.com"
    kinds = [("Finance PII", "high", [{"name": "IBAN", "count": 2}]), ("HR Data", None, [{"name": "SSN"}, {"name": "IBAN"}]), (None, "low", [])]
    count = SORT_IN_MIN if case == "few" else 400
    written = [
        HistoryEntry(entry_id=f"e{i}", content_id=f"c{i}", user=user, at=100.0 + i % 4, policy=kinds[i % 3][0], severity=kinds[i % 3][1],
                     files=["q1.xlsx"], sensitive_info=kinds[i % 3][2])
        for i in range(count)
    ]
    if case == "revised":
        written.append(HistoryEntry(entry_id="e5", content_id="again", user=user, at=200.0, policy="HR Data", sensitive_info=[{"name": "SSN"}]))
    await store.record("alert", written)
    odd = {"policy": "HR Data", "entry_id": "reordered", "content_id": "c", "user": user, "at": 101.0, "sensitive_info": [{"name": "PAN"}]}
    store._db.execute("INSERT INTO history_alerts (user, entry_id, content_id, at, data) VALUES (?, ?, ?, ?, ?)",
                      (user, odd["entry_id"], odd["content_id"], odd["at"], orjson.dumps(odd)))
    entries, _cursor = await store.entries_after("alert", user, None, since=0.0)
    expected = AlertTally(12)
    for entry in entries:
        expected._apply(entry, _entry_names(entry))
    expected._sort_in_if_due()

    def no_entries(*args, **kwargs):
        raise AssertionError("an entry made per row")

    monkeypatch.setattr(history_module, "_stored_entries", no_entries)
    monkeypatch.setattr(store, "entries_after", no_entries)  # it makes its entries without `_stored_entries` (packs)
    tallies = UserTallies(store, "alert", names=_entry_names, recent_per_point=12)
    try:
        await tallies.ensure({user: 0.0})
        assert _tally_state(tallies.tally(user)) == _tally_state(expected)
        assert len(tallies.tally(user)) == len(entries) - (1 if case == "revised" else 0)
        assert store.rows_read == 2 * len(entries)
    finally:
        await store.aclose()


async def test_a_purge_never_lets_a_later_write_reuse_a_rowid_a_reader_has_passed(tmp_path):
    """Readers resume after the last rowid they read (`entries_after`). A purge that dropped the table's
    last row (an old entry written late, say) would let SQLite hand that rowid out again: a reader
    already past it would never see the entry written there."""
    from pipeline.state.history import SqliteHistoryStore

    path, now, user = tmp_path / "history.sqlite", 400 * 86400.0, "megan.bowen@contoso.com"
    writer = SqliteHistoryStore(path=path, retention_days=120)
    reader = SqliteHistoryStore(path=path, retention_days=120)
    purger = SqliteHistoryStore(path=path, retention_days=120)
    try:
        recent = HistoryEntry(entry_id="recent", content_id="c1", user=user, at=now)
        await writer.record("alert", [recent])  # the writer's first write purges: nothing is old yet
        await writer.record("alert", [HistoryEntry(entry_id="late-old", content_id="c2", user=user, at=now - 200 * 86400)])  # the last rowid
        _, cursor = await reader.entries_after("alert", user, None, since=0.0)
        await purger.record("alert", [recent])  # written already (ignored); its first write purges: the late old entry goes
        await writer.record("alert", [HistoryEntry(entry_id="after", content_id="c3", user=user, at=now)])
        found, _ = await reader.entries_after("alert", user, cursor, since=0.0)
        assert [entry.entry_id for entry in found] == ["after"]
    finally:
        for store in (writer, reader, purger):
            await store.aclose()


async def test_the_sqlite_history_purge_cost_follows_the_users_and_the_purged_rows_not_the_rows_kept(tmp_path):
    """The retention purge finds the rows to drop through each user's (user, at) range: the SQLite
    steps it takes do not grow with the rows it keeps (a scan of the table would read every row)."""
    from pipeline.state.history import SqliteHistoryStore

    steps = {}
    for kept in (50, 3_000):
        store = SqliteHistoryStore(path=tmp_path / f"kept{kept}.sqlite", retention_days=1)
        try:
            now = 10 * 86400.0
            old = [HistoryEntry(entry_id=f"old{i}", content_id="c", user=f"u{i % 5}", at=1.0) for i in range(20)]
            recent = [HistoryEntry(entry_id=f"new{i}", content_id="c", user=f"u{i % 7}", at=now) for i in range(kept)]  # u5, u6: none old
            store._db.executemany("INSERT INTO history_alerts (user, entry_id, content_id, at, data) VALUES (?, ?, ?, ?, x'7b7d')",
                                  [(e.user, e.entry_id, e.content_id, e.at) for e in old + recent])
            counted = [0]

            def step(counted: list[int] = counted) -> int:
                counted[0] += 1
                return 0

            store._db.set_progress_handler(step, 1)
            await store.record("alert", [HistoryEntry(entry_id="last", content_id="c", user="u0", at=now)])  # its first write purges
            store._db.set_progress_handler(None, 1)
            assert store._db.execute("SELECT count(*) FROM history_alerts WHERE at < ?", (now - 86400,)).fetchone() == (0,)
            assert store._db.execute("SELECT count(*) FROM history_alerts").fetchone() == (kept + 1,)
            steps[kept] = counted[0]
        finally:
            await store.aclose()
    assert steps[3_000] < 1.5 * steps[50], steps
