"""The DLP story on the canonical alert and its lifecycle as revisions (issue 17, items 1, 2 and 5).

Fixtures: tests/fixtures/lifecycle/ (written from the Management Activity API schema; see its README).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.assemble.stage import Assembler
from pipeline.config import AssemblySettings
from pipeline.deliver.minimise import alert_key
from pipeline.errors import ConfigError
from pipeline.ingest.decode import decode_message
from pipeline.runner import Message, Runner
from pipeline.state.sqlite import SqliteStateStore
from tests.support.config import pipeline_toml
from tests.support.records import lake_lines

LIFECYCLE = Path(__file__).resolve().parents[1] / "fixtures" / "lifecycle"
HIGH_RULE = "8a1b2c3d-4e5f-4a6b-9c7d-8e9f0a1b2c3d"
JUSTIFICATION = "The auditor needs the list"
SPO_EVENTS = ("spo_rule_match_two_rules.json", "spo_info_false_positive.json", "spo_rule_undo_override.json")
EXCHANGE_EVENTS = ("exchange_rule_match.json", "exchange_rule_match_override.json", "exchange_rule_match_false_positive.json")


def record(name: str) -> dict:
    return json.loads((LIFECYCLE / name).read_text())


def body(*names: str) -> bytes:
    return orjson.dumps([record(name) for name in names])


async def run(write_config, *batches: bytes, toml: str | None = None) -> list[dict]:
    """Every lake line after running each body as its own batch."""
    async with Runner(write_config(toml or pipeline_toml())) as runner:
        for message in batches:
            await runner.process_batch([Message(message)])
        return lake_lines(runner)


def latest(lines: list[dict]) -> dict:
    """The newest revision of the only alert in `lines` (they all share one alert key)."""
    keys = {(line["alert"]["tenant_id"], line["alert"]["source_format"], line["alert"]["kind"], line["alert"]["alert_id"]) for line in lines}
    assert len(keys) == 1, keys
    return max(lines, key=revision)


def revision(line: dict) -> int:
    """How many events a revision holds: each event a test sends makes the next revision (processing
    times can tie on a fast machine)."""
    return len(line["alert"]["lifecycle"]["events"])


# -- 1. every policy and rule, the exception ------------------------------------------------------


async def test_every_rule_is_kept_and_the_alert_has_the_highest_rules_severity(write_config):
    (line,) = await run(write_config, body("spo_rule_match_two_rules.json"))
    alert = line["alert"]
    (policy,) = alert["policies"]
    assert policy["name"] == "Card data" and policy["policy_id"] == "0f1e2d3c-4b5a-4968-8776-5a4b3c2d1e0f"
    assert [(r["name"], r["severity"], r["mode"]) for r in policy["rules"]] == [
        ("High volume of credit card numbers", "high", "Enforce"),
        ("Mid volume of credit card numbers", "medium", "Audit with Notify"),
    ]
    assert policy["rules"][0]["actions"] == ["BlockAccess", "NotifyUser", "GenerateAlert"]
    assert alert["severity"] == "high"
    assert alert["exception"] is None and alert["lifecycle"]["state"] == "matched"


def test_an_override_is_an_exception_and_its_justification_is_dropped_by_default():
    decoded = decode_message(body("exchange_rule_match_override.json"))
    (part,) = decoded.parts
    exception = part.data["exception"]
    assert exception == {"override": True, "false_positive": False, "reason": "Override", "rule_ids": [HIGH_RULE], "justification": None}
    assert JUSTIFICATION.encode() not in orjson.dumps(part.data)


def test_the_justification_is_kept_only_when_the_setting_asks():
    (part,) = decode_message(body("exchange_rule_match_override.json"), keep_user_justification=True).parts
    assert part.data["exception"]["justification"].startswith(JUSTIFICATION)


def test_the_justification_setting_is_typed(write_config):
    loaded = write_config(pipeline_toml(lifecycle={"keep_user_justification": True}))
    assert loaded.config.lifecycle.keep_user_justification is True
    with pytest.raises(ConfigError, match="lifecycle.keep_justification"):
        write_config(pipeline_toml(lifecycle={"keep_justification": True}), name="bad.toml")


async def test_a_kept_justification_is_never_logged_nor_dead_lettered(write_config, caplog):
    caplog.set_level(logging.DEBUG)
    override = record("exchange_rule_match_override.json")
    unusable = override | {"Id": None}  # dead-lettered, with its justification scrubbed
    async with Runner(write_config(pipeline_toml(lifecycle={"keep_user_justification": True}))) as runner:
        await runner.process_batch([Message(body("exchange_rule_match.json"))])
        await runner.process_batch([Message(orjson.dumps([override, unusable]))])
        lines = lake_lines(runner)
        stored = b"".join(path.read_bytes() for path in runner.loaded.data_path("dead-letter").rglob("*") if path.is_file())
    assert latest(lines)["alert"]["exception"]["justification"].startswith(JUSTIFICATION)  # it was kept for the sinks...
    assert caplog.records and b"invalid_record" in stored  # the run logged and dead-lettered...
    assert JUSTIFICATION not in caplog.text and "4111 1111 1111 1111" not in caplog.text  # ...but never the justification
    assert JUSTIFICATION.encode() not in stored


# -- 2. lifecycle as revisions --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "state", "override", "false_positive"),
    [("exchange_rule_match_override.json", "overridden", True, False), ("exchange_rule_match_false_positive.json", "reported_false_positive", False, True)],
)
async def test_an_override_or_a_false_positive_report_revises_the_match(write_config, event, state, override, false_positive):
    lines = await run(write_config, body("exchange_rule_match.json"), body(event))
    assert len(lines) == 2 and len({line["record_id"] for line in lines}) == 2  # a new revision, not folded away
    revised = latest(lines)
    assert revised["alert"]["lifecycle"]["state"] == state
    assert (revised["alert"]["exception"]["override"], revised["alert"]["exception"]["false_positive"]) == (override, false_positive)
    assert [e["record_id"] for e in revised["alert"]["lifecycle"]["events"]] == [record("exchange_rule_match.json")["Id"], record(event)["Id"]]


async def test_dlp_info_and_dlp_rule_undo_revise_the_match_they_belong_to(write_config):
    lines = await run(write_config, body(SPO_EVENTS[0]), body(SPO_EVENTS[1]), body(SPO_EVENTS[2]))
    assert [line["alert"]["lifecycle"]["state"] for line in sorted(lines, key=revision)] == [
        "matched", "reported_false_positive", "undone",
    ]
    undone = latest(lines)["alert"]
    assert undone["exception"]["reason"] == "Override" and undone["exception"]["rule_ids"] == [HIGH_RULE]
    assert undone["policies"][0]["rules"][0]["overridden_actions"] == ["BlockAccess"]
    assert undone["severity"] == "high" and undone["files"][0]["name"] == "cards.xlsx"  # the match's details stay
    assert undone["created_at"].startswith("2025-07-03T12:16:01") and undone["last_activity_at"].startswith("2025-07-03T12:20:30")


async def test_an_undo_that_arrives_first_still_ends_undone(write_config):
    lines = await run(write_config, body(SPO_EVENTS[2]), body(SPO_EVENTS[0]))
    assert latest(lines)["alert"]["lifecycle"]["state"] == "undone"


async def test_a_redelivered_event_is_no_new_revision(write_config):
    lines = await run(write_config, body(SPO_EVENTS[0]), body(SPO_EVENTS[2]), body(SPO_EVENTS[2]), body(SPO_EVENTS[0]))
    assert len({line["record_id"] for line in lines}) == 2


ALL_EVENTS = [(name, record(name)) for name in SPO_EVENTS + EXCHANGE_EVENTS]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.permutations(range(len(ALL_EVENTS))), cuts=st.lists(st.booleans(), min_size=len(ALL_EVENTS), max_size=len(ALL_EVENTS)))
async def test_lifecycle_events_in_any_order_and_batching_give_the_same_final_state(tmp_path_factory, order, cuts):
    """Events go through the real state store in the order and batches given; the last revision of
    each match is the same whatever the order."""
    store = SqliteStateStore(tmp_path_factory.mktemp("state") / "state.sqlite")
    assembler = Assembler(store, AssemblySettings(), max_parts_per_alert=100)
    final: dict[str, str] = {}
    batches: list[list[dict]] = [[]]
    for index, cut in zip(order, cuts):
        batches[-1].append(ALL_EVENTS[index][1])
        if cut:
            batches.append([])
    now = 1_000.0
    try:
        for batch in batches:
            if not batch:
                continue
            now += 1
            decoded = decode_message(orjson.dumps(batch))
            await assembler.store(decoded.parts, now=now)
            claimed = await assembler.claim(now=now, force=False)
            for alert in claimed.alerts:
                final[alert.alert_id] = alert.model_dump_json()
            await assembler.mark_emitted(claimed.alert_ids, now=now)
    finally:
        await store.aclose()
    assert final == EXPECTED_FINAL and final_states(final) == FINAL_STATES  # the same, and the right one


async def fold_in_order(store, order: list[int]) -> dict[str, str]:
    """The last revision of each match after the events of `order` went through `store`, one batch each."""
    assembler = Assembler(store, AssemblySettings(), max_parts_per_alert=100)
    final: dict[str, str] = {}
    for step, index in enumerate(order, start=1):
        now = 1_000.0 + step
        await assembler.store(decode_message(orjson.dumps(ALL_EVENTS[index][1])).parts, now=now)
        claimed = await assembler.claim(now=now, force=False)
        final.update((alert.alert_id, alert.model_dump_json()) for alert in claimed.alerts)
        await assembler.mark_emitted(claimed.alert_ids, now=now)
    return final


@pytest.mark.parametrize("order", [[0, 1, 2, 3, 4, 5], [5, 2, 4, 1, 3, 0], [2, 0, 1, 4, 5, 3]])
async def test_the_shared_table_store_folds_events_in_any_order_alike(azurite, monkeypatch, order):
    """The deployed state store (Azure Table Storage, on Azurite) gives the same final state."""
    from pipeline.state.azure_table import TableStateStore
    from tests.support.table_state import ENV, table_name, table_settings

    monkeypatch.setenv(ENV, azurite.connection_string)
    store = TableStateStore(table_settings(table_name("life")))
    try:
        final = await fold_in_order(store, order)
        assert final == EXPECTED_FINAL and final_states(final) == FINAL_STATES
    finally:
        await store.aclose()


def _expected_final() -> dict[str, str]:
    from pipeline.assemble.join import assemble

    parts = decode_message(orjson.dumps([event for _, event in ALL_EVENTS])).parts
    by_match: dict[str, list] = {}
    for part in parts:
        by_match.setdefault(part.alert_id, []).append(part)
    return {key: assemble(group).model_dump_json() for key, group in by_match.items()}


EXPECTED_FINAL = _expected_final()


FINAL_STATES = {"SharePoint": "undone", "Exchange": "reported_false_positive"}


def final_states(final: dict[str, str]) -> dict[str, str]:
    """Each match's lifecycle state, by workload."""
    return {json.loads(alert)["workload"]: json.loads(alert)["lifecycle"]["state"] for alert in final.values()}


