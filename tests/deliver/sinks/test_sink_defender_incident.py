"""defender_incident against an in-memory Graph security v1.0 server that follows the documented
contract: customTags replaced by a PATCH (so others' tags must be read and kept), comments appended
with no idempotency key, 429 with Retry-After, 403 without the permission, 404 for an unknown incident."""

from __future__ import annotations

import pytest

from pipeline.deliver.sinks.defender_incident import DefenderIncidentSink
from tests.support.alerts import StaticCredential
from tests.support.enriched import rich_record
from tests.support.incident_servers import GraphSecurity
from tests.support.itsm_servers import Failure
from tests.support.records import make_record


@pytest.fixture
def graph(httpserver):
    server = GraphSecurity()
    server.install(httpserver)
    server.add_incident("48213", tags=["Analyst:keep-me"])
    return server


def sink(httpserver, **settings) -> DefenderIncidentSink:
    return DefenderIncidentSink(DefenderIncidentSink.Settings(graph_url=httpserver.url_for("/v1.0"), timeout_seconds=5, **settings), None, credential=StaticCredential())


async def publish(sink_, records):
    try:
        return await sink_.publish(records)
    finally:
        await sink_.aclose()


async def test_tags_are_merged_with_others_and_one_comment_carries_the_summary(httpserver, graph):
    record = rich_record()
    (outcome,) = await publish(sink(httpserver), [record])
    assert outcome.status == "delivered", outcome
    incident = graph.incidents["48213"]
    assert incident["customTags"] == ["Analyst:keep-me", "DLP:triage-high", "DLP:departing-user"]
    (comment,) = incident["comments"]
    text = comment["comment"]
    assert "Triage: high (score 85" in text and "department: Human Resources" in text and "Prior incidents: 1 in 7 days" in text
    assert text.endswith(f"[dlp-pipeline record {record.record_id}]")


async def test_redelivery_in_a_new_process_writes_nothing_and_a_revision_adds_one_comment(httpserver, graph):
    record = rich_record()
    await publish(sink(httpserver), [record])
    writes = len(graph.writes)
    outcomes = await publish(sink(httpserver), [record, record])  # a restart: nothing remembered
    assert [o.status for o in outcomes] == ["delivered", "delivered"]
    assert len(graph.writes) == writes and len(graph.incidents["48213"]["comments"]) == 1
    revised = rich_record(severity="high")
    await publish(sink(httpserver), [revised])
    assert len(graph.incidents["48213"]["comments"]) == 2  # one per alert revision
    assert graph.incidents["48213"]["customTags"].count("DLP:triage-high") == 1


async def test_a_tag_an_analyst_adds_between_runs_is_kept(httpserver, graph):
    await publish(sink(httpserver), [rich_record()])
    graph.incidents["48213"]["customTags"].append("Analyst:escalated")
    await publish(sink(httpserver), [rich_record(severity="high")])
    assert graph.incidents["48213"]["customTags"] == ["Analyst:keep-me", "DLP:triage-high", "DLP:departing-user", "Analyst:escalated"]


async def test_throttling_is_retryable_with_retry_after_and_the_rest_of_the_batch_waits(httpserver, graph):
    graph.failures.append(Failure("GET", 429, {"Retry-After": "7"}))
    outcomes = await publish(sink(httpserver), [rich_record("r-1"), rich_record("r-2")])
    assert [(o.status, o.retry_after) for o in outcomes] == [("retryable", 7.0), ("retryable", 7.0)]
    assert graph.writes == []


async def test_missing_permission_is_rejected_naming_it(httpserver, graph):
    graph.granted = False
    (outcome,) = await publish(sink(httpserver), [rich_record()])
    assert outcome.status == "rejected" and "SecurityIncident.ReadWrite.All" in outcome.reason and "docs/deploy.md" in outcome.reason


async def test_unknown_incident_is_rejected(httpserver, graph):
    (outcome,) = await publish(sink(httpserver), [rich_record(incident_id="99999")])
    assert outcome.status == "rejected" and "404" in outcome.reason


