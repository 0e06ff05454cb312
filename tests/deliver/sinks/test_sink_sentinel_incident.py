"""sentinel_incident against an in-memory Microsoft.SecurityInsights (2025-09-01) server that follows
the documented contract: PUT of the whole incident with its etag (409 when stale), labels replaced by
what is sent, comments upserted by the id the caller picks, 30,000 characters and 100 comments at most."""

from __future__ import annotations

import pytest

from pipeline.deliver.sinks.sentinel_incident import SentinelIncidentSink
from pipeline.deliver.sinks.writeback import comment_id
from tests.support.alerts import StaticCredential
from tests.support.enriched import rich_record
from tests.support.incident_servers import GraphSecurity, SentinelIncidents
from tests.support.itsm_servers import Failure
from tests.support.records import make_record

WORKSPACE = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-sec/providers/Microsoft.OperationalInsights/workspaces/law-sec"


@pytest.fixture
def sentinel(httpserver):
    server = SentinelIncidents(WORKSPACE)
    server.install(httpserver)
    server.add_incident("48213", labels=["Analyst:keep-me"])
    server.add_incident("777", provider="Azure Sentinel")  # not a mirrored Defender incident
    return server


def sink(httpserver, **settings) -> SentinelIncidentSink:
    values = {"workspace_resource_id": WORKSPACE, "arm_url": httpserver.url_for("/").rstrip("/"), "graph_url": httpserver.url_for("/v1.0"), "timeout_seconds": 5, **settings}
    return SentinelIncidentSink(SentinelIncidentSink.Settings(**values), None, credential=StaticCredential())


async def publish(sink_, records):
    try:
        return await sink_.publish(records)
    finally:
        await sink_.aclose()


def labels(incident) -> list[str]:
    return [label["labelName"] for label in incident["properties"]["labels"]]


async def test_labels_are_merged_and_the_comment_is_written_under_the_record_id(httpserver, sentinel):
    record = rich_record()
    (outcome,) = await publish(sink(httpserver), [record])
    assert outcome.status == "delivered", outcome
    incident = sentinel.by_provider_id("48213")
    assert labels(incident) == ["Analyst:keep-me", "DLP:triage-high", "DLP:departing-user"]
    assert incident["properties"]["title"] == "DLP incident 48213" and incident["properties"]["severity"] == "Medium"
    (comment,) = sentinel.comments[incident["name"]].values()
    assert comment["name"] == comment_id(record.record_id)
    assert "Triage: high (score 85" in comment["properties"]["message"]


async def test_a_rerun_writes_nothing_and_a_revision_adds_its_own_comment(httpserver, sentinel):
    record = rich_record()
    await publish(sink(httpserver), [record])
    writes = len(sentinel.writes)
    await publish(sink(httpserver), [record])  # a new process
    assert len(sentinel.writes) == writes
    await publish(sink(httpserver), [rich_record(severity="high")])
    assert len(sentinel.comments[sentinel.by_provider_id("48213")["name"]]) == 2


async def test_a_stale_etag_is_answered_by_reading_again_and_merging(httpserver, sentinel):
    sentinel.concurrent_label = "Analyst:escalated"  # an analyst labels the incident between our read and our write
    (outcome,) = await publish(sink(httpserver), [rich_record()])
    assert outcome.status == "delivered"
    assert labels(sentinel.by_provider_id("48213")) == ["Analyst:keep-me", "Analyst:escalated", "DLP:triage-high", "DLP:departing-user"]
    puts = [body for method, path, body in sentinel.requests if method == "PUT" and "/comments/" not in path]
    assert len(puts) == 2 and puts[0]["etag"] != puts[1]["etag"]


async def test_a_comment_written_whose_answer_was_lost_is_updated_not_doubled(httpserver, sentinel):
    record = rich_record()
    name = sentinel.by_provider_id("48213")["name"]
    sentinel.failures.append(Failure("GET", 503, path=f"{sentinel.prefix}/{name}/comments"))
    (outcome,) = await publish(sink(httpserver), [record])  # the call tries again after the 503
    assert outcome.status == "delivered" and len(sentinel.comments[name]) == 1
    sentinel.comments[name][comment_id(record.record_id)] = {"name": comment_id(record.record_id), "properties": {"message": "an older text"}}
    (outcome,) = await publish(sink(httpserver), [record])
    assert outcome.status == "delivered"
    (comment,) = sentinel.comments[name].values()
    assert "Triage: high" in comment["properties"]["message"]


async def test_the_comment_limits_are_respected(httpserver, sentinel):
    name = sentinel.by_provider_id("48213")["name"]
    await publish(sink(httpserver, max_comment_chars=30_000, summary={"extra_lines": ["{alert.title}"] * 400}), [rich_record()])
    (comment,) = sentinel.comments[name].values()
    assert len(comment["properties"]["message"]) <= 30_000
    for n in range(99):
        sentinel.comments[name][f"c{n}"] = {"name": f"c{n}", "properties": {"message": "analyst note"}}
    (outcome,) = await publish(sink(httpserver), [rich_record(severity="high")])
    assert outcome.status == "delivered" and len(sentinel.comments[name]) == 100


async def test_throttling_forbidden_and_unknown(httpserver, sentinel):
    sentinel.failures.append(Failure("GET", 429, {"Retry-After": "12"}))
    (outcome,) = await publish(sink(httpserver), [rich_record()])
    assert (outcome.status, outcome.retry_after) == ("retryable", 12.0)
    sentinel.granted = False
    (outcome,) = await publish(sink(httpserver), [rich_record()])
    assert outcome.status == "rejected" and "Microsoft Sentinel Responder" in outcome.reason
    sentinel.granted = True
    (outcome,) = await publish(sink(httpserver), [rich_record(incident_id="777")])  # only a non-Defender incident has that id
    assert outcome.status == "retryable" and "no Sentinel incident mirrors" in outcome.reason


async def test_a_list_that_ignores_the_filter_is_checked_not_trusted(httpserver, sentinel):
    sentinel.ignore_filter = True
    sentinel.add_incident("11111")
    (outcome,) = await publish(sink(httpserver), [rich_record()])
    assert outcome.status == "delivered"
    assert labels(sentinel.by_provider_id("11111")) == [] and "DLP:triage-high" in labels(sentinel.by_provider_id("48213"))


async def test_a_streaming_row_is_mapped_through_graph(httpserver, sentinel):
    graph = GraphSecurity()
    graph.install(httpserver)
    graph.alerts["dl-stream-1"] = {"id": "dl-stream-1", "incidentId": "48213"}
    (outcome,) = await publish(sink(httpserver), [make_record("dl-stream-1", incident_id=None, enrichments={"triage": {"score": 50, "band": "medium"}})])
    assert outcome.status == "delivered" and "DLP:triage-medium" in labels(sentinel.by_provider_id("48213"))
