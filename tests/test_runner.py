"""The runner: record ids across redeliveries, dead letters, enricher waves, timeouts, isolation, caching and delivery
(assembly of split alerts across batches: tests/assemble/test_assembly.py)."""

from __future__ import annotations

import asyncio
import json

import orjson
import pytest

from pipeline.deadletter import LocalDeadLetterStore
from pipeline.errors import ConfigError
from pipeline.runner import Message, Runner
from tests import plugins
from tests.support.config import LAKE, LAKE_ONLY, NO_SETTLE, pipeline_toml, sink_entry
from tests.support.records import lake_lines
from tests.support.samples import MATCHED_VALUES
from tests.support.streaming import envelope, streaming_records


async def test_redelivered_message_gives_the_same_record_id_and_no_duplicate(write_config, fixture_bytes, tmp_path):
    body = fixture_bytes("graph_alert_v2_dlp.json")
    async with Runner(write_config(LAKE_ONLY)) as runner:
        first = await runner.process_batch([Message(body=body)])
        again = await runner.process_batch([Message(body=body)])
        assert first.record_ids == again.record_ids
        assert len(lake_lines(runner)) == 1  # the lake is idempotent by record_id
    loaded = write_config(LAKE_ONLY, name="fresh.toml")
    loaded.data_dir = tmp_path / "elsewhere"
    async with Runner(loaded) as fresh:  # a re-run from scratch gives the same id too
        assert (await fresh.process_batch([Message(body=body)])).record_ids == first.record_ids


async def test_bad_messages_are_dead_lettered_with_reason_and_position_and_the_batch_goes_on(write_config, fixture_bytes):
    loaded = write_config(LAKE_ONLY)
    good = fixture_bytes("graph_alert_v2_dlp.json")
    messages = [Message(b"{broken", source="f.jsonl:1"), Message(good, source="f.jsonl:2"), Message(b'{"x": 1}', source="f.jsonl:3")]
    async with Runner(loaded) as runner:
        report = await runner.process_batch(messages)
        entries = await runner.dead_letter.list()
    assert report.alerts == 1 and report.delivered["lake"] == 1 and report.dead_lettered["decode"] == 2
    by_index = {e.message_index: e for e in entries}
    assert by_index[0].reason == "invalid_json" and by_index[0].body == b"{broken" and by_index[0].source == "f.jsonl:1"
    assert by_index[2].reason == "unrecognised_shape" and by_index[2].source == "f.jsonl:3"


async def test_dead_letter_of_a_bad_record_holds_no_matched_values(write_config, fixture_bytes):
    record = json.loads(fixture_bytes("mgmt_api_dlp_rule_match.json"))
    record["Id"] = ""
    async with Runner(write_config(LAKE_ONLY)) as runner:
        await runner.process_batch([Message(orjson.dumps([record]))])
        stored = b"".join(p.read_bytes() for p in runner.loaded.data_path("dead-letter").glob("*.json"))
        (entry,) = await runner.dead_letter.list()
    assert entry.reason == "invalid_record" and entry.record_index == 0
    for value in MATCHED_VALUES:
        assert value.encode() not in stored and value.encode() not in entry.body


async def test_dead_lettering_the_same_bad_message_twice_keeps_one_entry_with_two_attempts(write_config):
    async with Runner(write_config(LAKE_ONLY)) as runner:
        await runner.process_batch([Message(b"nope", source="s")])
        await runner.process_batch([Message(b"nope", source="s")])
        (entry,) = await runner.dead_letter.list()
    assert entry.attempts == 2


ENRICHERS = LAKE_ONLY + """
[[enrichers]]
name = "a"
use = "tests.plugins:Recorder"
settings = {{ label = "a", delay = 0.05 }}

[[enrichers]]
name = "b"
use = "tests.plugins:Recorder"
settings = {{ label = "b", delay = 0.05 }}

[[enrichers]]
name = "needs_a"
use = "tests.plugins:NeedsA"
settings = {{ label = "needs_a", upstream = ["a", "b"] }}
{extra}
"""


