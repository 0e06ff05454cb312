"""A fully enriched record as the bundled enrichers write it: a departing HR contractor with
risky telemetry, prior alerts and high-confidence sensitive types (for summary and write-back tests)."""

from __future__ import annotations

from typing import Any

from pipeline.models import EnrichedRecord
from tests.support.records import make_record

RICH_ENRICHMENTS: dict[str, Any] = {
    "user_context": {
        "found": True, "sources": ["directory", "hr"], "display_name": "Megan Bowen", "department": "Human Resources",
        "job_title": "HR Generalist", "employee_type": "Contractor", "account_enabled": True,
        "manager": {"display_name": "Lynne Robbins", "mail": "lynne.robbins@contoso.com"},
        "resignation_date": "2025-03-01T00:00:00Z", "last_working_date": "2025-04-15T17:00:00Z",
        "departing": True, "departed": False, "days_until_departure": 32,
    },
    "prior_incidents": {
        "last_7_days": 1, "last_30_days": 2, "last_90_days": 4, "same_policy_90_days": 3, "sensitive_types": ["Credit Card Number"],
        "last_alert_at": "2025-03-10T10:00:00Z",
        "recent": [{"alert_id": "m-2", "at": "2025-03-10T10:00:00Z", "policy": "HR Data", "severity": "low", "source": "pipeline"}],
        "sources": ["pipeline"],
    },
    "sensitive_info": {
        "types": [{"name": "Credit Card Number", "type_id": None, "count": 12, "confidence": 85, "category": "financial"}],
        "type_names": ["Credit Card Number"], "type_ids": [], "total_count": 12, "max_confidence": 85, "high_confidence_count": 12,
        "categories": ["financial"], "sensitivity_label_ids": [], "source": "alert", "correlated_ids": [],
    },
    "telemetry": {
        "sources": {"identity_risk": {"kind": "table", "found": True, "count": None,
                                      "fields": {"okta_risk": "high", "last_vpn_country": "RU", "mfa_enrolled": "false", "proxy_uploads_24h": "57"}}},
        "found_any": True, "errors": {},
    },
    "triage": {
        "score": 85, "band": "high", "thresholds": {"medium": 40, "high": 70}, "missing_inputs": [],
        "reasons": [
            {"code": "identity_risk", "points": 20, "detail": "identity risk high (identity_risk.okta_risk)", "source": "telemetry", "evidence": {"identity_risk.okta_risk": "high"}},
            {"code": "departing_soon", "points": 20, "detail": "leaves in 32 day(s)", "source": "user_context", "evidence": {"days_until_departure": 32}},
        ],
    },
}


def rich_record(alert_id: str = "rich-1", **alert_changes: Any) -> EnrichedRecord:
    return make_record(alert_id, enrichments=RICH_ENRICHMENTS, **alert_changes)
