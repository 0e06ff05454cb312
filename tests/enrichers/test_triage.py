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


CONTRACTOR = """
[assembly]
settle_seconds = 0

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

[[enrichers]]
name = "telemetry"
[[enrichers.settings.tables]]
name = "identity_risk"
path = "identity.csv"
key = "upn"
key_column = "upn"

[[enrichers]]
name = "triage"
{rules}
""" + LAKE_SINK_TOML

UNUSUAL_COUNTRY = """
[[enrichers.settings.telemetry_rules]]
code = "identity_risk"
label = "identity risk high"
fields = ["okta_risk"]
test = "in"
values = ["high"]
points = 20
[[enrichers.settings.telemetry_rules]]
code = "mfa_off"
label = "MFA not enrolled"
fields = ["mfa_enrolled"]
test = "is_false"
points = 15
[[enrichers.settings.telemetry_rules]]
code = "unusual_country"
label = "last sign-in from an unusual country"
source = "identity_risk"
fields = ["last_vpn_country"]
test = "not_in"
values = ["FR", "GB", "US"]
points = 10
[[enrichers.settings.telemetry_rules]]
code = "upload_volume"
label = "proxy uploads in 24 h"
fields = ["proxy_uploads_24h"]
test = "at_least"
threshold = 20
points = 15
"""


@pytest.fixture
def contractor(tmp_path):
    """The issue's example: an HR contractor leaving in 32 days, identity risk high, MFA off, last
    sign-in from an unusual country, 57 proxy uploads."""
    upn = "pat.contractor@contoso.com"
    (tmp_path / "users.json").write_text(json.dumps([{"userPrincipalName": upn, "department": "Human Resources", "jobTitle": "HR Assistant", "employeeType": "Contractor"}]))
    (tmp_path / "hr.csv").write_text(f"EmailAddress,ResignationDate,LastWorkingDate\n{upn},2025-03-10T00:00:00Z,2025-04-15T17:00:00Z\n")
    (tmp_path / "identity.csv").write_text(f"upn,okta_risk,last_vpn_country,mfa_enrolled,proxy_uploads_24h\n{upn},high,RU,false,57\n")
    return upn


async def test_the_departing_high_risk_contractor_scores_high_with_every_reason_and_its_evidence(write_config, contractor):
    async with Runner(write_config(CONTRACTOR.format(rules=UNUSUAL_COUNTRY))) as runner:
        await runner.process_batch([message(graph_alert("c-1", upn=contractor, created="2025-03-14T09:12:44Z", policy="HR Data"))])
        triage = lake(runner)["c-1"]["enrichments"]["triage"]
    reasons = {r["code"]: r for r in triage["reasons"]}
    assert triage["band"] == "high" and triage["score"] >= 70, triage
    assert triage["thresholds"] == {"medium": 40, "high": 70}
    assert reasons["departing_soon"]["evidence"] == {"days_until_departure": 32, "last_working_date": "2025-04-15"}
    assert reasons["contractor"]["evidence"] == {"employee_type": "Contractor"}
    assert reasons["identity_risk"]["evidence"] == {"identity_risk.okta_risk": "high"} and reasons["identity_risk"]["source"] == "telemetry"
    assert reasons["mfa_off"]["evidence"] == {"identity_risk.mfa_enrolled": "false"}
    assert reasons["unusual_country"]["evidence"] == {"identity_risk.last_vpn_country": "RU"}
    assert reasons["upload_volume"]["evidence"] == {"identity_risk.proxy_uploads_24h": "57"}
    assert "telemetry_hit" not in reasons  # presence alone is not counted once a value is
    assert triage["score"] == sum(r["points"] for r in triage["reasons"]) == 20 + 5 + 20 + 15 + 10 + 15 + 5


async def test_the_default_telemetry_rules_read_the_bundled_telemetry_columns(write_config, contractor):
    async with Runner(write_config(CONTRACTOR.format(rules=""))) as runner:
        await runner.process_batch([message(graph_alert("c-1", upn=contractor, created="2025-03-14T09:12:44Z", policy="HR Data"))])
        triage = lake(runner)["c-1"]["enrichments"]["triage"]
    assert {"identity_risk", "mfa_off", "upload_volume", "departing_soon", "contractor"} <= {r["code"] for r in triage["reasons"]}
    assert triage["band"] == "high"


def test_a_rule_without_its_operand_and_inverted_bands_are_config_errors(write_config, contractor):
    with pytest.raises(ConfigError, match="needs values"):
        Runner(write_config(CONTRACTOR.format(rules='[[enrichers.settings.telemetry_rules]]\ncode = "x"\nlabel = "x"\nfields = ["a"]\ntest = "in"\npoints = 1\n')))
    with pytest.raises(ConfigError, match="medium_at"):
        Runner(write_config(CONTRACTOR.format(rules="[enrichers.settings]\nmedium_at = 80\nhigh_at = 70\n")))


def test_alerts_with_equal_reasons_share_one_triage_and_the_shared_ones_are_bounded(monkeypatch):
    """A triage follows from its reasons and missing inputs: equal ones are one fragment (read-only),
    different ones their own; at most `MADE_AT_MOST` are kept for sharing."""
    import time
    from types import SimpleNamespace

    import enrichers.triage as triage_module
    from enrichers.triage import TriageEnricher
    from pipeline.enrich.contract import EnrichmentContext
    from pipeline.models import DlpAlert

    enricher = TriageEnricher(TriageEnricher.Settings())

    def scored(alert_id: str, total: int) -> object:
        alert = DlpAlert.model_validate({"alert_id": alert_id, "source_format": "graph_alert", "severity": "high"})
        info = SimpleNamespace(types=[], total_count=total)
        return enricher.score(alert, EnrichmentContext(alert, fragments={"sensitive_info": info}, statuses={}, cache=None, clock=time.time))

    one, same, other = scored("a", 60), scored("b", 60), scored("c", 70)
    assert one is same and one is not other
    assert [r.evidence for r in one.reasons if r.code == "volume"] == [{"matches": 60, "threshold": 50}]
    assert [r.evidence for r in other.reasons if r.code == "volume"] == [{"matches": 70, "threshold": 50}]
    monkeypatch.setattr(triage_module, "MADE_AT_MOST", 2)
    for total in range(100, 110):
        scored("d", total)
    assert len(enricher._made) == 2
