"""Delivery rules of the runner: the batch-wide outage rule and its bound, circuit breakers."""

from __future__ import annotations

import json
from datetime import UTC

import orjson
import pytest

from pipeline.errors import SinkOutage
from pipeline.resilience.breaker import CircuitBreaker
from pipeline.runner import Message, Runner
from tests import faults
from tests.support.config import FAST_RETRIES, LAKE, enricher_entry, pipeline_toml, sink_entry


class Tick:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_threshold_refuses_then_allows_one_trial():
    clock = Tick()
    breaker = CircuitBreaker("s", failure_threshold=3, cooldown_seconds=10, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state == "closed"
    breaker.record_success()  # a success resets the count
    for _ in range(3):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow() and breaker.remaining_cooldown() == 10
    clock.now += 10
    assert breaker.state == "half_open"
    assert breaker.allow() and not breaker.allow()  # one trial at a time
    breaker.record_failure()  # the trial failed: open for a whole cool-down again
    assert breaker.state == "open" and breaker.remaining_cooldown() == 10
    clock.now += 10
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed" and breaker.allow()


def test_a_trial_that_never_reports_back_expires_after_a_cooldown():
    clock = Tick()
    breaker = CircuitBreaker("s", failure_threshold=1, cooldown_seconds=10, clock=clock)
    breaker.record_failure()
    clock.now += 10
    assert breaker.allow()  # the trial's task is cancelled and never records an outcome
    assert not breaker.allow()
    clock.now += 10
    assert breaker.allow()


def config(settings: dict, *, runner: dict | None = None, enrichers: list[dict] | None = None, **delivery) -> str:
    """The lake and a scripted ITSM sink (`settings` are its script), fast retries plus `delivery`."""
    return pipeline_toml(
        runner=runner,
        delivery={**FAST_RETRIES, **delivery},
        enrichers=enrichers or [],
        sinks=[LAKE, sink_entry("itsm", "tests.faults:ScriptedSink", settings)],
    )


def graph_alerts(fixture_bytes, count: int, prefix: str = "alert") -> list[Message]:
    alert = json.loads(fixture_bytes("graph_alert_v2_dlp.json"))
    return [Message(orjson.dumps(dict(alert, id=f"{prefix}-{i}")), source=f"m{i}") for i in range(count)]


def split_alert(fixture_bytes) -> Message:
    return Message(fixture_bytes("streaming_dlp_batch.json"), source="split")


def lake_ids(runner: Runner) -> list[str]:
    root = runner.loaded.data_path("lake")
    return [json.loads(line)["record_id"] for path in sorted(root.rglob("*.jsonl")) for line in path.read_text().splitlines()]


async def test_sink_down_for_the_whole_batch_raises_without_dead_lettering_and_the_rerun_delivers(write_config, fixture_bytes):
    loaded = write_config(config({"label": "down", "fail_first_calls": 3}))
    batch = graph_alerts(fixture_bytes, 3) + [split_alert(fixture_bytes)]
    async with Runner(loaded) as runner:
        with pytest.raises(SinkOutage) as caught:
            await runner.process_batch(batch)
        assert caught.value.sinks == ("itsm",)
        assert await runner.dead_letter.list() == []  # nothing dead-lettered: the batch runs again
        assert await runner.state.pending_count() == 1  # the split alert was not marked emitted...
        report = await runner.process_batch(batch)  # ...and its lease was released: the rerun claims it now
        sink = faults.INSTANCES["down"]
        assert report.delivered == {"lake": 4, "itsm": 4} and report.pending == 0 and not report.dead_lettered
        assert sorted(sink.stored) == sorted(report.record_ids) and set(sink.stored.values()) == {1}
        assert sorted(lake_ids(runner)) == sorted(report.record_ids)  # the lake got them once, though offered twice


async def test_outage_is_bounded_by_max_batch_redeliveries_counted_durably(write_config, fixture_bytes):
    loaded = write_config(config({"label": "dead", "fail_first_calls": 999}, max_batch_redeliveries=2))
    batch = graph_alerts(fixture_bytes, 2)
    for _ in range(2):  # a fresh runner each time, as after a restart: the count is in the state store
        async with Runner(loaded) as runner:
            with pytest.raises(SinkOutage):
                await runner.process_batch(batch)
    async with Runner(loaded) as runner:
        report = await runner.process_batch(batch)
        entries = await runner.dead_letter.list()
    assert report.dead_lettered == {"deliver": 2} and report.delivered == {"lake": 2}
    assert {(e.sink, e.reason) for e in entries} == {("itsm", "retries_exhausted")}
    assert sorted(e.record_id for e in entries) == sorted(report.record_ids)


async def test_on_outage_dead_letter_never_raises(write_config, fixture_bytes):
    loaded = write_config(config({"label": "dead2", "fail_first_calls": 999}, on_outage="dead_letter"))
    async with Runner(loaded) as runner:
        report = await runner.process_batch(graph_alerts(fixture_bytes, 2))
    assert report.dead_lettered == {"deliver": 2}


async def test_a_sink_that_takes_some_records_is_not_down_the_rest_is_dead_lettered(write_config, fixture_bytes):
    settings = {"label": "partial", "retryable_alert_ids": ["alert-1"], "reject_alert_ids": ["alert-2"]}
    async with Runner(write_config(config(settings))) as runner:
        report = await runner.process_batch(graph_alerts(fixture_bytes, 3))
        entries = {e.alert_id: e.reason for e in await runner.dead_letter.list()}
    assert report.delivered == {"lake": 3, "itsm": 1}
    assert entries == {"alert-1": "retries_exhausted", "alert-2": "sink_rejected"}


async def test_open_sink_breaker_stops_calling_the_sink_until_the_cooldown(write_config, fixture_bytes):
    clock = Tick()
    loaded = write_config(config({"label": "tripped", "fail_first_calls": 999}, breaker_threshold=2, breaker_cooldown_seconds=60, max_batch_redeliveries=0))
    async with Runner(loaded, breaker_clock=clock) as runner:
        await runner.process_batch(graph_alerts(fixture_bytes, 1, "a"))
        sink = faults.INSTANCES["tripped"]
        assert sink.calls == 2 and runner.sink_breakers["itsm"].state == "open"  # 3 attempts allowed, the breaker stopped the 3rd
        report = await runner.process_batch(graph_alerts(fixture_bytes, 1, "b"))
        assert sink.calls == 2 and report.dead_lettered == {"deliver": 1}  # short-circuited: the sink was not called
        (entry,) = [e for e in await runner.dead_letter.list() if e.alert_id == "b-0"]
        assert "circuit open" in entry.detail
        clock.now += 60
        sink.settings.fail_first_calls = 0
        report = await runner.process_batch(graph_alerts(fixture_bytes, 1, "c"))
        assert sink.calls == 3 and report.delivered == {"lake": 1, "itsm": 1} and runner.sink_breakers["itsm"].state == "closed"


async def test_open_enricher_breaker_fails_fast_with_circuit_open_and_alerts_still_flow(write_config, fixture_bytes):
    text = config(
        {"label": "ok"},
        runner={"max_concurrent_alerts": 1, "enricher_breaker_threshold": 3},
        enrichers=[enricher_entry("counting_explodes", "tests.faults:CountingExplodes"), enricher_entry("counting_hangs", "tests.faults:CountingHangs")],
    )
    faults.CountingExplodes.calls = faults.CountingHangs.calls = 0
    async with Runner(write_config(text)) as runner:
        report = await runner.process_batch(graph_alerts(fixture_bytes, 10))
        lines = [json.loads(line) for path in runner.loaded.data_path("lake").rglob("*.jsonl") for line in path.read_text().splitlines()]
    assert faults.CountingExplodes.calls == 3 and faults.CountingHangs.calls == 3
    assert report.delivered == {"lake": 10, "itsm": 10}
    errors = [line["enrichment_status"]["counting_explodes"]["error"] for line in lines]
    assert errors.count("circuit open") == 7 and all(line["enrichment_status"]["counting_hangs"]["state"] in ("timed_out", "failed") for line in lines)


def test_cli_run_with_a_sink_down_exits_1_saying_run_again_then_the_rerun_delivers(tmp_path, fixture_bytes):
    import os
    import subprocess
    import sys

    from tests.support.paths import ROOT

    (tmp_path / "in.jsonl").write_bytes(b"\n".join(m.body for m in graph_alerts(fixture_bytes, 5)) + b"\n")
    path = tmp_path / "pipeline.toml"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "pipeline", "run", "in.jsonl", "--config", "pipeline.toml", "--out", "out"]
    path.write_text(config({"label": "cli", "fail_first_calls": 999}))
    down = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, timeout=120)
    assert down.returncode == 1
    (line,) = down.stderr.decode().strip().splitlines()[-1:]
    assert "sink(s) itsm unavailable for the whole batch" in line and line.endswith("nothing is lost: run again")
    assert not list((tmp_path / "out" / "dead-letter").glob("*.json"))
    path.write_text(config({"label": "cli"}))
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, timeout=120)
    assert again.returncode == 0, again.stderr.decode()
    assert "delivered:           itsm=5, lake=5" in again.stdout.decode()