async def test_enrichers_run_in_dependency_waves_and_siblings_overlap(write_config, fixture_bytes):
    plugins.CALLS.clear()
    async with Runner(write_config(ENRICHERS.format(extra=""))) as runner:
        assert [[s.name for s in wave] for wave in runner.chain.waves] == [["a", "b"], ["needs_a"]]
        report = await runner.process_batch([Message(fixture_bytes("graph_alert_v2_dlp.json"))])
        (line,) = lake_lines(runner)
    assert plugins.CALLS[:2] == [("start", "a"), ("start", "b")]  # a and b overlap
    assert plugins.CALLS.index(("start", "needs_a")) > plugins.CALLS.index(("end", "a"))
    assert line["enrichments"]["needs_a"]["seen_upstream"] == ["a", "b"]
    assert {name: s["state"] for name, s in line["enrichment_status"].items()} == {"a": "ok", "b": "ok", "needs_a": "ok"}
    assert line["enrichment_status"]["a"]["duration_ms"] >= 40
    assert report.enrichment[("a", "ok")] == 1


async def test_timeouts_and_failures_are_isolated_and_recorded(write_config, fixture_bytes, caplog):
    extra = """
[[enrichers]]
name = "hangs"
use = "tests.plugins:Hangs"

[[enrichers]]
name = "explodes"
use = "tests.plugins:Explodes"

[[enrichers]]
name = "returns_dict"
use = "tests.plugins:ReturnsDict"
"""
    async with Runner(write_config(ENRICHERS.format(extra=extra))) as runner:
        report = await runner.process_batch([Message(fixture_bytes("graph_alert_v2_dlp.json"))])
        (line,) = lake_lines(runner)
    status = line["enrichment_status"]
    assert status["hangs"]["state"] == "timed_out" and status["hangs"]["duration_ms"] < 1000
    assert status["explodes"]["state"] == "failed" and status["explodes"]["error"] == "RuntimeError"
    assert status["returns_dict"]["state"] == "failed" and "pydantic" in status["returns_dict"]["error"]
    assert status["a"]["state"] == "ok" and line["enrichments"]["a"]["value"] == "a"
    assert report.delivered["lake"] == 1 and report.enrichment_failures == {"hangs": 1, "explodes": 1, "returns_dict": 1}
    assert "megan.bowen" not in caplog.text  # the exception's text stays out of warnings


async def test_cache_gives_one_lookup_for_many_alerts_of_one_user(write_config, fixture_bytes):
    extra = LAKE_ONLY + """
[[enrichers]]
name = "cached_lookup"
use = "tests.plugins:CachedLookup"
"""
    alert = json.loads(fixture_bytes("graph_alert_v2_dlp.json"))
    messages = []
    for i in range(25):
        alert["id"] = f"alert-{i}"
        messages.append(Message(orjson.dumps(alert)))
    plugins.CachedLookup.lookups = 0
    async with Runner(write_config(extra)) as runner:
        report = await runner.process_batch(messages)
        lines = lake_lines(runner)
    assert report.alerts == 25 and plugins.CachedLookup.lookups == 1
    assert {line["enrichments"]["cached_lookup"]["value"] for line in lines} == {"MEGAN.BOWEN@CONTOSO.COM"}


async def test_concurrency_across_alerts_is_bounded(write_config, fixture_bytes):
    config = ENRICHERS.format(extra="").replace("max_concurrent_alerts", "x")
    config = "[runner]\nmax_concurrent_alerts = 2\n" + config
    alert = json.loads(fixture_bytes("graph_alert_v2_dlp.json"))
    messages = []
    for i in range(6):
        alert["id"] = f"alert-{i}"
        messages.append(Message(orjson.dumps(alert)))
    plugins.CALLS.clear()
    async with Runner(write_config(config)) as runner:
        await runner.process_batch(messages)
    running = peak = 0
    for event, label in plugins.CALLS:
        if label == "a":
            running += 1 if event == "start" else -1
            peak = max(peak, running)
    assert peak == 2


