"""What the pipeline has seen, per user: DLP alerts (for prior_incidents) and DLP rule-match activities
(for the sensitive_info correlation).

Two implementations of one small protocol:
- `SqliteHistoryStore` — the embedded default: tables `history_alerts` / `history_activitys` beside
  the runner's state (`StateStore.local_history`: the SQLite state file), or a file of its own
  under the data dir;
- `TableHistoryStore` — Azure Table Storage (azure.data.tables.aio), shared by every Functions
  instance. One table; PartitionKey is "<kind>-" + a hash of the user, so user names are never keys.

Writes are idempotent: an entry is keyed by (user, entry id, content id), so a re-run or a
redelivery changes nothing; readers count distinct entry ids, so a revised alert counts once.
On SQLite, a user with `PACK_MIN_ROWS` rows or more also has a pack (`history_<kind>_packs`): their
rows in one blob, made again by the reads and writes of any process as rows are added, so that a
process's first read of the user takes the blob and reads one by one only the rows written after it
(at most about a quarter of them). A pack never changes what a read returns; one that cannot be
read is read around and made again.
Entries hold no matched values: ids, times, policy, sensitive type names/ids/counts/confidence.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import sqlite3
import time
from array import array
from bisect import bisect_left, bisect_right, insort
from collections import Counter, OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from datetime import datetime, timedelta
from functools import lru_cache
from operator import attrgetter
from pathlib import Path
from typing import Any, Literal, Protocol

import orjson
from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import EnricherUnavailable, store_error
from pipeline.models import DlpAlert
from pipeline.secrets import SecretEnv
from pipeline.state.sqlite import HeldWrites, Statement, Transaction, WalCheckpointer, connect

log = logging.getLogger("pipeline.enrichers.history")


@dataclass(slots=True)
class HistoryEntry:
    """One alert or activity of one user, reduced to what the enrichers need. Entries read from a
    store are read-only: those of equal content may share their lists (`SqliteHistoryStore`)."""

    entry_id: str
    content_id: str
    user: str
    at: float  # epoch seconds of the event
    policy: str | None = None
    severity: str | None = None
    files: list[str] = field(default_factory=list)
    sensitive_info: list[dict[str, Any]] = field(default_factory=list)  # name, type_id, count, confidence
    labels: list[str] = field(default_factory=list)


# A stored entry as `SqliteHistoryStore.stored_after` gives it: entry id, content id, at, and the
# rest of its fields in `HistoryEntry`'s order (policy, severity, files, types, labels).
StoredRow = tuple[str, str, float, tuple[Any, ...]]


def user_key(alert: DlpAlert) -> str | None:
    """The history key of an alert's user: the UPN (lowercase), else the object id."""
    if alert.user is None:
        return None
    return alert.user.upn or (alert.user.object_id.lower() if alert.user.object_id else None)


def event_time(alert: DlpAlert, default: float) -> float:
    when = alert.first_activity_at or alert.created_at or alert.last_activity_at
    return when.timestamp() if when is not None else default


def entry_of(alert: DlpAlert, *, now: float) -> HistoryEntry | None:
    user = user_key(alert)
    if user is None:
        return None
    return HistoryEntry(
        entry_id=alert.alert_id,
        content_id=alert.content_id(),
        user=user,
        at=event_time(alert, now),
        policy=alert.policy_name,
        severity=alert.severity,
        files=sorted({f.name.lower() for f in alert.files if f.name}),
        # as `model_dump(exclude_none=True)` writes them (scalar fields, in the model's order), without pydantic's call
        sensitive_info=[{name: value for name, value in s.__dict__.items() if value is not None} for s in alert.sensitive_info],
        labels=sorted({f.sensitivity_label_id for f in alert.files if f.sensitivity_label_id}),
    )


Kind = Literal["alert", "activity"]


class HistoryStore(Protocol):
    async def start(self) -> None: ...

    async def record(self, kind: Kind, entries: Sequence[HistoryEntry]) -> None: ...

    async def entries(self, kind: Kind, user: str, *, since: float, until: float, limit: int = 1000) -> list[HistoryEntry]:
        """Entries of `user` with since <= at <= until, newest first, at most `limit`."""
        ...

    async def entries_after(self, kind: Kind, user: str, cursor: Any, *, since: float) -> tuple[list[HistoryEntry], Any]:
        """Entries of `user` with at >= since written after `cursor` (None: all of them), oldest write
        first, and the cursor to pass next time. A read returns only what was written since the
        last one (an entry may come again; applying it twice changes nothing)."""
        ...

    async def aclose(self) -> None: ...


class HistoryWriter:
    """Writes entries to a store once per process: remembers the last `remember` (entry id, content id)
    pairs written (4,096 by default: a redelivery comes within minutes, not after thousands
    of other alerts), so an alert seen again costs no write. The store's own writes are idempotent
    anyway; this only saves the round trips, so its memory stays bounded whatever the run's length."""

    def __init__(self, store: HistoryStore, *, remember: int = 4_096) -> None:
        self.store = store
        self.remember = remember
        # The hash of each (entry id, content id) pair, not the pair: the id strings stay unreferenced
        # (about 150 bytes less per remembered entry). Equal hashes of two pairs (odds about 2⁻⁶⁴ per
        # pair) would save a write the store would have ignored only if they were the same entry.
        self._written: OrderedDict[int, None] = OrderedDict()

    async def write(self, kind: Kind, entries: Sequence[HistoryEntry]) -> list[HistoryEntry]:
        """Write the entries not written before by this process; returns those."""
        fresh = [(e, key) for e in entries if (key := hash((e.entry_id, e.content_id))) not in self._written]
        if not fresh:
            return []
        await self.store.record(kind, [e for e, _ in fresh])
        for _, key in fresh:
            self._written[key] = None
        while len(self._written) > self.remember:
            self._written.popitem(last=False)
        return [e for e, _ in fresh]