async def test_functions_trigger_raises_for_an_outage_and_its_last_retry_dead_letters(tmp_path, monkeypatch, fixture_bytes):
    """As the host runs it, with the shipped numbers (deploy/function.toml's max_batch_redeliveries,
    function_app.py's max_retry_count): 1 execution + max_retry_count retries; an execution within
    them must return (and checkpoint) with everything dead-lettered. Not adapted to the files: a
    bound above the retry count fails here."""
    from datetime import datetime

    import azure.functions as func

    from pipeline.entrypoints import functions
    from tests.deliver.test_guarantees import shipped_max_batch_redeliveries, shipped_max_retry_count
    from tests.entrypoints.test_functions import FUNCTIONS

    bound, max_retry_count = shipped_max_batch_redeliveries("deploy/function.toml"), shipped_max_retry_count()
    path = tmp_path / "pipeline.toml"
    path.write_text(config({"label": "fn", "fail_first_calls": 9999}, max_batch_redeliveries=bound))
    monkeypatch.setenv("DLP_PIPELINE_CONFIG", str(path))
    monkeypatch.setenv("DLP_PIPELINE_DATA_DIR", str(tmp_path / "data"))
    await functions.reset_runner()
    events = [
        func.EventHubEvent(body=m.body, sequence_number=i, offset=str(i), enqueued_time=datetime.now(UTC), partition_key=None)
        for i, m in enumerate(graph_alerts(fixture_bytes, 3))
    ]
    trigger = FUNCTIONS["dlp_alerts"].get_user_function()
    raised = 0
    try:
        for _ in range(1 + max_retry_count):  # what the host runs before it checkpoints anyway
            try:
                await trigger(events)
            except SinkOutage:
                raised += 1
                continue
            break
        runner = await functions.get_runner()
        entries = await runner.dead_letter.list()
    finally:
        await functions.reset_runner()
    assert raised == bound <= max_retry_count, f"{raised} executions raised; the host runs {1 + max_retry_count} in all"
    assert sorted(e.alert_id for e in entries) == ["alert-0", "alert-1", "alert-2"] and {e.sink for e in entries} == {"itsm"}


async def test_retry_waits_at_least_the_sinks_retry_after(write_config, fixture_bytes):
    import time

    loaded = write_config(config({"label": "throttled", "fail_first_calls": 1, "retry_after": 0.3}))
    async with Runner(loaded) as runner:
        started = time.monotonic()
        report = await runner.process_batch(graph_alerts(fixture_bytes, 2))
        elapsed = time.monotonic() - started
    assert report.delivered == {"lake": 2, "itsm": 2} and faults.INSTANCES["throttled"].calls == 2
    assert elapsed >= 0.3  # the backoff alone would have waited about a millisecond
