"""The standalone consumer: a partition's checkpoint moves only after its batch is accounted for.

Without Docker: the batch handler is driven the way EventHubConsumerClient drives it, with real
`azure.eventhub.EventData` objects (sequence numbers and offsets set as the service sets them) and a
real PartitionContext over a real BlobCheckpointStore on Azurite.
With Docker: `python -m pipeline consume` against the Event Hubs emulator (skipped otherwise).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime

import orjson
import pytest
from azure.eventhub import EventData
from azure.eventhub.aio import PartitionContext

from pipeline.entrypoints.consumer import BatchHandler
from pipeline.errors import SinkOutage
from pipeline.runner import Runner
from tests import faults
from tests.support.azurite import docker_available
from tests.support.config import FAST_RETRIES, LAKE, pipeline_toml, sink_entry
from tests.support.paths import ROOT
from tests.support.streaming import streaming_records

NAMESPACE, HUB, GROUP = "ns.servicebus.windows.net", "dlp", "$Default"


def config(settings: dict) -> str:
    """The lake and a scripted ITSM sink (`settings` are its script), two fast attempts per record."""
    return pipeline_toml(delivery={**FAST_RETRIES, "max_attempts": 2}, sinks=[LAKE, sink_entry("itsm", "tests.faults:ScriptedSink", settings)])


def received_event(body: bytes, sequence: int) -> EventData:
    """An EventData as the client hands it to on_event_batch: with the service's annotations."""
    event = EventData(body)
    event.raw_amqp_message.annotations[b"x-opt-sequence-number"] = sequence
    event.raw_amqp_message.annotations[b"x-opt-offset"] = str(sequence * 1000).encode()
    event.raw_amqp_message.annotations[b"x-opt-enqueued-time"] = int(datetime.now(UTC).timestamp() * 1000)
    return event


def events(fixture_bytes, count: int, start: int = 0) -> list[EventData]:
    alert = json.loads(fixture_bytes("graph_alert_v2_dlp.json"))
    return [received_event(orjson.dumps(dict(alert, id=f"ev-{i}")), i) for i in range(start, start + count)]


def split_events(fixture_bytes, count: int) -> list[EventData]:
    """`count` events, each one whole split Streaming API alert of its own (parts the state store must hold)."""
    parts = streaming_records(fixture_bytes)[:4]  # AlertInfo and its evidence rows
    bodies = []
    for i in range(count):
        copies = json.loads(json.dumps(parts))
        for record in copies:
            record["properties"]["AlertId"] = f"dl-outage-{i}"
        bodies.append(orjson.dumps({"records": copies}))
    return [received_event(body, i) for i, body in enumerate(bodies)]


@pytest.fixture
async def checkpoint_store(azurite):
    from azure.eventhub.extensions.checkpointstoreblobaio import BlobCheckpointStore
    from azure.storage.blob.aio import ContainerClient

    name = f"cp-{uuid.uuid4().hex[:8]}"
    async with ContainerClient.from_connection_string(azurite.connection_string, name) as container:
        await container.create_container()
    store = BlobCheckpointStore.from_connection_string(azurite.connection_string, name)
    async with store:
        yield store


async def checkpoints(store) -> dict[str, tuple[int, str]]:
    return {c["partition_id"]: (c["sequence_number"], c["offset"]) for c in await store.list_checkpoints(NAMESPACE, HUB, GROUP)}


@pytest.mark.integration
async def test_checkpoint_stays_while_the_batch_raises_and_moves_once_it_is_accounted_for(write_config, fixture_bytes, checkpoint_store):
    loaded = write_config(config({"label": "consumer-down", "fail_first_calls": 2}))
    context = PartitionContext(NAMESPACE, HUB, GROUP, "0", checkpoint_store=checkpoint_store)
    batch = events(fixture_bytes, 5)
    async with Runner(loaded) as runner:
        handler = BatchHandler(runner, max_runs=1)  # give the partition back instead of retrying in process
        with pytest.raises(SinkOutage):
            await handler.on_event_batch(context, batch)
        assert await checkpoints(checkpoint_store) == {}  # not moved: the events will be read again
        assert await runner.dead_letter.list() == []
        await handler.on_event_batch(context, batch)  # read again from the checkpoint: now accounted for
        assert await checkpoints(checkpoint_store) == {"0": (4, "4000")}
        sink = faults.INSTANCES["consumer-down"]
        assert len(sink.stored) == 5 and set(sink.stored.values()) == {1}
        await handler.on_event_batch(context, events(fixture_bytes, 3, start=5))
        assert await checkpoints(checkpoint_store) == {"0": (7, "7000")}


