"""ServiceNow and Jira sinks against in-memory servers that follow the documented contracts: one
ticket per alert across redeliveries, revisions, throttling and lost responses."""

from __future__ import annotations

from datetime import UTC

import pytest

from pipeline.deliver.minimise import alert_key
from pipeline.errors import ConfigError
from pipeline.runner import Message, Runner
from tests.support.config import pipeline_toml, sink_entry
from tests.support.itsm_servers import Failure, adf_text, jira_sink, publish, snow_sink
from tests.support.records import make_record

# -- ServiceNow ---------------------------------------------------------------------------------


async def test_servicenow_creates_one_incident_with_mapped_fields_and_a_work_note(httpserver, snow):
    record = make_record("a-1", severity="high")
    (outcome,) = await publish(snow_sink(httpserver), [record])
    assert outcome.status == "delivered"
    (ticket,) = snow.tickets.values()
    assert ticket["correlation_id"] == alert_key(record) and ticket["correlation_display"] == "Purview DLP"
    assert ticket["short_description"].startswith("DLP high: DLP policy (Finance PII")
    assert (ticket["impact"], ticket["urgency"]) == ("1", "1")
    (note,) = snow.work_notes[ticket["sys_id"]]
    assert "Sensitive types: Credit Card Number x12" in note and "Triage: unbanded (score 72.5)" in note and record.record_id in note


async def test_servicenow_redelivery_and_revision_update_the_same_ticket(httpserver, snow):
    first = make_record("a-1")
    revised = make_record("a-1", severity="high", status="inProgress")  # same alert, new content
    assert revised.record_id != first.record_id and alert_key(revised) == alert_key(first)
    await publish(snow_sink(httpserver), [first])
    # A new process (no memory of the ticket) gets the same record again, then the revision.
    outcomes = await publish(snow_sink(httpserver), [first, revised, make_record("b-2")])
    assert [o.status for o in outcomes] == ["delivered"] * 3
    assert len(snow.tickets) == 2
    ticket = next(t for t in snow.tickets.values() if t["correlation_id"] == alert_key(first))
    assert ticket["impact"] == "1" and len(snow.work_notes[ticket["sys_id"]]) == 3
    assert [m for m, _, _ in snow.requests].count("POST") == 2


async def test_servicenow_429_with_retry_after_then_success(httpserver, snow):
    records = [make_record("a-1"), make_record("b-2")]
    snow.failures.append(Failure("GET", 429, {"Retry-After": "7"}))
    sink = snow_sink(httpserver)
    try:
        first = await sink.publish(records)
        assert [(o.status, o.retry_after) for o in first] == [("retryable", 7.0), ("retryable", 7.0)]
        assert len(snow.requests) == 1  # the second record is not sent into the throttled API
        second = await sink.publish(records)
    finally:
        await sink.aclose()
    assert [o.status for o in second] == ["delivered"] * 2 and len(snow.tickets) == 2


async def test_servicenow_lost_create_response_does_not_open_a_second_ticket(httpserver, snow):
    record = make_record("a-1")
    snow.failures.append(Failure("POST", 503, after_acting=True))  # created, but the client sees 503
    sink = snow_sink(httpserver)
    try:
        (first,) = await sink.publish([record])
        (second,) = await sink.publish([record])  # the router's retry
    finally:
        await sink.aclose()
    # The sink looks the key up again within the call: the ticket the lost create made is found.
    assert first.status == "delivered" and second.status == "delivered"
    assert len(snow.tickets) == 1 and [m for m, _, _ in snow.requests].count("POST") == 1


async def test_servicenow_retries_through_the_runner_and_rejects_4xx(httpserver, snow, write_config, fixture_bytes):
    config = pipeline_toml(
        delivery={"max_attempts": 3, "backoff_initial_seconds": 0.01, "budget_seconds": 5},
        sinks=[sink_entry("snow", "servicenow", {"instance_url": httpserver.url_for("/"), "username": "svc-dlp", "password_env": "TEST_SNOW_PASSWORD"})],
    )
    snow.failures.extend([Failure("GET", 429, {"Retry-After": "0"}), Failure("GET", 503)])
    async with Runner(write_config(config)) as runner:
        report = await runner.process_batch([Message(fixture_bytes("graph_alert_v2_dlp.json"))])
        again = await runner.process_batch([Message(fixture_bytes("graph_alert_v2_dlp.json"))])
        snow.failures.append(Failure("POST", 400))
        import json

        import orjson

        other = dict(json.loads(fixture_bytes("graph_alert_v2_dlp.json")), id="other-alert")
        rejected = await runner.process_batch([Message(orjson.dumps(other))])
        (entry,) = await runner.dead_letter.list()
    assert report.delivered == {"snow": 1} and again.delivered == {"snow": 1} and len(snow.tickets) == 1
    assert rejected.dead_lettered == {"deliver": 1} and entry.reason == "sink_rejected" and "HTTP 400" in entry.detail


