"""sensitive_info: a summary of the alert's sensitive information types. Never matched values.

When an alert carries no SIT data (Streaming API and Graph alerts usually do not), or types without
counts (Sentinel) or without confidence (Graph `additionalData`), it is correlated with the DLP rule-match activities that passed
through the pipeline (Management Activity records, CloudAppEvents rows; kept in the history store
by user, file and time), or, when `hunting` is configured, with CloudAppEvents rows found through
Advanced Hunting. Activities of one batch are stored before any alert of it is looked at.

Every type is named and filed: the name the record carries first, then the `custom_types` table of
the config, then the bundled table of Microsoft's built-in types (enrichers/data/sensitive_types.csv,
from Microsoft Learn), then the tenant's own list (`tenant_types`: Management Activity API
`resources/dlpSensitiveTypes`, fetched once a day). The category comes from the config table, then
the bundled table, then keywords in the name; a type none of them knows is "custom". Sensitivity
label ids are named from the tenant's labels (`labels.graph`: Microsoft Graph, fetched once a day),
then the `labels.names` table. A lookup service that is down or refuses costs names, never the alert.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import re
import time
from bisect import bisect_left, bisect_right, insort
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Literal, NamedTuple, cast

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from enrichers._hunting import HuntingClient, HuntingSettings, hunting_checks, user_filter
from enrichers._names import GraphLabels, LabelName, LabelSettings, RefreshedTable, TenantTypes, TenantTypesSettings, builtin_types
from pipeline.enrich.cache import CachePolicy, load_many
from pipeline.enrich.contract import BatchEnricher, EnrichmentContext
from pipeline.models import DlpAlert, SensitiveInfo
from pipeline.plugins import shared_credential
from pipeline.state.history import HistoryEntry, HistorySettings, HistoryWriter, UserHistories, entry_of, event_time, open_history_store, user_key

log = logging.getLogger("pipeline.enrichers.sensitive_info")

Category = Literal["financial", "personal", "health", "credentials", "custom"]

# Name keywords decide the category of a type that no table files.
_KEYWORDS: tuple[tuple[Category, tuple[str, ...]], ...] = (
    ("credentials", ("password", "credential", "secret", "access key", "account key", "auth key", "private key", "token", "connection string")),
    ("health", ("health", "medical", "drug", "disease", "icd", "dea number")),
    ("financial", ("credit card", "debit card", "bank", "iban", "swift", "routing", "account number", "tax", "debit")),
    ("personal", ("social security", "ssn", "passport", "driver", "national id", "identity", "birth", "address", "phone", "email")),
)
_WORD_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def category_of(name: str | None, type_id: str | None) -> Category:
    """The category of a type: the bundled table's for a built-in type, else keywords in its name
    (written "Credit Card Number" or "CreditCardNumber"), else "custom"."""
    if type_id and (known := builtin_types().get(type_id.lower())) is not None:
        return cast(Category, known[1])  # the table holds only the four built-in categories (a test checks)
    lowered = _WORD_BOUNDARY.sub(" ", name or "").lower()
    for category, words in _KEYWORDS:
        if any(word in lowered for word in words):
            return category
    return "custom"


NameSource = Literal["record", "config", "builtin", "tenant"]


class CustomType(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256)
    category: Category = "custom"


class SensitivityLabel(BaseModel):
    id: str
    name: str | None
    parent: str | None = Field(None, description="the parent label's name, for a sublabel")
    source: Literal["graph", "config"] | None = Field(None, description="where the name came from; None: unnamed")


class SensitiveType(BaseModel):
    name: str | None
    type_id: str | None
    count: int | None
    confidence: int | None
    category: Category
    name_source: NameSource | None = Field(None, description="where the name came from: the record, the config, the bundled table, the tenant's list")


class SensitiveInfoSummary(BaseModel):
    types: list[SensitiveType]
    type_names: list[str]
    type_ids: list[str]
    total_count: int
    max_confidence: int | None
    high_confidence_count: int = Field(description="matches in types detected at or above the high-confidence threshold")
    categories: list[Category]
    sensitivity_label_ids: list[str]
    sensitivity_labels: list[SensitivityLabel] = Field(default_factory=list, description="each label id with its name")
    sensitivity_label_names: list[str] = Field(default_factory=list)
    source: Literal["alert", "correlated", "hunting"] = Field("alert", description="where the types came from")
    correlated_ids: list[str] = Field(
        default_factory=list, description="ids of the rule-match activities used, sorted: the newest `max_correlated_ids` of them when there are more"
    )
    correlated_count: int = Field(0, description="how many rule-match activities were used (`correlated_ids` lists at most `max_correlated_ids`)")


SHARED_AT_MOST = 1_024  # distinct summaries kept for sharing across batches


class SensitiveInfoEnricher(BatchEnricher["SensitiveInfoEnricher.Settings"]):
    name = "sensitive_info"
    fragments_unchanged = True  # its fragments (shared by equal alerts, across batches) are never changed
    timeout = 5.0
    cache_policy = CachePolicy(ttl_seconds=300, max_entries=20_000)  # hunting results only

    class Settings(BatchEnricher.Settings):
        high_confidence_threshold: int = Field(85, ge=0, le=100)
        correlate: bool = Field(True, description="fill alerts without SIT data from rule-match activities seen by the pipeline")
        window_minutes: float = Field(60, gt=0, le=7 * 24 * 60, description="an activity matches within this time of the alert")
        max_correlated_ids: int = Field(
            20, ge=0, le=1000, description="`correlated_ids` lists at most this many activities, the newest; `correlated_count` counts them all"
        )
        store: HistorySettings = Field(default_factory=HistorySettings)
        hunting: HuntingSettings | None = Field(None, description="else look for the rule match in CloudAppEvents via Advanced Hunting")
        custom_types: dict[str, CustomType] = Field(default_factory=dict, description="type id -> name and category, for the tenant's custom types")
        tenant_types: TenantTypesSettings | None = Field(None, description="present = also name types from the tenant's list (Management Activity API)")
        labels: LabelSettings = Field(default_factory=LabelSettings)

        @field_validator("custom_types")
        @classmethod
        def _lower_ids(cls, value: dict[str, CustomType]) -> dict[str, CustomType]:
            return {key.strip().lower(): entry for key, entry in value.items()}

    @classmethod
    async def doctor(cls, settings: Any, services: Any) -> list[Any]:
        """The history store (its folder, or its table); Advanced Hunting: a token for its scope."""
        from pipeline.doctor import Check, history_store_checks

        checks = await history_store_checks("history store", settings.store, services) if settings.correlate else [Check.skipped("history store", "correlate = false")]
        return checks + await hunting_checks(settings.hunting, services)

    credential: Any = None  # for hunting; the services' shared one (start()) unless given

    def __init__(self, settings=None, services=None) -> None:
        super().__init__(settings, services)
        self.store = open_history_store(self.settings.store, services) if self.settings.correlate else None
        self.hunting = HuntingClient(self.settings.hunting) if self.settings.hunting is not None else None
        self._clock = services.clock if services is not None else time.time
        self.writer = HistoryWriter(self.store) if self.store is not None else None
        # Each user's activities, read once and reused across batches for `store.reuse_seconds`, kept
        # current with this process's own writes (other hosts' writes show up within that time).
        # Held as groups of equal activities (`_Activities`): correlation walks groups, not rows.
        self.activities = UserHistories(self.store, "activity", holder=_Activities, ttl=self.settings.store.reuse_seconds) if self.store is not None else None
        self._tenant_client: TenantTypes | None = None
        self._labels_client: GraphLabels | None = None
        self.tenant_types: RefreshedTable[str] | None = None
        self.graph_labels: RefreshedTable[LabelName] | None = None
        self._shared: dict[tuple[Any, ...], SensitiveInfoSummary] = {}  # `_shared_summary`'s, named from `_shared_tables`
        self._shared_tables: tuple[Any, Any] = (None, None)

    async def start(self) -> None:
        s = self.settings
        if s.tenant_types is not None and self._tenant_client is None:
            credential = self.credential or shared_credential(self.services, s.tenant_types.managed_identity_client_id)
            self._tenant_client = TenantTypes(s.tenant_types, credential)
            self.tenant_types = RefreshedTable(
                "the tenant's sensitive information types (Management Activity API)", self._tenant_client.fetch,
                refresh_seconds=s.tenant_types.refresh_hours * 3600, retry_seconds=s.tenant_types.retry_minutes * 60, clock=self._clock,
                hint="Check that the app has the Office 365 Management APIs permission ActivityFeed.Read (admin consent) and that tenant_id is your tenant's id.",
            )
        if s.labels.graph is not None and self._labels_client is None:
            credential = self.credential or shared_credential(self.services, s.labels.graph.managed_identity_client_id)
            self._labels_client = GraphLabels(s.labels.graph, credential)
            self.graph_labels = RefreshedTable(
                "the tenant's sensitivity labels (Microsoft Graph)", self._labels_client.fetch,
                refresh_seconds=s.labels.graph.refresh_hours * 3600, retry_seconds=s.labels.graph.retry_minutes * 60, clock=self._clock,
                hint="Check that the app has the Microsoft Graph application permission SensitivityLabel.Read (or SensitivityLabels.Read.All), admin consented.",
            )
        if self.store is not None:
            await self.store.start()
        if self.hunting is not None:
            if self.hunting.credential is None:
                self.hunting.credential = self.credential or shared_credential(self.services, self.hunting.settings.managed_identity_client_id)
            await self.hunting.start()

    async def aclose(self) -> None:
        for client in (self._tenant_client, self._labels_client):
            if client is not None:
                await client.aclose()
        if self.store is not None:
            await self.store.aclose()
        if self.hunting is not None:
            await self.hunting.aclose()

    async def _record(self, alerts: list[DlpAlert]) -> None:
        if self.writer is None:
            return
        now = self._clock()
        written = await self.writer.write("activity", [e for a in alerts if a.kind == "activity" and a.sensitive_info and (e := entry_of(a, now=now)) is not None])
        if self.activities is not None:
            self.activities.add(written)

    async def enrich_batch(self, alerts: list[DlpAlert], contexts: list[EnrichmentContext]) -> list[SensitiveInfoSummary | None | Exception]:
        """Store the batch's rule-match activities first (alerts of one batch see them), then read
        each user's activities once for the batch and correlate every alert that needs it."""
        await self._record(alerts)
        cache = contexts[0].cache if contexts else None
        needing = [index for index, alert in enumerate(alerts) if _needs_correlation(alert)]
        correlated: dict[int, Any] = {}  # alert index -> a _Correlation or None
        hunted: dict[int, Any] = {}  # alert index -> the same from Advanced Hunting, or the exception
        if needing:
            activities = await self._activities([alerts[index] for index in needing])
            # Alerts of one user with the same time, files, policy and type names correlate alike: once
            # per batch (a user's activities do not change while the batch is correlated).
            answers: dict[tuple[Any, ...], Any] = {}
            for index in needing:
                alert = alerts[index]
                user = user_key(alert) or ""
                key = (user, event_time(alert, self._clock()), alert.policy_name, *_alert_keys(alert))
                if key not in answers:
                    answers[key] = self._correlate(alert, activities.get(user) or _Activities())
                correlated[index] = answers[key]
            hunt = [index for index in needing if correlated[index] is None] if self.hunting is not None else []
            if hunt:
                by_id = {alerts[index].alert_id: alerts[index] for index in hunt}
                answers = await load_many(cache, (("hunting", alert_id) for alert_id in by_id), lambda key: self._hunt(by_id[key[1]]), timeout=self.lookup_timeout)
                hunted = {index: answers[("hunting", alerts[index].alert_id)] for index in hunt}
        found: list[tuple[list[SensitiveInfo], list[str], str, list[str], int] | Exception] = []
        for index, alert in enumerate(alerts):
            labels = sorted({f.sensitivity_label_id for f in alert.files if f.sensitivity_label_id})
            infos, ids, source, count = list(alert.sensitive_info), [], "alert", 0
            match, source_if_found = correlated.get(index), "correlated"
            if index in hunted:
                match, source_if_found = hunted[index], "hunting"
                if isinstance(match, Exception):
                    found.append(match)
                    continue
            if match:
                (infos, ids, found_labels, count), source = match, source_if_found
                labels = sorted(set(labels) | set(found_labels))
            found.append((infos, labels, source, ids, count))
        await self._refresh_names([item for item in found if not isinstance(item, Exception)])
        return [item if isinstance(item, Exception) else (self._shared_summary(*item) if item[0] or item[1] else None) for item in found]

    def _shared_summary(self, infos: list[SensitiveInfo], labels: list[str], source: str, ids: list[str], count: int) -> SensitiveInfoSummary:
        """`summarize`, shared: alerts with equal types, labels and correlation get one summary
        (fragments are read-only; dumped once while the engine keeps it: `fragments_unchanged`), across batches while the
        tenant's name tables in use are the ones it was made with (a refresh replaces a table). At
        most `SHARED_AT_MOST` summaries are kept (then emptied)."""
        tables = (self.tenant_types.table if self.tenant_types is not None else None, self.graph_labels.table if self.graph_labels is not None else None)
        if len(self._shared) >= SHARED_AT_MOST or tables[0] is not self._shared_tables[0] or tables[1] is not self._shared_tables[1]:
            self._shared.clear()  # full, or the tables were replaced: summaries of the old ones would only hold them in memory
            self._shared_tables = tables
        key = (tuple((s.name, s.type_id, s.count, s.confidence) for s in infos), tuple(labels), source, tuple(ids), count)
        summary = self._shared.get(key)
        if summary is None:
            summary = self._shared[key] = self.summarize(infos, labels, source=source, ids=ids, count=count)
        return summary

    async def _refresh_names(self, found: list[tuple[list[SensitiveInfo], list[str], str, list[str], int]]) -> None:
        """Fetch the tenant's lists when stale, and only when the batch has an id they could name."""
        waits: list[Awaitable[Any]] = []
        if self.tenant_types is not None and any(self._local_name(s)[0] is None for infos, *_ in found for s in infos if s.type_id):
            waits.append(self.tenant_types.current())
        if self.graph_labels is not None and any(labels for _infos, labels, *_ in found):
            waits.append(self.graph_labels.current())
        if waits:
            await asyncio.gather(*waits)

    def _local_name(self, info: SensitiveInfo) -> tuple[str | None, NameSource | None]:
        """A type's name from the record, the config table or the bundled table."""
        if info.name:
            return info.name, "record"
        type_id = (info.type_id or "").lower()
        if (custom := self.settings.custom_types.get(type_id)) is not None:
            return custom.name, "config"
        if (builtin := builtin_types().get(type_id)) is not None:
            return builtin[0], "builtin"
        return None, None

    def named_type(self, info: SensitiveInfo) -> SensitiveType:
        """One type with its name (record, config, bundled table, tenant's list) and category."""
        name, name_source = self._local_name(info)
        type_id = (info.type_id or "").lower()
        if name is None and type_id and self.tenant_types is not None and (tenant_name := self.tenant_types.table.get(type_id)):
            name, name_source = tenant_name, "tenant"
        custom = self.settings.custom_types.get(type_id)
        category = custom.category if custom is not None else category_of(name, info.type_id)
        return SensitiveType(name=name, type_id=info.type_id, count=info.count, confidence=info.confidence, category=category, name_source=name_source)

    def named_label(self, label_id: str) -> SensitivityLabel:
        key = label_id.lower()
        if self.graph_labels is not None and (label := self.graph_labels.table.get(key)) is not None:
            return SensitivityLabel(id=label_id, name=label.name, parent=label.parent, source="graph")
        if (name := self.settings.labels.names.get(key)) is not None:
            return SensitivityLabel(id=label_id, name=name, source="config")
        return SensitivityLabel(id=label_id, name=None)

    def summarize(
        self, infos: list[SensitiveInfo], labels: list[str], *, source: str = "alert", ids: list[str] | None = None, count: int | None = None
    ) -> SensitiveInfoSummary:
        """`ids`: the activity ids to list (the caller bounds them); `count`: how many were used (default: len(ids))."""
        threshold = self.settings.high_confidence_threshold
        types = [self.named_type(s) for s in infos]
        named_labels = [self.named_label(label) for label in labels]
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
            sensitivity_labels=named_labels,
            sensitivity_label_names=[label.name for label in named_labels if label.name],
            source=source,
            correlated_ids=sorted(ids or []),
            correlated_count=len(ids or []) if count is None else count,
        )

    async def _activities(self, alerts: list[DlpAlert]) -> dict[str, _Activities]:
        """Each user's stored rule-match activities around the batch's alerts: one read per user,
        reused across batches (`UserHistories`)."""
        if self.activities is None:
            return {}
        window, now = self.settings.window_minutes * 60, self._clock()
        since: dict[str, float] = {}
        for alert in alerts:
            user = user_key(alert)
            if user is not None:
                since[user] = min(since.get(user, float("inf")), event_time(alert, now) - window)
        await self.activities.ensure(since)
        return {user: self.activities.rows(user) for user in since}

    def _correlate(self, alert: DlpAlert, activities: _Activities) -> _Correlation | None:
        """Rule-match activities of the same user near the alert's time, on the same file and policy:
        of each activity, its newest content that matches. One test per group of equal activities
        (`_Activities`), never one per activity; the ids are bounded (`max_correlated_ids`, the newest)."""
        at = event_time(alert, self._clock())
        window = self.settings.window_minutes * 60
        files = {f.name.lower() for f in alert.files if f.name}
        names = {s.name.lower() for s in alert.sensitive_info if s.name}
        matched = [
            group for group in activities.between(at - window, at + window)
            if not (files and group.files and not files & group.files)
            and not (alert.policy_name and group.policy and alert.policy_name != group.policy)
            and not (names and not names & group.names)
        ]
        if not matched:
            return None
        limit = self.settings.max_correlated_ids
        if any(group.shares_ids for group in matched):
            return _revisions_correlated(matched, limit)
        # Every id is in one group only: counts add up, and each group's types and labels are used.
        types = {group.types: group.infos for group in matched}  # each distinct list of types merged once, newest first
        newest = heapq.merge(*(group.rows_newest_first() for group in matched), reverse=True)
        return _Correlation(
            merge_types(types.values()),
            [entry_id for _at, _number, entry_id in itertools.islice(newest, limit)],
            sorted({label for group in matched for label in group.labels}),
            sum(len(group.ids) for group in matched),
        )

    async def _hunt(self, alert: DlpAlert) -> _Correlation | None:
        assert self.hunting is not None
        if alert.user is None:
            return None
        from pipeline.ingest.formats import management_activity

        at = datetime.fromtimestamp(event_time(alert, self._clock()), tz=UTC)
        window = timedelta(minutes=self.settings.window_minutes)
        who = user_filter(alert.user, upn_column="tostring(RawEventData.UserId)", object_id_column="AccountObjectId")
        kql = (
            f"CloudAppEvents | where Timestamp between (datetime({(at - window).isoformat()}) .. datetime({(at + window).isoformat()}))"
            ' | where ActionType =~ "DLPRuleMatch" or tostring(RawEventData.Operation) =~ "DLPRuleMatch"'
            f" | where {who}"
            " | project Timestamp, ReportId, RawEventData | take 50"
        )
        files = {f.name.lower() for f in alert.files if f.name}
        infos: list[list[dict[str, Any]]] = []
        ids: list[tuple[str, str]] = []  # (Timestamp, activity id)
        labels: set[str] = set()
        for row in await self.hunting.query(kql):
            raw = row.get("RawEventData")
            if isinstance(raw, str):
                try:
                    raw = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    continue
            if not isinstance(raw, dict) or not management_activity.is_dlp(raw):
                continue
            activity = management_activity.to_alert(raw)  # reads counts and types only, never matched values
            names = {str(f.get("name") or "").lower() for f in activity.get("files") or []}
            if files and names - {""} and not files & names:
                continue
            if alert.policy_name and activity.get("policy_name") and activity["policy_name"] != alert.policy_name:
                continue
            infos.append(list(activity.get("sensitive_info") or []))
            labels.update(f.get("sensitivity_label_id") for f in activity.get("files") or [] if f.get("sensitivity_label_id"))
            ids.append((str(row.get("Timestamp") or ""), str(activity.get("alert_id") or row.get("ReportId") or "")))
        if not infos:
            return None
        named = [pair for pair in ids if pair[1]]
        return _Correlation(merge_types(infos), [entry_id for _at, entry_id in sorted(named, reverse=True)[: self.settings.max_correlated_ids]], sorted(labels), len(named))