@pytest.mark.integration
async def test_store_outage_retries_in_process_without_checkpointing(write_config, fixture_bytes, checkpoint_store):
    loaded = write_config(config({"label": "consumer-ok"}))
    context = PartitionContext(NAMESPACE, HUB, GROUP, "1", checkpoint_store=checkpoint_store)
    seen_while_failing = []
    async with Runner(loaded) as runner:
        runner.state._db.execute("PRAGMA busy_timeout=50")  # the SQLite file itself: fail fast on its lock
        blocker = sqlite3.connect(runner.state.path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # the state store is unavailable for writes (WAL: reads go on)

        async def wait(seconds: float) -> None:  # what the handler does between runs: look, then end the outage
            seen_while_failing.append(await checkpoints(checkpoint_store))
            if len(seen_while_failing) == 2:
                blocker.execute("ROLLBACK")

        handler = BatchHandler(runner, retry_initial_seconds=0.01, sleep=wait)
        # Split alerts: every run must write their parts (a batch with nothing to write needs no write lock).
        await handler.on_event_batch(context, split_events(fixture_bytes, 4))
        blocker.close()
    assert seen_while_failing == [{}, {}] and handler.failed_runs == 2
    assert await checkpoints(checkpoint_store) == {"1": (3, "3000")}
    assert len(faults.INSTANCES["consumer-ok"].stored) == 4


# -- the Event Hubs emulator (Docker) --------------------------------------------------------------

EMULATOR_CONFIG = {
    "UserConfig": {
        "NamespaceConfig": [{"Type": "EventHub", "Name": "emulatorNs1", "Entities": [{"Name": "dlp", "PartitionCount": "2", "ConsumerGroups": [{"Name": "pipeline"}]}]}],
        "LoggingConfig": {"Type": "File"},
    }
}


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(not docker_available(), reason="no Docker engine answers: the Event Hubs emulator runs only as a container")
def test_consume_against_the_event_hubs_emulator(tmp_path, fixture_bytes):
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.network import Network
    from testcontainers.core.waiting_utils import wait_for_logs

    from tests.support.azurite import ACCOUNT, KEY

    (tmp_path / "Config.json").write_text(json.dumps(EMULATOR_CONFIG))
    with Network() as network:
        azurite = DockerContainer("mcr.microsoft.com/azure-storage/azurite").with_network(network).with_network_aliases("azurite").with_exposed_ports(10000, 10001, 10002)
        with azurite:
            emulator = (
                DockerContainer("mcr.microsoft.com/azure-messaging/eventhubs-emulator:latest")
                .with_network(network)
                .with_env("BLOB_SERVER", "azurite")
                .with_env("METADATA_SERVER", "azurite")
                .with_env("ACCEPT_EULA", "Y")
                .with_volume_mapping(str(tmp_path / "Config.json"), "/Eventhubs_Emulator/ConfigFiles/Config.json")
                .with_exposed_ports(5672)
            )
            with emulator:
                wait_for_logs(emulator, "Emulator Service is Successfully Up", timeout=180)
                host, port = emulator.get_container_host_ip(), emulator.get_exposed_port(5672)
                hub_conn = f"Endpoint=sb://{host}:{port};SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;"
                blob = f"http://{azurite.get_container_host_ip()}:{azurite.get_exposed_port(10000)}/{ACCOUNT}"
                storage_conn = f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint={blob};"
                _send(hub_conn, fixture_bytes, 30)
                config = tmp_path / "pipeline.toml"
                consumer = {"connection_string_env": "HUB_CONN", "checkpoint_connection_string_env": "STORAGE_CONN", "eventhub_name": "dlp", "consumer_group": "pipeline", "max_wait_seconds": 1}
                config.write_text(pipeline_toml(consumer=consumer, sinks=[sink_entry("lake", "jsonl")]))
                env = {**os.environ, "PYTHONPATH": str(ROOT), "HUB_CONN": hub_conn, "STORAGE_CONN": storage_conn}
                command = [sys.executable, "-m", "pipeline", "consume", "--config", str(config), "--out", str(tmp_path / "out"), "--idle-exit", "10"]
                first = subprocess.run(command, env=env, capture_output=True, timeout=300)
                assert first.returncode == 0, first.stderr.decode()
                second = subprocess.run(command, env=env, capture_output=True, timeout=300)  # from the checkpoints: nothing new
                assert second.returncode == 0, second.stderr.decode()
    lines = [json.loads(line) for path in (tmp_path / "out" / "lake").rglob("*.jsonl") for line in path.read_text().splitlines()]
    assert sorted(line["alert"]["alert_id"] for line in lines) == sorted(f"em-{i}" for i in range(30))
    assert b"batches checkpointed: 0" in second.stdout


def _send(connection_string: str, fixture_bytes, count: int) -> None:
    from azure.eventhub import EventHubProducerClient

    alert = json.loads(fixture_bytes("graph_alert_v2_dlp.json"))
    producer = EventHubProducerClient.from_connection_string(connection_string, eventhub_name="dlp")
    with producer:
        batch = producer.create_batch()
        for i in range(count):
            batch.add(EventData(orjson.dumps(dict(alert, id=f"em-{i}"))))
        producer.send_batch(batch)
    time.sleep(1)


def test_consume_without_a_consumer_table_exits_2_in_one_line(tmp_path):
    config = tmp_path / "pipeline.toml"
    config.write_text(pipeline_toml(assembly=None, sinks=[sink_entry("lake", "jsonl")]))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "pipeline", "consume", "--config", str(config)], cwd=tmp_path, env=env, capture_output=True, timeout=60)
    assert result.returncode == 2
    (line,) = result.stderr.decode().strip().splitlines()
    assert "pipeline.toml, key 'consumer'" in line and "[consumer]" in line


