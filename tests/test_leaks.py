"""Matched content never leaves: the whole pipeline (CLI subprocess) on the bundled samples plus crafted
messages that carry card numbers and SSNs wherever a DLP payload can hold them.

Checked: stdout and stderr at WARNING, INFO and DEBUG; every file the run writes (lake, its index,
the state store, dead letters); and, decoded, every dead-letter body (rejected records and bodies of
messages that could not be decoded: scrubbed when JSON, withheld when they cannot be scrubbed).
"""

from __future__ import annotations

import base64
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.support.paths import FIXTURES, ROOT, SAMPLES
from tests.support.samples import MATCHED_VALUES

# Public test card numbers and never-issued SSNs, plus the context strings of the shared samples.
CARD_A, CARD_B, SSN_A, SSN_B = "4012888888881881", "378282246310005", "078-05-1120", "219-09-9999"
SECRETS = (*MATCHED_VALUES, CARD_A, CARD_B, SSN_A, SSN_B)


def detections(*values: str) -> dict:
    return {"DetectedValues": [{"Name": value, "Value": f"...card on file {value} (SYNTHETIC TEST DATA)..."} for value in values], "ResultsTruncated": False}


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def crafted_messages() -> dict[str, bytes]:
    """Each message puts matched values somewhere else. Keys name the case."""
    messages: dict[str, bytes] = {}

    exchange = fixture("mgmt_api_dlp_rule_match.json")
    exchange.update(Id="leak-exchange", Workload="Exchange", RecordType=13, SharePointMetaData=None,
                    ExchangeMetaData={"From": "alex.wilber@contoso.com", "To": ["x@fabrikam.com"], "Subject": f"card {CARD_A}", "MessageID": "<m@contoso>"},
                    ExceptionInfo={"Reason": "Override", "Justification": f"customer asked, card {CARD_B} ssn {SSN_A}", "Rules": ["r"]})
    sit = exchange["PolicyDetails"][0]["Rules"][0]["ConditionsMatched"]["SensitiveInformation"][0]
    sit["SensitiveInformationDetections"] = detections(CARD_A, SSN_A)
    messages["exchange: DetectedValues, Justification, Subject"] = orjson.dumps(exchange)

    endpoint = fixture("mgmt_api_dlp_rule_match_endpoint_variant.json")
    endpoint["Id"] = "leak-endpoint"
    for entry in endpoint["EndpointMetaData"]["SensitiveInfoTypeData"]:
        entry["SensitiveInformationDetectionsInfo"] = detections(SSN_B)
    endpoint["EndpointMetaData"]["Justification"] = f"needed {SSN_B}"
    messages["endpoint: SensitiveInformationDetectionsInfo, Justification"] = orjson.dumps([endpoint])

    streaming = fixture("streaming_dlp_batch.json")
    for record in streaming["records"]:
        props = record["properties"]
        props["AlertId"] = "leak-streaming"
        if isinstance(props.get("AdditionalFields"), str):
            extra = json.loads(props["AdditionalFields"])
            extra.update(DetectedValues=[CARD_A], Justification=f"text {CARD_B}", Nested=json.dumps({"MatchedValues": [SSN_A]}))
            props["AdditionalFields"] = json.dumps(extra)
    messages["streaming: AdditionalFields (JSON in a string, nested twice)"] = orjson.dumps(streaming)

    raw = copy.deepcopy(exchange)
    raw["Id"] = "leak-cloudapp"
    cloud_app = {"time": "2025-03-14T09:14:02Z", "tenantId": "11111111-2222-3333-4444-555555555555", "category": "AdvancedHunting-CloudAppEvents",
                 "properties": {"Timestamp": "2025-03-14T09:11:02Z", "ActionType": "DLPRuleMatch", "RawEventData": json.dumps(raw)}}
    messages["cloud app events: RawEventData as a string"] = orjson.dumps({"records": [cloud_app]})

    sentinel = fixture("sentinel_securityalert_dlp.json")
    sentinel["SystemAlertId"] = sentinel["VendorOriginalId"] = "leak-sentinel"
    extended = json.loads(sentinel["ExtendedProperties"])
    extended["DetectedValues"] = [CARD_B]
    sentinel["ExtendedProperties"] = json.dumps(extended)
    entities = json.loads(sentinel["Entities"])
    entities[0]["EvidenceText"] = f"{SSN_B} found"
    sentinel["Entities"] = json.dumps(entities)
    messages["sentinel: ExtendedProperties and Entities strings"] = orjson.dumps(sentinel)

    graph = fixture("graph_alert_v2_dlp.json")
    graph["id"] = "leak-graph"
    graph.setdefault("additionalData", {})["MatchedValues"] = [CARD_A, SSN_A]
    graph["evidence"][0]["detectedValues"] = [CARD_B]
    messages["graph: additionalData.MatchedValues, evidence detectedValues"] = orjson.dumps({"value": [graph]})

    rejected = copy.deepcopy(exchange)
    rejected["Id"] = None  # cannot become an alert: dead-lettered as a record
    messages["rejected record with DetectedValues and Justification"] = orjson.dumps([rejected, graph])
    broken_row = copy.deepcopy(sentinel)
    broken_row["SystemAlertId"] = broken_row["VendorOriginalId"] = None  # no alert id: rejected, ExtendedProperties kept scrubbed
    messages["rejected sentinel row: DetectedValues in a JSON string"] = orjson.dumps(broken_row)
    broken_evidence = copy.deepcopy(streaming["records"][1])
    broken_evidence["properties"]["AlertId"] = None
    messages["rejected streaming row: AdditionalFields"] = orjson.dumps({"records": [broken_evidence]})
    messages["unrecognised shape holding DetectedValues"] = orjson.dumps({"hello": {"DetectedValues": [CARD_A], "justification": SSN_A}})
    messages["invalid JSON naming DetectedValues"] = b'{"records": [{"DetectedValues": ["' + CARD_A.encode() + b'", "' + SSN_B.encode()
    deep: object = {"DetectedValues": [CARD_B]}
    for _ in range(40):
        deep = {"d": deep}
    messages["too deep record"] = orjson.dumps([dict(graph, id="leak-deep", extra=deep)])
    messages["string too long in a record with a Justification"] = orjson.dumps(
        [dict(exchange, Id="leak-long", Long="x" * 70_000)]
    )
    big = dict(exchange, Id="leak-big", Padding="p" * (1024 * 1024))
    messages["body too large"] = orjson.dumps(big)
    return messages


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True, timeout=120)


