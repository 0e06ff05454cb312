"""The ITSM ticket names sensitive types the alert carries only by id, from the sensitive_info enrichment."""

from __future__ import annotations

from pipeline.deliver.summary import render_lines as summary_lines

CARD = "50842eb7-edc8-4019-85dd-5a5c1f2bb085"
UNKNOWN = "d7c6b5a4-9382-4716-a5b4-c3d2e1f0a9b8"


def test_a_type_known_only_by_id_is_named_in_the_ticket_from_the_enrichment():
    document = {
        "alert": {"alert_id": "a-1", "sensitive_info": [{"name": None, "type_id": CARD.upper(), "count": 12}, {"name": None, "type_id": UNKNOWN, "count": None}]},
        "enrichments": {"sensitive_info": {"types": [{"name": "Credit Card Number", "type_id": CARD.upper(), "count": 12}, {"name": None, "type_id": UNKNOWN}]}},
    }
    (line,) = [line for line in summary_lines(document, record_id="r-1") if line.startswith("Sensitive types:")]
    assert line == f"Sensitive types: Credit Card Number x12, {UNKNOWN}"


def test_without_the_enrichment_the_ticket_shows_what_the_alert_carries():
    document = {"alert": {"alert_id": "a-1", "sensitive_info": [{"name": "IBAN", "type_id": None, "count": 2}, {"name": None, "type_id": CARD}]}}
    (line,) = [line for line in summary_lines(document, record_id="r-1") if line.startswith("Sensitive types:")]
    assert line == f"Sensitive types: IBAN x2, {CARD}"
