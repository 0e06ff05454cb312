"""Fault injection with the real ITSM and lake sinks together (issue: delivery guarantees).

ServiceNow and Jira (in-memory servers that follow their contracts) and the Blob lake (Azurite) fail
the ways a real outage looks — 429 with Retry-After, 5xx, and responses lost after the server acted —
then the same batch is redelivered (the Functions host re-runs it before the checkpoint moves) and
re-run from scratch with the local state gone. Every alert must be delivered or dead-lettered, each
alert must have exactly one ServiceNow ticket and one Jira issue, and no lake blob is written twice.
"""

from __future__ import annotations

import uuid

import pytest
from azure.storage.blob import ContainerClient

from pipeline.ingest.inputs import read_messages
from pipeline.runner import Runner
from tests.support.config import enricher_entry, pipeline_toml, sink_entry
from tests.support.itsm_servers import Failure, Jira, ServiceNow
from tests.support.paths import SAMPLES

pytestmark = pytest.mark.integration

def config(base: str, container: str) -> str:
    """ServiceNow and Jira at `base`, the Blob lake in `container`; ten fast attempts per record."""
    return pipeline_toml(
        delivery={"max_attempts": 10, "backoff_initial_seconds": 0.01, "backoff_max_seconds": 0.02, "budget_seconds": 10},
        enrichers=[enricher_entry("sensitive_info")],
        sinks=[
            sink_entry("snow", "servicenow", {"instance_url": base, "username": "svc-dlp", "password_env": "TEST_SNOW_PASSWORD", "timeout_seconds": 5}),
            sink_entry("jira", "jira", {"site_url": base, "email": "dlp-bot@contoso.com", "api_token_env": "TEST_JIRA_TOKEN", "project_key": "SEC", "timeout_seconds": 5}),
            sink_entry("lake", "blob", {"connection_string_env": "TEST_LAKE_CONNECTION", "container": container, "create_container": True}),
        ],
    )


@pytest.fixture
def services(httpserver, azurite, monkeypatch):
    monkeypatch.setenv("TEST_SNOW_PASSWORD", "pw-test")
    monkeypatch.setenv("TEST_JIRA_TOKEN", "jira-token-test")
    monkeypatch.setenv("TEST_LAKE_CONNECTION", azurite.connection_string)
    snow, jira = ServiceNow(), Jira()
    snow.install(httpserver)
    jira.install(httpserver)
    container = ContainerClient.from_connection_string(azurite.connection_string, f"faults-{uuid.uuid4().hex[:12]}")
    return snow, jira, container


def blob_names(container: ContainerClient) -> list[str]:
    return sorted(blob.name for blob in container.list_blobs())


async def test_outages_redelivery_and_a_rerun_lose_nothing_and_duplicate_nothing(httpserver, services, write_config, tmp_path):
    snow, jira, container = services
    text = config(httpserver.url_for("/").rstrip("/"), container.container_name)
    messages = list(read_messages([str(SAMPLES)]))
    snow.failures.extend([
        Failure("GET", 429, {"Retry-After": "0"}),
        Failure("POST", 500, after_acting=True),  # the incident is created, the response is lost
        Failure("GET", 503),
        Failure("PATCH", 502, after_acting=True),
    ])
    jira.failures.extend([
        Failure("POST", 429, {"Retry-After": "0"}),
        Failure("POST", 502, after_acting=True),  # the issue is created, the response is lost
        Failure("PUT", 500),
    ])

    async with Runner(write_config(text)) as runner:
        first = await runner.process_batch(messages, flush=True)
        assert first.alerts > 0 and not first.dead_lettered.get("deliver")
        assert first.delivered == {"snow": first.alerts, "jira": first.alerts, "lake": first.alerts}  # nothing lost
        tickets, issues, blobs = dict(snow.tickets), dict(jira.issues), blob_names(container)
        alert_keys = {ticket["correlation_id"] for ticket in tickets.values()}
        assert len(tickets) == len(alert_keys) == first.alerts and len(issues) == first.alerts  # one ticket per alert
        assert blobs

        redelivered = await runner.process_batch(messages, flush=True)  # the host re-runs the batch
    assert redelivered.delivered.get("snow", 0) == redelivered.alerts
    assert len(snow.tickets) == len(tickets) and len(jira.issues) == len(issues) and blob_names(container) == blobs

    rerun_config = write_config(text, name="rerun.toml")
    rerun_config.data_dir = tmp_path / "state-lost"  # a re-run from scratch: no local state survived
    snow.failures.append(Failure("POST", 503))
    jira.failures.append(Failure("GET", 500))
    async with Runner(rerun_config) as runner:
        rerun = await runner.process_batch(messages, flush=True)
    assert rerun.delivered == first.delivered and not rerun.dead_lettered.get("deliver")
    assert len(snow.tickets) == len(tickets) and len(jira.issues) == len(issues)  # updated, never opened twice
    assert blob_names(container) == blobs  # same deterministic names, conditional create: nothing written twice
    assert {t["correlation_id"] for t in snow.tickets.values()} == alert_keys
