"""Blob lake sink against Azurite (started by the suite): partitions, JSONL.gz content, conditional
create (a retried batch writes nothing twice), Parquet, and a whole pipeline run into Azurite."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import uuid
from datetime import UTC, datetime

import pytest
from azure.storage.blob import BlobServiceClient

from pipeline.deliver.sinks.blob_lake import BlobLakeSink
from pipeline.runner import Message, Runner
from tests.support.config import blob_lake_entry, enricher_entry, pipeline_toml
from tests.support.paths import SAMPLES
from tests.support.records import make_record
from tests.support.samples import MATCHED_VALUES

TENANT = "11111111-2222-3333-4444-555555555555"


@pytest.fixture
def container(azurite, monkeypatch):
    monkeypatch.setenv("TEST_LAKE_CONNECTION", azurite.connection_string)
    name = f"lake-{uuid.uuid4().hex[:12]}"
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    yield service.get_container_client(name)
    try:
        service.delete_container(name)
    except Exception:
        pass
    service.close()


def make_sink(container, **settings) -> BlobLakeSink:
    values = {"connection_string_env": "TEST_LAKE_CONNECTION", "container": container.container_name, "create_container": True, **settings}
    return BlobLakeSink(BlobLakeSink.Settings(**values), None)


def blobs(container) -> dict[str, bytes]:
    return {b.name: container.download_blob(b.name).readall() for b in container.list_blobs()}


def lines(data: bytes) -> list[dict]:
    return [json.loads(line) for line in gzip.decompress(data).splitlines()]


@pytest.mark.integration
async def test_batch_is_partitioned_by_tenant_date_hour_with_a_deterministic_name(container):
    at = lambda h: datetime(2025, 3, 14, h, 5, tzinfo=UTC)  # noqa: E731
    records = [
        make_record("a1", created_at=at(9)),
        make_record("a2", created_at=at(9)),
        make_record("b1", created_at=at(10)),
        make_record("c1", created_at=at(9), tenant_id="other-tenant"),
    ]
    sink = make_sink(container)
    try:
        outcomes = await sink.publish(records)
    finally:
        await sink.aclose()
    assert [o.status for o in outcomes] == ["delivered"] * 4
    stored = blobs(container)
    digest = hashlib.sha256("\n".join(sorted([records[0].record_id, records[1].record_id])).encode()).hexdigest()[:40]
    expected_name = f"enriched/tenant={TENANT}/date=2025-03-14/hour=09/{digest}.jsonl.gz"
    assert set(stored) == {
        expected_name,
        next(n for n in stored if n.startswith(f"enriched/tenant={TENANT}/date=2025-03-14/hour=10/")),
        next(n for n in stored if n.startswith("enriched/tenant=other-tenant/date=2025-03-14/hour=09/")),
    }
    assert [line["alert"]["alert_id"] for line in lines(stored[expected_name])] == ["a1", "a2"]
    first = lines(stored[expected_name])[0]
    assert first == records[0].to_dict()  # the lake keeps the full record


@pytest.mark.integration
async def test_a_retried_batch_writes_nothing_twice(container):
    records = [make_record(f"r{i}") for i in range(5)]
    sink = make_sink(container)
    try:
        assert all(o.status == "delivered" for o in await sink.publish(records))
        before = {b.name: b.etag for b in container.list_blobs()}
        again = await sink.publish(records)  # the runner retrying after a lost response, or a redelivery
        reordered = await sink.publish(list(reversed(records)))
    finally:
        await sink.aclose()
    assert all(o.status == "delivered" for o in again + reordered)
    assert sink.blobs_written == 1
    assert {b.name: b.etag for b in container.list_blobs()} == before
    (data,) = blobs(container).values()
    assert sorted(line["record_id"] for line in lines(data)) == sorted(r.record_id for r in records)


@pytest.mark.integration
async def test_parquet_format_when_pyarrow_is_installed(container):
    pq = pytest.importorskip("pyarrow.parquet")
    records = [make_record("p1"), make_record("p2")]
    sink = make_sink(container, format="parquet")
    try:
        assert all(o.status == "delivered" for o in await sink.publish(records))
    finally:
        await sink.aclose()
    ((name, data),) = blobs(container).items()
    assert name.endswith(".parquet")
    table = pq.read_table(io.BytesIO(data)).to_pylist()
    assert [row["AlertId"] for row in table] == ["p1", "p2"]
    assert table[0]["TriageScore"] == 72.5 and json.loads(table[0]["record_json"]) == records[0].to_dict()


async def test_unreachable_storage_is_retryable(monkeypatch):
    monkeypatch.setenv("TEST_LAKE_CONNECTION", "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;BlobEndpoint=http://127.0.0.1:9/devstoreaccount1;")
    sink = BlobLakeSink(BlobLakeSink.Settings(connection_string_env="TEST_LAKE_CONNECTION", timeout_seconds=2), None)
    try:
        (outcome,) = await sink.publish([make_record("x")])
    finally:
        await sink.aclose()
    assert outcome.status == "retryable"


@pytest.mark.integration
async def test_a_missing_container_is_retryable_not_rejected(container):
    sink = make_sink(container, create_container=False)  # the fixture's container does not exist yet
    try:
        (outcome,) = await sink.publish([make_record("x")])
    finally:
        await sink.aclose()
    assert outcome.status == "retryable" and "not found" in outcome.reason


def test_settings_need_exactly_one_way_to_connect():
    with pytest.raises(ValueError, match="exactly one"):
        BlobLakeSink.Settings()
    with pytest.raises(ValueError, match="exactly one"):
        BlobLakeSink.Settings(account_url="https://x.blob.core.windows.net", connection_string_env="X")


def lake_in_azurite(container: str) -> str:
    """Two Blob lakes in `container`: the full records, and pseudonymised ones under their own prefix."""
    pseudonymised = blob_lake_entry(container, name="pseudonymised", prefix="pseudonymised")
    pseudonymised["pseudonymise"] = {"key_env": "TEST_PSEUDONYM_KEY"}
    return pipeline_toml(sinks=[blob_lake_entry(container), pseudonymised])


@pytest.mark.integration
async def test_a_pipeline_run_writes_the_expected_blobs_and_a_rerun_adds_none(container, write_config, monkeypatch):
    monkeypatch.setenv("TEST_PSEUDONYM_KEY", "k" * 32)
    loaded = write_config(lake_in_azurite(container.container_name))
    from pipeline.ingest.inputs import read_messages

    messages: list[Message] = list(read_messages([str(SAMPLES)]))
    async with Runner(loaded) as runner:
        report = await runner.process_batch(messages, flush=True)
        failures = [(e.sink, e.reason, e.detail) for e in await runner.dead_letter.list() if e.stage == "deliver"]
    assert report.delivered["lake"] == report.alerts == report.delivered["pseudonymised"] > 0, (report.delivered, failures)
    stored = blobs(container)
    full = {n: d for n, d in stored.items() if n.startswith("enriched/")}
    masked = {n: d for n, d in stored.items() if n.startswith("pseudonymised/")}
    records = [line for data in full.values() for line in lines(data)]
    assert sorted(r["record_id"] for r in records) == sorted(report.record_ids)
    for name, data in full.items():
        for line in lines(data):
            created = datetime.fromisoformat(line["alert"]["created_at"].replace("Z", "+00:00")).astimezone(UTC)
            assert f"/tenant={line['alert']['tenant_id']}/date={created:%Y-%m-%d}/hour={created:%H}/" in name
    raw = b"".join(gzip.decompress(d) for d in stored.values())
    assert not any(value.encode() in raw for value in MATCHED_VALUES)
    upns = {r["alert"]["user"]["upn"] for r in records if r["alert"].get("user") and r["alert"]["user"].get("upn")}
    assert "megan.bowen@contoso.com" in upns
    masked_text = b"".join(gzip.decompress(d) for d in masked.values())
    assert b"megan.bowen" not in masked_text.lower() and b"Megan Bowen" not in masked_text and b'"hmac:' in masked_text

    loaded = write_config(lake_in_azurite(container.container_name), name="again.toml")
    loaded.data_dir = loaded.data_dir.parent / "fresh-out"  # a re-run from scratch: same batch, new state
    async with Runner(loaded) as runner:
        await runner.process_batch(messages, flush=True)
    assert blobs(container).keys() == stored.keys()


@pytest.mark.integration
def test_the_cli_run_with_the_lake_in_azurite(container, tmp_path, monkeypatch):
    import os

    from tests.entrypoints.test_cli import run_cli, summary

    config = tmp_path / "azurite.toml"
    config.write_text(pipeline_toml(enrichers=[enricher_entry("sensitive_info")], sinks=[blob_lake_entry(container.container_name)]))
    assert os.environ["TEST_LAKE_CONNECTION"]  # set by the fixture; the subprocess inherits it
    result = run_cli("run", "--config", str(config), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    counts = summary(result.stdout)
    stored = blobs(container)
    records = [line for data in stored.values() for line in lines(data)]
    assert counts["delivered"] == f"lake={len(records)}" and len(records) == int(counts["alerts enriched"]) > 0
    assert {r["alert"]["source_format"] for r in records} == {"defender_streaming", "graph_alert", "management_activity", "sentinel_alert"}
    assert all(name.startswith("enriched/tenant=") and "/date=" in name and "/hour=" in name and name.endswith(".jsonl.gz") for name in stored)
    assert all(r["enrichments"]["sensitive_info"]["total_count"] >= 0 for r in records if r["alert"]["sensitive_info"])
