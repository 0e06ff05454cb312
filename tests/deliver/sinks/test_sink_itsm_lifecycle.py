"""ITSM tickets follow the DLP lifecycle: one ticket per match, updated by each event; a setting
decides whether an undone match closes its ticket (ServiceNow, against the in-memory Table API)."""

from __future__ import annotations

import json
from pathlib import Path

import orjson

from pipeline.runner import Message, Runner
from tests.support.config import pipeline_toml
from tests.support.itsm_servers import adf_text, jira_entry, snow_entry

LIFECYCLE = Path(__file__).resolve().parents[2] / "fixtures" / "lifecycle"
EVENTS = ("spo_rule_match_two_rules.json", "spo_info_false_positive.json", "spo_rule_undo_override.json")






async def deliver_events(write_config, httpserver, entry=None, *, events=EVENTS, **settings) -> None:
    entry = entry or snow_entry(httpserver, **settings)
    async with Runner(write_config(pipeline_toml(sinks=[entry]))) as runner:
        for name in events:
            await runner.process_batch([Message(orjson.dumps(json.loads((LIFECYCLE / name).read_text())))])


async def test_each_event_updates_the_one_ticket_of_its_match(write_config, httpserver, snow):
    await deliver_events(write_config, httpserver)
    (ticket,) = snow.tickets.values()
    notes = snow.work_notes[ticket["sys_id"]]
    assert len(notes) == 3
    assert [line for note in notes for line in note.splitlines() if line.startswith("DLP lifecycle:")] == [
        "DLP lifecycle: matched", "DLP lifecycle: reported false positive", "DLP lifecycle: undone",
    ]
    assert "Rules matched: High volume of credit card numbers (high), Mid volume of credit card numbers (medium)" in notes[0]
    assert ticket["state"] == "1"  # undone does not close a ticket unless the setting says so


async def test_an_undone_match_closes_its_ticket_when_the_setting_says_so(write_config, httpserver, snow):
    await deliver_events(write_config, httpserver, close_when_undone=True)
    (ticket,) = snow.tickets.values()
    assert ticket["state"] == "6" and ticket["close_code"] == "Resolved by request"
    assert ticket["close_notes"] == "The DLP policy action was undone (Override)."
    closing = [body for method, _, body in snow.requests if method in ("POST", "PATCH") and body.get("state") == "6"]
    assert len(closing) == 1  # only the undo closed it


async def test_jira_follows_the_match_and_closes_it_when_undone_with_a_transition(write_config, httpserver, jira):
    await deliver_events(write_config, httpserver, jira_entry(httpserver, undone_transition_id="31"))
    (issue,) = jira.issues.values()
    assert issue.get("status") == "Done"
    assert "DLP lifecycle: undone" in adf_text(issue["fields"]["description"])
    transitions = [path for method, path, _ in jira.requests if path.endswith("/transitions")]
    assert len(transitions) == 1


async def test_jira_without_the_setting_only_updates_the_issue(write_config, httpserver, jira):
    await deliver_events(write_config, httpserver, jira_entry(httpserver))
    (issue,) = jira.issues.values()
    assert "status" not in issue and "DLP lifecycle: undone" in adf_text(issue["fields"]["description"])
    assert not [path for _, path, _ in jira.requests if path.endswith("/transitions")]


async def test_jira_an_issue_closed_already_is_left_as_it_is(write_config, httpserver, jira):
    undo_first = ("spo_rule_undo_override.json", "spo_rule_match_two_rules.json")  # both revisions end undone
    await deliver_events(write_config, httpserver, jira_entry(httpserver, undone_transition_id="31"), events=undo_first)
    (issue,) = jira.issues.values()
    assert issue["status"] == "Done" and len([p for _, p, _ in jira.requests if p.endswith("/transitions")]) == 2  # the second answered 400
