"""Decoders against every shared sample, plus variants: casing, missing fields, nulls, unicode, key order."""

from __future__ import annotations

import copy
import json

import orjson
import pytest

from pipeline.assemble.join import assemble
from pipeline.errors import DecodeError
from pipeline.ingest.decode import decode_message
from tests.support.samples import MATCHED_VALUES

ALERT_ID = "dl0c6f1e2a-7b3d-4c5e-9f10-2a3b4c5d6e7f"
UPN = "megan.bowen@contoso.com"
CARD = "50842eb7-edc8-4019-85dd-5a5c1f2bb085"
SSN = "a44669fe-0d48-453d-a9b1-2cc83f2cba77"


def only_alert(body: bytes):
    decoded = decode_message(body)
    assert len(decoded.alerts) == 1, decoded
    return decoded.alerts[0]


def test_streaming_batch_gives_parts_of_one_dlp_alert_and_skips_the_mde_alert(fixture_bytes):
    decoded = decode_message(fixture_bytes("streaming_dlp_batch.json"))
    assert decoded.format == "defender_streaming"
    assert decoded.records == 5 and decoded.skipped == 1 and not decoded.rejected
    assert {p.alert_id for p in decoded.parts} == {ALERT_ID}
    alert = assemble(decoded.parts)
    assert alert.source_format == "defender_streaming"
    assert alert.severity == "medium"
    assert alert.user.upn == UPN and alert.user.object_id == "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"
    assert alert.user.display_name == "Megan Bowen"
    assert alert.files[0].name == "Q1-payroll-export.xlsx"
    assert alert.files[0].path == "https://contoso.sharepoint.com/sites/Finance/Shared Documents/Payroll"  # URL-decoded
    assert alert.rule_name == "Finance PII - Credit Card and SSN" and alert.policy_name == "Finance PII"
    assert alert.workload == "SharePoint"
    assert {(s.type_id, s.count, s.confidence) for s in alert.sensitive_info} == {(CARD, 12, 85), (SSN, 3, 85)}
    assert alert.created_at.year == 2025 and alert.created_at.utcoffset().total_seconds() == 0


def only_match(body: bytes):
    """The alert of the one DLP match a Management Activity body holds (its events are parts of it)."""
    decoded = decode_message(body)
    assert not decoded.alerts and {p.alert_id for p in decoded.parts} and len({p.alert_id for p in decoded.parts}) == 1, decoded
    return assemble(decoded.parts)


def test_graph_alert(fixture_bytes):
    alert = only_alert(fixture_bytes("graph_alert_v2_dlp.json"))
    assert alert.source_format == "graph_alert" and alert.alert_id == ALERT_ID
    assert alert.status == "new" and alert.severity == "medium"
    assert alert.user.upn == UPN
    assert alert.incident_id == "48213"
    assert alert.alert_url.startswith("https://security.microsoft.com/alerts/")
    assert alert.incident_url.startswith("https://security.microsoft.com/incidents/48213")
    assert [(s.name, s.count) for s in alert.sensitive_info] == [("Credit Card Number", 12), ("U.S. Social Security Number (SSN)", 3)]
    assert alert.workload == "SharePoint" and alert.policy_name == "Finance PII"


@pytest.mark.parametrize("wrap", ["object", "array", "page"])
def test_graph_alert_in_every_envelope(fixture_bytes, wrap):
    alert = json.loads(fixture_bytes("graph_alert_v2_dlp.json"))
    body = {"object": alert, "array": [alert, alert], "page": {"@odata.context": "x", "value": [alert]}}[wrap]
    decoded = decode_message(orjson.dumps(body))
    assert decoded.alerts and all(a.alert_id == ALERT_ID for a in decoded.alerts)


def test_management_activity_sharepoint(fixture_bytes):
    alert = only_match(fixture_bytes("mgmt_api_dlp_rule_match.json"))
    assert alert.source_format == "management_activity" and alert.kind == "activity"
    assert alert.workload == "SharePoint" and alert.user.upn == UPN
    assert alert.shared_externally is True
    assert alert.files[0].sensitivity_label_id == "99999999-8888-4777-8666-555555555555"
    assert {(s.type_id, s.count, s.confidence) for s in alert.sensitive_info} == {(CARD, 12, 85), (SSN, 3, 85)}
    assert alert.created_at.tzinfo is not None  # CreationTime has no zone: read as UTC


def test_management_activity_endpoint(fixture_bytes):
    alert = only_match(fixture_bytes("mgmt_api_dlp_rule_match_endpoint_variant.json"))
    assert alert.workload == "Endpoint" and alert.severity == "high"
    assert alert.device.name == "CONTOSO-LT-0042.contoso.com" and alert.device.platform == "Windows"
    assert alert.files[0].name == "Q1-payroll-export.xlsx"
    assert {s.type_id for s in alert.sensitive_info} == {CARD, SSN}


