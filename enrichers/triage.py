"""triage: a score 0-100 with its reasons, from the other enrichers' fragments and the alert.

Runs after user_context, sensitive_info, prior_incidents and telemetry (those configured); it uses
what they produced and names the ones whose output was missing in `missing_inputs`, so a score
computed without, say, the HR context is recognisable. Every weight is configurable; the score is
the sum of the points of the reasons that hold, capped at 100. Sinks route on it with
`when.triage_score_at_least` (it reads `enrichments.triage.score`).

Telemetry counts by its values, not its presence: `telemetry_rules` (defaults: identity risk level,
MFA state, upload volume, device risk, USB writes, unusual sign-in) each name the fields they read
(any telemetry source, or one), a test and the points. Guarantees: every reason carries its points,
the fragment it came from (`source`) and the values it weighed (`evidence`: counts, levels, days,
field values of telemetry, never a matched value); the band thresholds used are in the record
(`thresholds`); a rule fires at most once per alert; `telemetry_hit` (presence only) counts only
when no telemetry rule fired.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from typing import Any, Literal, cast

import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.enrich.contract import BatchEnricher, EnrichmentContext
from pipeline.models import DlpAlert

INPUTS = ("user_context", "sensitive_info", "prior_incidents", "telemetry")


class Weights(BaseModel):
    model_config = ConfigDict(extra="forbid")

    departing_user: int = Field(30, ge=0, le=100, description="user leaving within `departing_within_days` (or already gone)")
    departing_soon: int = Field(20, ge=0, le=100, description="user leaving within `departing_soon_days` (but not within `departing_within_days`)")
    contractor: int = Field(5, ge=0, le=100, description="employee type one of `contractor_types`")
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
    telemetry_hit: int = Field(5, ge=0, le=100, description="a non-Microsoft source knows this user or device, and no telemetry rule fired")


Evidence = str | int | float | bool | None


class TelemetryRule(BaseModel):
    """One test of a telemetry value: `fields` are the names it reads (the first one a source has);
    `source` limits it to one telemetry source. Values from CSV files are strings: numbers and
    booleans ("true", "no", "enabled", "0", ...) are read as such."""

    model_config = ConfigDict(extra="forbid")

    code: str = Field(pattern=r"^[a-z][a-z0-9_]{0,40}$")
    label: str = Field(description="what the reason says, e.g. \"identity risk high\"")
    fields: list[str] = Field(min_length=1)
    source: str | None = Field(None, description="only this telemetry source (default: any)")
    test: Literal["in", "not_in", "at_least", "at_most", "is_true", "is_false"]
    values: list[str] = Field(default_factory=list, description="for in / not_in (compared case-insensitively)")
    threshold: float | None = Field(None, description="for at_least / at_most")
    points: int = Field(ge=0, le=100)

    @model_validator(mode="after")
    def _operands(self) -> TelemetryRule:
        if self.test in ("in", "not_in") and not self.values:
            raise ValueError(f"rule {self.code}: test '{self.test}' needs values")
        if self.test in ("at_least", "at_most") and self.threshold is None:
            raise ValueError(f"rule {self.code}: test '{self.test}' needs threshold")
        return self

    def holds(self, value: Any) -> bool:
        if self.test in ("in", "not_in"):
            inside = str(value).strip().lower() in {v.lower() for v in self.values}
            return inside if self.test == "in" else not inside
        if self.test in ("is_true", "is_false"):
            flag = _boolean(value)
            return flag is (self.test == "is_true")
        number = _number(value)
        if number is None or self.threshold is None:
            return False
        return number >= self.threshold if self.test == "at_least" else number <= self.threshold


_RISK_FIELDS = ["risk_level", "identity_risk", "user_risk_level", "risk_state", "risk", "okta_risk"]
DEFAULT_TELEMETRY_RULES: list[dict[str, Any]] = [
    {"code": "identity_risk", "label": "identity risk high", "fields": _RISK_FIELDS, "test": "in", "values": ["high"], "points": 20},
    {"code": "identity_risk_medium", "label": "identity risk medium", "fields": _RISK_FIELDS, "test": "in", "values": ["medium"], "points": 8},
    {"code": "mfa_off", "label": "MFA not in use", "fields": ["mfa_enrolled", "mfa_registered", "mfa_enabled", "is_mfa_registered", "mfa"], "test": "is_false", "points": 15},
    {"code": "upload_volume", "label": "many uploads", "fields": ["proxy_uploads_24h", "uploads_24h", "upload_count", "uploads"], "test": "at_least", "threshold": 20, "points": 15},
    {"code": "device_risk", "label": "device at risk", "fields": ["device_risk", "device_risk_level", "edr_status", "health_status"], "test": "in", "values": ["high", "at_risk", "unhealthy", "compromised", "infected"], "points": 15},
    {"code": "usb_writes", "label": "many USB writes", "fields": ["usb_writes_24h", "usb_writes"], "test": "at_least", "threshold": 10, "points": 5},
    {"code": "unusual_sign_in", "label": "unusual sign-in", "fields": ["unusual_sign_in", "sign_in_unusual", "impossible_travel", "unfamiliar_location"], "test": "is_true", "points": 10},
]


class Reason(BaseModel):
    code: str
    points: int = Field(description="the weight this reason added to the score")
    detail: str
    source: Literal["user_context", "sensitive_info", "prior_incidents", "telemetry", "alert"] = "alert"
    evidence: dict[str, Evidence] = Field(default_factory=dict, description="the values weighed (never a matched value)")


class Triage(BaseModel):
    score: int = Field(ge=0, le=100)
    band: Literal["low", "medium", "high"]
    thresholds: dict[str, int] = Field(default_factory=dict, description="band → the score it starts at")
    reasons: list[Reason]
    missing_inputs: list[str]


class TriageEnricher(BatchEnricher["TriageEnricher.Settings"]):
    name = "triage"
    fragments_unchanged = True  # its fragments (shared by equal alerts, across batches) are never changed
    runs_after = INPUTS
    timeout = 1.0

    class Settings(BatchEnricher.Settings):
        weights: Weights = Field(default_factory=Weights)
        high_confidence_threshold: int = Field(85, ge=0, le=100)
        departing_within_days: int = Field(30, ge=0, description="`departing_user` when the last working day is this close")
        departing_soon_days: int = Field(90, ge=0, description="`departing_soon` when it is this close (and further than departing_within_days)")
        contractor_types: list[str] = Field(default_factory=lambda: ["contractor", "vendor", "external", "guest"], description="employee types (case-insensitive) that add `contractor`")
        telemetry_rules: list[TelemetryRule] = Field(default_factory=lambda: [TelemetryRule(**rule) for rule in DEFAULT_TELEMETRY_RULES])
        repeat_threshold: int = Field(2, ge=1)
        volume_threshold: int = Field(50, ge=1)
        medium_at: int = Field(40, ge=0, le=100, description="band 'medium' from this score")
        high_at: int = Field(70, ge=0, le=100, description="band 'high' from this score")

        @model_validator(mode="after")
        def _bands(self) -> TriageEnricher.Settings:
            if self.medium_at > self.high_at:
                raise ValueError("medium_at must not be above high_at")
            codes = [rule.code for rule in self.telemetry_rules]
            if len(codes) != len(set(codes)):
                raise ValueError("telemetry_rules: each code once")
            return self

    async def enrich_batch(self, alerts: list[DlpAlert], contexts: list[EnrichmentContext]) -> list[Triage | None | Exception]:
        results: list[Triage | None | Exception] = []
        for alert, ctx in zip(alerts, contexts):
            try:
                results.append(self.score(alert, ctx))
            except Exception as exc:  # one alert's surprise fails that alert only
                results.append(exc)
        return results

    @cached_property
    def _contractor_types(self) -> frozenset[str]:
        """The settings' contractor types, lowercased (settings do not change once the enricher is built)."""
        return frozenset(t.lower() for t in self.settings.contractor_types)

    def score(self, alert: DlpAlert, ctx: EnrichmentContext) -> Triage:
        """The alert's triage."""
        s, w = self.settings, self.settings.weights
        # The reasons' fields, validated as `Reason`s by the one validation of `Triage` below (one call
        # into pydantic per alert, not one per reason).
        reasons: list[dict[str, Any]] = []

        def add(code: str, points: int, detail: str, source: str = "alert", **evidence: Evidence) -> None:
            if points > 0:
                reasons.append({"code": code, "points": points, "detail": detail, "source": source, "evidence": evidence})

        # Fields are read by name (`_field`), so a plugin that replaces a built-in input is read the same way.
        fragments = {name: ctx.fragment(name) for name in INPUTS}
        missing = [name for name in INPUTS if fragments[name] is None and name in ctx.statuses and ctx.statuses[name].state != "skipped"]

        user = fragments["user_context"]
        if user is not None:
            days = _field(user, "days_until_departure", None)
            leaves = _field(user, "last_working_date", None) or _field(user, "leave_date", None)
            when = leaves.date().isoformat() if hasattr(leaves, "date") else None
            if _field(user, "departed", None):
                add("departing_user", w.departing_user, f"left {-days} day(s) before the alert" if days is not None else "has left", "user_context", days_until_departure=days, last_working_date=when)
            elif _field(user, "departing", None) and days is None:
                add("departing_user", w.departing_user, "resigned, last working day unknown", "user_context", days_until_departure=None)
            elif _field(user, "departing", None) and days is not None and days <= s.departing_within_days:
                add("departing_user", w.departing_user, f"leaves in {days} day(s)", "user_context", days_until_departure=days, last_working_date=when)
            elif _field(user, "departing", None) and days is not None and days <= s.departing_soon_days:
                add("departing_soon", w.departing_soon, f"leaves in {days} day(s)", "user_context", days_until_departure=days, last_working_date=when)
            if _field(user, "account_enabled", None) is False:
                add("account_disabled", w.account_disabled, "the account is disabled", "user_context", account_enabled=False)
            employee_type = _field(user, "employee_type", None)
            if isinstance(employee_type, str) and employee_type.strip().lower() in self._contractor_types:
                add("contractor", w.contractor, f"employee type {employee_type}", "user_context", employee_type=employee_type)

        info = fragments["sensitive_info"]
        if info is not None:
            by_category: dict[str, int] = {}
            confidence_of: dict[str, int] = {}
            for item in _field(info, "types", None) or []:
                category = _field(item, "category", None)
                if category == "credentials" and (_field(item, "count", None) or 0) > 0:
                    by_category["credentials"] = by_category.get("credentials", 0) + _field(item, "count", None)
                confidence = _field(item, "confidence", None)
                if confidence is not None and confidence >= s.high_confidence_threshold:
                    by_category[category] = by_category.get(category, 0) + (_field(item, "count", None) or 0)
                    confidence_of[category] = max(confidence_of.get(category, 0), confidence)
            for category, weight in (("financial", w.high_confidence_financial), ("health", w.high_confidence_health), ("personal", w.high_confidence_personal)):
                if by_category.get(category):
                    add(f"high_confidence_{category}", weight, f"{by_category[category]} high-confidence {category} match(es)", "sensitive_info",
                        matches=by_category[category], max_confidence=confidence_of.get(category), threshold=s.high_confidence_threshold)
            if by_category.get("credentials"):
                add("credentials", w.credentials, f"{by_category['credentials']} credential match(es)", "sensitive_info", matches=by_category["credentials"])
            total = _field(info, "total_count", None) or 0
            if total >= s.volume_threshold:
                add("volume", w.volume, f"{total} matches (threshold {s.volume_threshold})", "sensitive_info", matches=total, threshold=s.volume_threshold)

        prior = fragments["prior_incidents"]
        if prior is not None:
            recent = _field(prior, "last_30_days", None) or 0
            if recent >= s.repeat_threshold:
                add("repeat_offender", w.repeat_offender, f"{recent} prior DLP alert(s) in 30 days", "prior_incidents", last_30_days=recent, threshold=s.repeat_threshold)
            same_policy = _field(prior, "same_policy_90_days", None)
            if same_policy:
                add("same_policy_repeat", w.same_policy_repeat, f"{same_policy} prior alert(s) of the same policy in 90 days", "prior_incidents", same_policy_90_days=same_policy)

        if alert.shared_externally:
            add("external_sharing", w.external_sharing, "shared with people outside the organisation", shared_externally=True)
        if alert.severity == "high":
            add("severity", w.severity_high, "alert severity high", severity="high")
        elif alert.severity == "medium":
            add("severity", w.severity_medium, "alert severity medium", severity="medium")

        telemetry = fragments["telemetry"]
        if telemetry is not None:
            fired = False
            sources = _field(telemetry, "sources", None) or {}
            found = [(name, sources[name]) for name in sorted(sources) if _field(sources[name], "found", None)]  # in name order
            for rule in s.telemetry_rules if found else ():  # no source found anything: no rule can fire
                hit = _first_hit(rule, found)
                if hit is not None:
                    source_name, field, value = hit
                    fired = True
                    add(rule.code, rule.points, f"{rule.label} ({source_name}.{field} = {value})", "telemetry", **{f"{source_name}.{field}": _evidence(value)})
            if not fired and _field(telemetry, "found_any", None):
                known = [name for name, _ in found]
                add("telemetry_hit", w.telemetry_hit, "known to " + ", ".join(known), "telemetry", sources=", ".join(known))

        score = min(100, sum(r["points"] for r in reasons))
        band: Literal["low", "medium", "high"] = "high" if score >= s.high_at else "medium" if score >= s.medium_at else "low"
        reasons.sort(key=lambda r: (-r["points"], r["code"]))
        # Equal reasons make an equal triage (score, band and the thresholds follow from them and the
        # settings): one fragment, shared (fragments are read-only; dumped once while the engine keeps
        # it: `fragments_unchanged`). Told apart by their JSON, which tells apart what compares equal
        # but is written otherwise (1, 1.0, true).
        try:
            key = orjson.dumps((reasons, missing))
        except TypeError:  # what orjson cannot write (an int beyond 64 bits): not shared
            return self._triage(score, band, reasons, missing)
        made = self._made.get(key)
        if made is None:
            if len(self._made) >= MADE_AT_MOST:
                self._made.clear()
            made = self._made[key] = self._triage(score, band, reasons, missing)
        return made

    def _triage(self, score: int, band: str, reasons: list[dict[str, Any]], missing: list[str]) -> Triage:
        """The triage of these figures, validated (the reasons' fields as `Reason`s: one call into pydantic)."""
        s = self.settings
        return Triage.model_validate(
            {"score": score, "band": band, "thresholds": {"medium": s.medium_at, "high": s.high_at}, "reasons": reasons, "missing_inputs": missing}
        )

    @cached_property
    def _made(self) -> dict[bytes, Triage]:
        """The triages made, by their reasons and missing inputs: at most `MADE_AT_MOST` (then emptied)."""
        return {}


MADE_AT_MOST = 1_024  # distinct triages kept for sharing


def _first_hit(rule: TelemetryRule, found: list[tuple[str, Any]]) -> tuple[str, str, Any] | None:
    """(source, field, value) of the first value the rule holds for; `found`: (name, result) of the
    sources that found something, in name order."""
    for source_name, result in found:
        if rule.source is not None and source_name != rule.source:
            continue
        fields = _field(result, "fields", None) or {}
        for field in rule.fields:
            if field in fields and fields[field] not in (None, ""):
                if rule.holds(fields[field]):
                    return source_name, field, fields[field]
                break  # the first field the source has decides for that source
    return None


def _evidence(value: Any) -> Evidence:
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)


def _boolean(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    text = str(value).strip().lower()
    if text in ("true", "yes", "y", "1", "on", "enabled", "enrolled", "registered"):
        return True
    if text in ("false", "no", "n", "0", "off", "disabled", "not enrolled", "none"):
        return False
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        return None


# A fragment's field by name: `_field(fragment, name, None)`, None when it has no such field
# (the builtin itself: ~20 reads per alert, no Python call around each).
_field = cast(Callable[[Any, str, None], Any], getattr)
