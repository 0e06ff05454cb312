"""The Functions adapter, called as the host calls it: the real decorated function, real EventHubEvents."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime

import azure.functions as func
import pytest

import function_app
from pipeline.entrypoints import functions
from pipeline.errors import DataFolderBusy, StoreUnavailable
from pipeline.state.folder_lock import LOCK_FILE, FolderLock
from tests.support.config import enricher_entry, pipeline_toml, sink_entry
from tests.support.paths import SAMPLES

# get_functions() indexes the app and may only be called once per process, as the host does.
FUNCTIONS = {f.get_function_name(): f for f in function_app.app.get_functions()}


def user_function(name: str):
    return FUNCTIONS[name].get_user_function()


def test_trigger_bindings_are_as_documented():
    fn = FUNCTIONS["dlp_alerts"]
    (binding,) = [b.get_dict_repr() for b in fn.get_bindings()]
    assert binding["type"] == "eventHubTrigger"
    assert binding["cardinality"].value == "many" and binding["dataType"].name == "BINARY"
    assert binding["connection"] == "EventHubConnection"
    assert fn.get_setting("retry_policy").get_dict_repr()["strategy"] == "exponential_backoff"


@pytest.fixture
async def functions_env(tmp_path, monkeypatch):
    config = tmp_path / "pipeline.toml"
    config.write_text(pipeline_toml(enrichers=[enricher_entry("sensitive_info")], sinks=[sink_entry("lake", "jsonl")]))
    monkeypatch.setenv("DLP_PIPELINE_CONFIG", str(config))
    monkeypatch.setenv("DLP_PIPELINE_DATA_DIR", str(tmp_path / "data"))
    await functions.reset_runner()
    yield tmp_path / "data"
    await functions.reset_runner()


def event(body: bytes, sequence: int) -> func.EventHubEvent:
    return func.EventHubEvent(body=body, sequence_number=sequence, offset=str(sequence * 100), enqueued_time=datetime.now(UTC), partition_key=None)


async def test_batch_of_events_is_delivered_and_bad_ones_dead_lettered(functions_env):
    events = [
        event((SAMPLES / "01-defender-streaming-batch.json").read_bytes(), 1),
        event(b"\x00\xffnot json", 2),
        event((SAMPLES / "03-graph-alert.json").read_bytes(), 3),
    ]
    await user_function("dlp_alerts")(events)
    lines = [json.loads(text) for p in (functions_env / "lake").rglob("*.jsonl") for text in p.read_text().splitlines()]
    assert sorted(line["alert"]["source_format"] for line in lines) == ["defender_streaming", "graph_alert"]
    assert lines[0]["enrichments"]["sensitive_info"]["total_count"] == 15
    (dead,) = [json.loads(p.read_text()) for p in (functions_env / "dead-letter").glob("*.json")]
    assert dead["reason"] == "invalid_json" and dead["message_index"] == 1 and dead["source"] == "eventhub:sequence=2;offset=200"


async def test_timer_emits_settled_split_alerts(functions_env, monkeypatch):
    info_message = (SAMPLES / "02-defender-streaming-split.jsonl").read_text().splitlines()
    config = functions_env.parent / "pipeline.toml"
    config.write_text(config.read_text().replace("settle_seconds = 0", "settle_seconds = 0.2"))
    await functions.reset_runner()
    await user_function("dlp_alerts")([event(line.encode(), i) for i, line in enumerate(info_message)])
    assert not list((functions_env / "lake").rglob("*.jsonl"))  # parts are waiting to settle
    import asyncio

    await asyncio.sleep(0.3)
    await user_function("flush_pending_alerts")(None)
    (line,) = [json.loads(text) for p in (functions_env / "lake").rglob("*.jsonl") for text in p.read_text().splitlines()]
    assert line["alert"]["user"]["upn"] == "adele.vance@contoso.com" and line["alert"]["severity"] == "high"


async def test_store_outage_raises_so_the_host_retries_the_batch(functions_env):
    runner = await functions.get_runner()
    runner.dead_letter.root = functions_env.parent / "pipeline.toml"  # a file: every dead-letter write fails
    with pytest.raises(Exception) as caught:
        await user_function("dlp_alerts")([event(b"not json", 1)])
    # a folder that is a file cannot be written (PathUnusable, pipeline.errors.store_error): the invocation raises, naming it
    assert type(caught.value).__name__ == "PathUnusable" and str(functions_env.parent / "pipeline.toml") in str(caught.value)


async def test_an_invocation_waits_for_another_worker_on_the_local_folder_then_runs(functions_env, monkeypatch):
    monkeypatch.setenv("DLP_PIPELINE_LOCK_WAIT_SECONDS", "10")
    other_worker = FolderLock(functions_env)  # another open of the lock file: refused like another process
    other_worker.acquire()
    invocation = asyncio.create_task(user_function("dlp_alerts")([event((SAMPLES / "03-graph-alert.json").read_bytes(), 1)]))
    await asyncio.sleep(0.3)
    assert not invocation.done() and not (functions_env / "lake").exists(), "the invocation did not wait for the folder"
    other_worker.release()
    await asyncio.wait_for(invocation, timeout=10)
    (line,) = [json.loads(text) for p in (functions_env / "lake").rglob("*.jsonl") for text in p.read_text().splitlines()]
    assert line["alert"]["source_format"] == "graph_alert"


async def test_an_invocation_that_cannot_get_the_local_folder_raises_for_a_retry_and_writes_nothing(functions_env, monkeypatch):
    monkeypatch.setenv("DLP_PIPELINE_LOCK_WAIT_SECONDS", "0.2")
    other_worker = FolderLock(functions_env)
    other_worker.acquire()
    try:
        for name, arguments in (("dlp_alerts", [event((SAMPLES / "03-graph-alert.json").read_bytes(), 1)]), ("flush_pending_alerts", None)):
            with pytest.raises(DataFolderBusy) as caught:
                await user_function(name)(arguments)
            assert isinstance(caught.value, StoreUnavailable)  # the batch is retried, as for a store outage
            assert f"(pid {os.getpid()}) is using {functions_env}; waited 0.2 s" in str(caught.value)
        assert sorted(p.name for p in functions_env.iterdir()) == [LOCK_FILE]
    finally:
        other_worker.release()
    await user_function("dlp_alerts")([event((SAMPLES / "03-graph-alert.json").read_bytes(), 1)])  # the retry
    assert len(list((functions_env / "lake").rglob("*.jsonl"))) == 1


async def test_invocations_of_one_worker_take_turns_and_all_deliver(functions_env):
    bodies = [graph_body(f"turn-{i}") for i in range(6)]
    await asyncio.gather(*(user_function("dlp_alerts")([event(body, i)]) for i, body in enumerate(bodies)))
    lines = [json.loads(text) for p in (functions_env / "lake").rglob("*.jsonl") for text in p.read_text().splitlines()]
    assert sorted(line["alert"]["alert_id"] for line in lines) == [f"turn-{i}" for i in range(6)]


def graph_body(alert_id: str) -> bytes:
    """The bundled Graph alert under another id."""
    return json.dumps(dict(json.loads((SAMPLES / "03-graph-alert.json").read_bytes()), id=alert_id)).encode()
