"""Routing and minimisation: per-sink `when`, field projection and keyed pseudonymisation, through
the runner with real sinks (ServiceNow contract server, blob lake in Azurite)."""

from __future__ import annotations

import gzip
import json
import uuid

import orjson
import pytest
from azure.storage.blob import BlobServiceClient

from pipeline.config import PseudonymiseSettings
from pipeline.deliver.minimise import Minimiser, alert_key
from pipeline.errors import ConfigError
from pipeline.runner import Message, Runner
from tests.support.config import LAKE, blob_lake_entry, pipeline_toml, sink_entry
from tests.support.itsm_servers import ServiceNow
from tests.support.records import make_record

ITSM_FIELDS = ["alert.alert_id", "alert.title", "alert.severity", "alert.policy_name", "alert.files.name", "alert.sensitive_info", "enrichments.triage.score"]


def test_projection_keeps_only_allowed_paths_across_lists_and_always_the_record_id():
    record = make_record("a-1")
    projected = Minimiser(ITSM_FIELDS, None).apply(record).to_dict()
    assert projected == {
        "record_id": record.record_id,
        "alert": {
            "alert_id": "a-1",
            "title": record.alert.title,
            "severity": "medium",
            "policy_name": "Finance PII",
            "files": [{"name": "Q1-payroll-export.xlsx"}],
            "sensitive_info": [s.model_dump(mode="json") for s in record.alert.sensitive_info],
        },
        "enrichments": {"triage": {"score": 72.5}},
    }


def test_pseudonyms_are_keyed_stable_and_cover_paths():
    record = make_record("a-1")
    settings = PseudonymiseSettings(key_env="K")
    one = Minimiser(None, settings, environ={"K": "a" * 32}).apply(record).to_dict()
    again = Minimiser(None, settings, environ={"K": "a" * 32}).apply(make_record("b-2")).to_dict()
    other_key = Minimiser(None, settings, environ={"K": "b" * 32}).apply(record).to_dict()
    user = one["alert"]["user"]
    assert user["upn"].startswith("hmac:") and user["upn"] == again["alert"]["user"]["upn"] != other_key["alert"]["user"]["upn"]
    assert user["display_name"].startswith("hmac:") and user["object_id"].startswith("hmac:")
    assert one["alert"]["files"][0]["path"].startswith("hmac:") and one["alert"]["files"][0]["name"] == "Q1-payroll-export.xlsx"
    assert "megan" not in json.dumps(one).lower()
    assert one["alert"]["title"] == record.alert.title and one["record_id"] == record.record_id
    with pytest.raises(ValueError, match="not set"):
        Minimiser(None, settings, environ={})
    with pytest.raises(ValueError, match="shorter than 16"):
        Minimiser(None, settings, environ={"K": "short"})