@pytest.mark.parametrize("extra,key,needle", [
    ('[[enrichers]]\nname = "no_such_enricher"\n', "enrichers[3].name", "unknown plugin 'no_such_enricher'"),
    ('[[enrichers]]\nname = "x"\nuse = "tests.plugins:Nope"\n', "enrichers[3].use", "cannot load plugin"),
    ('[[enrichers]]\nname = "a"\nuse = "tests.plugins:Recorder"\n', "enrichers[3].name", "used twice"),
    ('[[enrichers]]\nname = "c"\nuse = "tests.plugins:Recorder"\nsettings = { delay = "slow" }\n', "enrichers[3].settings.delay", "valid number"),
    ('[[enrichers]]\nname = "c"\nuse = "tests.plugins:Recorder"\nsettings = { colour = "red" }\n', "enrichers[3].settings.colour", "unknown key"),
    ('[[enrichers]]\nname = "c"\nuse = "tests.plugins:Recorder"\nsettings = { dalay = 0.1 }\n', "enrichers[3].settings.dalay", "unknown key; did you mean 'delay'?"),
    ('[[enrichers]]\nname = "triage"\nsettings = { weights = { departing = 5 } }\n', "enrichers[3].settings.weights.departing", "unknown key; did you mean 'departing_user'?"),
    ('[[enrichers]]\nname = "c"\nuse = "tests.plugins:NeedsB"\n', "enrichers[3]", "depends on 'b'"),
])
def test_bad_plugin_config_fails_at_start_naming_file_and_key(write_config, extra, key, needle):
    text = ENRICHERS.format(extra=extra)
    if "NeedsB" in extra:
        text = text.replace('name = "b"\nuse = "tests.plugins:Recorder"', 'name = "b2"\nuse = "tests.plugins:Recorder"')
    with pytest.raises(ConfigError) as caught:
        Runner(write_config(text))
    message = str(caught.value)
    assert "pipeline.toml" in message and f"key '{key}'" in message and needle in message


def test_dependency_cycle_is_rejected(write_config, tmp_path):
    (tmp_path / "cyclic.py").write_text(
        "from tests.plugins import Recorder\n"
        "class A(Recorder):\n    depends_on = ('b',)\n"
        "class B(Recorder):\n    depends_on = ('a',)\n"
    )
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        config = LAKE_ONLY + '[[enrichers]]\nname = "a"\nuse = "cyclic:A"\n[[enrichers]]\nname = "b"\nuse = "cyclic:B"\n'
        with pytest.raises(ConfigError, match="cycle"):
            Runner(write_config(config))
    finally:
        sys.path.remove(str(tmp_path))


def sinks_config(settings: dict, *, when: dict | None = None, assembly: dict = NO_SETTLE, **delivery) -> str:
    """The lake and a flaky sink (`settings` script its failures, `when` routes to it); three quick attempts plus `delivery`."""
    routing = {"when": when} if when else {}
    return pipeline_toml(
        assembly=assembly,
        delivery={"max_attempts": 3, "backoff_initial_seconds": 0.01, "backoff_max_seconds": 0.02, "budget_seconds": 5, **delivery},
        sinks=[LAKE, sink_entry("flaky", "tests.plugins:FlakySink", settings, **routing)],
    )


def flaky(runner: Runner):
    return dict((entry.name, sink) for entry, sink in runner.sinks)["flaky"]


@pytest.mark.parametrize("raise_instead", [False, True])
async def test_transient_sink_failures_are_retried_then_delivered(write_config, fixture_bytes, raise_instead):
    async with Runner(write_config(sinks_config({"failures": 2, "raise_instead": raise_instead}))) as runner:
        report = await runner.process_batch([Message(fixture_bytes("graph_alert_v2_dlp.json"))])
        sink = flaky(runner)
    assert sink.calls == 3 and report.delivered == {"lake": 1, "flaky": 1} and not report.dead_lettered


