"""prior_incidents: this user's earlier DLP alerts (7/30/90 days, same policy, types, the latest ones).

Every alert the pipeline sees (kind "alert") is written to the history store (pipeline/state/history.py:
SQLite by default, Azure Table Storage to share it between Functions instances), idempotently: a
re-run or a redelivery does not count twice, and the alert never counts in its own history. The
windows end just before the alert's own time (its own end point is not in them), so the result does
not depend on processing order, and a rule-match activity never counts the alert raised from it
(which carries the activity's time) as a prior incident. With a
`hunting` table, alerts older than the pipeline come from Advanced Hunting (AlertInfo/AlertEvidence).
Activities (kind "activity") get their user's prior alerts too, but are not recorded as alerts.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from functools import lru_cache
from operator import attrgetter
from typing import Any, NamedTuple

from pydantic import BaseModel, Field

from enrichers._files import parse_datetime
from enrichers._hunting import HuntingClient, HuntingSettings, user_filter
from pipeline.enrich.cache import CachePolicy, load_many
from pipeline.enrich.contract import BatchEnricher, EnrichmentContext
from pipeline.models import DlpAlert
from pipeline.plugins import shared_credential
from pipeline.state.history import HistoryEntry, HistorySettings, HistoryWriter, UserHistories, between, entry_of, open_history_store

log = logging.getLogger("pipeline.enrichers.prior_incidents")

DAY = 86400.0


class PriorAlert(BaseModel):
    alert_id: str
    at: datetime
    policy: str | None = None
    severity: str | None = None
    source: str = "pipeline"


class PriorIncidents(BaseModel):
    last_7_days: int
    last_30_days: int
    last_90_days: int
    same_policy_90_days: int = Field(description="prior alerts of the last 90 days that matched this alert's policy")
    sensitive_types: list[str] = Field(description="distinct sensitive information types of those alerts")
    last_alert_at: datetime | None
    recent: list[PriorAlert] = Field(description="the most recent prior alerts, newest first (bounded)")
    sources: list[str]


class PriorIncidentsEnricher(BatchEnricher["PriorIncidentsEnricher.Settings"]):
    name = "prior_incidents"
    timeout = 5.0
    cache_policy = CachePolicy(ttl_seconds=600, max_entries=20_000)  # hunting results only

    class Settings(BatchEnricher.Settings):
        store: HistorySettings = Field(default_factory=HistorySettings)
        max_recent: int = Field(5, ge=0, le=50)
        hunting: HuntingSettings | None = Field(None, description="also ask Advanced Hunting for alerts older than the pipeline")

    @classmethod
    async def doctor(cls, settings: Any, services: Any) -> list[Any]:
        """The history store (its folder, or its table); Advanced Hunting: a token for its scope."""
        from pipeline.doctor import Check, history_store_checks, token_check

        checks = await history_store_checks("history store", settings.store, services)
        if settings.hunting is not None:
            credential = shared_credential(services, settings.hunting.managed_identity_client_id)
            checks.append(await token_check("Advanced Hunting token", credential, settings.hunting.scope))
            checks.append(Check.skipped("Advanced Hunting query", "not sent by the doctor (ThreatHunting.Read.All is proven by the first query)"))
        return checks

    credential: Any = None  # for hunting; the services' shared one (start()) unless given

    def __init__(self, settings=None, services=None) -> None:
        super().__init__(settings, services)
        self.store = open_history_store(self.settings.store, services)
        self.hunting = HuntingClient(self.settings.hunting) if self.settings.hunting is not None else None
        self.writer = HistoryWriter(self.store)
        self._clock = services.clock if services is not None else None
        # Per-user history read from the store, reused across batches for `store.reuse_seconds` and kept
        # current with this process's own writes (other hosts' writes show up within that time).
        self.histories = UserHistories(self.store, "alert", convert=_rows, ttl=self.settings.store.reuse_seconds)

    async def start(self) -> None:
        await self.store.start()
        if self.hunting is not None:
            if self.hunting.credential is None:
                self.hunting.credential = self.credential or shared_credential(self.services, self.hunting.settings.managed_identity_client_id)
            await self.hunting.start()

    async def aclose(self) -> None:
        await self.store.aclose()
        if self.hunting is not None:
            await self.hunting.aclose()

    def _now(self) -> float:
        return self._clock() if self._clock is not None else time.time()

    async def _record(self, entries: list[HistoryEntry]) -> list[HistoryEntry]:
        return await self.writer.write("alert", entries)

    async def enrich_batch(self, alerts: list[DlpAlert], contexts: list[EnrichmentContext]) -> list[PriorIncidents | None | Exception]:
        """Write every alert of the batch first, so alerts of one batch see each other; then make
        sure each distinct user's history is at hand: read once per user and reused across batches
        for `store.reuse_seconds` (one query per user, not per alert or per batch)."""
        now = self._now()
        entries = [entry_of(alert, now=now) for alert in alerts]
        pairs = [(alert, entry) for alert, entry in zip(alerts, entries) if entry is not None]
        written = await self._record([entry for alert, entry in pairs if alert.kind == "alert"])
        self.histories.add(written)  # the histories held stay current with what this batch wrote
        since: dict[str, float] = {}
        for _, paired in pairs:
            since[paired.user] = min(since.get(paired.user, paired.at), paired.at) - 90 * DAY
        await self.histories.ensure(since)
        hunted: dict[Any, Any] = {}
        if self.hunting is not None:
            first = {entry.user: alert for alert, entry in pairs}
            cache = contexts[0].cache if contexts else None
            hunted = await load_many(cache, (("hunting", user) for user in first), lambda key: self._hunt(first[key[1]]), timeout=self.lookup_timeout)
        results: list[PriorIncidents | None | Exception] = [None] * len(alerts)
        for index, (alert, entry) in enumerate(zip(alerts, entries)):
            if entry is None:
                continue
            rows = between(self.histories.rows(entry.user), entry.at - 90 * DAY, _before(entry.at))
            found = hunted.get(("hunting", entry.user)) if self.hunting is not None else None
            results[index] = found if isinstance(found, Exception) else self._summary(alert, entry.at, rows, found)
        return results

    def _summary(self, alert: DlpAlert, until: float, rows: list[_Row], hunted: list[PriorAlert] | None) -> PriorIncidents:
        # Count on plain tuples with C-level passes (map, count, set); build models only for the
        # bounded `recent` list.
        own = alert.alert_id
        ids = list(map(_ID, rows))
        mine = ids.count(own)  # the alert never counts in its own history
        if mine == 0:
            ordered = rows
        elif mine == 1:
            at = ids.index(own)
            ordered = rows[:at] + rows[at + 1 :]
        else:
            ordered = [row for row in rows if row.entry_id != own]
        distinct = set(ids)
        distinct.discard(own)
        types: set[str] = set().union(*set(map(_TYPES, ordered)))  # few distinct sets, each hashed once
        sources: list[str] = [self.settings.store.kind]
        if hunted is not None or len(distinct) != len(ordered):
            prior: dict[str, _Row] = {}
            for row in ordered:  # newest first: a revised alert counts once, as its newest content
                prior.setdefault(row.entry_id, row)
            if hunted is not None:
                for found in hunted:
                    found_at = found.at.timestamp()
                    if found.alert_id != own and found.alert_id not in prior and until - 90 * DAY <= found_at < until:
                        prior[found.alert_id] = _Row(found.alert_id, found_at, found.policy, found.severity, frozenset(), found.source)
                sources.append("hunting")
            ordered = sorted(prior.values(), key=_AT, reverse=True)
        # One row per prior alert, newest first: each window's count is a bisection, the policy count
        # one C-level pass (no Python loop over a history of hundreds of alerts).
        policy = alert.policy_name
        recent = [_prior_alert(row.entry_id, row.at, row.policy, row.severity, row.source) for row in ordered[: self.settings.max_recent]]
        return PriorIncidents(
            last_7_days=len(between(ordered, until - 7 * DAY, until)),
            last_30_days=len(between(ordered, until - 30 * DAY, until)),
            last_90_days=len(ordered),
            same_policy_90_days=list(map(_POLICY, ordered)).count(policy) if policy else 0,
            sensitive_types=sorted(types),
            last_alert_at=recent[0].at if recent else (datetime.fromtimestamp(ordered[0].at, tz=UTC) if ordered else None),
            recent=recent,
            sources=sources,
        )

    async def _hunt(self, alert: DlpAlert) -> list[PriorAlert]:
        assert self.hunting is not None and alert.user is not None
        who = user_filter(alert.user, upn_column="AccountUpn", object_id_column="AccountObjectId")
        kql = (
            'AlertEvidence | where EntityType == "User" and (' + who + ")"
            ' | join kind=inner (AlertInfo | where ServiceSource == "Microsoft Data Loss Prevention") on AlertId'
            " | summarize Timestamp = min(Timestamp), Severity = take_any(Severity) by AlertId"
            " | order by Timestamp desc | take 500"
        )
        found = []
        for row in await self.hunting.query(kql):
            at = parse_datetime(row.get("Timestamp"))
            if isinstance(row.get("AlertId"), str) and at is not None:
                severity = str(row.get("Severity") or "").lower() or None
                found.append(PriorAlert(alert_id=row["AlertId"], at=at, severity=severity, source="hunting"))
        return found


def _before(at: float) -> float:
    """The latest time a prior incident can have: just before `at` (the window excludes its end point)."""
    return math.nextafter(at, -math.inf)


class _Row(NamedTuple):
    """What the counting needs of one prior alert (a history entry, or an alert found by hunting).
    Rows are held for every user's whole history (`UserHistories`): kept small."""

    entry_id: str
    at: float
    policy: str | None
    severity: str | None
    names: frozenset[str]  # sensitive information type names (one shared set per distinct set)
    source: str


_ID, _AT, _POLICY, _TYPES = attrgetter("entry_id"), attrgetter("at"), attrgetter("policy"), attrgetter("names")


@lru_cache(maxsize=8192)
def _prior_alert(entry_id: str, at: float, policy: str | None, severity: str | None, source: str) -> PriorAlert:
    """The `recent` entry of a row. Each user's newest rows are in every one of their alerts' `recent`
    lists: made once, shared (fragments are read-only)."""
    return PriorAlert(alert_id=entry_id, at=datetime.fromtimestamp(at, tz=UTC), policy=policy, severity=severity, source=source)


@lru_cache(maxsize=1024)
def _names(names: tuple[str, ...]) -> frozenset[str]:
    return frozenset(names)


def _row(entry_id: str, at: float, policy: str | None, severity: str | None, names: Iterable[str], source: str = "pipeline") -> _Row:
    return _Row(entry_id, at, policy, severity, _names(tuple(names)), source)


def _rows(entries: list[HistoryEntry]) -> list[_Row]:
    return [_row(e.entry_id, e.at, e.policy, e.severity, (s["name"] for s in e.sensitive_info if s.get("name"))) for e in entries]