def test_a_missing_pseudonym_key_fails_at_start_naming_the_key(write_config, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    config = '[[sinks]]\nname = "lake"\nkind = "jsonl"\npseudonymise = { key_env = "NO_SUCH_KEY_VAR" }\n'
    with pytest.raises(ConfigError) as caught:
        Runner(write_config(config))
    assert "sinks[0].pseudonymise.key_env" in str(caught.value) and "NO_SUCH_KEY_VAR is not set" in str(caught.value)


def config(container: str, url: str) -> str:
    """Everything to the Blob lake in `container`; high-severity alerts, only `ITSM_FIELDS` of them, to ServiceNow at `url`."""
    snow = sink_entry(
        "snow", "servicenow", {"instance_url": url, "username": "svc-dlp", "password_env": "TEST_SNOW_PASSWORD"},
        fields=ITSM_FIELDS, when={"severity_at_least": "high"},
    )
    return pipeline_toml(sinks=[blob_lake_entry(container), snow])


@pytest.mark.integration
async def test_itsm_ticket_carries_only_the_allow_list_while_the_lake_keeps_everything(azurite, httpserver, write_config, fixture_bytes, monkeypatch):
    monkeypatch.setenv("TEST_LAKE_CONNECTION", azurite.connection_string)
    monkeypatch.setenv("TEST_SNOW_PASSWORD", "pw-test")
    snow = ServiceNow()
    snow.install(httpserver)
    container = f"route-{uuid.uuid4().hex[:10]}"
    loaded = write_config(config(container, httpserver.url_for("/")))
    graph = json.loads(fixture_bytes("graph_alert_v2_dlp.json"))
    high = dict(graph, id="high-one", severity="high")
    low = dict(graph, id="low-one", severity="low")
    async with Runner(loaded) as runner:
        report = await runner.process_batch([Message(orjson.dumps([high, low]))])
    assert report.delivered == {"lake": 2, "snow": 1}

    (ticket,) = snow.tickets.values()
    (note,) = snow.work_notes[ticket["sys_id"]]
    sent = json.dumps([body for _, _, body in snow.requests if body])
    assert "high-one" in sent and "Q1-payroll-export.xlsx" in sent and "Credit Card Number" in sent
    for absent in ("megan.bowen", "Megan Bowen", "aaaaaaaa-bbbb", "Payroll", "security.microsoft.com", "Workload: SharePoint"):
        assert absent not in sent, absent  # user, path, links and workload are outside the allow-list
    assert "User:" not in note and "Triage:" not in note  # no triage enricher ran: nothing to show
    assert ticket["correlation_id"].startswith("dlp-")

    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    try:
        client = service.get_container_client(container)
        lines = [json.loads(line) for blob in client.list_blobs() for line in gzip.decompress(client.download_blob(blob.name).readall()).splitlines()]
        service.delete_container(container)
    finally:
        service.close()
    by_id = {line["alert"]["alert_id"]: line for line in lines}
    assert set(by_id) == {"high-one", "low-one"}
    assert by_id["high-one"]["alert"]["user"]["upn"] == "megan.bowen@contoso.com"
    assert by_id["high-one"]["alert"]["files"][0]["path"].endswith("Payroll")
    assert ticket["correlation_id"] == alert_key(make_record("high-one"))  # keyed by the alert, computed before projection


def test_the_azure_example_config_builds_every_sink(monkeypatch, tmp_path):
    from pipeline.config import load_config
    from tests.support.paths import ROOT

    env = {
        "DLP_SENTINEL_DCE_ENDPOINT": "https://dcr-x.westeurope-1.ingest.monitor.azure.com",
        "DLP_SENTINEL_DCR_IMMUTABLE_ID": "dcr-00000000000000000000000000000000",
        "DLP_STORAGE_BLOB_URL": "https://account.blob.core.windows.net",
        "LAKE_PSEUDONYM_KEY": "k" * 32,
        "SNOW_INSTANCE_URL": "https://example.service-now.com",
        "SNOW_CLIENT_ID": "cid",
        "SNOW_CLIENT_SECRET": "secret-from-key-vault",
        "JIRA_SITE_URL": "https://example.atlassian.net",
        "JIRA_EMAIL": "dlp-bot@example.com",
        "JIRA_API_TOKEN": "token-from-key-vault",
        "FANOUT_EVENTHUB_NAMESPACE": "example.servicebus.windows.net",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    loaded = load_config(ROOT / "pipeline" / "samples" / "azure.toml", data_dir=tmp_path)
    runner = Runner(loaded)
    try:
        kinds = {entry.name: type(getattr(sink, "inner", sink)).__name__ for entry, sink in runner.sinks}
    finally:
        import asyncio

        asyncio.run(runner.aclose())
    assert kinds == {
        "sentinel": "SentinelSink", "lake": "BlobLakeSink", "lake-pseudonymised": "BlobLakeSink",
        "servicenow": "ServiceNowSink", "jira": "JiraSink", "fanout": "EventHubSink",
    }
    text = (ROOT / "pipeline" / "samples" / "azure.toml").read_text()
    for secret in ("secret-from-key-vault", "token-from-key-vault"):
        assert secret not in text


def test_a_typo_in_an_allow_list_fails_at_start(write_config):
    config = '[[sinks]]\nname = "lake"\nkind = "jsonl"\nfields = ["alert.alert_id", "alert.severty"]\n'
    with pytest.raises(ConfigError) as caught:
        Runner(write_config(config))
    assert "key 'sinks[0].fields'" in str(caught.value) and "alert has no field 'severty'" in str(caught.value)


async def test_the_local_jsonl_lake_can_be_minimised_too(write_config, fixture_bytes, monkeypatch):
    monkeypatch.setenv("TEST_PSEUDONYM_KEY", "k" * 32)
    fields = ["alert.alert_id", "alert.tenant_id", "alert.created_at", "alert.user", "alert.severity"]
    lake = {**LAKE, "fields": fields, "pseudonymise": {"key_env": "TEST_PSEUDONYM_KEY"}}
    async with Runner(write_config(pipeline_toml(sinks=[lake]))) as runner:
        report = await runner.process_batch([Message(fixture_bytes("graph_alert_v2_dlp.json"))])
        (path,) = runner.loaded.data_path("lake").rglob("*.jsonl")
    (line,) = [json.loads(text) for text in path.read_text().splitlines()]
    assert report.delivered == {"lake": 1} and not report.dead_lettered
    assert set(line) == {"record_id", "alert"} and set(line["alert"]) == {"alert_id", "tenant_id", "created_at", "user", "severity"}
    assert line["alert"]["user"]["upn"].startswith("hmac:")
    assert "date=2025-03-14" in str(path) and f"tenant={line['alert']['tenant_id']}" in str(path)
