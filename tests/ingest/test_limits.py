"""Limits on hostile input: each one enforced at decode (or in the assembler) with its own reason code."""

from __future__ import annotations

import base64
import copy
import hashlib
import json

import orjson
import pytest

from pipeline.errors import ConfigError, DecodeError
from pipeline.ingest.decode import decode_message, stored_body
from pipeline.ingest.formats import common
from pipeline.ingest.limits import Limits, check_record
from pipeline.runner import Message, Runner
from tests.support.config import LAKE_ONLY
from tests.support.samples import MATCHED_VALUES

SMALL = Limits(max_body_bytes=64 * 1024, max_records_per_message=5, max_evidence_per_alert=4, max_string_length=8192, max_nesting_depth=12)


def graph(fixture_bytes) -> dict:
    return json.loads(fixture_bytes("graph_alert_v2_dlp.json"))


def streaming(fixture_bytes) -> list[dict]:
    return json.loads(fixture_bytes("streaming_dlp_batch.json"))["records"]


def nested(depth: int, leaf=0):
    value = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


def dead_letters(runner: Runner) -> list[dict]:
    return [json.loads(p.read_bytes()) for p in sorted(runner.loaded.data_path("dead-letter").glob("*.json"))]


def test_defaults_and_the_old_signature_still_work(fixture_bytes):
    assert Limits().max_body_bytes == 1024 * 1024 and Limits().max_nesting_depth == 32
    assert len(decode_message(fixture_bytes("graph_alert_v2_dlp.json")).alerts) == 1


def test_a_body_over_the_limit_is_refused_without_being_parsed():
    body = b"{" + b" " * (SMALL.max_body_bytes)  # invalid JSON: a parse would say invalid_json
    with pytest.raises(DecodeError) as caught:
        decode_message(body, limits=SMALL)
    assert caught.value.reason == "body_too_large" and str(SMALL.max_body_bytes) in caught.value.detail
    decode_message(b"[]", limits=SMALL)  # under the limit: parsed


