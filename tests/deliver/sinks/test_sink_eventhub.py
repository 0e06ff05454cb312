"""Event Hub sink: packing with the SDK's real EventDataBatch, failure mapping against an unreachable
namespace, and (with a Docker engine) a round trip through the Event Hubs emulator."""

from __future__ import annotations

import json
import textwrap
import time

import pytest
from azure.eventhub import EventDataBatch

from pipeline.deliver.minimise import alert_key
from pipeline.deliver.sinks.eventhub import EventHubSink, make_event, pack
from tests.support.azurite import docker_available
from tests.support.records import make_record


async def new_batch_of(size: int):
    async def factory():
        return EventDataBatch(max_size_in_bytes=size)

    return factory


async def test_records_fill_batches_in_order_and_an_oversized_one_is_set_aside():
    records = [make_record(f"r{i}", padding=3000) for i in range(10)] + [make_record("huge", padding=20_000), make_record("last")]
    batches, too_large = await pack(records, await new_batch_of(16_000))
    members = [m for _, m in batches]
    assert sorted(i for m in members for i in m) == [i for i in range(12) if i != 10]
    assert [i for m in members for i in m] == sorted(i for m in members for i in m)  # order kept
    assert list(too_large) == [10] and "does not fit" in too_large[10]
    assert all(batch.size_in_bytes <= 16_000 for batch, _ in batches)
    # Packed as tightly as the SDK allows: a next record never fitted the batch before it.
    assert len(batches) <= (sum(b.size_in_bytes for b, _ in batches) // 16_000) + 2


def test_an_event_carries_the_record_and_its_keys():
    record = make_record("a")
    event = make_event(record)
    assert json.loads(event.body_as_str()) == record.to_dict()
    assert event.message_id == record.record_id and event.content_type == "application/json"
    assert event.properties["record_id"] == record.record_id and event.properties["alert_key"] == alert_key(record)


async def test_an_unreachable_namespace_is_retryable(monkeypatch):
    monkeypatch.setenv("TEST_EH_CONNECTION", "Endpoint=sb://127.0.0.1:9;SharedAccessKeyName=k;SharedAccessKey=v;EntityPath=hub;UseDevelopmentEmulator=true")
    sink = EventHubSink(EventHubSink.Settings(connection_string_env="TEST_EH_CONNECTION", sdk_retries=0, timeout_seconds=3), None)
    started = time.monotonic()
    try:
        outcomes = await sink.publish([make_record("a"), make_record("b")])
    finally:
        await sink.aclose()
    assert [o.status for o in outcomes] == ["retryable", "retryable"]
    assert time.monotonic() - started < 20


def test_settings_need_exactly_one_way_to_connect():
    with pytest.raises(ValueError, match="exactly one"):
        EventHubSink.Settings()
    with pytest.raises(ValueError, match="eventhub_name"):
        EventHubSink.Settings(fully_qualified_namespace="ns.servicebus.windows.net")


EMULATOR_CONFIG = {
    "UserConfig": {
        "NamespaceConfig": [
            {"Type": "EventHub", "Name": "emulatorNs1", "Entities": [{"Name": "enriched", "PartitionCount": "2", "ConsumerGroups": []}]}
        ],
        "LoggingConfig": {"Type": "File"},
    }
}


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(not docker_available(), reason="the Event Hubs emulator needs a Docker engine (none answers here)")
async def test_round_trip_through_the_event_hubs_emulator(tmp_path, monkeypatch):
    from azure.eventhub.aio import EventHubConsumerClient
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.network import Network
    from testcontainers.core.waiting_utils import wait_for_logs

    config = tmp_path / "Config.json"
    config.write_text(json.dumps(EMULATOR_CONFIG))
    with Network() as network:
        storage = DockerContainer("mcr.microsoft.com/azure-storage/azurite:latest").with_network(network).with_network_aliases("azurite")
        with storage:
            emulator = (
                DockerContainer("mcr.microsoft.com/azure-messaging/eventhubs-emulator:latest")
                .with_network(network)
                .with_env("ACCEPT_EULA", "Y")
                .with_env("BLOB_SERVER", "azurite")
                .with_env("METADATA_SERVER", "azurite")
                .with_volume_mapping(str(config), "/Eventhubs_Emulator/ConfigFiles/Config.json", "ro")
                .with_exposed_ports(5672)
            )
            with emulator:
                wait_for_logs(emulator, "Emulator Service is Successfully Up", timeout=120)
                host, port = emulator.get_container_host_ip(), emulator.get_exposed_port(5672)
                connection = textwrap.dedent(
                    f"Endpoint=sb://{host}:{port};SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;"
                )
                monkeypatch.setenv("TEST_EH_CONNECTION", connection)
                sink = EventHubSink(EventHubSink.Settings(connection_string_env="TEST_EH_CONNECTION", eventhub_name="enriched", max_batch_bytes=8000), None)
                records = [make_record(f"e{i}", padding=2000) for i in range(6)]
                try:
                    outcomes = await sink.publish(records)
                finally:
                    await sink.aclose()
                assert all(o.status == "delivered" for o in outcomes) and sink.batches_sent >= 2
                received: dict[str, dict] = {}
                consumer = EventHubConsumerClient.from_connection_string(connection, consumer_group="$Default", eventhub_name="enriched")

                async def on_event(context, event):
                    if event is not None:
                        received[event.properties[b"record_id"].decode()] = {"body": json.loads(event.body_as_str()), "key": event.properties[b"alert_key"].decode()}

                import asyncio

                async with consumer:
                    task = asyncio.create_task(consumer.receive(on_event, starting_position="-1"))
                    deadline = time.monotonic() + 30
                    while len(received) < len(records) and time.monotonic() < deadline:
                        await asyncio.sleep(0.2)
                    task.cancel()
                assert set(received) == {r.record_id for r in records}
                assert received[records[0].record_id]["key"] == alert_key(records[0])
