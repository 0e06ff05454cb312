"""Graph incident bodies (`GET /security/incidents/{id}?$expand=alerts`, or a page of them): each
alert decoded as a Graph alert with its incident's id, skipped or rejected on its own."""

from __future__ import annotations

import copy
import json
from typing import Any

import orjson
import pytest

from pipeline.errors import DecodeError
from pipeline.ingest.decode import decode_message
from tests.support.samples import MATCHED_VALUES

TENANT = "11111111-2222-3333-4444-555555555555"


def alert(fixture_bytes, alert_id: str, **changes: Any) -> dict[str, Any]:
    """The shared Graph DLP alert under another id, without the incident fields unless given."""
    record = copy.deepcopy(json.loads(fixture_bytes("graph_alert_v2_dlp.json")))
    record["id"] = alert_id
    for key in ("incidentId", "incidentWebUrl"):
        record.pop(key, None)
    record.update(changes)
    return record


def mde_alert(alert_id: str) -> dict[str, Any]:
    return {"@odata.type": "#microsoft.graph.security.alert", "id": alert_id, "serviceSource": "microsoftDefenderForEndpoint",
            "detectionSource": "antivirus", "title": "Suspicious PowerShell", "severity": "high", "evidence": []}


def incident(incident_id: str, alerts: list[Any], **changes: Any) -> dict[str, Any]:
    body = {
        "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#security/incidents(alerts())/$entity",
        "@odata.type": "#microsoft.graph.security.incident",
        "id": incident_id,
        "tenantId": TENANT,
        "displayName": "DLP policy (Finance PII) matched, involving one user",
        "incidentWebUrl": f"https://security.microsoft.com/incidents/{incident_id}?tid={TENANT}",
        "redirectIncidentId": None,
        "status": "active",
        "severity": "medium",
        "classification": "unknown",
        "determination": "unknown",
        "createdDateTime": "2025-03-14T09:12:44Z",
        "lastUpdateDateTime": "2025-03-14T09:20:00Z",
        "assignedTo": None,
        "customTags": [],
        "systemTags": [],
        "comments": [],
        "alerts": alerts,
    }
    body.update(changes)
    return body


def test_the_shared_incident_fixture_gives_its_dlp_alert_and_skips_the_other(fixture_bytes):
    """Why: a Graph incident body (an incident with its `alerts` array) was dead-lettered
    `unrecognised_shape` instead of being unpacked into its alerts."""
    decoded = decode_message(fixture_bytes("graph_incident_dlp.json"))
    assert decoded.format == "graph_alert" and decoded.records == 2 and decoded.skipped == 1 and not decoded.rejected
    (only,) = decoded.alerts
    assert only.alert_id == "dl0c6f1e2a-7b3d-4c5e-9f10-2a3b4c5d6e7f" and only.incident_id == "48213"
    assert only.user.upn == "megan.bowen@contoso.com" and [s.count for s in only.sensitive_info] == [12, 3]


def test_an_incident_body_is_unpacked_into_its_alerts_each_with_the_incident_id(fixture_bytes):
    body = incident("48213", [alert(fixture_bytes, "dl-1"), mde_alert("da-2"), alert(fixture_bytes, "dl-3", incidentId="48213")])
    decoded = decode_message(orjson.dumps(body))
    assert decoded.format == "graph_alert" and decoded.records == 3 and decoded.skipped == 1 and not decoded.rejected
    assert [a.alert_id for a in decoded.alerts] == ["dl-1", "dl-3"]
    for decoded_alert in decoded.alerts:
        assert decoded_alert.incident_id == "48213"
        assert decoded_alert.incident_url == f"https://security.microsoft.com/incidents/48213?tid={TENANT}"
        assert decoded_alert.tenant_id == TENANT and decoded_alert.source_format == "graph_alert"
        assert decoded_alert.user.upn == "megan.bowen@contoso.com" and decoded_alert.policy_name == "Finance PII"


@pytest.mark.parametrize("wrap", ["page", "list"])
def test_a_page_or_list_of_incidents_keeps_each_alert_with_its_own_incident(fixture_bytes, wrap):
    incidents = [incident("100", [alert(fixture_bytes, "a-1")]), incident("200", [alert(fixture_bytes, "a-2"), alert(fixture_bytes, "a-3")])]
    body = {"@odata.context": "https://graph.microsoft.com/v1.0/$metadata#security/incidents(alerts())", "value": incidents} if wrap == "page" else incidents
    decoded = decode_message(orjson.dumps(body))
    assert {a.alert_id: a.incident_id for a in decoded.alerts} == {"a-1": "100", "a-2": "200", "a-3": "200"}


