"""Routing (`[sinks.when]`): generic enrichment thresholds, the triage shorthand, no match without the value."""

import pytest
from pydantic import ValidationError

from pipeline.deliver.routing import When, route
from pipeline.models import EnrichedRecord
from pipeline.plugin_kit.testing import make_alert


def record(enrichments: dict) -> EnrichedRecord:
    alert = make_alert("graph_alert")
    return EnrichedRecord.model_construct(record_id=alert.content_id() + str(sorted(map(str, enrichments.items()))), alert=alert, enrichments=enrichments, enrichment_status={})


def test_enrichment_at_least_reads_any_enricher_by_its_configured_name():
    when = When(enrichment_at_least={"risk.level": 3})
    assert when.matches(record({"risk": {"level": 3}}))
    assert not when.matches(record({"risk": {"level": 2}}))
    assert not when.matches(record({}))  # no value: no match
    assert not when.matches(record({"risk": {"level": True}}))  # a flag is not a number
    assert not when.matches(record({"risk": "high"}))


def test_triage_shorthand_is_the_same_condition():
    assert When(triage_score_at_least=70).matches(record({"triage": {"score": 70}}))
    assert not When(triage_score_at_least=70).matches(record({"triage": {"score": 69}}))


def test_unknown_condition_is_refused():
    with pytest.raises(ValidationError):
        When.model_validate({"score_above": 3})


def test_route_counts_records_no_sink_took():
    high, low = record({"triage": {"score": 90}}), record({"triage": {"score": 10}})
    selected, unrouted = route([("itsm", When(triage_score_at_least=70)), ("never", When(policy_in=["none"]))], [high, low])
    assert list(selected) == ["itsm"] and selected["itsm"] == [high] and unrouted == 1
