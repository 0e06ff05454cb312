"""triage: the score from the real enrichers' output, its reasons, and sink routing on it."""

from __future__ import annotations

import json
import socket

import pytest

from pipeline.errors import ConfigError
from pipeline.runner import Message, Runner
from tests.support.alerts import graph_alert, message
from tests.support.config import LAKE_SINK_TOML

CHAIN = """
[assembly]
settle_seconds = 0

[[enrichers]]
name = "triage"
[enrichers.settings]
repeat_threshold = 2
volume_threshold = 20
[enrichers.settings.weights]
departing_user = 31
high_confidence_financial = 23
high_confidence_personal = 5
repeat_offender = 17
same_policy_repeat = 3
severity_medium = 2
severity_high = 0
external_sharing = 13
volume = 7
telemetry_hit = 0

[[enrichers]]
name = "user_context"
[enrichers.settings]
directory = "users.json"
[enrichers.settings.hr]
path = "hr.csv"

[[enrichers]]
name = "sensitive_info"

[[enrichers]]
name = "prior_incidents"
{telemetry}
""" + LAKE_SINK_TOML + """
[[sinks]]
name = "hot"
kind = "jsonl"
when = {{ triage_score_at_least = 60 }}
[sinks.settings]
path = "hot"
fsync = false
"""


@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "users.json").write_text(json.dumps([{"userPrincipalName": "megan.bowen@contoso.com", "department": "Finance"}, {"userPrincipalName": "adele.vance@contoso.com"}]))
    (tmp_path / "hr.csv").write_text("EmailAddress,ResignationDate,LastWorkingDate\nmegan.bowen@contoso.com,2025-03-01T00:00:00Z,2025-03-31T00:00:00Z\n")


def lake(runner: Runner, path: str = "lake") -> dict[str, dict]:
    root = runner.loaded.data_path(path)
    return {json.loads(line)["alert"]["alert_id"]: json.loads(line) for p in root.rglob("*.jsonl") for line in p.read_text().splitlines()}


def alerts():
    megan = "megan.bowen@contoso.com"
    return [
        graph_alert("m-1", upn=megan, created="2025-03-01T10:00:00Z", policy="Finance PII", sits="Credit Card Number (1)", severity="low"),
        graph_alert("m-2", upn=megan, created="2025-03-10T10:00:00Z", policy="HR Data", severity="low"),
        graph_alert("m-3", upn=megan, created="2025-03-14T09:12:44Z", file_name="Q1-payroll-export.xlsx", policy="Finance PII"),
        graph_alert("a-1", upn="adele.vance@contoso.com", created="2025-03-14T09:12:44Z", policy="Finance PII", sits="IBAN (1)", severity="low"),
    ]


async def test_score_and_reasons_from_the_other_enrichers_and_routing(write_config, inputs, fixture_bytes):
    runner = Runner(write_config(CHAIN.format(telemetry="")))
    assert [[slot.name for slot in wave] for wave in runner.chain.waves][-1] == ["triage"]
    async with runner:
        await runner.process_batch([message(*alerts()), Message(fixture_bytes("mgmt_api_dlp_rule_match.json"))])
        records, hot = lake(runner), lake(runner, "hot")
    triage = records["m-3"]["enrichments"]["triage"]
    # departing (leaves in 17 days), high-confidence financial (correlated with the rule match),
    # 2 prior alerts in 30 days, 1 of the same policy, severity medium
    assert {r["code"]: r["points"] for r in triage["reasons"]} == {
        "departing_user": 31,
        "high_confidence_financial": 23,
        "high_confidence_personal": 5,
        "repeat_offender": 17,
        "same_policy_repeat": 3,
        "severity": 2,
    }
    assert triage["score"] == 81 and triage["band"] == "high" and triage["missing_inputs"] == []
    assert "17 day" in next(r["detail"] for r in triage["reasons"] if r["code"] == "departing_user")
    quiet = records["a-1"]["enrichments"]["triage"]
    assert quiet["score"] == 0 and quiet["band"] == "low" and quiet["reasons"] == []
    activity = next(r for r in records.values() if r["alert"]["kind"] == "activity")["enrichments"]["triage"]
    # the rule-match activity (09:11, before m-3): m-1 and m-2 are prior, and it was shared externally
    assert {r["code"] for r in activity["reasons"]} == {"departing_user", "high_confidence_financial", "high_confidence_personal", "external_sharing", "severity", "repeat_offender", "same_policy_repeat"}
    assert activity["score"] == min(100, 31 + 23 + 5 + 13 + 2 + 17 + 3)
    activity_id = next(k for k, r in records.items() if r["alert"]["kind"] == "activity")
    assert set(hot) == {"m-3", activity_id}
    assert all(r["enrichments"]["triage"]["score"] >= 60 for r in hot.values())


async def test_a_failed_input_is_named_and_the_score_uses_the_rest(write_config, inputs):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    telemetry = f"""
[[enrichers]]
name = "telemetry"
[[enrichers.settings.http]]
name = "proxy"
url = "http://127.0.0.1:{port}/lookup/{{upn}}"
allowed_hosts = ["127.0.0.1"]
allow_private_hosts = ["127.0.0.1"]
timeout_seconds = 0.5
"""
    async with Runner(write_config(CHAIN.format(telemetry=telemetry))) as runner:
        await runner.process_batch([message(*alerts())])
        records = lake(runner)
    triage = records["m-3"]["enrichments"]["triage"]
    assert records["m-3"]["enrichment_status"]["telemetry"]["state"] == "failed"
    assert triage["missing_inputs"] == ["telemetry"]
    assert triage["score"] > 0


def test_unknown_weight_is_a_config_error(write_config, inputs):
    with pytest.raises(ConfigError, match=r"enrichers\[0\]\.settings\.weights\.departing: unknown key|weights.departing"):
        Runner(write_config(CHAIN.format(telemetry="").replace("departing_user = 31", "departing = 31")))