async def test_retries_exhausted_and_rejections_are_dead_lettered_per_sink(write_config, fixture_bytes):
    graph = json.loads(fixture_bytes("graph_alert_v2_dlp.json"))
    other = dict(graph, id="rejected-one")
    body = orjson.dumps([graph, other])
    async with Runner(write_config(sinks_config({"failures": 0, "reject_alert_ids": ["rejected-one"]}))) as runner:
        report = await runner.process_batch([Message(body)])
        entries = await runner.dead_letter.list()
    assert report.delivered == {"lake": 2, "flaky": 1}
    (entry,) = entries
    assert entry.stage == "deliver" and entry.sink == "flaky" and entry.reason == "sink_rejected" and entry.alert_id == "rejected-one"
    assert json.loads(entry.body)["alert"]["alert_id"] == "rejected-one"

    down = sinks_config({"failures": 99}, on_outage="dead_letter")
    async with Runner(write_config(down, name="down.toml")) as runner:
        report = await runner.process_batch([Message(fixture_bytes("graph_alert_v2_dlp.json"))])
        entries = [e for e in await runner.dead_letter.list() if e.reason == "retries_exhausted"]
    assert flaky(runner).calls == 3 and report.delivered == {"lake": 1}
    assert entries[0].attempts == 3 and "HTTP 503" in entries[0].detail


async def test_retry_after_longer_than_the_budget_dead_letters_without_waiting(write_config, fixture_bytes):
    config = sinks_config({"failures": 1, "retry_after": 120}, on_outage="dead_letter")
    async with Runner(write_config(config)) as runner:
        started = asyncio.get_running_loop().time()
        report = await runner.process_batch([Message(fixture_bytes("graph_alert_v2_dlp.json"))])
        assert asyncio.get_running_loop().time() - started < 2
    assert report.dead_lettered == {"deliver": 1}


async def test_retry_after_longer_than_the_budget_for_the_whole_batch_raises_without_waiting(write_config, fixture_bytes):
    from pipeline.errors import SinkOutage

    config = sinks_config({"failures": 1, "retry_after": 120})
    async with Runner(write_config(config)) as runner:
        started = asyncio.get_running_loop().time()
        with pytest.raises(SinkOutage):
            await runner.process_batch([Message(fixture_bytes("graph_alert_v2_dlp.json"))])
        assert asyncio.get_running_loop().time() - started < 2
        assert await runner.dead_letter.list() == []


async def test_when_filter_routes_by_severity_and_kind(write_config, fixture_bytes):
    when = {"severity_at_least": "high", "kind_in": ["activity"]}
    body = orjson.dumps([json.loads(fixture_bytes("mgmt_api_dlp_rule_match.json")), json.loads(fixture_bytes("mgmt_api_dlp_rule_match_endpoint_variant.json"))])
    async with Runner(write_config(sinks_config({}, when=when))) as runner:
        report = await runner.process_batch([Message(body)])
    assert report.delivered == {"lake": 2, "flaky": 1}  # only the high-severity endpoint match


async def test_unwritable_dead_letter_store_stops_the_batch(write_config, tmp_path):
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the folder should be")
    loaded = write_config(LAKE_ONLY)
    store = LocalDeadLetterStore(tmp_path / "dl")
    store.root = blocker  # every write now fails
    from pipeline.errors import PathUnusable

    async with Runner(loaded, dead_letter=store) as runner:
        with pytest.raises(PathUnusable, match="blocked"):  # a path that cannot be written (the CLI exits 2 naming it)
            await runner.process_batch([Message(b"not json")])


async def test_flush_emits_a_backlog_in_bounded_chunks(write_config, fixture_bytes):
    config = sinks_config({}, assembly={"settle_seconds": 30, "emit_batch_size": 3})
    info, user, file_, app, _ = streaming_records(fixture_bytes)
    messages = []
    for i in range(7):
        parts = json.loads(json.dumps([info, user, file_]))
        for part in parts:
            part["properties"]["AlertId"] = f"dl-backlog-{i}"
        messages.append(envelope(*parts))
    async with Runner(write_config(config)) as runner:
        first = await runner.process_batch(messages)
        assert first.alerts == 0 and first.pending == 7  # nothing has settled yet
        report = await runner.flush()
        sink = flaky(runner)
    assert report.alerts == 7 and report.pending == 0 and report.delivered == {"lake": 7, "flaky": 7}
    assert sink.calls == 3  # 3 + 3 + 1: never the whole backlog in one batch


