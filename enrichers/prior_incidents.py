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
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, Field

from enrichers._files import parse_datetime
from enrichers._hunting import HuntingClient, HuntingSettings, hunting_checks, user_filter
from pipeline.enrich.cache import CachePolicy, load_many
from pipeline.enrich.contract import BatchEnricher, EnrichmentContext
from pipeline.models import DlpAlert
from pipeline.plugins import shared_credential
from pipeline.state.history import AlertTally, HistoryEntry, HistorySettings, HistoryWriter, UserTallies, entry_of, open_history_store, recent_depth

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
    fragments_unchanged = True  # its fragments (shared by equal alerts, across batches) are never changed
    timeout = 5.0
    cache_policy = CachePolicy(ttl_seconds=600, max_entries=20_000)  # hunting results only

    class Settings(BatchEnricher.Settings):
        store: HistorySettings = Field(default_factory=HistorySettings)
        max_recent: int = Field(5, ge=0, le=50)
        hunting: HuntingSettings | None = Field(None, description="also ask Advanced Hunting for alerts older than the pipeline")

    @classmethod
    async def doctor(cls, settings: Any, services: Any) -> list[Any]:
        """The history store (its folder, or its table); Advanced Hunting: a token for its scope."""
        from pipeline.doctor import history_store_checks

        checks = await history_store_checks("history store", settings.store, services)
        return checks + await hunting_checks(settings.hunting, services)

    credential: Any = None  # for hunting; the services' shared one (start()) unless given

    def __init__(self, settings=None, services=None) -> None:
        super().__init__(settings, services)
        self.store = open_history_store(self.settings.store, services)
        self.hunting = HuntingClient(self.settings.hunting) if self.settings.hunting is not None else None
        self.writer = HistoryWriter(self.store)
        self._clock = services.clock if services is not None else None
        # Each user's prior alerts as counters (`AlertTally`), read incrementally from the store at most
        # every `store.reuse_seconds` and kept current with this process's own writes at once.
        self.tallies = UserTallies(
            self.store, "alert", names=_entry_names, ttl=self.settings.store.reuse_seconds, recent_per_point=recent_depth(self.settings.max_recent)
        )

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
        """Make sure each distinct user's history is at hand (read once per user and reused across
        batches for `store.reuse_seconds`: one query per user, not per alert or per batch), then write
        every alert of the batch and count it at once in its user's tally, so alerts of one batch see
        each other. The writes are made even when the read fails. Reading first leaves the writes held
        for the batch's own commit (`SqliteHistoryStore`), where a read after them committed them first."""
        now = self._now()
        entries = [entry_of(alert, now=now) for alert in alerts]
        pairs = [(alert, entry) for alert, entry in zip(alerts, entries) if entry is not None]
        since: dict[str, float] = {}
        for _, paired in pairs:  # 90 days before each user's oldest alert of the batch
            since[paired.user] = min(since.get(paired.user, math.inf), paired.at - 90 * DAY)
        try:
            await self.tallies.ensure(since)
        finally:
            written = await self._record([entry for alert, entry in pairs if alert.kind == "alert"])
            self.tallies.add(written)  # every user of the batch is held now: the tallies count what it wrote
        hunted: dict[Any, Any] = {}
        if self.hunting is not None:
            first = {entry.user: alert for alert, entry in pairs}
            cache = contexts[0].cache if contexts else None
            hunted = await load_many(cache, (("hunting", user) for user in first), lambda key: self._hunt(first[key[1]]), timeout=self.lookup_timeout)
        results: list[PriorIncidents | None | Exception] = [None] * len(alerts)
        for index, (alert, entry) in enumerate(zip(alerts, entries)):
            if entry is None:
                continue
            found = hunted.get(("hunting", entry.user)) if self.hunting is not None else None
            results[index] = found if isinstance(found, Exception) else self._summary(alert, entry.at, self.tallies.tally(entry.user), found)
        return results

    def _summary(self, alert: DlpAlert, until: float, tally: AlertTally, hunted: list[PriorAlert] | None) -> PriorIncidents:
        """The figures of the windows ending just before `until`, from the user's tally: bisections and
        counters, never a pass over the user's alerts. The alert's own id never counts."""
        own, policy, k = alert.alert_id, alert.policy_name, self.settings.max_recent
        last = _before(until)
        own_at = tally.at_of(own)
        mine = own_at is not None and until - 90 * DAY <= own_at <= last  # a revision of this alert at an earlier time
        extra = 1 if mine else 0
        wide = tally.window(until - 90 * DAY, last, policy=policy, k=k + extra)
        in_window = {7: tally.count(until - 7 * DAY, last), 30: tally.count(until - 30 * DAY, last), 90: wide.count}
        counts = {days: count - (1 if mine and own_at is not None and own_at >= until - days * DAY else 0) for days, count in in_window.items()}
        same_policy = wide.same_policy - (1 if mine and policy and tally.policy_of(own) == policy else 0) if policy else 0
        own_names = tally.names_of(own) if mine else frozenset()
        names = [name for name, count in wide.names.items() if count > (1 if name in own_names else 0)]
        newest = [(entry_id, at, pol, severity, "pipeline") for entry_id, at, pol, severity in wide.newest if entry_id != own][:k]
        sources: list[str] = [self.settings.store.kind]
        # the newest time counted: `newest` lists no entry of a time whose listed ids revisions moved away (`AlertTally`)
        last_at = tally.newest_at(until - 90 * DAY, last, skip=own) if counts[90] else None
        if hunted is not None:
            sources.append("hunting")
            added = []
            for found in hunted:
                found_at = found.at.timestamp()
                if found.alert_id != own and until - 90 * DAY <= found_at < until and not _counted(tally, found.alert_id, until):
                    added.append((found.alert_id, found_at, found.policy, found.severity, found.source))
            for days in counts:
                counts[days] += sum(1 for item in added if item[1] >= until - days * DAY)
            if policy:
                same_policy += sum(1 for item in added if item[2] == policy)
            newest = sorted(newest + added, key=lambda item: item[1], reverse=True)[:k]  # stable: the store's first at one time
            if added:
                newest_added = max(item[1] for item in added)
                last_at = newest_added if last_at is None or newest_added > last_at else last_at
        return _incidents(counts[7], counts[30], counts[90], same_policy, tuple(sorted(names)), last_at, tuple(newest), tuple(sources))

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