def _needs_correlation(alert: DlpAlert) -> bool:
    """An alert without counts (Sentinel: names only) or without confidence (Graph: "Name (count)")."""
    infos = alert.sensitive_info
    return alert.kind == "alert" and user_key(alert) is not None and not (any(s.count is not None for s in infos) and any(s.confidence is not None for s in infos))


def _alert_keys(alert: DlpAlert) -> tuple[frozenset[str], frozenset[str]]:
    """What `_correlate` compares of an alert besides its user, time and policy: file and type names."""
    return frozenset(f.name.lower() for f in alert.files if f.name), frozenset(s.name.lower() for s in alert.sensitive_info if s.name)


@lru_cache(maxsize=4096)
def _types_of(key: bytes) -> tuple[bytes, list[dict[str, Any]]]:
    """The types of a held activity, hashable, and one list in memory for equal types (activities
    of one kind of document carry the same types), at most 4,096 distinct lists shared."""
    return key, orjson.loads(key)


class _Correlation(NamedTuple):
    infos: list[SensitiveInfo]  # the types, merged
    ids: list[str]  # the newest activities used, at most `max_correlated_ids`
    labels: list[str]
    used: int  # every activity used


def _revisions_correlated(matched: list[_Group], limit: int) -> _Correlation:
    """`_correlate` when an entry id is in more than one matching group (revisions of other
    content): rows walked newest first, each id taken once, at its newest matching content."""
    rows = sorted(((group.at, number, entry_id, group) for group in matched for entry_id, number in group.ids.items()), key=lambda row: row[:2], reverse=True)
    chosen: dict[str, _Group] = {}
    for _at, _number, entry_id, group in rows:
        chosen.setdefault(entry_id, group)
    types = {group.types: group.infos for group in chosen.values()}
    return _Correlation(
        merge_types(types.values()), list(itertools.islice(chosen, limit)), sorted({label for group in chosen.values() for label in group.labels}), len(chosen)
    )