def test_a_too_large_body_is_withheld_from_the_dead_letter_store(fixture_bytes):
    body = fixture_bytes("mgmt_api_dlp_rule_match.json") * 50
    kept = orjson.loads(stored_body(body, "body_too_large"))
    assert kept == {"withheld": "body_too_large", "bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}


@pytest.mark.parametrize("wrap", ["streaming", "array", "page"])
def test_too_many_records_refuses_the_whole_message(fixture_bytes, wrap):
    one = streaming(fixture_bytes)[0] if wrap == "streaming" else graph(fixture_bytes)
    for count, refused in ((SMALL.max_records_per_message, False), (SMALL.max_records_per_message + 1, True)):
        items = [one] * count
        body = {"streaming": {"records": items}, "array": items, "page": {"value": items}}[wrap]
        if refused:
            with pytest.raises(DecodeError) as caught:
                decode_message(orjson.dumps(body), limits=SMALL)
            assert caught.value.reason == "too_many_records"
        else:
            assert decode_message(orjson.dumps(body), limits=SMALL).records == count


def test_a_too_long_string_rejects_only_its_record(fixture_bytes):
    good = graph(fixture_bytes)
    long_title = copy.deepcopy(good)
    long_title["title"] = "x" * (SMALL.max_string_length + 1)
    long_key = copy.deepcopy(good)
    long_key["additionalData"]["k" * (SMALL.max_string_length + 1)] = 1
    decoded = decode_message(orjson.dumps([good, long_title, long_key, good]), limits=SMALL)
    assert len(decoded.alerts) == 2
    assert [(r.index, r.reason) for r in decoded.rejected] == [(1, "string_too_long"), (2, "string_too_long")]
    assert "x" * 100 not in decoded.rejected[0].detail  # the detail says how long, never what


def test_a_too_deep_record_is_rejected_on_its_own_also_inside_embedded_json(fixture_bytes):
    records = streaming(fixture_bytes)
    deep = copy.deepcopy(records[0])
    deep["properties"]["Extra"] = nested(SMALL.max_nesting_depth)
    embedded = copy.deepcopy(records[1])  # AdditionalFields is JSON in a string: its depth counts too
    embedded["properties"]["AdditionalFields"] = orjson.dumps(nested(SMALL.max_nesting_depth - 1)).decode()  # 2 + 11 > 12
    body = orjson.dumps({"records": [deep, embedded, records[2]]})
    decoded = decode_message(body, limits=SMALL)
    assert [(r.index, r.reason) for r in decoded.rejected] == [(0, "too_deep"), (1, "too_deep")]
    assert len(decoded.parts) == 1


def test_nesting_at_orjsons_own_maximum_raises_no_recursion_error():
    # orjson parses up to 1024 levels; the checks and the scrubber are iterative.
    for depth in (900, 1020):
        inner = b"[" * depth + b"]" * depth
        dlp = b'{"category": "AdvancedHunting-AlertInfo", "properties": {"ServiceSource": "Data Loss Prevention", "x": ' + inner + b"}}"
        other = b'{"category": "AdvancedHunting-DeviceEvents", "properties": {"x": ' + inner + b"}}"
        decoded = decode_message(b'{"records": [' + dlp + b"," + other + b"]}")
        assert [(r.index, r.reason) for r in decoded.rejected] == [(0, "too_deep")]
        assert decoded.skipped == 1  # the row that cannot be DLP is skipped unwalked (decode.py, "Fast skip")
        decoded = decode_message(b'[{"DetectedValues": 1, "a": ' + inner + b"}]")
        assert [r.reason for r in decoded.rejected] == ["too_deep"]
        assert b"DetectedValues" not in decoded.rejected[0].record
        assert stored_body(b'{"DetectedValues": 1, "a": ' + inner + b"}", "unrecognised_shape").startswith(b'{"a":[[[')


def test_too_many_evidence_items_reject_the_record_in_every_format(fixture_bytes):
    alert = graph(fixture_bytes)
    alert["evidence"] = alert["evidence"] * (SMALL.max_evidence_per_alert + 1)
    mgmt = json.loads(fixture_bytes("mgmt_api_dlp_rule_match.json"))
    rule = mgmt["PolicyDetails"][0]["Rules"][0]
    rule["ConditionsMatched"]["SensitiveInformation"] = rule["ConditionsMatched"]["SensitiveInformation"] * 3
    row = json.loads(fixture_bytes("sentinel_securityalert_dlp.json"))
    row["Entities"] = json.dumps(json.loads(row["Entities"]) * (SMALL.max_evidence_per_alert + 1))
    for record in (alert, mgmt, row):
        decoded = decode_message(orjson.dumps(record), limits=SMALL)
        assert not decoded.alerts and not decoded.parts and [r.reason for r in decoded.rejected] == ["too_many_evidence"], record.keys()
        within = decode_message(orjson.dumps(record))  # within the default limit
        assert within.alerts or within.parts


def test_check_record_is_iterative_and_counts_containers():
    limits = Limits(max_nesting_depth=4)
    check_record(nested(4), limits)
    with pytest.raises(Exception, match="too_deep"):
        check_record(nested(5), limits)
    with pytest.raises(Exception, match="too_deep"):  # embedded JSON more than 3 levels deep
        inner = "[]"
        for _ in range(4):
            inner = json.dumps([inner])
        check_record([inner], Limits(max_nesting_depth=100))


def test_limits_table_in_the_config(write_config):
    loaded = write_config(LAKE_ONLY + "\n[limits]\nmax_body_bytes = 4096\nmax_nesting_depth = 8\n")
    assert loaded.config.limits.max_body_bytes == 4096 and loaded.config.limits.max_records_per_message == 2000
    with pytest.raises(ConfigError, match=r"key 'limits.max_depth': unknown key"):
        write_config(LAKE_ONLY + "\n[limits]\nmax_depth = 8\n", name="bad.toml")
    with pytest.raises(ConfigError, match=r"key 'limits.max_nesting_depth'"):
        write_config(LAKE_ONLY + "\n[limits]\nmax_nesting_depth = 0\n", name="bad2.toml")


async def test_runner_applies_the_configured_limits_and_goes_on(write_config, fixture_bytes):
    loaded = write_config(LAKE_ONLY + "\n[limits]\nmax_body_bytes = 4096\n")
    big = fixture_bytes("mgmt_api_dlp_rule_match.json")
    assert len(big) > 4096
    small = orjson.dumps(graph(fixture_bytes))
    assert len(small) <= 4096
    async with Runner(loaded) as runner:
        report = await runner.process_batch([Message(big, source="big"), Message(small, source="small")])
    assert report.alerts == 1 and report.dead_lettered["decode"] == 1
    (entry,) = dead_letters(runner)
    assert entry["reason"] == "body_too_large" and entry["source"] == "big"
    body = base64.b64decode(entry["body_base64"])
    assert orjson.loads(body)["sha256"] == hashlib.sha256(big).hexdigest()
    for value in MATCHED_VALUES:
        assert value.encode() not in body


async def test_split_alert_parts_are_capped_per_alert_in_the_state_store(write_config, fixture_bytes):
    loaded = write_config(LAKE_ONLY + "\n[limits]\nmax_evidence_per_alert = 3\n")
    info, user, file_, app, _ = streaming(fixture_bytes)
    extra = []
    for number in range(3):  # more distinct evidence rows of the same alert
        row = copy.deepcopy(user)
        row["properties"]["AccountUpn"] = f"user{number}@contoso.com"
        extra.append(row)
    async with Runner(loaded) as runner:
        first = await runner.process_batch([Message(orjson.dumps({"records": [info, user, file_]}))])
        emitted = first.alerts
        assert first.dead_lettered == {}
        second = await runner.process_batch([Message(orjson.dumps({"records": [app, *extra]}))])
        again = await runner.process_batch([Message(orjson.dumps({"records": [user]}))])  # a stored part: duplicate, not over
        emitted += second.alerts + again.alerts + (await runner.flush()).alerts
    assert second.dead_lettered["assemble"] == 1 and again.duplicate_parts == 1 and again.dead_lettered == {}
    (entry,) = dead_letters(runner)
    assert entry["reason"] == "too_many_evidence" and entry["stage"] == "assemble" and entry["alert_id"] == info["properties"]["AlertId"]
    assert len(orjson.loads(base64.b64decode(entry["body_base64"]))) == 4 and "limit 3" in entry["detail"]
    assert emitted == 1  # the alert itself is still emitted, from the parts within the limit


async def test_a_tenant_id_is_never_a_path(write_config, fixture_bytes, tmp_path):
    loaded = write_config(LAKE_ONLY)
    alert = graph(fixture_bytes)
    alert["tenantId"] = "a/../../../escaped"
    async with Runner(loaded) as runner:
        report = await runner.process_batch([Message(orjson.dumps(alert))])
    assert report.alerts == 0 and report.dead_lettered["decode"] == 1
    assert dead_letters(runner)[0]["reason"] == "invalid_record"
    assert not [p for p in tmp_path.rglob("*.jsonl")]


def test_scrub_removes_matched_content_inside_json_held_in_strings():
    entities = json.dumps([{"Type": "file", "DetectedValues": [{"Name": "4111 1111 1111 1111"}], "Name": "a.xlsx"}])
    record = {"Entities": entities, "ExceptionInfo": {"Reason": "Override", "Justification": "card 4111 1111 1111 1111 is mine"}}
    scrubbed = common.scrub(record)
    assert json.loads(scrubbed["Entities"]) == [{"Type": "file", "Name": "a.xlsx"}]
    assert scrubbed["ExceptionInfo"] == {"Reason": "Override"}
    unchanged = {"AdditionalFields": '{"Name": "megan"}'}
    assert common.scrub(unchanged)["AdditionalFields"] is unchanged["AdditionalFields"]  # untouched when nothing is removed
    broken = {"AdditionalFields": '{"DetectedValues": ["4111 1111 1111 1111"'}  # names a removed key, cannot be parsed
    assert common.scrub(broken)["AdditionalFields"] == common.WITHHELD_TEXT


@pytest.mark.parametrize("alert_id", ["a\nWARNING pipeline: forged line", "x" * 257, "\x1b[31mred"])
def test_an_alert_id_cannot_forge_log_lines_or_grow_unbounded(fixture_bytes, alert_id):
    alert = graph(fixture_bytes)
    alert["id"] = alert_id
    decoded = decode_message(orjson.dumps(alert))
    assert not decoded.alerts and decoded.rejected[0].reason == "invalid_record" and "alert_id" in decoded.rejected[0].detail


def test_a_partition_key_is_sanitised_before_it_is_logged():
    import azure.functions as func

    from pipeline.entrypoints.functions import to_message

    event = func.EventHubEvent(body=b"{}", partition_key="k\nERROR forged\x00" + "z" * 500, sequence_number=1, offset="1")
    source = to_message(event).source
    assert "\n" not in source and "\x00" not in source and source.endswith("k?ERROR forged?" + "z" * 113)
