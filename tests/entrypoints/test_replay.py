"""Dead-letter replay (local and Blob stores): re-drives each stage, removes only what is delivered, idempotent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import orjson
import pytest

from pipeline.deadletter import DeadLetter, LocalDeadLetterStore
from pipeline.deadletter.blob import BlobDeadLetterStore
from pipeline.entrypoints.replay import replay_dead_letters
from pipeline.runner import Message, Runner
from tests import faults
from tests.deliver.test_faults import lake_records
from tests.support.config import FAST_RETRIES, LAKE, pipeline_toml, sink_entry
from tests.support.paths import ROOT


def config(url: str, *, dead_letter: dict | None = None) -> str:
    """The lake and an HTTP ticket sink at `url`, two fast attempts per record; `dead_letter` as given."""
    return pipeline_toml(
        delivery={**FAST_RETRIES, "max_attempts": 2},
        dead_letter=dead_letter,
        sinks=[LAKE, sink_entry("itsm", "tests.faults:HttpTicketSink", {"url": url})],
    )


@pytest.fixture
def ticket_server(httpserver):
    yield faults.TicketServer(httpserver)
    httpserver.clear()


def graph(fixture_bytes, alert_id: str) -> bytes:
    return orjson.dumps(dict(json.loads(fixture_bytes("graph_alert_v2_dlp.json")), id=alert_id))


async def test_deliver_stage_entries_go_to_their_sink_only_and_replaying_twice_writes_nothing_twice(write_config, fixture_bytes, ticket_server):
    loaded = write_config(config(ticket_server.url))
    ticket_server.faults = [400, 413]  # the ITSM rejects two records (e.g. a field it no longer accepts)
    async with Runner(loaded) as runner:
        report = await runner.process_batch([Message(graph(fixture_bytes, f"a{i}")) for i in range(4)])
    assert report.dead_lettered == {"deliver": 2} and report.delivered == {"lake": 4, "itsm": 2}
    lake_before = (loaded.data_path("lake") / "_delivered.sqlite").stat().st_mtime_ns

    first = await replay_dead_letters(loaded)  # the ITSM takes them now
    assert (first.entries, first.replayed, first.still_dead) == (2, 2, 0)
    assert first.pipeline.delivered == {"itsm": 2}  # not re-sent to the lake, which already had them
    assert (loaded.data_path("lake") / "_delivered.sqlite").stat().st_mtime_ns == lake_before
    assert len(ticket_server.created) == 4 and set(ticket_server.created.values()) == {1}
    assert await LocalDeadLetterStore(loaded.data_path("dead-letter")).list() == []

    second = await replay_dead_letters(loaded)
    assert (second.entries, second.replayed) == (0, 0) and ticket_server.requests == 4 + 2


async def test_an_entry_that_fails_again_stays_with_one_more_attempt(write_config, fixture_bytes, ticket_server):
    loaded = write_config(config(ticket_server.url))
    ticket_server.faults = [400]
    async with Runner(loaded) as runner:
        await runner.process_batch([Message(graph(fixture_bytes, "a0"))])
        (before,) = await runner.dead_letter.list()
    ticket_server.faults = [422]
    report = await replay_dead_letters(loaded)
    (after,) = await LocalDeadLetterStore(loaded.data_path("dead-letter")).list()
    assert (report.still_dead, report.replayed) == (1, 0)
    assert after.entry_id == before.entry_id and after.attempts == before.attempts + 1
    assert after.first_failure_at == before.first_failure_at and after.last_failure_at > before.first_failure_at
    assert after.detail == "HTTP 400" and after.replay_attempts[-1]["detail"] == "HTTP 422" and not ticket_server.created


async def test_replay_keeps_the_first_failures_reason_source_and_index_and_appends_each_attempt(write_config, fixture_bytes, ticket_server):
    loaded = write_config(config(ticket_server.url))
    store = LocalDeadLetterStore(loaded.data_path("dead-letter"))
    ticket_server.faults = [400]  # the record is rejected first ...
    async with Runner(loaded) as runner:
        await runner.process_batch([Message(graph(fixture_bytes, "a0"))])
    await store.put([DeadLetter(stage="decode", reason="invalid_json", detail="at byte 1", body=b"{not json", source="input.jsonl:7", message_index=6)])
    (rejected,) = [e for e in await store.list() if e.stage == "deliver"]
    for _ in range(2):
        ticket_server.faults = [503] * 4  # ... then the ITSM is down on each replay: a different reason
        await replay_dead_letters(loaded)
    by_stage = {e.stage: e for e in await store.list()}
    delivered_entry, decoded_entry = by_stage["deliver"], by_stage["decode"]
    assert (delivered_entry.reason, delivered_entry.detail, delivered_entry.attempts) == (rejected.reason, rejected.detail, rejected.attempts + 2)
    assert [a["reason"] for a in delivered_entry.replay_attempts] == ["retries_exhausted", "retries_exhausted"]
    assert (decoded_entry.reason, decoded_entry.source, decoded_entry.message_index, decoded_entry.attempts) == ("invalid_json", "input.jsonl:7", 6, 3)
    assert len(decoded_entry.replay_attempts) == 2 and all(a["reason"] == "invalid_json" and a["at"] for a in decoded_entry.replay_attempts)


async def test_undecodable_body_stays_dead_without_touching_the_lake(write_config, ticket_server):
    loaded = write_config(config(ticket_server.url))
    async with Runner(loaded) as runner:
        await runner.process_batch([Message(b"{not json", source="f:1"), Message(b'{"records": [1]}', source="f:2")])
    lake = loaded.data_path("lake")
    files_before = sorted(p.name for p in lake.rglob("*"))
    report = await replay_dead_letters(loaded)
    entries = await LocalDeadLetterStore(loaded.data_path("dead-letter")).list()
    assert (report.entries, report.still_dead, report.replayed, report.new_entries) == (2, 2, 0, 0)
    assert sorted(e.attempts for e in entries) == [2, 2] and len(entries) == 2
    assert sorted(p.name for p in lake.rglob("*")) == files_before and not list(lake.rglob("*.jsonl"))
    assert ticket_server.requests == 0


async def test_decode_and_assemble_entries_that_now_make_alerts_are_delivered_to_every_sink(write_config, fixture_bytes, ticket_server):
    """E.g. entries written by an older version whose decoder rejected them."""
    loaded = write_config(config(ticket_server.url))
    store = LocalDeadLetterStore(loaded.data_path("dead-letter"))
    good_message = graph(fixture_bytes, "from-decode")
    good_record = json.loads(graph(fixture_bytes, "from-record"))
    from pipeline.assemble.join import merge_parts
    from pipeline.ingest.decode import decode_message

    # a valid alert's fields, as the assemble stage stores them
    merged = merge_parts(decode_message(fixture_bytes("streaming_dlp_batch.json")).parts)
    await store.put([
        DeadLetter(stage="decode", reason="old_bug", detail="", body=good_message, source="old:1"),
        DeadLetter(stage="decode", reason="old_bug", detail="", body=orjson.dumps(good_record), source="old:2", record_index=3),
        DeadLetter(stage="assemble", reason="invalid_alert", detail="", body=orjson.dumps(merged), alert_id=merged["alert_id"]),
        DeadLetter(stage="assemble", reason="invalid_alert", detail="", body=b'{"source_format": "defender_streaming"}', alert_id="broken"),
    ])
    first = await replay_dead_letters(loaded)
    assert (first.replayed, first.still_dead) == (3, 1)
    (left,) = await store.list()
    assert left.alert_id == "broken" and left.attempts == 2
    async with Runner(loaded) as runner:
        ids = sorted(line["alert"]["alert_id"] for line in lake_records(runner))
    assert ids == sorted(["from-decode", "from-record", merged["alert_id"]]) and len(ticket_server.created) == 3
    second = await replay_dead_letters(loaded)
    assert (second.entries, second.replayed, second.still_dead) == (1, 0, 1)
    async with Runner(loaded) as runner:
        assert len(lake_records(runner)) == 3 and len(ticket_server.created) == 3 and set(ticket_server.created.values()) == {1}


def test_replay_command_uses_the_run_defaults(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "pipeline", "run"], cwd=tmp_path, env=env, capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr.decode()
    replay = subprocess.run([sys.executable, "-m", "pipeline", "replay-dead-letters"], cwd=tmp_path, env=env, capture_output=True, timeout=120)
    assert replay.returncode == 0, replay.stderr.decode()
    lines = dict(line.split(":", 1) for line in replay.stdout.decode().splitlines())
    assert lines["dead letters"].strip() == "3" and lines["still dead"].strip() == "3" and lines["output"].strip() == str(tmp_path / "out")


# -- Blob storage (Azurite) -----------------------------------------------------------------------


@pytest.mark.integration
async def test_blob_store_keeps_one_blob_per_entry_and_counts_attempts(azurite):
    from azure.storage.blob.aio import ContainerClient

    container = f"dl-{uuid.uuid4().hex[:8]}"
    store = BlobDeadLetterStore(ContainerClient.from_connection_string(azurite.connection_string, container), prefix="dead-letter")
    try:
        entry = DeadLetter(stage="decode", reason="invalid_json", detail="x", body=b"\x00{bad", source="s:1")
        await store.put([entry])
        await store.put([DeadLetter(stage="decode", reason="invalid_json", detail="x", body=b"\x00{bad", source="s:1")])
        (stored,) = await store.list()
        assert stored.entry_id == entry.entry_id and stored.attempts == 2 and stored.body == b"\x00{bad"
        names = [b.name async for b in store.container.list_blobs()]
        assert names == [f"dead-letter/{entry.entry_id}.json"]
        await store.remove([entry.entry_id, "absent"])
        assert await store.list() == []
    finally:
        await store.container.delete_container()
        await store.aclose()


@pytest.mark.integration
async def test_replay_from_the_blob_store(write_config, fixture_bytes, ticket_server, azurite, monkeypatch):
    monkeypatch.setenv("DL_CONN", azurite.connection_string)
    container = f"dl-{uuid.uuid4().hex[:8]}"
    loaded = write_config(config(ticket_server.url, dead_letter={"kind": "blob", "container": container, "connection_string_env": "DL_CONN"}))
    ticket_server.faults = [400]
    async with Runner(loaded) as runner:
        assert isinstance(runner.dead_letter, BlobDeadLetterStore)
        await runner.process_batch([Message(graph(fixture_bytes, "a0")), Message(b"garbage", source="g")])
        assert len(await runner.dead_letter.list()) == 2
    report = await replay_dead_letters(loaded)
    assert (report.replayed, report.still_dead) == (1, 1) and len(ticket_server.created) == 1
    async with Runner(loaded) as runner:
        (left,) = await runner.dead_letter.list()
        assert left.stage == "decode" and left.attempts == 2
        await runner.dead_letter.container.delete_container()


def test_blob_dead_letter_store_needs_an_account(write_config):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        write_config('[dead_letter]\nkind = "blob"\ncontainer = "dl"\n')
    assert "key 'dead_letter'" in str(caught.value) and "account_url or connection_string_env" in str(caught.value)
    with pytest.raises(ConfigError, match="key 'delivery.on_outage'"):
        write_config('[delivery]\non_outage = "ignore"\n')


@pytest.mark.integration
async def test_blob_store_concurrent_writers_never_lose_a_count(azurite):
    import asyncio

    from azure.storage.blob.aio import ContainerClient

    container = f"dl-{uuid.uuid4().hex[:8]}"
    stores = [BlobDeadLetterStore(ContainerClient.from_connection_string(azurite.connection_string, container)) for _ in range(4)]
    try:
        await stores[0].put([])  # creates the container
        entries = [DeadLetter(stage="deliver", reason="retries_exhausted", detail="", body=b"{}", sink="itsm", record_id="r1") for _ in range(8)]
        await asyncio.gather(*(stores[i % 4].put([entry]) for i, entry in enumerate(entries)))
        (stored,) = await stores[0].list()
        assert stored.attempts == 8
    finally:
        await stores[0].container.delete_container()
        for store in stores:
            await store.aclose()
