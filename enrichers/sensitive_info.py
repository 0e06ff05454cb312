"""sensitive_info: a summary of the alert's sensitive information types. Never matched values."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from pipeline.enricher import BaseEnricher, EnrichmentContext
from pipeline.models import DlpAlert

Category = Literal["financial", "personal", "health", "credentials", "custom"]

# Well-known Microsoft SIT ids, then name keywords, decide a type's category.
_KNOWN_IDS: dict[str, Category] = {
    "50842eb7-edc8-4019-85dd-5a5c1f2bb085": "financial",  # Credit Card Number
    "a44669fe-0d48-453d-a9b1-2cc83f2cba77": "personal",  # U.S. Social Security Number (SSN)
}
_KEYWORDS: tuple[tuple[Category, tuple[str, ...]], ...] = (
    ("credentials", ("password", "credential", "secret", "key", "token", "connection string")),
    ("health", ("health", "medical", "drug", "disease", "icd", "dea number")),
    ("financial", ("credit card", "bank", "iban", "swift", "routing", "account number", "tax", "debit")),
    ("personal", ("social security", "ssn", "passport", "driver", "national id", "identity", "birth", "address", "phone", "email")),
)


def category_of(name: str | None, type_id: str | None) -> Category:
    if type_id and type_id.lower() in _KNOWN_IDS:
        return _KNOWN_IDS[type_id.lower()]
    lowered = (name or "").lower()
    for category, words in _KEYWORDS:
        if any(word in lowered for word in words):
            return category
    return "custom"


class SensitiveType(BaseModel):
    name: str | None
    type_id: str | None
    count: int | None
    confidence: int | None
    category: Category


class SensitiveInfoSummary(BaseModel):
    types: list[SensitiveType]
    type_names: list[str]
    type_ids: list[str]
    total_count: int
    max_confidence: int | None
    high_confidence_count: int = Field(description="matches in types detected at or above the high-confidence threshold")
    categories: list[Category]
    sensitivity_label_ids: list[str]


class SensitiveInfoEnricher(BaseEnricher):
    name = "sensitive_info"
    timeout = 2.0

    class Settings(BaseEnricher.Settings):
        high_confidence_threshold: int = Field(85, ge=0, le=100)

    async def enrich(self, alert: DlpAlert, ctx: EnrichmentContext) -> SensitiveInfoSummary | None:
        labels = sorted({f.sensitivity_label_id for f in alert.files if f.sensitivity_label_id})
        if not alert.sensitive_info and not labels:
            return None
        threshold = self.settings.high_confidence_threshold
        types = [
            SensitiveType(name=s.name, type_id=s.type_id, count=s.count, confidence=s.confidence, category=category_of(s.name, s.type_id))
            for s in alert.sensitive_info
        ]
        confidences = [t.confidence for t in types if t.confidence is not None]
        return SensitiveInfoSummary(
            types=types,
            type_names=[t.name for t in types if t.name],
            type_ids=[t.type_id for t in types if t.type_id],
            total_count=sum(t.count or 0 for t in types),
            max_confidence=max(confidences) if confidences else None,
            high_confidence_count=sum(t.count or 0 for t in types if t.confidence is not None and t.confidence >= threshold),
            categories=sorted({t.category for t in types}),
            sensitivity_label_ids=labels,
        )