def _counted(tally: AlertTally, alert_id: str, until: float) -> bool:
    at = tally.at_of(alert_id)
    return at is not None and until - 90 * DAY <= at < until


@lru_cache(maxsize=1024)
def _incidents(
    last_7: int, last_30: int, last_90: int, same_policy: int, names: tuple[str, ...], last_at: float | None,
    newest: tuple[tuple[str, float, str | None, str | None, str], ...], sources: tuple[str, ...],
) -> PriorIncidents:
    """The fragment of these figures. Alerts with equal figures (the first alert of every user, say)
    share one (fragments are read-only), made once and dumped once while the engine keeps it
    (`fragments_unchanged`); at most 1,024 held.
    `last_at`: the newest prior alert's time, of the store's and hunting's alerts alike (that of
    `newest[0]`, or later when the tally counts alerts its lists no longer name: `AlertTally`)."""
    return PriorIncidents(
        last_7_days=last_7,
        last_30_days=last_30,
        last_90_days=last_90,
        same_policy_90_days=same_policy,
        sensitive_types=list(names),
        last_alert_at=datetime.fromtimestamp(last_at, tz=UTC) if last_at is not None else None,
        recent=[_prior_alert(*item) for item in newest],
        sources=list(sources),
    )


@lru_cache(maxsize=1024)
def _prior_alert(entry_id: str, at: float, policy: str | None, severity: str | None, source: str) -> PriorAlert:
    """The `recent` entry of a prior alert. Each user's newest alerts are in every one of their
    alerts' `recent` lists: made once, shared (fragments are read-only); at most 1,024 held."""
    return PriorAlert(alert_id=entry_id, at=datetime.fromtimestamp(at, tz=UTC), policy=policy, severity=severity, source=source)


@lru_cache(maxsize=1024)
def _names(names: tuple[str, ...]) -> frozenset[str]:
    return frozenset(names)


def _entry_names(entry: HistoryEntry) -> frozenset[str]:
    """The sensitive information type names of a stored alert (one shared set per distinct set)."""
    return _names(tuple(s["name"] for s in entry.sensitive_info if s.get("name")))
