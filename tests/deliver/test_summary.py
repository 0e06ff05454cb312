"""The one enrichment summary: what a ServiceNow or Jira ticket shows a responder, rendered from the
record as projected for the sink, against the in-memory ITSM servers."""

from __future__ import annotations

import pytest

from pipeline.deliver.sinks.jira import JiraSink
from pipeline.deliver.sinks.servicenow import ServiceNowSink
from pipeline.deliver.summary import SummarySettings, render_text
from tests.support.enriched import rich_record
from tests.support.itsm_servers import adf_text

EXPECTED = (
    "Triage: high (score 85; high from 70, medium from 40)",
    "+20 identity_risk: identity risk high (identity_risk.okta_risk) [identity_risk.okta_risk=high]",
    "+20 departing_soon: leaves in 32 day(s) [days_until_departure=32]",
    "department: Human Resources, job: HR Generalist, employee type: Contractor",
    "manager: Lynne Robbins <lynne.robbins@contoso.com>",
    "departure date: 2025-04-15 (in 32 day(s)); resigned 2025-03-01",
    "Prior incidents: 1 in 7 days, 2 in 30 days, 4 in 90 days; same policy in 90 days: 3; last: 2025-03-10 (HR Data, low)",
    "Sensitive types: Credit Card Number x12 (confidence 85)",
    "Telemetry: identity risk high",
    "Defender alert: https://security.microsoft.com/alerts/",
    "Defender incident: https://security.microsoft.com/incidents/48213",
)


async def test_servicenow_description_and_work_note_carry_the_whole_summary(httpserver, snow):
    record = rich_record()
    sink = ServiceNowSink(ServiceNowSink.Settings(instance_url=httpserver.url_for("/"), username="svc-dlp", password_env="TEST_SNOW_PASSWORD"), None)
    try:
        (outcome,) = await sink.publish([record])
    finally:
        await sink.aclose()
    assert outcome.status == "delivered"
    (ticket,) = snow.tickets.values()
    (note,) = snow.work_notes[ticket["sys_id"]]
    for text in (ticket["description"], note):
        for expected in EXPECTED:
            assert expected in text, expected
        assert "Triage score: 85" not in text


async def test_jira_description_carries_the_whole_summary(httpserver, jira):
    sink = JiraSink(JiraSink.Settings(site_url=httpserver.url_for("/"), email="dlp-bot@contoso.com", api_token_env="TEST_JIRA_TOKEN", project_key="SEC"), None)
    try:
        (outcome,) = await sink.publish([rich_record()])
    finally:
        await sink.aclose()
    assert outcome.status == "delivered"
    ((_, issue),) = jira.issues.items()
    text = adf_text(issue["fields"]["description"])
    for expected in EXPECTED:
        assert expected in text, expected


def test_sections_and_templates_come_from_the_config():
    record = rich_record()
    settings = SummarySettings(heading="DLP {enrichments.triage.band}: {alert.policy_name}", sections=["prior", "triage"], extra_lines=["Owner: {enrichments.user_context.manager.mail}"])
    lines = render_text(record.to_dict(), record_id=record.record_id, settings=settings).splitlines()
    assert lines[0] == "DLP high: Finance PII"
    assert lines[1].startswith("Prior incidents:") and lines[2].startswith("Triage: high")
    assert "Owner: lynne.robbins@contoso.com" in lines and lines[-1] == f"Pipeline record: {record.record_id}"
    assert not any(line.startswith(("User:", "Sensitive types:", "Defender alert:")) for line in lines)


def test_unknown_section_and_unknown_key_are_refused():
    with pytest.raises(ValueError):
        SummarySettings(sections=["payload"])
    with pytest.raises(ValueError):
        SummarySettings(header="x")


def test_a_projected_record_summarises_only_what_the_sink_may_see():
    from pipeline.deliver.minimise import Minimiser

    projected = Minimiser(["alert.severity", "alert.title", "enrichments.triage"], None).apply(rich_record())
    text = render_text(projected.to_dict(), record_id=projected.record_id)
    assert "Triage: high" in text
    for absent in ("megan.bowen", "Human Resources", "Lynne", "x12", "security.microsoft.com", "Prior incidents"):
        assert absent not in text, absent