def test_the_final_states_of_the_fixture_matches():
    assert final_states(EXPECTED_FINAL) == FINAL_STATES


async def test_revisions_of_a_match_share_one_alert_key(write_config):
    async with Runner(write_config(pipeline_toml())) as runner:
        await runner.process_batch([Message(body(EXCHANGE_EVENTS[0]))])
        await runner.process_batch([Message(body(EXCHANGE_EVENTS[1]))])
        lines = lake_lines(runner)
    from pipeline.models import EnrichedRecord

    keys = {alert_key(EnrichedRecord.model_validate(line)) for line in lines}
    assert len(lines) == 2 and len(keys) == 1


# -- 5. partial records, not lost ones ------------------------------------------------------------


async def test_a_broken_optional_timestamp_is_nulled_with_a_warning_not_dead_lettered(write_config):
    broken = record(SPO_EVENTS[0]) | {"CreationTime": "2025-07-03T12:16:01+053088Z"}
    async with Runner(write_config(pipeline_toml())) as runner:
        report = await runner.process_batch([Message(orjson.dumps(broken))])
        lines = lake_lines(runner)
    assert report.dead_lettered.total() == 0 and len(lines) == 1
    alert = lines[0]["alert"]
    assert alert["created_at"] is None and alert["severity"] == "high"
    assert len(alert["decode_warnings"]) == 1 and alert["decode_warnings"][0].startswith("created_at: ")
    assert "053088" not in alert["decode_warnings"][0]  # the warning names the field, never the value
    assert report.field_warnings == 1 and any(line.startswith("fields nulled:") for line in report.summary_lines())