class UserHistories:
    """Each user's history of one kind, read from the store incrementally and reused across batches.

    Guarantees: `rows(user)` after `ensure({user: since})` holds every entry of the user at or after
    `since` that this process wrote (`add`) or that the store held when it was last read, newest
    first (at one time, the latest written first). A user's first read takes their entries from
    `since` on; later ones, at most `ttl` seconds apart (other hosts' writes show up within `ttl`),
    only what was written since (`HistoryStore.entries_after`), so their cost follows the new
    entries, not the length of the history. Memory is bounded: at most `max_users` users (the least
    recently needed dropped first) of at most `max_rows` rows each (past it, the rows older than the
    newest half are dropped, never those the latest `ensure` asked for, and the user's rows then
    start later: an alert older than that reads the range it lacks). An alert older than the rows
    held reads only the range they lack, and the entries written since the last read. The rows are
    the entries themselves (`RowList`), or what `holder` makes: any `HeldRows` (sensitive_info holds
    equal activities as one group); the guarantees above are the holder's rows'.
    """

    def __init__(
        self, store: HistoryStore, kind: Kind, *, ttl: float = 30.0, max_users: int = 2_000, max_rows: int = 2_000,
        holder: Callable[[], HeldRows] | None = None,
    ) -> None:
        self.store, self.kind = store, kind
        self.holder: Callable[[], HeldRows] = holder if holder is not None else RowList
        self.ttl, self.max_users, self.max_rows = ttl, max_users, max_rows
        self._users: OrderedDict[str, _Held] = OrderedDict()

    async def ensure(self, since: dict[str, float]) -> None:
        """Make every user's history from `since[user]` on available to `rows` (at most one read per
        user; none for a user whose rows are held from `since[user]` on and were read less than `ttl`
        seconds ago)."""
        now = time.monotonic()

        async def refresh(user: str) -> None:
            held = self._users.get(user)
            if held is None:
                held = _Held(since=since[user], loaded_at=now, rows=self.holder(), cursor=None)
            held.needed = since[user]
            if held.since > since[user]:  # older entries needed: only the range not held yet
                older = await _older(self.store, self.kind, user, since[user], held.since)
                held.since = since[user]
                self._merge(held, older[::-1])
            entries, held.cursor = await self.store.entries_after(self.kind, user, held.cursor, since=held.since)
            held.loaded_at = now
            self._users[user] = held
            self._merge(held, entries)

        stale = []
        for user, wanted in since.items():
            held = self._users.get(user)
            if held is not None and _fresh(held, wanted, now, self.ttl):
                held.needed = wanted
            else:
                stale.append(user)
        await _read_all(self.store, [refresh(user) for user in stale])
        _keep_recently_needed(self._users, since, self.max_users)

    def rows(self, user: str) -> Any:
        """The user's held rows: a `RowList` newest first, or what `holder` makes (empty for a user not held)."""
        held = self._users.get(user)
        return held.rows if held is not None else self.holder()

    def add(self, entries: Sequence[HistoryEntry]) -> None:
        """Entries this process just wrote: kept in the histories already held, newest first."""
        by_user: dict[str, list[HistoryEntry]] = {}
        for entry in entries:
            held = self._users.get(entry.user)
            if held is not None and entry.at >= held.since:
                by_user.setdefault(entry.user, []).append(entry)
        for user, mine in by_user.items():
            self._merge(self._users[user], mine)

    def _merge(self, held: _Held, entries: Sequence[HistoryEntry]) -> None:
        """Entries in write order into the rows: an (entry id, content id) held already is not added
        again; the latest written comes first among rows of one time. Past `max_rows`, the rows older
        than the newest half are dropped (cut between two times, never inside one)."""
        fresh = [e for e in entries if hash((e.entry_id, e.content_id)) not in held.keys]
        if not fresh:
            return
        held.keys.update((hash((e.entry_id, e.content_id)), e.at) for e in fresh)
        held.rows.add(fresh)
        if len(held.rows) > self.max_rows:
            # the newest time that goes: never one the latest `ensure` asked for
            cut = min(held.rows.at_of(self.max_rows // 2), math.nextafter(held.needed, -math.inf))
            if held.rows.drop_through(cut):
                held.since = math.nextafter(cut, math.inf)
                held.keys = {key: at for key, at in held.keys.items() if at >= held.since}


class HeldRows(Protocol):
    """What `UserHistories` keeps of one user: rows with a time, each (entry id, content id) once."""

    def __len__(self) -> int:
        """The rows held."""
        ...

    def add(self, entries: Sequence[HistoryEntry]) -> None:
        """Entries in write order (oldest write first), none of them held already."""
        ...

    def at_of(self, index: int) -> float:
        """The time of the `index`-th newest row (0: the newest; at one time, the latest written first)."""
        ...

    def drop_through(self, cut: float) -> bool:
        """Drop every row with at <= cut; whether any was dropped."""
        ...


class RowList(list[Any]):
    """The default `HeldRows`: the entries, newest first (at one time, the latest written first)."""

    def add(self, entries: Sequence[HistoryEntry]) -> None:
        self[:0] = list(entries)[::-1]
        self.sort(key=_AT, reverse=True)  # stable: at one time, the later write stays first

    def at_of(self, index: int) -> float:
        return float(self[index].at)

    def drop_through(self, cut: float) -> bool:
        kept = bisect_left(self, -cut, key=_minus_at)
        if kept == len(self):
            return False
        del self[kept:]
        return True




def _fresh(held: _Held | _Tallied, since: float, now: float, ttl: float) -> bool:
    """Whether a user's held history serves a batch that needs it from `since` on without a read:
    it starts no later than that and was read less than `ttl` seconds ago."""
    return held.since <= since and held.cursor is not None and now - held.loaded_at < ttl


async def _read_all(store: HistoryStore, reads: list[Coroutine[Any, Any, None]]) -> None:
    """Run the users' reads side by side. One read, or every read of a store whose reads never wait
    (`reads_without_waiting`: SQLite), is awaited in this task, one after another, so such a batch
    never waits on the loop (a task would make the caller wait for the loop's next turn, and the
    enrichment engine would start the enricher's siblings in tasks)."""
    if len(reads) == 1 or getattr(store, "reads_without_waiting", False) is True:
        for index, read in enumerate(reads):
            try:
                await read
            except BaseException:
                for left in reads[index + 1 :]:
                    left.close()  # never started: nothing to wait for
                raise
    elif reads:
        await asyncio.gather(*reads)


def _keep_recently_needed(users: OrderedDict[str, Any], since: dict[str, float], max_users: int) -> None:
    """The users of `since` become the most recently needed; past `max_users` (never fewer than a
    batch needs), the least recently needed are dropped."""
    for user in since:
        users.move_to_end(user)
    while len(users) > max(max_users, len(since)):
        users.popitem(last=False)


async def _older(store: HistoryStore, kind: Kind, user: str, since: float, held_since: float) -> list[HistoryEntry]:
    """The user's entries with since <= at < held_since, newest first: what a holder that starts at
    `held_since` lacks for an alert older than the ones it was read for."""
    return await store.entries(kind, user, since=since, until=math.nextafter(held_since, -math.inf), limit=1_000_000)


# -- Tallies: each user's prior alerts as counters per point in time ------------------------------

SORT_IN_MIN = 64  # unsorted slots a tally holds before it sorts them in, at least
RECENT_PER_POINT = 51  # the newest entries kept by id at one point in time, at most (`recent` asks for at most 50, and one is the alert's own)


def recent_depth(max_recent: int) -> int:
    """The newest ids a tally keeps per point for `recent` lists of `max_recent`: twice what one
    window asks (`max_recent`, and the alert's own id), so that a point's list still answers after as
    many of its entries moved to another time by a revision (a moved entry leaves the list; what
    was behind it is not known again until the user's tally is read anew)."""
    return min(RECENT_PER_POINT, 2 * (max_recent + 1))


@dataclass(slots=True)
class _Point:
    """The entries of one user at one time: counters, and the newest few entries by id."""

    at: float
    count: int = 0
    policies: dict[str | None, int] = field(default_factory=dict)
    names: dict[str, int] = field(default_factory=dict)
    newest: list[tuple[str, str | None, str | None]] = field(default_factory=list)  # (entry id, policy, severity), newest write first


@dataclass(slots=True)
class TallyWindow:
    """What a tally answers for one window: counts, and the newest entries (id, at, policy, severity)."""

    count: int
    same_policy: int
    names: dict[str, int]  # type name -> entries of the window that have it
    newest: list[tuple[str, float, str | None, str | None]]


class AlertTally:
    """One user's alerts as counters per distinct time (`_Point`), not as a list of rows.

    Guarantees: each entry id counts once, at the time, policy, severity and type names of its latest
    applied revision (a revision moves it; the same revision applied again changes nothing). A
    window's figures cost bisections over the distinct times plus one pass over the user's distinct
    policies and type names, never a pass over the entries; `newest` walks at most `k` points. The
    index behind the bisections grows at its end when an entry comes at the newest time (the usual
    case) and is rebuilt once, at the next window, after any other change.

    Memory: 32 to 48 bytes per entry id (a 32-byte slot in flat arrays: the id's hash, its time, the
    hash of its content id, and the numbers of its policy and type-name set in two small per-tally
    tables; and a share of the dict that finds the slots not sorted in yet), and one `_Point` per
    distinct time. The id strings themselves are not kept, only the newest few per point. Entry ids and content ids are told
    apart by their 64-bit `hash()`: two ids of one user with equal hashes (odds about n² / 2⁶⁵ for n
    ids; the hash is keyed afresh in every process) would count as revisions of one entry."""

    __slots__ = ("_points", "_times", "_ids", "_ats", "_contents", "_policy_numbers", "_names_numbers", "_sorted", "_unsorted",
                 "_policies", "_name_sets", "_policy_number_of", "_names_number_of", "_index", "_depth")

    def __init__(self, recent_per_point: int = RECENT_PER_POINT) -> None:
        self._depth = recent_per_point  # the newest ids kept per point (`recent_depth`)
        self._points: dict[float, _Point] = {}
        self._times: list[float] = []  # sorted, ascending
        # One slot per entry id, what places a revision and answers `at_of`: slots [0, _sorted) are
        # sorted by the id's hash (found by bisection); later ones are found through `_unsorted`
        # until there are enough of them to sort in (`_sort_in`), so adding an id costs no shift of
        # the whole arrays.
        self._ids = array("q")  # hash of the entry id
        self._ats = array("d")  # time of its latest applied revision
        self._contents = array("q")  # hash of that revision's content id
        self._policy_numbers = array("I")  # its policy, as a number into `_policies`
        self._names_numbers = array("I")  # its type names, as a number into `_name_sets`
        self._sorted = 0
        self._unsorted: dict[int, int] = {}  # hash of the entry id -> its slot, for the slots past `_sorted`
        self._policies: list[str | None] = []
        self._name_sets: list[frozenset[str]] = []
        self._policy_number_of: dict[str | None, int] = {}
        self._names_number_of: dict[frozenset[str], int] = {}
        self._index: Any = None  # (prefix counts, {policy: (times, prefix)}, {name: times}), rebuilt after a change

    def __len__(self) -> int:
        return len(self._ids)

    def _slot(self, key: int) -> int | None:
        """The slot of the entry id whose hash is `key`, if any."""
        slot = bisect_left(self._ids, key, 0, self._sorted)
        if slot < self._sorted and self._ids[slot] == key:
            return slot
        return self._unsorted.get(key)

    def _sort_in(self) -> None:
        """Sort every slot by the id's hash (done once the unsorted ones are an eighth of them, so each
        id's share of the sorting stays constant however many ids the tally holds). A few unsorted
        slots are merged into many sorted ones, the sorted runs copied whole; otherwise all are sorted."""
        arrays = ("_ids", "_ats", "_contents", "_policy_numbers", "_names_numbers")
        if 3 * len(self._unsorted) < self._sorted:
            tail = sorted(self._unsorted.items())  # (hash, slot), by hash
            cuts = [bisect_left(self._ids, key, 0, self._sorted) for key, _ in tail]
            for name in arrays:
                values = getattr(self, name)
                view, size, merged, start = memoryview(values).cast("B"), values.itemsize, array(values.typecode), 0
                for cut, (_, slot) in zip(cuts, tail):
                    merged.frombytes(view[start * size : cut * size])
                    merged.append(values[slot])
                    start = cut
                merged.frombytes(view[start * size : self._sorted * size])
                view.release()
                setattr(self, name, merged)
        else:
            order = sorted(range(len(self._ids)), key=self._ids.__getitem__)
            for name in arrays:
                values = getattr(self, name)
                setattr(self, name, array(values.typecode, map(values.__getitem__, order)))
        self._sorted = len(self._ids)
        self._unsorted = {}

    def _sort_in_if_due(self) -> None:
        if len(self._unsorted) > max(SORT_IN_MIN, self._sorted // 8):
            self._sort_in()

    def apply_all(self, entries: Sequence[HistoryEntry], names: Any) -> None:
        """`apply` each entry in turn (`names(entry)`: its type names, a function of the entry's
        content: policy, severity, files, types and labels); the slots are sorted once at the end.
        An empty tally given more than `SORT_IN_MIN` entries of distinct ids (a user's first read)
        is built from them at once (`_load`), to the state the entries applied in turn would leave."""
        if not self._ids and len(entries) > SORT_IN_MIN and self._load(entries, names):
            return
        self.apply_each(entries, names)

    def apply_each(self, entries: Sequence[HistoryEntry], names: Any) -> None:
        """`apply` each entry in turn, never built at once; the slots are sorted once at the end."""
        for entry in entries:
            self._apply(entry, names(entry))
        self._sort_in_if_due()

    def _load(self, entries: Sequence[HistoryEntry], names: Any) -> bool:
        """An empty tally built from `entries` (write order) as `_apply` of each, then `_sort_in`, would
        leave it, without their per-entry work: entries of equal content (the lists that entries read
        from the store share, `_stored_entries`) are counted as one per point in time, and `names` is
        called once per content. False, the tally untouched, when two entries have equal id hashes
        (a revision: applied in turn, it moves an entry from one point to another)."""
        contents = [(entry.policy, entry.severity, id(entry.files), id(entry.sensitive_info), id(entry.labels)) for entry in entries]
        return self._build([entry.entry_id for entry in entries], [entry.content_id for entry in entries], [entry.at for entry in entries], contents,
                           dict(zip(contents, entries)), names)

    def load_stored(self, rows: Sequence[StoredRow], names: Any, user: str) -> bool:
        """`_load` of the entries of stored rows (`SqliteHistoryStore.stored_after`), made from them
        only once per distinct content (to ask `names`), not once per row. False, the tally
        untouched, when it is not empty, the rows are too few or hold a revision (`apply_all` then)."""
        if self._ids or len(rows) <= SORT_IN_MIN:
            return False
        entry_ids, content_ids, ats, fields = zip(*rows)
        contents = list(map(id, fields))  # equal contents of one read share one tuple (`_content_of`)
        samples = {content: HistoryEntry(row[0], row[1], user, row[2], *row[3]) for content, row in dict(zip(contents, rows)).items()}
        return self._build(entry_ids, content_ids, ats, contents, samples, names)

    def _build(
        self, entry_ids: Sequence[str], content_ids: Sequence[str], ats: Sequence[float], contents: Sequence[Any],
        samples: dict[Any, HistoryEntry], names: Any,
    ) -> bool:
        """The empty tally built from entries given as columns (write order): ids, content ids, times,
        and a key per entry that is equal for entries of equal content, `samples` an entry of each key
        (in first-written order; the policy, severity and type names of every entry of that key)."""
        keys = [hash(entry_id) for entry_id in entry_ids]
        if len(set(keys)) != len(keys):
            return False
        numbers: dict[Any, tuple[str | None, str | None, frozenset[str], int, int]] = {}
        for content, entry in samples.items():  # each content once, in first-written order
            entry_names = names(entry)
            numbers[content] = (entry.policy, entry.severity, entry_names, self._number(entry.policy, self._policy_number_of, self._policies),
                                self._number(entry_names, self._names_number_of, self._name_sets))
        for (at, content), count in Counter(zip(ats, contents)).items():  # in first-written order
            point = self._points.get(at)
            if point is None:
                point = self._points[at] = _Point(at)
            policy, _severity, entry_names = numbers[content][:3]
            point.count += count
            point.policies[policy] = point.policies.get(policy, 0) + count
            for name in entry_names:
                point.names[name] = point.names.get(name, 0) + count
        full, depth = 0, self._depth
        for slot in range(len(keys) - 1, -1, -1):  # each point's newest ids: its latest written first
            if full == len(self._points):
                break
            newest = self._points[ats[slot]].newest
            if len(newest) < depth:
                policy, severity = numbers[contents[slot]][:2]
                newest.append((entry_ids[slot], policy, severity))
                full += len(newest) == depth
        self._times = sorted(self._points)
        order = sorted(range(len(keys)), key=keys.__getitem__)
        by_key = [numbers[content] for content in map(contents.__getitem__, order)]
        self._ids = array("q", map(keys.__getitem__, order))
        self._ats = array("d", map(ats.__getitem__, order))
        self._contents = array("q", [hash(content_ids[slot]) for slot in order])
        self._policy_numbers = array("I", [found[3] for found in by_key])
        self._names_numbers = array("I", [found[4] for found in by_key])
        self._sorted, self._unsorted, self._index = len(keys), {}, None
        return True

    @staticmethod
    def _number(value: Any, numbers: dict[Any, int], table: list[Any]) -> int:
        number = numbers.get(value)
        if number is None:
            number = numbers[value] = len(table)
            table.append(value)
        return number

    def apply(self, entry: HistoryEntry, names: frozenset[str]) -> None:
        self._apply(entry, names)
        self._sort_in_if_due()

    def _apply(self, entry: HistoryEntry, names: frozenset[str]) -> None:
        key, content = hash(entry.entry_id), hash(entry.content_id)
        slot = self._slot(key)
        if slot is not None:
            if self._contents[slot] == content:
                return
            self._uncount(entry.entry_id, slot)
        in_order = slot is None and self._index is not None and (not self._times or entry.at >= self._times[-1])
        point = self._points.get(entry.at)
        if point is None:
            point = self._points[entry.at] = _Point(entry.at)
            insort(self._times, entry.at)
        point.count += 1
        point.policies[entry.policy] = point.policies.get(entry.policy, 0) + 1
        for name in names:
            point.names[name] = point.names.get(name, 0) + 1
        point.newest.insert(0, (entry.entry_id, entry.policy, entry.severity))
        del point.newest[self._depth :]
        policy_number = self._number(entry.policy, self._policy_number_of, self._policies)
        names_number = self._number(names, self._names_number_of, self._name_sets)
        if slot is not None:
            self._ats[slot], self._contents[slot] = entry.at, content
            self._policy_numbers[slot], self._names_numbers[slot] = policy_number, names_number
        else:
            self._unsorted[key] = len(self._ids)
            self._ids.append(key)
            self._ats.append(entry.at)
            self._contents.append(content)
            self._policy_numbers.append(policy_number)
            self._names_numbers.append(names_number)
        if in_order:  # the usual case, a new alert at the newest time: the index grows at its end
            prefix, policies, by_name = self._index
            if point.count == 1:
                prefix.append(prefix[-1] + 1)
            else:
                prefix[-1] += 1
            for found in [policies.setdefault(entry.policy, ([], [0]))] + [by_name.setdefault(name, ([], [0])) for name in names]:
                _count_at_end(found, entry.at)
        else:
            self._index = None

    def _uncount(self, entry_id: str, slot: int) -> None:
        """Take the revision held in `slot` out of its point's counters (the caller rewrites the slot)."""
        at, policy, names = self._ats[slot], self._policies[self._policy_numbers[slot]], self._name_sets[self._names_numbers[slot]]
        point = self._points[at]
        point.count -= 1
        point.policies[policy] -= 1
        if not point.policies[policy]:
            del point.policies[policy]
        for name in names:
            point.names[name] -= 1
            if not point.names[name]:
                del point.names[name]
        point.newest = [item for item in point.newest if item[0] != entry_id]
        if point.count == 0:
            del self._points[at]
            self._times.pop(bisect_left(self._times, at))

    def at_of(self, entry_id: str) -> float | None:
        slot = self._slot(hash(entry_id))
        return self._ats[slot] if slot is not None else None

    def policy_of(self, entry_id: str) -> str | None:
        slot = self._slot(hash(entry_id))
        return self._policies[self._policy_numbers[slot]] if slot is not None else None

    def names_of(self, entry_id: str) -> frozenset[str]:
        slot = self._slot(hash(entry_id))
        return self._name_sets[self._names_numbers[slot]] if slot is not None else frozenset()

    def newest_at(self, since: float, until: float, *, skip: str | None = None) -> float | None:
        """The time of the newest entry with since <= at <= until other than `skip`."""
        skipped = self.at_of(skip) if skip is not None else None
        index = bisect_right(self._times, until) - 1
        while index >= 0 and self._times[index] >= since:
            at = self._times[index]
            if self._points[at].count - (1 if at == skipped else 0) > 0:
                return at
            index -= 1
        return None

    def _built(self) -> Any:
        if self._index is None:
            prefix, total = [0], 0
            policies: dict[str | None, tuple[list[float], list[int]]] = {}
            names: dict[str, tuple[list[float], list[int]]] = {}
            for at in self._times:
                point = self._points[at]
                total += point.count
                prefix.append(total)
                for key, count in point.policies.items():
                    times, counts = policies.setdefault(key, ([], [0]))
                    times.append(at)
                    counts.append(counts[-1] + count)
                for name, count in point.names.items():
                    times, counts = names.setdefault(name, ([], [0]))
                    times.append(at)
                    counts.append(counts[-1] + count)
            self._index = (prefix, policies, names)
        return self._index

    def count(self, since: float, until: float) -> int:
        """The entries with since <= at <= until: two bisections."""
        prefix = self._built()[0]
        return prefix[bisect_right(self._times, until)] - prefix[bisect_left(self._times, since)]

    def window(self, since: float, until: float, *, policy: str | None, k: int) -> TallyWindow:
        """The entries with since <= at <= until: their count, those of `policy`, their type names,
        and the newest `k` of them (newest time first; at one time, the latest written first)."""
        prefix, policies, names = self._built()
        times = self._times
        first, end = bisect_left(times, since), bisect_right(times, until)
        same = _between_count(policies.get(policy), since, until) if policy else 0
        present = {name: count for name, found in names.items() if (count := _between_count(found, since, until))}
        newest: list[tuple[str, float, str | None, str | None]] = []
        index = end - 1
        while len(newest) < k and index >= first:
            at = times[index]
            newest.extend((entry_id, at, pol, severity) for entry_id, pol, severity in self._points[at].newest[: k - len(newest)])
            index -= 1
        return TallyWindow(prefix[end] - prefix[first], same, present, newest)


def _count_at_end(found: tuple[list[float], list[int]], at: float) -> None:
    times, counts = found
    if times and times[-1] == at:
        counts[-1] += 1
    else:
        times.append(at)
        counts.append(counts[-1] + 1)


def _between_count(found: tuple[list[float], list[int]] | None, since: float, until: float) -> int:
    if found is None:
        return 0
    times, counts = found
    return counts[bisect_right(times, until)] - counts[bisect_left(times, since)]


class UserTallies:
    """Each user's tally of one kind, kept current by incremental reads of the store.

    Guarantees: after `ensure({user: since})` the user's tally holds every entry at or after `since`
    that this process applied (`add`) or that the store held at its last read; reads are at most
    `ttl` seconds apart per user (an alert older than the tally reads the range it lacks, and what
    was written since) and return only what was written since the user's previous read
    (`HistoryStore.entries_after`), so their cost follows the new entries, not the history's length.
    At most `max_users` users are held (least recently needed dropped first): memory is bounded by
    them, not by the length of the run. `names` turns an entry into its type names (a function of its
    content: policy, severity, files, types, labels); each tally keeps `recent_per_point` newest ids
    per point in time (`recent_depth`). A user's first read of a store that gives stored rows
    (`stored_after`: SQLite) builds the tally from their fields at once (`AlertTally.load_stored`)."""

    def __init__(
        self, store: HistoryStore, kind: Kind, *, names: Any, ttl: float = 30.0, max_users: int = 2_000, recent_per_point: int = RECENT_PER_POINT
    ) -> None:
        self.store, self.kind, self.names = store, kind, names
        self.ttl, self.max_users, self.recent_per_point = ttl, max_users, recent_per_point
        self._users: OrderedDict[str, _Tallied] = OrderedDict()

    async def ensure(self, since: dict[str, float]) -> None:
        now = time.monotonic()

        async def refresh(user: str) -> None:
            held = self._users.get(user)
            if held is None:
                held = _Tallied(since=since[user], loaded_at=now, cursor=None, tally=AlertTally(self.recent_per_point))
            elif held.since > since[user]:  # older entries needed: only the range not held yet
                held.tally.apply_all(list(reversed(await _older(self.store, self.kind, user, since[user], held.since))), self.names)
                held.since = since[user]
            stored_after = getattr(self.store, "stored_after", None) if held.cursor is None else None
            if stored_after is not None:  # a first read: the tally is built from the stored fields at once
                rows, cursor = await stored_after(self.kind, user, None, since=held.since)
                if not held.tally.load_stored(rows, self.names, user):  # too few rows, or a revision among them
                    held.tally.apply_each(_entries_of_rows(user, rows), self.names)
            else:
                entries, cursor = await self.store.entries_after(self.kind, user, held.cursor, since=held.since)
                held.tally.apply_all(entries, self.names)
            held.cursor, held.loaded_at = cursor, now
            self._users[user] = held

        stale = [user for user, wanted in since.items() if (held := self._users.get(user)) is None or not _fresh(held, wanted, now, self.ttl)]
        await _read_all(self.store, [refresh(user) for user in stale])
        _keep_recently_needed(self._users, since, self.max_users)

    def tally(self, user: str) -> AlertTally:
        held = self._users.get(user)
        return held.tally if held is not None else AlertTally()

    def add(self, entries: Sequence[HistoryEntry]) -> None:
        """Entries this process just wrote: counted at once in the tallies held."""
        for entry in entries:
            held = self._users.get(entry.user)
            if held is not None and entry.at >= held.since:
                held.tally.apply(entry, self.names(entry))


@dataclass(slots=True)
class _Tallied:
    since: float
    loaded_at: float
    cursor: Any
    tally: AlertTally


_AT = attrgetter("at")


def _minus_at(row: Any) -> float:
    return -row.at


@dataclass(slots=True)
class _Held:
    since: float  # the rows cover every entry at or after this time
    loaded_at: float  # time.monotonic() of the read
    rows: HeldRows
    cursor: Any  # the store's, for the next incremental read
    needed: float = -math.inf  # the `since` the latest `ensure` asked for: rows from it on are never dropped
    # hash of (entry id, content id) -> at, of the entries held: hashes, not the strings, are kept (as `AlertTally` does)
    keys: dict[int, float] = field(default_factory=dict)


class HistorySettings(BaseModel):
    """Where the history lives. `sqlite` (default): the state file, or `path` under the data dir."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["sqlite", "azure_table"] = "sqlite"
    path: str | None = Field(None, description="sqlite: a file of its own under the data dir (default: the state file)")
    table_name: str = Field("dlphistory", pattern=r"^[A-Za-z][A-Za-z0-9]{2,62}$")
    account_url: str | None = Field(None, description="azure_table: https://<account>.table.core.windows.net (managed identity)")
    connection_string_env: SecretEnv | None = Field(None, description="azure_table: environment variable holding a connection string")
    managed_identity_client_id: str | None = None
    retention_days: float = Field(120, gt=0, description="sqlite: entries older than this are purged (all but the last written, which goes once a later one exists)")
    reuse_seconds: float = Field(
        30, ge=0, description="each user's history is read once and reused this long; other instances' writes show up within it (0: read for every batch)"
    )


def open_history_store(settings: HistorySettings, services: Any) -> HistoryStore:
    """The history the settings name. `sqlite` without a `path` lives beside the state store when the
    store offers one (`StateStore.local_history`), else in `history.sqlite` under the data dir."""
    if settings.kind == "azure_table":
        if settings.connection_string_env:
            return TableHistoryStore(settings)
        if services is None:
            raise ValueError("history kind 'azure_table' with account_url is built with the runner's services (its credential)")
        return TableHistoryStore(settings, credential=services.credential(settings.managed_identity_client_id))
    if settings.path is None:
        state = services.state if services is not None else None
        local = state.local_history(retention_days=settings.retention_days) if state is not None else None
        if local is not None:
            return local
        path = services.data_path("history.sqlite") if services is not None else Path("history.sqlite")
    else:
        path = services.data_path(settings.path) if services is not None else Path(settings.path)
    return SqliteHistoryStore(path=path, retention_days=settings.retention_days)


# -- SQLite --------------------------------------------------------------------------------------

# A rowid table: its rows carry a ~0.5 KB `data` blob, too large for WITHOUT ROWID (SQLite's own
# advice), which inserted ~40 % slower. Files written by earlier versions are converted on open.
_TABLE = """
CREATE TABLE IF NOT EXISTS history_{kind}s (
    user        TEXT NOT NULL,
    entry_id    TEXT NOT NULL,
    content_id  TEXT NOT NULL,
    at          REAL NOT NULL,
    data        BLOB NOT NULL,
    UNIQUE (user, entry_id, content_id)
)"""
_INDEX = "CREATE INDEX IF NOT EXISTS history_{kind}s_user_at ON history_{kind}s (user, at)"
# (user, rowid): what a user's rows written after a cursor are found by (`entries_after`).
_INDEX_USER = "CREATE INDEX IF NOT EXISTS history_{kind}s_user ON history_{kind}s (user)"

# A pack: one user's rows in one blob (`_packed`), what a first read takes instead of the rows one by
# one (~2 µs each in SQLite, for the lookup of each row through the (user, at) index). It holds every
# row of the user with rowid <= cursor and at >= since, as they were when it was made; a first read
# adds the rows written after its cursor. A rowid table: its blob is ~70 bytes per row.
_PACK_TABLE = """
CREATE TABLE IF NOT EXISTS history_{kind}_packs (
    user    TEXT PRIMARY KEY,
    since   REAL NOT NULL,
    newest  REAL NOT NULL,
    cursor  INTEGER NOT NULL,
    data    BLOB NOT NULL
)"""
# Two processes may make a user's pack at once: the one that read further wins (either is right).
_PACK_WRITE = """
INSERT INTO history_{kind}_packs (user, since, newest, cursor, data) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (user) DO UPDATE SET since = excluded.since, newest = excluded.newest, cursor = excluded.cursor, data = excluded.data
WHERE excluded.cursor > history_{kind}_packs.cursor"""
# Packs all of whose rows are past retention go with the purge (the rows are gone from the table).
_PACK_PURGE = "DELETE FROM history_{kind}_packs WHERE newest < ?"
PACK_VERSION = 1
PACK_MIN_ROWS = 256  # a user with fewer rows has no pack: reading them one by one costs under a millisecond
PACK_STALE_PART = 4  # a pack is made again once the rows written after it are a quarter of its rows
PACKS_TRACKED = 4_096  # users whose pack a store keeps count of (their rows written since), the least recently written dropped

# The retention purge: each user's rows before the cutoff, found through the (user, at) index, the
# users walked one index seek each (`WHERE at < ?` alone would scan the whole table). The table's last
# row stays, whatever its time: SQLite gives a new row the largest rowid + 1, so dropping the last
# one would hand its rowid out again, behind the cursor of a reader already past it (`entries_after`).
_PURGE = """
WITH RECURSIVE users (user) AS (
    SELECT min(user) FROM history_{kind}s
    UNION ALL
    SELECT (SELECT min(user) FROM history_{kind}s WHERE user > users.user) FROM users WHERE users.user IS NOT NULL
)
DELETE FROM history_{kind}s WHERE user IN (SELECT user FROM users) AND at < ? AND rowid < (SELECT max(rowid) FROM history_{kind}s)"""


def _convert_without_rowid(db: sqlite3.Connection, kind: str) -> None:
    """Rebuild a history table written by an earlier version (WITHOUT ROWID) as a rowid table, rows kept
    (its index is made again by the caller, after the copy). One transaction, re-checked inside it,
    so two processes opening the same file convert it once."""
    table = f"history_{kind}s"
    with Transaction(db):
        found = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
        if found is None or "WITHOUT ROWID" not in found[0].upper():
            return
        db.execute(f"ALTER TABLE {table} RENAME TO {table}_old")
        db.execute(f"DROP INDEX IF EXISTS {table}_user_at")
        db.execute(_TABLE.format(kind=kind))
        db.execute(f"INSERT INTO {table} (user, entry_id, content_id, at, data) SELECT user, entry_id, content_id, at, data FROM {table}_old")
        db.execute(f"DROP TABLE {table}_old")
    log.info("history table %s converted to a rowid table", table)


class SqliteHistoryStore:
    """Short local transactions under an async signature, like the SQLite state store."""

    reads_without_waiting = True  # its reads never wait on the loop: the readers run them one after another

    def __init__(
        self, *, connection: sqlite3.Connection | None = None, path: Path | None = None, retention_days: float = 120, held: HeldWrites | None = None,
        pack_min_rows: int = PACK_MIN_ROWS,
    ) -> None:
        """`connection`: the state store's (its file, named by `path`), else a file of its own at `path`.
        `held`: the state store's, which holds this store's writes while a batch runs (they are
        committed with the batch's mark, or before any read of this store, so a read sees them).
        `pack_min_rows`: the rows this store writes for a user before it makes the user's pack (and
        the fewest a pack is made again for), see `_repack`.
        A file that is busy, damaged or cannot be written raises as pipeline.errors.store_error says."""

        self._owned = connection is None
        self._held = held
        try:
            if connection is None:
                assert path is not None
                path.parent.mkdir(parents=True, exist_ok=True)
                connection = connect(path)
            self._db = connection
            for kind in ("alert", "activity"):
                _convert_without_rowid(self._db, kind)
                self._db.execute(_TABLE.format(kind=kind))
                self._db.execute(_INDEX.format(kind=kind))
                self._db.execute(_INDEX_USER.format(kind=kind))
                self._db.execute(_PACK_TABLE.format(kind=kind))
            self._checkpointer = WalCheckpointer(path, owner=self) if self._owned and path is not None else None
        except (OSError, sqlite3.Error) as exc:
            raise store_error(exc, path=path if path is not None else "the history store", operation="open the history store") from exc
        self.retention_seconds = retention_days * 86400
        self._next_purge = 0.0
        self.rows_read = 0  # rows returned by `entries_after`, for tests and benchmarks
        self.pack_min_rows = pack_min_rows
        self.pack_rows_read = 0  # rows first reads took from packs, for tests and benchmarks
        # (kind, user) -> [rows of the user's pack, as this store last made or read it; rows written since]
        self._packs: OrderedDict[tuple[str, str], list[int]] = OrderedDict()

    async def start(self) -> None:
        return None

    async def record(self, kind: Kind, entries: Sequence[HistoryEntry]) -> None:
        if not entries:
            return
        rows = [(e.user, e.entry_id, e.content_id, e.at, orjson.dumps(e)) for e in entries]
        statements: list[Statement] = [(f"INSERT OR IGNORE INTO history_{kind}s (user, entry_id, content_id, at, data) VALUES (?, ?, ?, ?, ?)", rows)]
        for user, count in self._packs_due(kind, entries):
            pack = self._repack(kind, user, written_after=count)
            if pack is not None:
                statements.append(pack)
        if time.monotonic() >= self._next_purge:
            self._next_purge = time.monotonic() + 600
            cutoff = max(e.at for e in entries) - self.retention_seconds
            statements.append((_PURGE.format(kind=kind), [(cutoff,)]))
            statements.append((_PACK_PURGE.format(kind=kind), [(cutoff,)]))
        self._write(statements)

    def _write(self, statements: list[Statement]) -> None:
        """The statements with the batch's writes when a batch holds them (`held`), else in a
        transaction of their own now; raises EnricherUnavailable when they cannot be written."""
        if self._held is not None and self._held.hold(statements):
            if not self._held.holders:  # held only behind writes whose commit failed: all of them, in order, now
                self._commit_held()
            return
        try:
            with Transaction(self._db) as db:
                for sql, arguments in statements:
                    db.executemany(sql, arguments)
        except sqlite3.Error as exc:
            raise EnricherUnavailable(f"history store write failed: {type(exc).__name__}") from exc

    def _commit_held(self) -> None:
        """Before a read: the writes the state holds are committed, so the read sees them."""
        if self._held is not None:
            try:
                self._held.commit(self._db)
            except sqlite3.Error as exc:
                raise EnricherUnavailable(f"history store write failed: {type(exc).__name__}") from exc

    async def entries(self, kind: Kind, user: str, *, since: float, until: float, limit: int = 1000) -> list[HistoryEntry]:
        self._commit_held()
        try:
            rows = self._db.execute(
                f"SELECT rowid, entry_id, content_id, at, data FROM history_{kind}s WHERE user = ? AND at >= ? AND at <= ? ORDER BY at DESC LIMIT ?",
                (user, since, until, limit),
            ).fetchall()
        except sqlite3.Error as exc:
            raise EnricherUnavailable(f"history store read failed: {type(exc).__name__}") from exc
        return _stored_entries(user, rows)

    async def entries_after(self, kind: Kind, user: str, cursor: Any, *, since: float) -> tuple[list[HistoryEntry], Any]:
        """The cursor is a rowid: a later read reads only the rows written after it, walking the (user)
        index in rowid order. A first read (no cursor) takes the user's pack (`_repack`) and the rows
        written after it, or, with no pack that starts early enough, finds the user's rows from `since`
        on through the (user, at) index: either way its cost follows that range, not the user's whole
        retained history, and it returns the same rows."""
        rows, cursor = self._stored_after(kind, user, cursor, since)
        return _entries_of_rows(user, rows), cursor

    async def stored_after(self, kind: Kind, user: str, cursor: Any, *, since: float) -> tuple[list[StoredRow], Any]:
        """`entries_after` as stored rows (entry id, content id, at, the rest of the entry's fields in
        `HistoryEntry`'s order), not entries: one tuple of fields for the rows of one content text
        (`_content_of`) or of one pack, no entry made per row. For a reader that needs the fields, not
        the entries (`UserTallies`' first reads)."""
        return self._stored_after(kind, user, cursor, since)

    def _stored_after(self, kind: Kind, user: str, cursor: Any, since: float) -> tuple[list[StoredRow], Any]:
        self._commit_held()
        if cursor is not None:
            rows = self._rows_after(kind, user, cursor, since)
            return _stored_rows(rows), (rows[-1][0] if rows else cursor)
        found = self._read_pack(kind, user)
        if found is None or found[0] > since:  # no pack that starts early enough: the rows one by one
            rows = self._rows_after(kind, user, None, since)
            stored, cursor = _stored_rows(rows), (rows[-1][0] if rows else 0)
            if len(stored) >= self.pack_min_rows:
                self._save_pack(kind, user, since, cursor, stored)  # every row with at >= since: a pack
            return stored, cursor
        pack_since, cursor, packed = found
        added = self._rows_after(kind, user, cursor, -math.inf)  # whatever their time: the next pack holds them
        stored = packed + _stored_rows(added)
        cursor = added[-1][0] if added else cursor
        self.pack_rows_read += len(packed)
        if self._pack_due(kind, user, len(packed), len(added)):
            self._save_pack(kind, user, pack_since, cursor, stored)
        # the rows after the pack were read whatever their time: those before `since` go (a late alert's)
        return [row for row in stored if row[2] >= since], cursor

    def _rows_after(self, kind: Kind, user: str, cursor: Any, since: float) -> list[tuple[Any, ...]]:
        """(rowid, entry id, content id, at, data) of the user's rows with at >= since written after
        `cursor` (None: all of them), in rowid order."""
        columns = f"SELECT rowid, entry_id, content_id, at, data FROM history_{kind}s"
        try:
            if cursor is None:
                rows = self._db.execute(f"{columns} WHERE user = ? AND at >= ? ORDER BY rowid", (user, since)).fetchall()
            else:
                rows = self._db.execute(
                    f"{columns} INDEXED BY history_{kind}s_user WHERE user = ? AND rowid > ? AND at >= ? ORDER BY rowid", (user, cursor, since)
                ).fetchall()
        except sqlite3.Error as exc:
            raise EnricherUnavailable(f"history store read failed: {type(exc).__name__}") from exc
        self.rows_read += len(rows)
        return rows

    # -- packs: a user's rows in one blob (`_PACK_TABLE`) --

    def _read_pack(self, kind: Kind, user: str) -> tuple[float, int, list[StoredRow]] | None:
        """The user's pack: its since, its cursor and its rows (write order). None without one, or
        when it cannot be read: the rows are then read one by one (a pack only saves time, it never
        decides what a read returns)."""
        try:
            found = self._db.execute(f"SELECT since, cursor, data FROM history_{kind}_packs WHERE user = ?", (user,)).fetchone()
        except sqlite3.Error as exc:
            raise EnricherUnavailable(f"history store read failed: {type(exc).__name__}") from exc
        if found is None:
            return None
        rows = _unpack(found[2])
        if rows is None:
            log.debug("history pack of a %s user unreadable: its rows are read one by one", kind)
            return None
        return found[0], found[1], rows

    def _pack_due(self, kind: Kind, user: str, packed: int, added: int) -> bool:
        """Whether a pack of `packed` rows is made again, `added` rows having been written after it:
        once they are `pack_min_rows` and a quarter of the pack (so the rows read one by one stay
        at most about a quarter of a first read, and making packs costs each row written a few
        rows' copy). Remembers the counts for the writes that follow (`_packs_due`)."""
        self._packs[(kind, user)] = [packed, added]
        self._packs.move_to_end((kind, user))
        while len(self._packs) > PACKS_TRACKED:
            self._packs.popitem(last=False)
        return added >= max(self.pack_min_rows, packed // PACK_STALE_PART)

    def _packs_due(self, kind: Kind, entries: Sequence[HistoryEntry]) -> list[tuple[str, int]]:
        """The users of `entries` whose pack is due (`_pack_due`), and their rows among them, counting
        the rows this store wrote since it last made or read their pack (a process that keeps a user's
        history in memory reads it once: its writes make the user's pack for the next process's first
        read)."""
        due = []
        for user, count in Counter(e.user for e in entries).items():
            packed, added = self._packs.get((kind, user), (0, 0))
            if self._pack_due(kind, user, packed, added + count):
                due.append((user, count))
        return due

    def _repack(self, kind: Kind, user: str, *, written_after: int) -> Statement | None:
        """The write of the user's pack made again from its rows and those written after its cursor, as
        committed now (rows written later get larger rowids: the next reads find them after the new
        cursor; `written_after`: the rows being written with it, which count toward the next pack).
        None when the user has no rows or they cannot be read: the pack is made at a later write."""
        if self._db.in_transaction:  # rows it sees might yet be rolled back: not a base for a pack
            return None
        try:
            found = self._read_pack(kind, user)
            since, cursor, packed = found if found is not None else (-math.inf, 0, [])
            added = self._rows_after(kind, user, cursor, since)
        except EnricherUnavailable as exc:  # the write itself goes on: the pack is made at a later one
            log.debug("history pack of a %s user not made: %s", kind, exc)
            return None
        rows = packed + _stored_rows(added)
        return self._pack_write(kind, user, since, added[-1][0] if added else cursor, rows, written_after=written_after) if rows else None

    def _save_pack(self, kind: Kind, user: str, since: float, cursor: int, rows: list[StoredRow]) -> None:
        """Write the pack a first read could make (every row of the user with at >= since and rowid <=
        cursor, as committed now: `_commit_held` ran before the read), with the batch's writes when a
        batch holds them, else at once. A pack that cannot be written now is made at a later read or
        write."""
        if self._db.in_transaction:
            return
        try:
            self._write([self._pack_write(kind, user, since, cursor, rows)])
        except EnricherUnavailable as exc:
            log.debug("history pack of a %s user not written: %s", kind, exc)

    def _pack_write(self, kind: Kind, user: str, since: float, cursor: int, rows: list[StoredRow], *, written_after: int = 0) -> Statement:
        """The statement that writes the user's pack of `rows` (write order; every row of the user with
        at >= since and rowid <= cursor), those past retention (`retention_days` before the newest) left
        out; the store counts `written_after` rows written after it (`_pack_due`)."""
        newest = max(row[2] for row in rows)
        since = max(since, newest - self.retention_seconds)
        kept = [row for row in rows if row[2] >= since]
        self._packs[(kind, user)] = [len(kept), written_after]
        return (_PACK_WRITE.format(kind=kind), [(user, since, newest, cursor, _packed(kept))])

    async def aclose(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
        if self._owned:
            self._db.close()


# `record` writes an entry's JSON in the dataclass's field order: its ids, user and time (the row's
# columns too), then the fields `_content_of` parses, from `policy` on.
_ENTRY_START = b'{"entry_id":'
_CONTENT_FIELDS = tuple(f.name for f in dataclass_fields(HistoryEntry))[4:]
_CONTENT_START = b',"' + _CONTENT_FIELDS[0].encode() + b'":'
_CONTENT_ORDER, _CONTENT_KEYS = list(_CONTENT_FIELDS), frozenset(_CONTENT_FIELDS)


def _packed(rows: Sequence[StoredRow]) -> bytes:
    """The blob of a pack: the rows' columns, and each distinct tuple of content fields once."""
    number_of: dict[int, int] = {}
    contents: list[tuple[Any, ...]] = []
    content_of = []
    for row in rows:
        number = number_of.get(id(row[3]))
        if number is None:
            number = number_of[id(row[3])] = len(contents)
            contents.append(row[3])
        content_of.append(number)
    entry_ids, content_ids, ats, _fields = zip(*rows)
    return orjson.dumps(
        {"version": PACK_VERSION, "entry_ids": entry_ids, "content_ids": content_ids, "ats": ats, "contents": contents, "content_of": content_of}
    )


def _unpack(data: Any) -> list[StoredRow] | None:
    """The rows of a pack's blob (`_packed`), in write order; None when it is not one."""
    try:
        pack = orjson.loads(data)
        if type(pack) is not dict or pack.get("version") != PACK_VERSION:
            return None
        entry_ids, content_ids, ats, content_of = pack["entry_ids"], pack["content_ids"], pack["ats"], pack["content_of"]
        contents = [tuple(fields) for fields in pack["contents"]]
        if not len(entry_ids) == len(content_ids) == len(ats) == len(content_of) or any(len(fields) != len(_CONTENT_FIELDS) for fields in contents):
            return None
        if content_of and min(content_of) < 0:  # a negative number would name a content from the end
            return None
        return list(zip(entry_ids, content_ids, ats, map(contents.__getitem__, content_of)))
    except (orjson.JSONDecodeError, KeyError, TypeError, IndexError):
        return None


def _stored_entries(user: str, rows: list[tuple[Any, ...]]) -> list[HistoryEntry]:
    """The entries of stored rows (rowid, entry id, content id, at, data), each equal to its JSON
    parsed whole; made from `_stored_rows`, so equal entries share their lists: entries read from
    the store are read-only."""
    return _entries_of_rows(user, _stored_rows(rows))


def _entries_of_rows(user: str, rows: Sequence[StoredRow]) -> list[HistoryEntry]:
    """The entries of `user`'s stored rows (`SqliteHistoryStore.stored_after`)."""
    return [HistoryEntry(entry_id, content_id, user, at, *fields) for entry_id, content_id, at, fields in rows]


def _stored_rows(rows: list[tuple[Any, ...]]) -> list[StoredRow]:
    """Stored rows (rowid, entry id, content id, at, data) as (entry id, content id, at, fields). Its
    ids and time are the row's columns; the rest of its JSON (policy, severity, files, types,
    labels), equal across the entries of one kind of document and policy, is parsed once per
    distinct text (`_content_of`): one tuple of fields per content, read-only. A row whose JSON is
    not laid out so (ids, user and time first, then exactly those fields) is parsed whole. One loop
    for the rows (a first read makes thousands), not a call per row."""
    stored: list[StoredRow] = []
    append, find, content_of, first, begin = stored.append, bytes.find, _content_of, _ENTRY_START, len(_ENTRY_START)
    for _rowid, entry_id, content_id, at, data in rows:
        start = find(data, _CONTENT_START, begin) if type(data) is bytes and data.startswith(first) else -1
        content = content_of(data[start:]) if start > 0 else None
        if content is None:
            whole = HistoryEntry(**orjson.loads(data))
            entry_id, content_id, at, content = whole.entry_id, whole.content_id, whole.at, tuple(getattr(whole, name) for name in _CONTENT_FIELDS)
        append((entry_id, content_id, at, content))
    return stored


@lru_cache(maxsize=1024)
def _content_of(rest: bytes) -> tuple[Any, ...] | None:
    """The fields of `_CONTENT_FIELDS` in `HistoryEntry`'s order, from the rest of an entry's JSON
    (`,"policy":…}`); None when that is not a JSON object of exactly those keys."""
    try:
        fields = orjson.loads(b"{" + rest[1:])
    except orjson.JSONDecodeError:
        return None
    if type(fields) is dict and list(fields) == _CONTENT_ORDER:  # as `record` writes it: the values in order
        return tuple(fields.values())
    if not isinstance(fields, dict) or fields.keys() != _CONTENT_KEYS:
        return None
    return tuple(fields[name] for name in _CONTENT_FIELDS)


# -- Azure Table Storage -------------------------------------------------------------------------


TIMESTAMP_SLACK = 60.0  # seconds re-read before the last `Timestamp` seen (writes in flight, clock steps)


def _partition(kind: str, user: str) -> str:
    return f"{kind}-" + hashlib.sha256(user.encode()).hexdigest()[:40]


def _row(entry: HistoryEntry) -> str:
    return hashlib.sha256(f"{entry.entry_id}\x00{entry.content_id}".encode()).hexdigest()[:48]


class TableHistoryStore:
    """azure.data.tables.aio; many Functions instances share one table. With `account_url` it signs in
    with `credential` (the services' shared one), which it does not close."""

    def __init__(self, settings: HistorySettings, *, credential: Any = None) -> None:
        if not settings.account_url and not settings.connection_string_env:
            raise ValueError("history kind 'azure_table' needs account_url or connection_string_env")
        if settings.connection_string_env and settings.connection_string_env not in os.environ:
            raise ValueError(f"environment variable {settings.connection_string_env} is not set")
        self.settings = settings
        self.credential = credential
        self._client: Any = None
        self._table_ready = False
        self.rows_read = 0  # entities returned by `entries_after`, for tests and benchmarks

    async def start(self) -> None:
        """Build the client (no network call: a store that is down fails lookups, not start-up)."""
        if self._client is not None:
            return
        from azure.data.tables.aio import TableClient

        s = self.settings
        options: dict[str, Any] = {"retry_total": 2, "retry_backoff_factor": 0.2, "connection_timeout": 3, "read_timeout": 5}
        if s.connection_string_env:
            self._client = TableClient.from_connection_string(os.environ[s.connection_string_env], table_name=s.table_name, **options)
        else:
            if self.credential is None or s.account_url is None:
                raise ValueError("history kind 'azure_table' with account_url needs a credential")
            self._client = TableClient(endpoint=s.account_url, table_name=s.table_name, credential=self.credential, **options)

    async def _ready(self) -> None:
        await self.start()
        if self._table_ready:
            return
        from azure.core.exceptions import ResourceExistsError

        try:
            await self._client.create_table()
        except ResourceExistsError:
            pass
        except Exception as exc:
            raise EnricherUnavailable(f"history table unavailable: {type(exc).__name__}") from exc
        self._table_ready = True

    async def record(self, kind: Kind, entries: Sequence[HistoryEntry]) -> None:
        if not entries:
            return
        await self._ready()
        from azure.data.tables import UpdateMode

        async def upsert(entry: HistoryEntry) -> None:
            await self._client.upsert_entity(
                {
                    "PartitionKey": _partition(kind, entry.user),
                    "RowKey": _row(entry),
                    "At": float(entry.at),
                    "Data": orjson.dumps(entry).decode(),
                },
                mode=UpdateMode.REPLACE,
            )

        try:
            await asyncio.gather(*(upsert(e) for e in entries))
        except Exception as exc:
            raise EnricherUnavailable(f"history table write failed: {type(exc).__name__}") from exc

    async def entries(self, kind: Kind, user: str, *, since: float, until: float, limit: int = 1000) -> list[HistoryEntry]:
        await self._ready()
        found: list[HistoryEntry] = []
        try:
            pages = self._client.query_entities(
                "PartitionKey eq @pk and At ge @since and At le @until",
                parameters={"pk": _partition(kind, user), "since": float(since), "until": float(until)},
                select=["Data"],
            )
            async for entity in pages:
                found.append(HistoryEntry(**orjson.loads(entity["Data"])))
        except Exception as exc:
            raise EnricherUnavailable(f"history table read failed: {type(exc).__name__}") from exc
        found.sort(key=lambda e: e.at, reverse=True)
        return found[:limit]

    async def entries_after(self, kind: Kind, user: str, cursor: Any, *, since: float) -> tuple[list[HistoryEntry], Any]:
        """The cursor is the service's `Timestamp` of the newest entity read; a later read asks for
        entities written from `TIMESTAMP_SLACK` seconds before it on (a write in flight during the
        previous read is not missed; what comes again changes nothing)."""
        await self._ready()
        found: list[tuple[datetime, HistoryEntry]] = []
        query = "PartitionKey eq @pk and At ge @since"
        parameters: dict[str, Any] = {"pk": _partition(kind, user), "since": float(since)}
        if cursor is not None:
            query += " and Timestamp ge @after"
            parameters["after"] = cursor - timedelta(seconds=TIMESTAMP_SLACK)
        try:
            async for entity in self._client.query_entities(query, parameters=parameters, select=["Data", "Timestamp"]):
                found.append((entity.metadata["timestamp"], HistoryEntry(**orjson.loads(entity["Data"]))))
        except Exception as exc:
            raise EnricherUnavailable(f"history table read failed: {type(exc).__name__}") from exc
        self.rows_read += len(found)
        found.sort(key=lambda pair: pair[0])
        return [entry for _, entry in found], (found[-1][0] if found else cursor)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