def _consume_config(tmp_path) -> str:
    config = tmp_path / "pipeline.toml"
    consumer = {"connection_string_env": "HUB_CONN", "checkpoint_connection_string_env": "STORAGE_CONN", "eventhub_name": "dlp", "checkpoint_container": "cp-idle"}
    config.write_text(pipeline_toml(assembly=None, consumer=consumer, sinks=[sink_entry("lake", "jsonl")]))
    return str(config)


UNREACHABLE_HUB = "Endpoint=sb://127.0.0.1:9;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=x;UseDevelopmentEmulator=true;"


def test_consume_with_an_unreachable_checkpoint_store_exits_1_in_one_line(tmp_path):
    storage = "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;BlobEndpoint=http://127.0.0.1:9/devstoreaccount1;"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HUB_CONN": UNREACHABLE_HUB, "STORAGE_CONN": storage}
    result = subprocess.run([sys.executable, "-m", "pipeline", "consume", "--config", _consume_config(tmp_path), "--out", "out"], cwd=tmp_path, env=env, capture_output=True, timeout=120)
    assert result.returncode == 1
    (line,) = result.stderr.decode().strip().splitlines()
    assert "checkpoint store: cannot reach container cp-idle" in line and "Traceback" not in line


@pytest.mark.slow
@pytest.mark.integration
def test_consume_starts_creates_its_checkpoint_container_and_stops_when_idle(tmp_path, azurite):
    """The client's lifecycle without a hub to read: the hub is unreachable, so nothing is read or checkpointed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HUB_CONN": UNREACHABLE_HUB, "STORAGE_CONN": azurite.connection_string}
    command = [sys.executable, "-m", "pipeline", "consume", "--config", _consume_config(tmp_path), "--out", "out", "--idle-exit", "1"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    assert b"batches checkpointed: 0" in result.stdout and b"Traceback" not in result.stderr
    from azure.storage.blob import BlobServiceClient

    with BlobServiceClient.from_connection_string(azurite.connection_string) as service:
        assert service.get_container_client("cp-idle").exists()