def test_a_broken_optional_field_of_any_format_is_nulled():
    graph = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "formats" / "graph_alert_v2_dlp.json").read_text())
    graph["createdDateTime"] = "2025-07-03T12:16:01+053088Z"
    decoded = decode_message(orjson.dumps(graph))
    assert not decoded.rejected and decoded.alerts[0].created_at is None and decoded.warnings == 1


def test_a_broken_required_field_still_dead_letters():
    broken = record(SPO_EVENTS[0]) | {"Id": None}
    decoded = decode_message(orjson.dumps(broken))
    assert not decoded.parts and [r.reason for r in decoded.rejected] == ["invalid_record"]
    assert "alert_id" in decoded.rejected[0].detail


def test_formats_that_name_one_policy_and_rule_give_them_as_policies_too():
    fixtures = Path(__file__).resolve().parents[1] / "fixtures" / "formats"
    from pipeline.assemble.join import assemble

    graph = decode_message((fixtures / "graph_alert_v2_dlp.json").read_bytes()).alerts[0]
    streaming = assemble(decode_message((fixtures / "streaming_dlp_batch.json").read_bytes()).parts)
    for alert in (graph, streaming):
        (policy,) = alert.policies
        assert policy.name == alert.policy_name and [rule.name for rule in policy.rules] == [alert.rule_name]


def test_validate_alert_nulls_nested_fields_and_falls_back_to_defaults():
    from pipeline.models import validate_alert

    alert = validate_alert({
        "alert_id": "a-1", "source_format": "graph_alert", "severity": "extreme", "files": [{"name": "a.xlsx", "size": "big"}],
        "last_activity_at": "yesterday",
    })
    assert alert.severity == "unknown" and alert.files[0].name == "a.xlsx" and alert.files[0].size is None and alert.last_activity_at is None
    assert sorted(w.split(":")[0] for w in alert.decode_warnings) == ["files.0.size", "last_activity_at", "severity"]
    with pytest.raises(ValueError):
        validate_alert({"alert_id": "a-1", "source_format": "graph_alert", "tenant_id": "../escape"})  # required: rejected, not nulled