@pytest.mark.parametrize("operation", ["DLPRuleMatch", "DlpRuleMatch", "dlprulematch"])
def test_management_activity_operation_any_casing(fixture_bytes, operation):
    record = json.loads(fixture_bytes("mgmt_api_dlp_rule_match.json"))
    record["Operation"] = operation
    assert only_match(orjson.dumps(record)).lifecycle.events[0].record_id == record["Id"]


def test_management_activity_non_dlp_records_are_skipped_not_rejected():
    body = orjson.dumps([{"CreationTime": "2025-03-14T09:00:00", "Id": "x", "Operation": "FileAccessed", "RecordType": 6, "Workload": "SharePoint"}])
    decoded = decode_message(body)
    assert decoded.skipped == 1 and not decoded.alerts and not decoded.rejected


def test_exchange_and_teams_shapes():
    exchange = {
        "CreationTime": "2025-03-14T11:00:00", "Id": "ex-1", "Operation": "DlpRuleMatch", "RecordType": 13, "Workload": "Exchange",
        "UserId": "DlpAgent", "OrganizationId": "t",
        "ExchangeMetaData": {"From": "Alex.Wilber@contoso.com", "To": ["someone@fabrikam.com"], "Subject": "payroll"},
        "PolicyDetails": [{"PolicyId": "p", "PolicyName": "Finance", "Rules": [{"RuleId": "r", "RuleName": "Card out", "Severity": "Low",
            "ConditionsMatched": {"SensitiveInformation": [{"SensitiveType": CARD, "SensitiveInformationTypeName": "Credit Card Number", "Count": 2, "Confidence": 75, "Location": "Message Body"}]}}]}],
    }
    teams = {**exchange, "Id": "tm-1", "Workload": "MicrosoftTeams", "RecordType": 11, "ExchangeMetaData": None, "UserId": "alex.wilber@contoso.com"}
    decoded = decode_message(orjson.dumps([exchange, teams]))
    by_id = {alert.lifecycle.events[0].record_id: alert for alert in (assemble([p]) for p in decoded.parts)}
    assert by_id["ex-1"].workload == "Exchange" and by_id["ex-1"].user.upn == "alex.wilber@contoso.com"  # UserId DlpAgent is not a user
    assert by_id["tm-1"].workload == "Teams" and by_id["tm-1"].severity == "low"


def test_sentinel_alert(fixture_bytes):
    alert = only_alert(fixture_bytes("sentinel_securityalert_dlp.json"))
    assert alert.source_format == "sentinel_alert" and alert.alert_id == ALERT_ID
    assert alert.user.upn == UPN and alert.user.object_id == "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"
    assert alert.tenant_id == "11111111-2222-3333-4444-555555555555"  # from the account entity, not the workspace
    assert [s.name for s in alert.sensitive_info] == ["Credit Card Number", "U.S. Social Security Number (SSN)"]
    assert alert.files[0].size == 48213 and alert.incident_id == "48213"


def test_sentinel_non_dlp_row_is_skipped(fixture_bytes):
    row = json.loads(fixture_bytes("sentinel_securityalert_dlp.json"))
    row.update(ProductName="Microsoft Defender for Endpoint", ProviderName="MDATP")
    assert decode_message(orjson.dumps(row)).skipped == 1


def test_cloud_app_events_dlp_row_is_an_activity(fixture_bytes):
    raw = json.loads(fixture_bytes("mgmt_api_dlp_rule_match.json"))
    row = {"time": "2025-03-14T09:14:02Z", "tenantId": "t-1", "category": "AdvancedHunting-CloudAppEvents",
           "properties": {"Timestamp": "2025-03-14T09:11:02Z", "ActionType": "DLPRuleMatch", "RawEventData": raw}}
    other = copy.deepcopy(row)
    other["properties"]["RawEventData"] = {"Operation": "FileDownloaded", "Id": "z"}
    decoded = decode_message(orjson.dumps({"records": [row, other]}))
    assert decoded.skipped == 1
    assert decoded.alerts[0].kind == "activity" and decoded.alerts[0].source_format == "defender_streaming"
    assert decoded.alerts[0].sensitive_info[0].type_id == CARD


@pytest.mark.parametrize("sample", ["streaming_dlp_batch.json", "graph_alert_v2_dlp.json", "mgmt_api_dlp_rule_match.json",
                                    "mgmt_api_dlp_rule_match_endpoint_variant.json", "sentinel_securityalert_dlp.json", "graph_incident_dlp.json"])