async def test_servicenow_never_updates_a_ticket_that_lacks_the_key(httpserver, snow):
    await publish(snow_sink(httpserver), [make_record("other-alert")])
    (before,) = [dict(t) for t in snow.tickets.values()]
    snow.ignore_query = True  # the query is silently ignored: every ticket comes back
    (outcome,) = await publish(snow_sink(httpserver), [make_record("a-1", severity="high")])
    assert outcome.status == "rejected" and "ignored the correlation_id query" in outcome.reason
    assert list(snow.tickets.values()) == [before] and [m for m, _, _ in snow.requests].count("PATCH") == 0


async def test_concurrent_calls_for_one_alert_open_one_ticket(httpserver, snow, jira):
    import asyncio

    first, revised = make_record("a-1"), make_record("a-1", severity="high")
    for sink, tickets in ((snow_sink(httpserver), snow.tickets), (jira_sink(httpserver), jira.issues)):
        try:
            # Two Event Hub partitions' batches in one worker, both carrying the same new alert.
            results = await asyncio.gather(sink.publish([first]), sink.publish([revised]), sink.publish([first]))
        finally:
            await sink.aclose()
        assert all(o.status == "delivered" for r in results for o in r)
        assert len(tickets) == 1 and len(sink._locks) == 0


async def test_servicenow_update_keeps_create_only_fields(httpserver, snow):
    fields = {"short_description": "DLP {alert.severity}", "assignment_group": "Security Operations"}
    await publish(snow_sink(httpserver, field_map=fields), [make_record("a-1")])
    (ticket,) = snow.tickets.values()
    ticket["assignment_group"] = "Tier 2"  # a responder reassigns it
    await publish(snow_sink(httpserver, field_map=fields), [make_record("a-1", severity="high")])
    assert ticket["assignment_group"] == "Tier 2" and ticket["short_description"] == "DLP high"


async def test_a_ticket_deleted_meanwhile_is_recreated_once(httpserver, snow, jira):
    for sink, store in ((snow_sink(httpserver), snow.tickets), (jira_sink(httpserver), jira.issues)):
        try:
            await sink.publish([make_record("a-1")])
            store.clear()  # someone deleted the ticket the sink remembers
            (outcome,) = await sink.publish([make_record("a-1", severity="high")])
        finally:
            await sink.aclose()
        assert outcome.status == "delivered" and len(store) == 1


async def test_a_record_already_on_its_ticket_is_not_sent_again_by_the_same_process(httpserver, snow, jira):
    first, revised = make_record("a-1"), make_record("a-1", severity="high")
    for sink, server in ((snow_sink(httpserver), snow), (jira_sink(httpserver), jira)):
        try:
            await sink.publish([first])
            before = len(server.requests)
            assert [o.status for o in await sink.publish([first, first])] == ["delivered"] * 2  # a redelivered batch
            assert len(server.requests) == before
            await sink.publish([revised])
            assert len(server.requests) == before + 1  # the revision updates the known ticket directly
        finally:
            await sink.aclose()
    (ticket,) = snow.tickets.values()
    assert len(snow.work_notes[ticket["sys_id"]]) == 2


def test_ticket_memory_is_bounded():
    from pipeline.deliver.sinks.itsm import TicketMemory

    memory = TicketMemory(maxsize=3)
    for i in range(5):
        memory.remember(f"k{i}", f"t{i}", f"r{i}")
    assert len(memory) == 3 and memory.ticket("k0") is None and memory.ticket("k4") == "t4" and memory.delivered("k4", "r4")


async def test_servicenow_oauth_client_credentials(httpserver, snow):
    sink = snow_sink(httpserver, auth="oauth", client_id="cid", client_secret_env="TEST_SNOW_SECRET", username=None, password_env=None)
    outcomes = await publish(sink, [make_record("a-1"), make_record("b-2")])
    assert [o.status for o in outcomes] == ["delivered"] * 2
    assert snow.tokens_issued == 1 and len(snow.tickets) == 2


async def test_servicenow_wrong_password_is_rejected_not_retried(httpserver, snow, monkeypatch):
    monkeypatch.setenv("TEST_SNOW_PASSWORD", "wrong")
    (outcome,) = await publish(snow_sink(httpserver), [make_record("a-1")])
    assert outcome.status == "rejected" and "HTTP 401" in outcome.reason and not snow.tickets