def _prepared(entries: list[HistoryEntry]) -> _Activities:
    """The held form of `entries` (in write order, oldest write first): what `_correlate` reads."""
    held = _Activities()
    held.add(entries)
    return held


@lru_cache(maxsize=4096)
def _shared(value: Any) -> Any:
    """One object for equal values (file and type name sets, label tuples): the first one met."""
    return value


@dataclass(slots=True, eq=False)
class _Group:
    """Activities of one user at one time equal in all that `_correlate` reads but their ids."""

    at: float
    files: frozenset[str]
    policy: str | None
    names: frozenset[str]
    types: bytes  # the types, hashable: equal lists, equal keys
    infos: list[dict[str, Any]]  # the types, shared by every group of equal types
    labels: tuple[str, ...]
    ids: dict[str, int]  # entry id -> write number; in write order, the latest last
    shares_ids: bool = False  # may hold an entry id another group holds too (a revision of other content)

    def newest(self) -> int:
        """The write number of the group's latest written row."""
        return next(reversed(self.ids.values()))

    def rows_newest_first(self) -> Iterator[tuple[float, int, str]]:
        """(time, write number, entry id) of each row, the latest written first."""
        at = self.at
        for entry_id, number in reversed(self.ids.items()):
            yield at, number, entry_id


# `_held_content`'s answer: the types as a key, the types, the file names, the type names, the labels.
_HeldContent = tuple[bytes, list[dict[str, Any]], frozenset[str], frozenset[str], tuple[str, ...]]


