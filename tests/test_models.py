"""The canonical models' own guarantees: the record's JSON and the alert's content id."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.dataset import make_bodies
from pipeline.assemble.join import assemble
from pipeline.ingest.decode import decode_message
from pipeline.models import DlpAlert, EnrichedRecord, EnrichmentStatus


def _alerts() -> list[DlpAlert]:
    """Alerts of all four formats, split alerts assembled (the benchmark dataset is built from the samples)."""
    alerts: list[DlpAlert] = []
    for body in make_bodies(10):
        decoded = decode_message(body)
        alerts.extend(decoded.alerts)
        if decoded.parts:
            alerts.append(assemble(decoded.parts))
    return alerts


def _record(alert: DlpAlert, enrichments: dict) -> EnrichedRecord:
    return EnrichedRecord.model_construct(
        record_id=alert.content_id(),
        alert=alert,
        enrichments=enrichments,
        enrichment_status={"a": EnrichmentStatus(state="ok", duration_ms=1.5), "b": EnrichmentStatus(state="failed", error="timeout")},
        pipeline_version="0.0.0",
        processed_at=datetime(2026, 11, 23, 18, 1, 2, 345678, tzinfo=UTC),
    )


def _pydantic_json(record: EnrichedRecord) -> bytes:
    return record.__pydantic_serializer__.to_json(record)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(enrichments=st.dictionaries(st.text(max_size=12), st.dictionaries(st.text(max_size=12), JSON_VALUES, max_size=5), max_size=5))
def test_record_json_is_what_pydantic_writes(enrichments):
    for alert in _alerts()[:5]:
        record = _record(alert, enrichments)
        assert record.to_json() == _pydantic_json(record)


@pytest.mark.parametrize(
    "value",
    [
        datetime(2025, 1, 1, 1, 2, 3, 456789, tzinfo=timezone(timedelta(hours=2))),
        datetime(2025, 1, 1, tzinfo=UTC),
        datetime(2025, 1, 1),
        date(2025, 1, 2),
        Decimal("1.50"),
        (1, "two"),
        2**70,  # beyond orjson: the record is written by pydantic itself
    ],
    ids=repr,
)
def test_record_json_is_what_pydantic_writes_for_values_beyond_plain_json(value):
    # The runner dumps plugins' fragments in JSON mode, but a record built elsewhere may hold other
    # values: they are written as pydantic writes them (a UTC datetime ends in "Z", not "+00:00").
    for alert in _alerts():
        record = _record(alert, {"odd": {"value": value, "list": [value]}})
        assert record.to_json() == _pydantic_json(record)


def test_a_copied_alert_with_changes_has_its_own_json_and_content_id():
    alert = _alerts()[0]
    before_json, before_id = alert.to_json(), alert.content_id()
    changed = alert.model_copy(update={"title": "another title"})
    assert b"another title" in changed.to_json()
    assert changed.content_id() != before_id
    assert alert.to_json() == before_json and alert.content_id() == before_id
    assert alert.model_copy().content_id() == before_id


def test_validating_an_alert_calls_no_python_hook_after_it():
    """Issue 19 (DLP-dense path): what an alert computes once is kept without private attributes,
    whose defaults pydantic would set by a Python call after validating each alert."""
    assert DlpAlert.__pydantic_post_init__ is None
    alert = DlpAlert.model_validate({"alert_id": "a1", "source_format": "graph_alert", "title": "t"})
    assert alert.__pydantic_private__ is None
    json, content_id = alert.to_json(), alert.content_id()
    assert alert.to_json() is json and alert.content_id() is content_id  # computed once
    assert alert.model_copy().__pydantic_private__ is None and alert.model_copy().content_id() == content_id