def test_matched_values_never_reach_alerts_parts_or_rejections(fixture_bytes, sample):
    body = fixture_bytes(sample)
    decoded = decode_message(body)
    produced = b"".join([a.model_dump_json().encode() for a in decoded.alerts] + [orjson.dumps(p.data) for p in decoded.parts] + [r.record for r in decoded.rejected])
    for value in MATCHED_VALUES:
        assert value.encode() not in produced


def test_rejected_record_is_stored_without_matched_values(fixture_bytes):
    record = json.loads(fixture_bytes("mgmt_api_dlp_rule_match.json"))
    record["Id"] = None  # no alert id: the record cannot become an alert
    decoded = decode_message(orjson.dumps([record]))
    assert decoded.rejected[0].reason == "invalid_record" and "alert_id" in decoded.rejected[0].detail
    assert b"4111 1111" not in decoded.rejected[0].record and b"DLPRuleMatch" in decoded.rejected[0].record


def test_key_order_does_not_change_the_alert(fixture_bytes):
    record = json.loads(fixture_bytes("graph_alert_v2_dlp.json"))
    reordered = dict(reversed(list(record.items())))
    assert only_alert(orjson.dumps(record)).content_id() == only_alert(orjson.dumps(reordered)).content_id()


def test_nulls_and_missing_optional_fields(fixture_bytes):
    record = json.loads(fixture_bytes("graph_alert_v2_dlp.json"))
    for key in ("additionalData", "incidentWebUrl", "severity", "firstActivityDateTime"):
        record.pop(key)
    record["evidence"] = None
    record["status"] = None
    alert = only_alert(orjson.dumps(record))
    assert alert.user is None and alert.files == [] and alert.severity == "unknown" and alert.status is None
    assert alert.rule_name == "Finance PII - Credit Card and SSN"  # still read from the title


def test_unicode_survives(fixture_bytes):
    record = json.loads(fixture_bytes("sentinel_securityalert_dlp.json"))
    record["AlertName"] = "DLP policy (Données RH – 社員) matched for document (relevé-été.xlsx) in SharePoint"
    record["ExtendedProperties"] = "{}"  # the rule name now comes from the title
    alert = only_alert(json.dumps(record, ensure_ascii=False).encode())
    assert alert.rule_name == "Données RH – 社員"
    assert alert.title.endswith("(relevé-été.xlsx) in SharePoint")


@pytest.mark.parametrize("severity,expected", [("High", "high"), ("MEDIUM", "medium"), ("informational", "informational"), ("Low", "low"), ("weird", "unknown"), (None, "unknown")])
def test_severity_is_normalised(fixture_bytes, severity, expected):
    record = json.loads(fixture_bytes("sentinel_securityalert_dlp.json"))
    record["AlertSeverity"] = severity
    assert only_alert(orjson.dumps(record)).severity == expected


def test_upn_is_lowercased(fixture_bytes):
    record = json.loads(fixture_bytes("graph_alert_v2_dlp.json"))
    record["evidence"][0]["userAccount"]["userPrincipalName"] = "Megan.Bowen@Contoso.COM"
    assert only_alert(orjson.dumps(record)).user.upn == UPN


@pytest.mark.parametrize("body,reason", [
    (b"not json at all", "invalid_json"),
    (b"", "invalid_json"),
    (b'{"hello": "world"}', "unrecognised_shape"),
    (b"42", "unrecognised_shape"),
    (b'"a string"', "unrecognised_shape"),
])
def test_unusable_bodies_raise_decode_error_with_a_reason(body, reason):
    with pytest.raises(DecodeError) as caught:
        decode_message(body)
    assert caught.value.reason == reason


def test_bad_records_inside_a_usable_body_are_rejected_one_by_one(fixture_bytes):
    good = json.loads(fixture_bytes("streaming_dlp_batch.json"))["records"]
    body = orjson.dumps({"records": [good[0], "not an object", {"category": "AdvancedHunting-AlertInfo"}, good[1]]})
    decoded = decode_message(body)
    assert [r.index for r in decoded.rejected] == [1, 2]
    assert {r.reason for r in decoded.rejected} == {"malformed_record"}
    assert len(decoded.parts) == 2


def test_array_with_an_unknown_item_keeps_the_known_ones(fixture_bytes):
    alert = json.loads(fixture_bytes("graph_alert_v2_dlp.json"))
    decoded = decode_message(orjson.dumps([{"what": "is this"}, alert]))
    assert len(decoded.alerts) == 1 and decoded.rejected[0].reason == "unrecognised_record" and decoded.rejected[0].index == 0
