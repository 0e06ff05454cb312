"""triage: a score 0-100 with its reasons, from the other enrichers' fragments and the alert.

Runs after user_context, sensitive_info, prior_incidents and telemetry (those configured); it uses
what they produced and names the ones whose output was missing in `missing_inputs`, so a score
computed without, say, the HR context is recognisable. Every weight is configurable; the score is
the sum of the points of the reasons that hold, capped at 100. Sinks route on it with
`when.triage_score_at_least` (it reads `enrichments.triage.score`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.enrich.contract import BatchEnricher, EnrichmentContext
from pipeline.models import DlpAlert

INPUTS = ("user_context", "sensitive_info", "prior_incidents", "telemetry")


class Weights(BaseModel):
    model_config = ConfigDict(extra="forbid")

    departing_user: int = Field(30, ge=0, le=100, description="user leaving within `departing_within_days` (or already gone)")
    high_confidence_financial: int = Field(25, ge=0, le=100)
    high_confidence_health: int = Field(25, ge=0, le=100)
    high_confidence_personal: int = Field(10, ge=0, le=100)
    credentials: int = Field(20, ge=0, le=100, description="credentials found, any confidence")
    repeat_offender: int = Field(20, ge=0, le=100, description="at least `repeat_threshold` prior alerts in 30 days")
    same_policy_repeat: int = Field(5, ge=0, le=100, description="a prior alert of the same policy in 90 days")
    external_sharing: int = Field(20, ge=0, le=100)
    volume: int = Field(15, ge=0, le=100, description="at least `volume_threshold` matches")
    severity_high: int = Field(10, ge=0, le=100)
    severity_medium: int = Field(5, ge=0, le=100)
    account_disabled: int = Field(10, ge=0, le=100, description="activity by a disabled account")
    telemetry_hit: int = Field(5, ge=0, le=100, description="a non-Microsoft source knows this user or device")


class Reason(BaseModel):
    code: str
    points: int
    detail: str


class Triage(BaseModel):
    score: int = Field(ge=0, le=100)
    band: Literal["low", "medium", "high"]
    reasons: list[Reason]
    missing_inputs: list[str]


class TriageEnricher(BatchEnricher["TriageEnricher.Settings"]):
    name = "triage"
    runs_after = INPUTS
    timeout = 1.0

    class Settings(BatchEnricher.Settings):
        weights: Weights = Field(default_factory=Weights)
        high_confidence_threshold: int = Field(85, ge=0, le=100)
        departing_within_days: int = Field(30, ge=0)
        repeat_threshold: int = Field(2, ge=1)
        volume_threshold: int = Field(50, ge=1)
        medium_at: int = Field(40, ge=0, le=100, description="band 'medium' from this score")
        high_at: int = Field(70, ge=0, le=100, description="band 'high' from this score")

    async def enrich_batch(self, alerts: list[DlpAlert], contexts: list[EnrichmentContext]) -> list[Triage | None | Exception]:
        results: list[Triage | None | Exception] = []
        for alert, ctx in zip(alerts, contexts):
            try:
                results.append(self.score(alert, ctx))
            except Exception as exc:  # one alert's surprise fails that alert only
                results.append(exc)
        return results

    def score(self, alert: DlpAlert, ctx: EnrichmentContext) -> Triage:
        s, w = self.settings, self.settings.weights
        reasons: list[Reason] = []

        def add(code: str, points: int, detail: str) -> None:
            if points > 0:
                reasons.append(Reason(code=code, points=points, detail=detail))

        # Fields are read by name (`_field`), so a plugin that replaces a built-in input is read the same way.
        fragments = {name: ctx.fragment(name) for name in INPUTS}
        missing = [name for name in INPUTS if fragments[name] is None and name in ctx.statuses and ctx.statuses[name].state != "skipped"]

        user = fragments["user_context"]
        if user is not None:
            days = _field(user, "days_until_departure")
            if _field(user, "departed"):
                add("departing_user", w.departing_user, f"left {-days} day(s) before the alert" if days is not None else "has left")
            elif _field(user, "departing") and days is None:
                add("departing_user", w.departing_user, "resigned, last working day unknown")
            elif _field(user, "departing") and days is not None and days <= s.departing_within_days:
                add("departing_user", w.departing_user, f"leaves in {days} day(s)")
            if _field(user, "account_enabled") is False:
                add("account_disabled", w.account_disabled, "the account is disabled")

        info = fragments["sensitive_info"]
        if info is not None:
            by_category: dict[str, int] = {}
            for item in _field(info, "types") or []:
                if _field(item, "category") == "credentials" and (_field(item, "count") or 0) > 0:
                    by_category["credentials"] = by_category.get("credentials", 0) + _field(item, "count")
                confidence = _field(item, "confidence")
                if confidence is not None and confidence >= s.high_confidence_threshold:
                    by_category[_field(item, "category")] = by_category.get(_field(item, "category"), 0) + (_field(item, "count") or 0)
            for category, weight in (("financial", w.high_confidence_financial), ("health", w.high_confidence_health), ("personal", w.high_confidence_personal)):
                if by_category.get(category):
                    add(f"high_confidence_{category}", weight, f"{by_category[category]} high-confidence {category} match(es)")
            if by_category.get("credentials"):
                add("credentials", w.credentials, f"{by_category['credentials']} credential match(es)")
            total = _field(info, "total_count") or 0
            if total >= s.volume_threshold:
                add("volume", w.volume, f"{total} matches (threshold {s.volume_threshold})")

        prior = fragments["prior_incidents"]
        if prior is not None:
            recent = _field(prior, "last_30_days") or 0
            if recent >= s.repeat_threshold:
                add("repeat_offender", w.repeat_offender, f"{recent} prior DLP alert(s) in 30 days")
            same_policy = _field(prior, "same_policy_90_days")
            if same_policy:
                add("same_policy_repeat", w.same_policy_repeat, f"{same_policy} prior alert(s) of the same policy in 90 days")

        if alert.shared_externally:
            add("external_sharing", w.external_sharing, "shared with people outside the organisation")
        if alert.severity == "high":
            add("severity", w.severity_high, "alert severity high")
        elif alert.severity == "medium":
            add("severity", w.severity_medium, "alert severity medium")

        telemetry = fragments["telemetry"]
        if telemetry is not None and _field(telemetry, "found_any"):
            known = sorted(name for name, result in (_field(telemetry, "sources") or {}).items() if _field(result, "found"))
            add("telemetry_hit", w.telemetry_hit, "known to " + ", ".join(known))

        score = min(100, sum(r.points for r in reasons))
        band: Literal["low", "medium", "high"] = "high" if score >= s.high_at else "medium" if score >= s.medium_at else "low"
        reasons.sort(key=lambda r: (-r.points, r.code))
        return Triage(score=score, band=band, reasons=reasons, missing_inputs=missing)


def _field(fragment: Any, name: str) -> Any:
    """A fragment's field by name, or None when it has no such field."""
    return getattr(fragment, name, None)