def test_the_incidents_id_is_the_one_kept_and_the_alerts_own_urls_stay(fixture_bytes):
    own = alert(fixture_bytes, "dl-1", incidentId="1", incidentWebUrl="https://security.microsoft.com/incidents/1", tenantId=None)
    (decoded,) = decode_message(orjson.dumps(incident("48213", [own]))).alerts
    assert decoded.incident_id == "48213"  # the body is this incident's: an alert moved here by a merge still belongs to it
    assert decoded.incident_url == "https://security.microsoft.com/incidents/1" and decoded.tenant_id == TENANT


def test_the_alerts_of_a_merged_incident_carry_the_incident_it_was_merged_into(fixture_bytes):
    body = incident("48213", [alert(fixture_bytes, "dl-1")], status="redirected", redirectIncidentId="50000")
    (decoded,) = decode_message(orjson.dumps(body)).alerts
    assert decoded.incident_id == "50000" and decoded.incident_url is None and decoded.tenant_id == TENANT


def test_a_bad_alert_of_an_incident_is_rejected_alone_and_kept_with_its_incident_id(fixture_bytes):
    body = incident("48213", [alert(fixture_bytes, "dl-1"), alert(fixture_bytes, "bad\nid"), "not an alert"])
    decoded = decode_message(orjson.dumps(body))
    assert [a.alert_id for a in decoded.alerts] == ["dl-1"]
    assert [(r.index, r.reason) for r in decoded.rejected] == [(1, "invalid_record"), (2, "unrecognised_record")]
    stored = orjson.loads(decoded.rejected[0].record)
    assert stored["incidentId"] == "48213"  # replayed alone, it still names its incident
    replayed = decode_message(orjson.dumps(dict(stored, id="dl-2")))
    assert replayed.alerts[0].incident_id == "48213"


def test_matched_values_in_an_incident_reach_neither_alerts_nor_rejections(fixture_bytes):
    leaky = alert(fixture_bytes, "dl-1")
    leaky["additionalData"]["DetectedValues"] = [{"Name": MATCHED_VALUES[0], "Value": f"card {MATCHED_VALUES[0]}"}]
    bad = dict(leaky, id="bad\nid")
    decoded = decode_message(orjson.dumps(incident("48213", [leaky, bad])))
    everything = b"".join(a.to_json() for a in decoded.alerts) + b"".join(r.record for r in decoded.rejected)
    assert len(decoded.alerts) == 1 and len(decoded.rejected) == 1
    assert MATCHED_VALUES[0].encode() not in everything


def test_an_incident_without_its_alerts_says_how_to_ask_for_them():
    body = incident("48213", [])
    del body["alerts"]
    with pytest.raises(DecodeError) as raised:
        decode_message(orjson.dumps(body))
    assert raised.value.reason == "unrecognised_shape" and "$expand=alerts" in str(raised.value)


def test_an_incident_with_no_alerts_decodes_to_nothing():
    decoded = decode_message(orjson.dumps(incident("48213", [])))
    assert decoded.format == "graph_alert" and decoded.records == 0 and not decoded.alerts and not decoded.rejected


async def test_the_runner_delivers_an_incidents_alerts_instead_of_dead_lettering_the_body(fixture_bytes, write_config):
    from pipeline.runner import Message, Runner
    from tests.support.config import LAKE_ONLY

    body = incident("48213", [alert(fixture_bytes, "dl-1"), alert(fixture_bytes, "dl-2")])
    async with Runner(write_config(LAKE_ONLY)) as runner:
        report = await runner.process_batch([Message(orjson.dumps(body))])
        lines = [json.loads(line) for path in runner.loaded.data_path("lake").rglob("*.jsonl") for line in path.read_text().splitlines()]
    assert not report.dead_lettered and report.delivered["lake"] == 2
    assert sorted((r["alert"]["alert_id"], r["alert"]["incident_id"]) for r in lines) == [("dl-1", "48213"), ("dl-2", "48213")]
