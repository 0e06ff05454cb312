"""The decoder registry: one decoder per format, a fixed detection order, and formats added without
touching the decode loop (a fake format registered here is decoded through the real loop)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, get_args

import orjson
import pytest

from pipeline.errors import DecodeError, PipelineError
from pipeline.ingest.decode import decode_message
from pipeline.ingest.formats import registry
from pipeline.ingest.formats.contract import AlertPart, RecordOutput
from pipeline.ingest.limits import DEFAULT_LIMITS
from pipeline.ingest.message import Message
from pipeline.ingest.stage import ingest
from pipeline.models import SourceFormat

BUILT_IN_ORDER = ("defender_streaming", "graph_alert", "sentinel_alert", "management_activity")


class FakeRecordFormat:
    """A record format of its own: a record with a `fakeAlertId` is one alert (or, with `bad`, a bug)."""

    # DlpAlert.source_format names the built-in formats only (a real new format adds its name to
    # SourceFormat); the fake's alerts borrow one so that they validate.
    name: Any = "fake_alerts"

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def envelope_rows(self, body: Any) -> list[Any] | None:
        return None

    def owns_record(self, record: dict[str, Any]) -> bool:
        return "fakeAlertId" in record

    def decode(self, record: Any, out: RecordOutput) -> None:
        self.seen.append(record)
        if record.get("bad"):
            raise KeyError("a bug in the fake decoder")
        if not record.get("dlp", True):
            out.skip()
            return
        out.alert({"alert_id": record["fakeAlertId"], "source_format": "management_activity", "title": "fake"})


class FakeEnvelopeFormat:
    """An envelope format of its own: `{"fakeRows": [...]}`, each row a part of a split alert."""

    name: Any = "fake_envelope"

    def envelope_rows(self, body: Any) -> list[Any] | None:
        return body["fakeRows"] if isinstance(body, dict) and isinstance(body.get("fakeRows"), list) else None

    def owns_record(self, record: dict[str, Any]) -> bool:
        return False

    def decode(self, record: Any, out: RecordOutput) -> None:
        if not isinstance(record, dict) or "id" not in record:
            out.reject("malformed_record", "fake row without id")
            return
        out.part(AlertPart(alert_id=record["id"], rank=1, data={"alert_id": record["id"], "title": "fake part"}))


@pytest.fixture
def fake_record_format() -> Iterator[FakeRecordFormat]:
    decoder = FakeRecordFormat()
    registry.register(decoder)
    yield decoder
    registry.unregister(decoder.name)
    assert registry.names() == BUILT_IN_ORDER


@pytest.fixture
def fake_envelope_format() -> Iterator[FakeEnvelopeFormat]:
    decoder = FakeEnvelopeFormat()
    registry.register(decoder)
    yield decoder
    registry.unregister(decoder.name)
    assert registry.names() == BUILT_IN_ORDER


def test_every_source_format_has_exactly_one_registered_decoder():
    assert sorted(registry.names()) == sorted(get_args(SourceFormat))
    for name in get_args(SourceFormat):
        assert registry.lookup(name).name == name


def test_a_second_decoder_for_a_registered_format_is_refused():
    original = registry.lookup("graph_alert")
    impostor = FakeRecordFormat()
    impostor.name = "graph_alert"
    with pytest.raises(ValueError, match="'graph_alert' already has a decoder"):
        registry.register(impostor)
    assert registry.lookup("graph_alert") is original
    assert registry.names() == BUILT_IN_ORDER


def test_detection_order_is_the_documented_one():
    assert registry.DETECTION_ORDER == BUILT_IN_ORDER
    assert registry.names() == BUILT_IN_ORDER
    assert tuple(decoder.name for decoder in registry.decoders()) == BUILT_IN_ORDER


def test_a_streaming_envelope_wins_over_a_page_in_the_same_body(fixture_bytes):
    body = json.loads(fixture_bytes("streaming_dlp_batch.json"))
    body["value"] = [json.loads(fixture_bytes("graph_alert_v2_dlp.json"))]
    decoded = decode_message(orjson.dumps(body))
    assert decoded.format == "defender_streaming"
    assert decoded.parts and not decoded.alerts


def test_a_record_both_graph_and_sentinel_would_own_is_a_graph_alert(fixture_bytes):
    record = json.loads(fixture_bytes("graph_alert_v2_dlp.json"))
    record["Type"] = "SecurityAlert"  # what makes a Sentinel row
    decoded = decode_message(orjson.dumps(record))
    assert decoded.format == "graph_alert"
    assert [alert.source_format for alert in decoded.alerts] == ["graph_alert"]


def test_a_record_both_sentinel_and_management_activity_would_own_is_a_sentinel_alert(fixture_bytes):
    record = json.loads(fixture_bytes("sentinel_securityalert_dlp.json"))
    record.update(Operation="DLPRuleMatch", CreationTime="2025-03-14T09:11:02")  # what makes a Management Activity record
    decoded = decode_message(orjson.dumps([record]))
    assert decoded.format == "sentinel_alert"
    assert [alert.source_format for alert in decoded.alerts] == ["sentinel_alert"]


def test_an_unknown_format_name_gives_a_clear_error():
    with pytest.raises(registry.UnknownFormat) as caught:
        registry.lookup("graph_alerts")
    message = str(caught.value)
    assert message.startswith("no decoder is registered for format 'graph_alerts'")
    assert "defender_streaming, graph_alert, sentinel_alert, management_activity" in message
    assert isinstance(caught.value, PipelineError) and isinstance(caught.value, LookupError)
    with pytest.raises(registry.UnknownFormat, match="'graph_alerts'"):
        registry.unregister("graph_alerts")


def test_a_registered_record_format_is_decoded_by_the_real_decode_loop(fake_record_format: FakeRecordFormat, fixture_bytes):
    graph = json.loads(fixture_bytes("graph_alert_v2_dlp.json"))
    fake = {"fakeAlertId": "fake-1", "Justification": "typed by the user"}
    body = orjson.dumps([fake, graph, {"fakeAlertId": "fake-2", "dlp": False}, {"fakeAlertId": "fake-3", "bad": True}])

    assert registry.names() == (*BUILT_IN_ORDER, "fake_alerts")
    assert registry.lookup("fake_alerts") is fake_record_format
    decoded = decode_message(body)
    assert decoded.format == "mixed" and decoded.records == 4 and decoded.skipped == 1
    assert [(alert.alert_id, alert.title) for alert in decoded.alerts] == [("fake-1", "fake"), (graph["id"], graph["title"])]
    # The loop's rules hold for a plugin format too: the record is scrubbed before the decoder reads
    # it, and a decoder bug costs that record only.
    assert fake_record_format.seen[0] == {"fakeAlertId": "fake-1"}
    assert [(rejected.index, rejected.reason, rejected.detail) for rejected in decoded.rejected] == [(3, "decoder_error", "KeyError")]

    assert decode_message(orjson.dumps(fake)).format == "fake_alerts"
    ingested = ingest([Message(body, source="test:1")], limits=DEFAULT_LIMITS, now=0.0)
    assert [alert.alert_id for alert in ingested.alerts] == ["fake-1", graph["id"]]
    assert [dead.reason for dead in ingested.dead] == ["decoder_error"]


def test_a_format_registered_after_the_built_ins_never_takes_their_records(fake_record_format, fixture_bytes):
    graph = json.loads(fixture_bytes("graph_alert_v2_dlp.json"))
    graph["fakeAlertId"] = "fake-1"  # the fake would own it too
    decoded = decode_message(orjson.dumps(graph))
    assert decoded.format == "graph_alert" and fake_record_format.seen == []


def test_a_registered_envelope_format_is_decoded_by_the_real_decode_loop(fake_envelope_format):
    body = orjson.dumps({"fakeRows": [{"id": "split-1"}, "not a row", {"id": "split-1"}]})
    decoded = decode_message(body)
    assert decoded.format == "fake_envelope" and decoded.records == 3
    assert [(part.alert_id, part.rank) for part in decoded.parts] == [("split-1", 1), ("split-1", 1)]
    assert [(rejected.index, rejected.reason) for rejected in decoded.rejected] == [(1, "malformed_record")]


def test_an_unregistered_format_is_no_longer_recognised():
    decoder = FakeRecordFormat()
    registry.register(decoder)
    try:
        assert decode_message(b'{"fakeAlertId": "fake-1"}').format == "fake_alerts"
    finally:
        registry.unregister(decoder.name)
    with pytest.raises(DecodeError) as caught:
        decode_message(b'{"fakeAlertId": "fake-1"}')
    assert caught.value.reason == "unrecognised_shape"
    decoded = decode_message(b'[{"fakeAlertId": "fake-1"}]')
    assert [rejected.reason for rejected in decoded.rejected] == ["unrecognised_record"] and decoder.seen == [{"fakeAlertId": "fake-1"}]