def everything_written(out: Path) -> tuple[bytes, list[dict]]:
    blobs, entries = [], []
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blobs.append(data)
        if path.parent.name == "dead-letter" and path.suffix == ".json":
            entry = orjson.loads(data)
            entries.append(entry)
            blobs.append(base64.b64decode(entry["body_base64"]))
    return b"\n".join(blobs), entries


def test_the_inputs_do_carry_the_values():
    everything = b"".join(crafted_messages().values()) + b"".join(p.read_bytes() for p in SAMPLES.iterdir())
    for value in SECRETS:
        assert value.encode() in everything


@pytest.mark.parametrize("verbosity", [[], ["-v"], ["-vv"]], ids=["warning", "info", "debug"])
def test_no_matched_value_reaches_a_sink_a_log_line_a_dead_letter_or_the_state_store(tmp_path, verbosity):
    crafted = tmp_path / "crafted.jsonl"
    crafted.write_bytes(b"\n".join(crafted_messages().values()) + b"\n")
    result = run_cli(*verbosity, "run", str(SAMPLES), str(crafted), "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()[-2000:]

    written, entries = everything_written(tmp_path / "out")
    for value in SECRETS:
        assert value.encode() not in result.stdout, value
        assert value.encode() not in result.stderr, value
        assert value.encode() not in written, value

    # The run did what it should with those messages (so the absence above is meaningful).
    lake = [json.loads(line) for path in (tmp_path / "out" / "lake").rglob("*.jsonl") for line in path.read_text().splitlines()]
    delivered = {line["alert"]["alert_id"] for line in lake}
    # A Management Activity event is filed under the match it belongs to; its own audit id is one of the match's events.
    delivered |= {event["record_id"] for line in lake for event in ((line["alert"].get("lifecycle") or {}).get("events") or [])}
    assert {"leak-exchange", "leak-endpoint", "leak-streaming", "leak-cloudapp", "leak-sentinel", "leak-graph"} <= delivered
    reasons = {entry["reason"] for entry in entries}
    assert {"invalid_record", "unrecognised_shape", "invalid_json", "too_deep", "string_too_long", "body_too_large"} <= reasons
    withheld = set()
    for entry in entries:
        try:
            withheld.add(orjson.loads(base64.b64decode(entry["body_base64"])).get("withheld"))
        except (orjson.JSONDecodeError, AttributeError):
            continue  # a kept body (JSON list, or invalid JSON naming no removed key, as in the samples)
    assert {"body_too_large", "invalid_json"} <= withheld
    if verbosity:
        assert b"INFO" in result.stderr or b"DEBUG" in result.stderr or b"WARNING" in result.stderr