def per_batch_config(mode: str) -> str:
    return LAKE_ONLY + f"""
[[enrichers]]
name = "first"
use = "tests.plugins:Recorder"
[enrichers.settings]
label = "first"

[[enrichers]]
name = "per_batch"
use = "tests.plugins:PerBatch"
[enrichers.settings]
mode = "{mode}"
"""


def three_graph_alerts(fixture_bytes) -> list[Message]:
    graph = json.loads(fixture_bytes("graph_alert_v2_dlp.json"))
    return [Message(body=orjson.dumps({**graph, "id": f"{graph['id']}-{n}"}), source=str(n)) for n in range(3)]


async def test_a_batch_enricher_gets_one_call_per_batch_after_the_waves_before_it(write_config, fixture_bytes):
    plugins.PerBatch.calls = []
    async with Runner(write_config(per_batch_config("ok"))) as runner:
        report = await runner.process_batch(three_graph_alerts(fixture_bytes))
        lines = lake_lines(runner)
    assert plugins.PerBatch.calls == [3]
    assert report.enrichment[("per_batch", "ok")] == 3
    for line in lines:  # each alert got its own fragment, and saw the earlier wave's fragment
        assert line["enrichments"]["per_batch"] == {"value": line["alert"]["alert_id"], "seen_upstream": ["first"]}


@pytest.mark.parametrize(
    ("mode", "states", "error"),
    [
        ("fail_second", ["ok", "failed", "ok"], "LookupError"),  # a returned exception fails that alert only
        ("raise", ["failed"] * 3, "RuntimeError"),  # a raise fails the whole batch
        ("hang", ["timed_out"] * 3, "no result within 0.2s"),  # the timeout covers the batch call
        ("short", ["failed"] * 3, "enrich_batch returned 2 results for 3 alerts"),
    ],
)
async def test_a_batch_enricher_failure_is_recorded_per_alert_and_never_drops_one(write_config, fixture_bytes, mode, states, error):
    async with Runner(write_config(per_batch_config(mode))) as runner:
        report = await runner.process_batch(three_graph_alerts(fixture_bytes))
        lines = sorted(lake_lines(runner), key=lambda line: line["alert"]["alert_id"])
    assert report.delivered["lake"] == 3
    assert [line["enrichment_status"]["per_batch"]["state"] for line in lines] == states
    assert {line["enrichment_status"]["per_batch"]["error"] for line in lines} - {None} == {error}
    assert all(line["enrichment_status"]["first"]["state"] == "ok" for line in lines)


async def test_the_runner_raises_the_gc_threshold_and_keeps_a_higher_one(write_config):
    import gc

    from pipeline.process import GC_GEN0_THRESHOLD

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, *before[1:])
        async with Runner(write_config(LAKE_ONLY)):
            assert gc.get_threshold()[0] == GC_GEN0_THRESHOLD
        gc.set_threshold(GC_GEN0_THRESHOLD * 2, *before[1:])
        async with Runner(write_config(LAKE_ONLY)):
            assert gc.get_threshold()[0] == GC_GEN0_THRESHOLD * 2
    finally:
        gc.set_threshold(*before)


async def test_a_run_merged_over_many_batches_holds_counters_not_per_record_lists(write_config):
    # A long run (CLI, consumer) merges every batch's report into one total: it must not grow per record.
    from benchmarks.dataset import make_bodies
    from pipeline.report import BatchReport

    total = BatchReport()
    bodies = make_bodies(60, seed=3)
    async with Runner(write_config(LAKE_ONLY)) as runner:
        for start in range(0, len(bodies), 10):
            report = await runner.process_batch([Message(body=body) for body in bodies[start : start + 10]])
            assert len(report.record_ids) == report.alerts  # a batch's own report still names its records
            total.merge(report)
        total.merge(await runner.flush())
    assert total.alerts == 60 and total.messages == 60
    assert [name for name, value in vars(total).items() if isinstance(value, list) and value] == []