def test_servicenow_secrets_come_from_the_environment_only(write_config, monkeypatch):
    monkeypatch.delenv("TEST_SNOW_PASSWORD", raising=False)
    base = '[[sinks]]\nname = "snow"\nkind = "servicenow"\n[sinks.settings]\ninstance_url = "https://x.service-now.com"\nusername = "u"\n'
    with pytest.raises(ConfigError, match="TEST_SNOW_PASSWORD is not set"):
        Runner(write_config(base + 'password_env = "TEST_SNOW_PASSWORD"\n'))
    with pytest.raises(ConfigError, match=r"sinks\[0\].settings.password'"):  # unknown key (or refused as a secret)
        Runner(write_config(base + 'password_env = "X"\npassword = "literal"\n'))
    with pytest.raises(ConfigError, match="https"):
        monkeypatch.setenv("TEST_SNOW_PASSWORD", "pw")
        Runner(write_config(base.replace("https://x.service-now.com", "http://x.service-now.com") + 'password_env = "TEST_SNOW_PASSWORD"\n'))


# -- Jira ---------------------------------------------------------------------------------------


async def test_jira_creates_an_issue_with_adf_description_and_the_key_label(httpserver, jira):
    record = make_record("a-1")
    (outcome,) = await publish(jira_sink(httpserver, priority_map={"medium": "Medium"}), [record])
    assert outcome.status == "delivered"
    ((key, issue),) = jira.issues.items()
    fields = issue["fields"]
    assert key == "SEC-1" and fields["labels"] == ["dlp", alert_key(record)] and fields["issuetype"] == {"name": "Task"}
    assert fields["priority"] == {"name": "Medium"} and fields["summary"].startswith("DLP medium: DLP policy")
    text = adf_text(fields["description"])
    assert "Sensitive types: Credit Card Number x12" in text and record.record_id in text


async def test_jira_redelivery_and_revision_update_the_same_issue(httpserver, jira):
    first, revised = make_record("a-1"), make_record("a-1", severity="high")
    await publish(jira_sink(httpserver), [first])
    outcomes = await publish(jira_sink(httpserver), [first, revised])  # a new process: found by JQL
    assert [o.status for o in outcomes] == ["delivered"] * 2
    ((_, issue),) = jira.issues.items()
    assert issue["fields"]["summary"].startswith("DLP high:")
    assert [m for m, p, _ in jira.requests if p == "/rest/api/3/issue"].count("POST") == 1


async def test_jira_search_index_lag_does_not_open_a_second_issue(httpserver, jira):
    jira.index_lag = True  # a new issue is not searchable yet
    first, revised = make_record("a-1"), make_record("a-1", severity="high")
    sink = jira_sink(httpserver)
    try:
        assert (await sink.publish([first]))[0].status == "delivered"
        assert [o.status for o in await sink.publish([revised, first])] == ["delivered"] * 2
    finally:
        await sink.aclose()
    assert len(jira.issues) == 1


async def test_jira_429_with_retry_after_then_success_and_lost_create_response(httpserver, jira):
    record = make_record("a-1")
    jira.failures.extend([
        Failure("POST", 429, {"Retry-After": "3"}, path="/rest/api/3/search/jql"),
        Failure("POST", 502, path="/rest/api/3/issue"),
        Failure("POST", 503, after_acting=True, path="/rest/api/3/issue"),  # the create happens, its answer is lost
    ])
    sink = jira_sink(httpserver)
    try:
        results = [(await sink.publish([record]))[0] for _ in range(2)]
    finally:
        await sink.aclose()
    # The 429 asks for longer than the sink waits within a call: the router retries. Within the
    # second call the 502 and the lost create are tried again, the lost one found by its label.
    assert [(o.status, o.retry_after) for o in results] == [("retryable", 3.0), ("delivered", None)]
    assert len(jira.issues) == 1 and [m for m, p, _ in jira.requests if p == "/rest/api/3/issue"].count("POST") == 2


async def test_retry_after_as_an_http_date(httpserver, jira):
    from datetime import datetime, timedelta
    from email.utils import format_datetime

    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    jira.failures.append(Failure("POST", 503, {"Retry-After": when}, path="/rest/api/3/search/jql"))
    (outcome,) = await publish(jira_sink(httpserver), [make_record("a-1")])
    assert outcome.status == "retryable" and 25 <= outcome.retry_after <= 31


async def test_jira_rejects_a_bad_request(httpserver, jira):
    (outcome,) = await publish(jira_sink(httpserver, project_key="OPS"), [make_record("a-1")])
    assert outcome.status == "rejected" and "HTTP 400" in outcome.reason and not jira.issues


async def test_logs_above_debug_carry_no_payload(httpserver, snow, jira, caplog):
    import logging

    caplog.set_level(logging.INFO)
    record = make_record("a-1")
    snow.failures.extend([Failure("POST", 400), Failure("GET", 503)])
    jira.failures.append(Failure("POST", 400, path="/rest/api/3/issue"))
    for sink in (snow_sink(httpserver), jira_sink(httpserver)):
        await publish(sink, [record])
        await publish(sink, [record])
    await publish(snow_sink(httpserver), [record])  # and a success
    assert "not delivered" in caplog.text and "HTTP 400" in caplog.text
    for value in ("megan", "Megan", "Q1-payroll", "Finance PII", "Credit Card", record.alert.title):
        assert value not in caplog.text, value