async def test_a_streaming_row_finds_its_incident_through_alerts_v2_once(httpserver, graph):
    graph.alerts["dl-stream-1"] = {"id": "dl-stream-1", "incidentId": "48213"}
    first = make_record("dl-stream-1", incident_id=None, enrichments={"triage": {"score": 50, "band": "medium"}})
    second = make_record("dl-stream-1", incident_id=None, severity="high", enrichments={"triage": {"score": 50, "band": "medium"}})
    outcomes = await publish(sink(httpserver), [first, second])
    assert [o.status for o in outcomes] == ["delivered", "delivered"]
    assert [p for m, p, _ in graph.requests if "alerts_v2" in p] == ["/v1.0/security/alerts_v2/dl-stream-1"]
    assert "DLP:triage-medium" in graph.incidents["48213"]["customTags"] and len(graph.incidents["48213"]["comments"]) == 2
    (outcome,) = await publish(sink(httpserver), [make_record("dl-unknown", incident_id=None)])
    assert outcome.status == "rejected" and "404" in outcome.reason


async def test_update_rules_set_the_incident_fields_of_the_matching_band(httpserver, graph):
    rules = [{"when_band": ["high"], "assigned_to": "soc-dlp@contoso.com", "status": "inProgress"}, {"classification": "informationalExpectedActivity"}]
    await publish(sink(httpserver, updates=rules), [rich_record()])
    incident = graph.incidents["48213"]
    assert (incident["assignedTo"], incident["status"], incident["classification"]) == ("soc-dlp@contoso.com", "inProgress", "unknown")


async def test_a_long_summary_is_cut_but_keeps_its_marker(httpserver, graph):
    record = rich_record()
    await publish(sink(httpserver, max_comment_chars=300), [record])
    (comment,) = graph.incidents["48213"]["comments"]
    assert len(comment["comment"]) <= 300 and comment["comment"].endswith(f"[dlp-pipeline record {record.record_id}]")
    await publish(sink(httpserver, max_comment_chars=300), [record])
    assert len(graph.incidents["48213"]["comments"]) == 1


async def test_a_comment_whose_answer_was_lost_is_not_posted_again(httpserver, graph):
    record = rich_record()
    graph.failures.append(Failure("POST", 504, after_acting=True))  # Graph wrote the comment, the answer never came
    (outcome,) = await publish(sink(httpserver), [record])  # the call tries again, starting over with the read
    assert outcome.status == "delivered" and len(graph.incidents["48213"]["comments"]) == 1
    (outcome,) = await publish(sink(httpserver), [record])  # a redelivery of the batch
    assert outcome.status == "delivered" and len(graph.incidents["48213"]["comments"]) == 1


async def test_an_undone_match_reaches_its_incident_as_a_new_comment_saying_so(httpserver, graph):
    """Issue 17: the incident write-back sees a lifecycle update (here: the DLP action was undone)."""
    from pipeline.models import Lifecycle

    matched = rich_record()
    undone = rich_record(lifecycle=Lifecycle(state="undone"))
    assert undone.record_id != matched.record_id  # a revision of the same alert
    outcomes = await publish(sink(httpserver), [matched, undone])
    assert [o.status for o in outcomes] == ["delivered", "delivered"]
    first, second = (c["comment"] for c in graph.incidents["48213"]["comments"])
    assert "DLP lifecycle" not in first and "DLP lifecycle: undone" in second  # a Graph alert has no lifecycle of its own


async def test_an_incident_read_answered_with_a_cut_short_body_is_tried_again_not_dead_lettered(httpserver, graph):
    """Issue 18's rule for every ticket-like sink: an answer that is not the documented shape is
    retryable, never a rejection (it was read with .json() and dead-lettered as a decode error)."""
    graph.failures.append(Failure("GET", 200, shape="cut_short", path="/v1.0/security/incidents/48213"))
    (outcome,) = await publish(sink(httpserver), [rich_record()])
    assert outcome.status == "delivered", outcome
    assert len(graph.incidents["48213"]["comments"]) == 1