def _held_content(entry: HistoryEntry) -> _HeldContent:
    """What `_Activities` holds of an entry's lists: its types (as a key, and shared), its file names,
    its lowercase type names and its labels, each one object for equal values."""
    types, infos = _types_of(orjson.dumps(entry.sensitive_info, option=orjson.OPT_SORT_KEYS))
    names = _shared(frozenset(str(s.get("name", "")).lower() for s in infos))
    return types, infos, _shared(frozenset(entry.files)), names, _shared(tuple(entry.labels))


class _Activities:
    """One user's held rule-match activities (`HeldRows` of `UserHistories`), as groups of equal ones.

    Guarantees: every (entry id, content) added is held, as the entry id in the group of what
    `_correlate` compares (time, files, policy, type names, types, labels); equal activities (one
    kind of document, one policy: the common case) cost one group and an id each, not a row each,
    and `_correlate` walks the groups of its window, not the activities. A row is an id in a group
    (a content of an entry equal to one held in the same group replaces it); rows are ordered newest
    time first, at one time the latest written first (by write number)."""

    __slots__ = ("_groups", "_times", "_keys", "_group_of", "_rows", "_written")

    def __init__(self) -> None:
        self._groups: dict[float, list[_Group]] = {}  # time -> its groups
        self._times: list[float] = []  # the distinct times held, ascending
        self._keys: dict[tuple[Any, ...], _Group] = {}  # (time, files, policy, names, types, labels) -> group
        self._group_of: dict[str, _Group] = {}  # entry id -> a group holding it, to tell one held by two groups
        self._rows = 0
        self._written = 0

    def __len__(self) -> int:
        return self._rows

    def add(self, entries: Sequence[HistoryEntry]) -> None:
        # What an entry's lists make (`_held_content`), once per distinct set of lists: the entries
        # read from the store share them when their contents are equal, as one kind of document's do.
        made: dict[tuple[int, int, int], _HeldContent] = {}
        for entry in entries:
            lists = (id(entry.files), id(entry.sensitive_info), id(entry.labels))
            content = made.get(lists)
            if content is None:
                content = made[lists] = _held_content(entry)
            types, infos, files, names, labels = content
            key = (entry.at, files, entry.policy, names, types, labels)
            group = self._keys.get(key)
            if group is None:
                group = self._keys[key] = _Group(entry.at, files, entry.policy, names, types, infos, labels, {})
                if entry.at not in self._groups:
                    self._groups[entry.at] = []
                    insort(self._times, entry.at)
                self._groups[entry.at].append(group)
            entry_id = entry.entry_id
            if group.ids.pop(entry_id, None) is None:
                self._rows += 1
            self._written += 1
            group.ids[entry_id] = self._written
            other = self._group_of.setdefault(entry_id, group)
            if other is not group:
                other.shares_ids = group.shares_ids = True

    def at_of(self, index: int) -> float:
        for at in reversed(self._times):
            index -= sum(len(group.ids) for group in self._groups[at])
            if index < 0:
                return at
        raise IndexError(index)

    def drop_through(self, cut: float) -> bool:
        gone = bisect_right(self._times, cut)
        if not gone:
            return False
        for at in self._times[:gone]:
            for group in self._groups.pop(at):
                del self._keys[(group.at, group.files, group.policy, group.names, group.types, group.labels)]
                self._rows -= len(group.ids)
                for entry_id in group.ids:
                    if self._group_of.get(entry_id) is group:
                        del self._group_of[entry_id]
        del self._times[:gone]
        return True

    def between(self, since: float, until: float) -> list[_Group]:
        """The groups with since <= at <= until, newest time first; at one time, the latest written first."""
        found = [group for at in self._times[bisect_left(self._times, since) : bisect_right(self._times, until)] for group in self._groups[at]]
        found.sort(key=lambda group: (group.at, group.newest()), reverse=True)
        return found


def merge_types(groups: Any) -> list[SensitiveInfo]:
    """One entry per type (by id, else name) across activities: the largest count and confidence."""
    merged: dict[str, dict[str, Any]] = {}
    for group in groups:
        for item in group:
            key = (item.get("type_id") or item.get("name") or "").lower()
            if not key:
                continue
            current = merged.setdefault(key, {"name": None, "type_id": None, "count": None, "confidence": None})
            current["name"] = current["name"] or item.get("name")
            current["type_id"] = current["type_id"] or item.get("type_id")
            for field in ("count", "confidence"):
                value = item.get(field)
                if isinstance(value, int) and (current[field] is None or value > current[field]):
                    current[field] = value
    return [SensitiveInfo(**value) for value in merged.values()]
