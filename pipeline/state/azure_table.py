"""The shared state store: one Azure Table Storage table (azure.data.tables.aio), used by every
Functions instance and process at once.

What it holds, for the whole deployment (docs/delivery.md, "The state model"): the pending parts of
split alerts and their emission claims, and the durable redelivery counts of batches.

Layout. PartitionKey is one of `SHARDS` (16) shards, `s00` … `s15`, chosen by a hash of the alert id,
so every entity of one alert is in one partition (entity group transactions need that) and the
alerts of a batch spread over 16 partitions (each takes about 2,000 entities/s). The shard count is
fixed: changing it needs a new table. RowKeys, with K the alert id (or `~` + a hash of it when the
id holds characters a key may not):

    a|K|            the alert's head: state (pending | emitted), the digests of its stored parts, and
                    the parts themselves, one property each (Q<digest>, rank and JSON)
    a|K|<digest>    a part too large for the head: its JSON over Binary properties D0…Dn of 64 KiB
    p|K             present while the alert is pending: first/last part times, the lease, and the
                    parts added while pending (P<digest>), so a claim reads them with no second
                    request; `Overflow` when they did not fit, or for a revision (then the claim reads
                    the head)
    e|<hour>|K      the alert was emitted in that hour: what `purge` walks
    PartitionKey `redelivery`, RowKey <fingerprint>: the redelivery count of a batch

Concurrency is by ETag (If-Match), within one partition:
- the head serialises writers of parts: a new alert's head is created (fails if another writer made
  it first: that writer re-reads it), a known alert's head is updated If-Match its ETag;
- the pending entry serialises claimers: a claim is an If-Match update of it (lease until, owner),
  so of several claimers of one settled alert exactly one wins; the winner keeps the new ETag;
- `mark_emitted` deletes the pending entry If-Match that ETag, in one transaction with the head's
  new state: only the lease holder can, and only if no part came since its claim (a new part
  rewrites the pending entry, so the alert stays pending and comes out again as a revision);
- a lease that runs out is claimed again by the next claimer (at-least-once).

Cost. The writes of one batch are entity group transactions (at most 100 operations, one
partition): the heads and pending entries of every alert of the batch in one shard go in one
request. A claim is one filtered query per shard plus one transaction per shard that has due
alerts; `mark_emitted` one transaction per shard; `pending_count` one query per shard. A new alert
costs no read; a known one (a later part, a redelivery) one point read of its head, unless this
process wrote or read that head recently. An alert is two operations when stored, one when
claimed, three when marked emitted. Measured on the emulator: docs/delivery.md, "The state model".

Limits. An entity holds at most 1 MiB and a property 64 KiB: a part up to 32 KiB of JSON is kept in
its head (at most 200 of them, 512 KiB); a larger one gets an entity of its own, its JSON split over
up to `PART_CHUNKS` Binary properties of 64 KiB (960 KiB). A part larger than that is not stored but
returned in `PartsAdded.too_large` (the runner dead-letters it as `part_too_large`). A head lists at
most `MAX_PARTS` part digests; parts beyond are returned in `over_limit`, like those over
`max_parts_per_alert`.

Failures. Any error of the Table service (unreachable, 5xx after the client's retries, refused
sign-in) raises StoreUnavailable: the batch raises, is run again, and nothing is lost, because every
write is idempotent and nothing is marked emitted before delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from pipeline.errors import ConfigError, StoreUnavailable
from pipeline.ingest.formats import AlertPart
from pipeline.ingest.formats.contract import PART_ORDER
from pipeline.state import REDELIVERY_FORGET_SECONDS, HeldClaims, PartsAdded, PendingAlert

if TYPE_CHECKING:
    from pipeline.config import StateSettings
    from pipeline.state.history import HistoryStore

log = logging.getLogger("pipeline.state.azure_table")

SHARDS = 16  # partitions the alerts are spread over; fixed for the life of a table
REDELIVERY_PARTITION = "redelivery"
CHUNK_BYTES = 64 * 1024  # a Binary property holds at most 64 KiB
PART_CHUNKS = 15  # 15 x 64 KiB = 960 KiB of JSON in an entity of its own, under the 1 MiB entity limit
MAX_PART_BYTES = PART_CHUNKS * CHUNK_BYTES
DIGEST_BYTES = 32
MAX_PARTS = 4096  # part digests a head lists (128 KiB, two properties)
HEAD_PART_BYTES = 32 * 1024  # a part up to this size is kept in its alert's head (one property)...
HEAD_BYTES = 512 * 1024  # ...while the head holds at most this much of them...
HEAD_PARTS = 200  # ...in at most this many properties (an entity has at most 252); others get an entity of their own
INLINE_PART_BYTES = 16 * 1024  # a part up to this size is also kept in the pending entry...
INLINE_BYTES = 256 * 1024  # ...while the pending entry holds at most this much of them...
INLINE_PARTS = 150  # ...in at most this many properties
MAX_OPERATIONS = 100  # an entity group transaction holds at most 100 operations...
MAX_TRANSACTION_BYTES = 3 * 1024 * 1024  # ...and 4 MiB; Binary goes base64 (x 4/3), so keep a margin
KNOWN_HEADS = 20_000  # heads this process wrote or read, kept to skip a read (a stale one only costs a retry)
KNOWN_HEAD_SECONDS = 3600.0
_MAX_ROUNDS = 12  # conflicts re-read and retried at most this often per call before giving up

_SAFE_ID = re.compile(r"[A-Za-z0-9._:@=+-]{1,200}")
_P, _P_END, _E = "p|", "p}", "e|"

T = TypeVar("T")


def shard_of(alert_id: str) -> str:
    """The PartitionKey of every entity of one alert."""
    return f"s{int(hashlib.sha256(alert_id.encode()).hexdigest()[:8], 16) % SHARDS:02d}"


def _key(alert_id: str) -> str:
    # Keys may not hold / \ # ? or control characters, and `|` separates the parts of ours.
    return alert_id if _SAFE_ID.fullmatch(alert_id) else "~" + hashlib.sha256(alert_id.encode()).hexdigest()[:48]


def _head_key(key: str) -> str:
    return f"a|{key}|"


def _alert_range(key: str) -> tuple[str, str]:
    """RowKeys from the head to the last part of one alert (`|` and `}` never occur in a key)."""
    return f"a|{key}|", f"a|{key}}}"


def _pending_key(key: str) -> str:
    return _P + key


def _emitted_key(key: str, at: float) -> str:
    return f"{_E}{int(at // 3600):08d}|{key}"


def _chunks(data: bytes, prefix: str) -> dict[str, bytes]:
    return {f"{prefix}{i}": data[start : start + CHUNK_BYTES] for i, start in enumerate(range(0, len(data), CHUNK_BYTES))}


def _joined(entity: Mapping[str, Any], prefix: str) -> bytes:
    out = []
    index = 0
    while entity.get(f"{prefix}{index}") is not None:  # a selected property the entity lacks comes back as None
        out.append(bytes(entity[f"{prefix}{index}"]))
        index += 1
    return b"".join(out)


@dataclass(slots=True)
class _Head:
    """What a writer of parts needs of an alert's head (never the parts themselves): its ETag, state,
    the digests of the stored parts, and how full the head and the pending entry are."""

    etag: str
    state: str
    digests: list[str]
    head_bytes: int = 0  # parts kept in the head (properties Q<digest>)
    head_count: int = 0
    inline_bytes: int = 0  # parts kept in the pending entry (P<digest>); -1: it overflowed, claims read the head
    inline_count: int = 0
    emitted_at: float = 0.0

    @classmethod
    def of(cls, entity: Any) -> _Head:
        raw = _joined(entity, "G")
        return cls(
            etag=entity.metadata["etag"], state=str(entity.get("State", "pending")),
            digests=[raw[i : i + DIGEST_BYTES].decode() for i in range(0, len(raw), DIGEST_BYTES)],
            head_bytes=int(entity.get("HeadBytes", 0)), head_count=int(entity.get("HeadCount", 0)),
            inline_bytes=int(entity.get("Inline", 0)), inline_count=int(entity.get("InlineCount", 0)), emitted_at=float(entity.get("EmittedAt", 0.0)),
        )

    def counters(self) -> dict[str, Any]:
        return {"State": self.state, "EmittedAt": self.emitted_at, "HeadBytes": self.head_bytes, "HeadCount": self.head_count,
                "Inline": self.inline_bytes, "InlineCount": self.inline_count}


def _part_value(part: AlertPart, data: bytes) -> bytes:
    """A part kept as one property (of the head or the pending entry): its rank, then its JSON."""
    return str(part.rank).encode() + b":" + data


def _parts_in(entity: Mapping[str, Any], prefix: str, alert_id: str) -> dict[str, AlertPart]:
    """The parts kept as properties `<prefix><digest>` of an entity."""
    found = {}
    for name, value in entity.items():
        if name.startswith(prefix) and len(name) == DIGEST_BYTES + 1:
            rank, _, data = bytes(value).partition(b":")
            found[name[1:]] = AlertPart(alert_id=alert_id, rank=int(rank), data=orjson.loads(data), digest=name[1:])
    return found


@dataclass(slots=True)
class _Op:
    """One operation of an entity group transaction: the alert it belongs to, its estimated size on the
    wire, and what to do with the entity's new ETag once the transaction committed."""

    alert_id: str
    operation: tuple[Any, ...]
    size: int = 512
    done: Callable[[str], None] | None = None


@dataclass(slots=True)
class _Unit:
    """The operations storing one alert's new parts: part entities, then the head and the pending entry
    that commit them (the head lists the digests of the committed parts)."""

    alert_id: str
    parts: list[_Op] = field(default_factory=list)
    commit: list[_Op] = field(default_factory=list)
    creates_head: bool = False
    new: int = 0
    known: int = 0
    over_limit: list[AlertPart] = field(default_factory=list)

    @property
    def operations(self) -> list[_Op]:
        return self.parts + self.commit


@dataclass(slots=True)
class _Claim:
    partition: str
    row: str
    etag: str
    until: float  # its lease: until then this handle does not claim the alert again


class _Conflict(StoreUnavailable):
    """An operation of a transaction met a changed, missing or existing entity; nothing was written.
    Always handled inside the store; were one to escape, it means what StoreUnavailable means: the
    batch runs again."""

    def __init__(self, index: int) -> None:
        super().__init__("state table: another instance changed the same alert at the same time; the batch will be run again and nothing is lost")
        self.index = index


class TableStateStore:
    """See `pipeline.state.StateStore` for the guarantees, and this module's docstring for the layout.

    `credential`: an async azure-core credential for `account_url` (without one, DefaultAzureCredential
    is built here, and closed by `aclose`). `client_options` go to the TableClient (tests and
    benchmarks add azure-core policies or a transport). `owner` names this store on its leases."""

    def __init__(
        self, settings: StateSettings, *, credential: Any = None, client_options: Mapping[str, Any] | None = None, owner: str | None = None
    ) -> None:
        self._connection_string: str | None = None
        if settings.connection_string_env:
            try:
                self._connection_string = settings.connection_string_env.resolve().get_secret_value()
            except ValueError as exc:
                raise ConfigError(str(exc), key="state.connection_string_env") from None
        elif not settings.account_url:
            raise ConfigError("kind 'azure_table' needs account_url or connection_string_env", key="state")
        self.settings = settings
        self.table_name = settings.table
        self.credential = credential
        self.owner = owner or uuid.uuid4().hex[:16]
        self._owns_credential = False
        self._options = {"retry_total": 3, "retry_backoff_factor": 0.2, "retry_backoff_max": 2, "connection_timeout": 5, "read_timeout": 15, **(client_options or {})}
        self._client: Any = None
        self._ready = False
        self._ready_lock = asyncio.Lock()
        self._claims: HeldClaims[_Claim] = HeldClaims(until=attrgetter("until"))
        self._heads: OrderedDict[str, tuple[float, _Head]] = OrderedDict()

    # -- client ------------------------------------------------------------------------------------

    async def _table(self) -> Any:
        """The TableClient, the table created on first use."""
        if self._ready:
            return self._client
        async with self._ready_lock:
            if self._ready:
                return self._client
            from azure.core.exceptions import ResourceExistsError
            from azure.data.tables.aio import TableClient

            if self._client is None:
                if self._connection_string is not None:
                    self._client = TableClient.from_connection_string(self._connection_string, table_name=self.table_name, **self._options)
                else:
                    if self.credential is None:
                        from azure.identity.aio import DefaultAzureCredential

                        self.credential = DefaultAzureCredential(managed_identity_client_id=self.settings.managed_identity_client_id)
                        self._owns_credential = True
                    self._client = TableClient(endpoint=str(self.settings.account_url), table_name=self.table_name, credential=self.credential, **self._options)
            try:
                await self._client.create_table()
            except ResourceExistsError:
                pass
            except Exception as exc:
                raise _unavailable(exc, f"open the state table {self.table_name}") from exc
            self._ready = True
        return self._client

    def joined_writes(self) -> contextlib.AbstractContextManager[None]:
        """Each write is its own request (entity batches are per partition): nothing to join."""
        return contextlib.nullcontext()

    def holding_history_writes(self) -> contextlib.AbstractContextManager[None]:
        """No history lives here (`local_history` is None): nothing to hold."""
        return contextlib.nullcontext()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
            self._ready = False
        if self._owns_credential and self.credential is not None:
            await self.credential.close()
            self.credential = None

    def local_history(self, *, retention_days: float) -> HistoryStore | None:
        """None: no history lives here; the history enrichers name their own store (`store.kind = "azure_table"`)."""
        return None

    # -- parts ------------------------------------------------------------------------------------

    async def add_parts(self, parts: Sequence[AlertPart], *, now: float, max_parts_per_alert: int | None = None) -> PartsAdded:
        added = PartsAdded()
        if not parts:
            return added
        cap = MAX_PARTS if max_parts_per_alert is None else min(max_parts_per_alert, MAX_PARTS)
        fresh: dict[str, dict[str, tuple[AlertPart, bytes]]] = {}
        for part in parts:
            of_alert = fresh.setdefault(part.alert_id, {})
            if part.digest in of_alert:
                added.duplicate += 1
                continue
            data = orjson.dumps(part.data)
            if len(data) > MAX_PART_BYTES:
                added.too_large.append(part)
                continue
            of_alert[part.digest] = (part, data)
        client = await self._table()
        # alert id -> its head as last seen (None: absent). Alerts not in here and not remembered are
        # assumed new: their head is created, which fails if another writer made it first.
        heads: dict[str, _Head | None] = {}
        todo = {alert_id: of_alert for alert_id, of_alert in fresh.items() if of_alert}
        for _ in range(_MAX_ROUNDS):
            units = [self._unit(alert_id, of_alert, heads.get(alert_id, self._known_head(alert_id)), now=now, cap=cap) for alert_id, of_alert in todo.items()]
            by_shard: dict[str, list[_Unit]] = {}
            for unit in units:
                if unit.operations:
                    by_shard.setdefault(shard_of(unit.alert_id), []).append(unit)
            results = await _gather(*(self._write_units(client, shard_units) for shard_units in by_shard.values()))
            reread: set[str] = set().union(*results)
            for unit in units:
                if unit.alert_id not in reread:
                    added.new += unit.new
                    added.duplicate += unit.known
                    added.over_limit.extend(unit.over_limit)
            if not reread:
                return added
            todo = {alert_id: todo[alert_id] for alert_id in reread}
            for alert_id in reread:
                self._heads.pop(alert_id, None)
            ids = list(reread)
            heads.update(zip(ids, await _gather(*(self._read_head(client, alert_id) for alert_id in ids))))
        raise StoreUnavailable("state table: other writers kept changing the same alerts; the batch will be run again and nothing is lost")

    def _unit(self, alert_id: str, of_alert: dict[str, tuple[AlertPart, bytes]], head: _Head | None, *, now: float, cap: int) -> _Unit:
        from azure.core import MatchConditions
        from azure.data.tables import UpdateMode

        partition, key = shard_of(alert_id), _key(alert_id)
        unit = _Unit(alert_id=alert_id)
        stored = head.digests if head is not None else []
        seen = set(stored)
        new: list[tuple[AlertPart, bytes]] = []
        for digest, (part, data) in of_alert.items():
            if digest in seen:
                unit.known += 1
            elif len(stored) + len(new) >= cap:
                unit.over_limit.append(part)
            else:
                new.append((part, data))
        unit.new = len(new)
        if not new:
            return unit
        pending = head is not None and head.state == "pending"
        written = _Head(etag="", state="pending", digests=stored + [part.digest for part, _ in new],
                        head_bytes=head.head_bytes if head else 0, head_count=head.head_count if head else 0,
                        inline_bytes=head.inline_bytes if head and pending else 0, inline_count=head.inline_count if head and pending else 0,
                        emitted_at=head.emitted_at if head else 0.0)
        # A revision (the alert was emitted) reads every part from the head at its claim.
        overflow = written.inline_bytes < 0 or (head is not None and not pending)
        in_head: dict[str, bytes] = {}
        inline: dict[str, bytes] = {}
        for part, data in new:
            value = _part_value(part, data)
            if len(value) <= HEAD_PART_BYTES and written.head_bytes + len(value) <= HEAD_BYTES and written.head_count < HEAD_PARTS:
                in_head["Q" + part.digest] = value
                written.head_bytes += len(value)
                written.head_count += 1
            else:  # an entity of its own, its JSON over as many 64 KiB properties as it needs
                entity = {"PartitionKey": partition, "RowKey": f"a|{key}|{part.digest}", "Rank": part.rank, **_chunks(data, "D")}
                unit.parts.append(_Op(alert_id, ("upsert", entity, {"mode": UpdateMode.REPLACE}), len(data) * 4 // 3 + 512))
            if overflow or len(value) > INLINE_PART_BYTES or written.inline_bytes + len(value) > INLINE_BYTES or written.inline_count >= INLINE_PARTS:
                overflow = True
                continue
            inline["P" + part.digest] = value
            written.inline_bytes += len(value)
            written.inline_count += 1
        if overflow:
            written.inline_bytes = -1
        head_entity = {"PartitionKey": partition, "RowKey": _head_key(key), "AlertId": alert_id, **written.counters(),
                       **_chunks("".join(written.digests).encode(), "G"), **in_head}
        head_size = (len(written.digests) * DIGEST_BYTES + sum(map(len, in_head.values()))) * 4 // 3 + 1024
        row = {"PartitionKey": partition, "RowKey": _pending_key(key), "LastPartAt": float(now), "LeaseUntil": 0.0, "LeaseOwner": "", **inline}
        if overflow:
            row["Overflow"] = True
        row_size = sum(map(len, inline.values())) * 4 // 3 + 512
        remember = self._remember_head(alert_id, written)
        if head is None:  # new as far as this writer knows: creating the head fails if another writer made it first
            unit.creates_head = True
            unit.commit.append(_Op(alert_id, ("create", head_entity), head_size, remember))
            unit.commit.append(_Op(alert_id, ("upsert", {**row, "AlertId": alert_id, "FirstPartAt": float(now)}, {"mode": UpdateMode.REPLACE}), row_size))
            return unit
        # The head gains the new parts (MERGE keeps the others), on condition that nobody changed it since it was read.
        condition = {"mode": UpdateMode.MERGE, "etag": head.etag, "match_condition": MatchConditions.IfNotModified}
        unit.commit.append(_Op(alert_id, ("update", head_entity, condition), head_size, remember))
        if pending:  # the new parts join those waiting; the settle time starts again and any lease ends
            unit.commit.append(_Op(alert_id, ("upsert", row, {"mode": UpdateMode.MERGE}), row_size))
        else:  # emitted before: pending again, a revision that will hold every part
            unit.commit.append(_Op(alert_id, ("upsert", {**row, "AlertId": alert_id, "FirstPartAt": float(now), "Overflow": True}, {"mode": UpdateMode.REPLACE}), row_size))
        return unit

    async def _write_units(self, client: Any, units: list[_Unit]) -> set[str]:
        """Write the units of one shard in as few transactions as they fit; returns the alerts to read
        again and retry (nothing of theirs was committed). A unit too large for one transaction writes
        its part entities first and commits them with its head last: parts written without their head
        are not listed in it, so they count as new when the batch runs again."""
        reread: set[str] = set()
        fitting: list[list[_Op]] = []
        for unit in units:
            if len(unit.operations) <= MAX_OPERATIONS and sum(op.size for op in unit.operations) <= MAX_TRANSACTION_BYTES:
                fitting.append(unit.operations)
                continue
            for group in _packed([[op] for op in unit.parts]):
                if await self._submit(client, group, "write parts") is not None:
                    reread.add(unit.alert_id)
                    break
            else:
                if await self._submit(client, unit.commit, "write parts") is not None:
                    reread.add(unit.alert_id)
        assumed_new = {unit.alert_id for unit in units if unit.creates_head}
        while fitting:
            retry: list[list[_Op]] = []
            for group in _packed(fitting):
                lost = await self._submit(client, group, "write parts")
                if lost is None:
                    continue
                # Nothing of the transaction was written. The alert that met the conflict is read again;
                # so are the other alerts of it assumed new (a redelivered batch: they are likely known too).
                suspects = {lost} | {op.alert_id for op in group if op.alert_id in assumed_new}
                reread |= suspects
                retry.extend(_by_alert(op for op in group if op.alert_id not in suspects))
            fitting = retry
        return reread

    async def _submit(self, client: Any, ops: list[_Op], what: str) -> str | None:
        """One transaction. None when it committed (each op's `done` is given its new ETag), else the
        alert whose operation met a conflict."""
        try:
            results = await _call(client.submit_transaction([op.operation for op in ops]), what)
        except _Conflict as conflict:
            return ops[min(conflict.index, len(ops) - 1)].alert_id
        for op, result in zip(ops, results):
            if op.done is not None:
                op.done(result["etag"])
        return None

    def _known_head(self, alert_id: str) -> _Head | None:
        held = self._heads.get(alert_id)
        if held is None or time.monotonic() - held[0] > KNOWN_HEAD_SECONDS:
            return None
        return held[1]

    def _remember_head(self, alert_id: str, head: _Head) -> Callable[[str], None]:
        def done(etag: str) -> None:
            head.etag = etag
            self._heads[alert_id] = (time.monotonic(), head)
            self._heads.move_to_end(alert_id)
            while len(self._heads) > KNOWN_HEADS:
                self._heads.popitem(last=False)

        return done

    async def _read_head(self, client: Any, alert_id: str) -> _Head | None:
        entity = await self._read_entity(client, shard_of(alert_id), _head_key(_key(alert_id)), select=["State", "EmittedAt", "HeadBytes", "HeadCount", "Inline", "InlineCount", "G0", "G1"])
        return _Head.of(entity) if entity is not None else None

    async def _read_entity(self, client: Any, partition: str, row: str, *, select: list[str] | None = None) -> Any:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return await client.get_entity(partition, row, select=select)
        except ResourceNotFoundError:
            return None
        except Exception as exc:
            raise _unavailable(exc, "read an alert") from exc

    # -- claims -----------------------------------------------------------------------------------

    async def claim_due(
        self, *, now: float, settle_seconds: float, max_hold_seconds: float, lease_seconds: float, force: bool = False, limit: int | None = None
    ) -> list[PendingAlert]:
        from azure.core import MatchConditions
        from azure.data.tables import UpdateMode

        client = await self._table()
        query = "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi"
        parameters: dict[str, Any] = {"lo": _P, "hi": _P_END}
        if not force:
            query += " and LeaseUntil le @now and ( LastPartAt le @settled or FirstPartAt le @held )"  # the client wants a space after a @name
            parameters.update(now=float(now), settled=float(now - settle_seconds), held=float(now - max_hold_seconds))
        found = await _gather(*(self._query(client, query, {**parameters, "pk": shard}, limit=limit) for shard in _shards()))
        # Not an alert this handle holds a claim on whose lease runs yet: a part that came since made it
        # due again, but the batch of that claim is still at work, and its mark must not take this one's.
        candidates = sorted((entity for entities in found for entity in entities if force or not self._claims.holds(entity["AlertId"], now)), key=_age)
        if limit is not None:
            candidates = candidates[:limit]
        until = float(now + lease_seconds)
        lease = {"LeaseUntil": until, "LeaseOwner": self.owner}
        units: list[list[_Op]] = []
        won: dict[str, tuple[Any, str]] = {}
        for entity in candidates:
            def keep(etag: str, entity: Any = entity) -> None:
                won[entity["AlertId"]] = (entity, etag)

            claim = ("update", {"PartitionKey": entity["PartitionKey"], "RowKey": entity["RowKey"], **lease},
                     {"mode": UpdateMode.MERGE, "etag": entity.metadata["etag"], "match_condition": MatchConditions.IfNotModified})
            units.append([_Op(entity["AlertId"], claim, 256, keep)])
        await self._each_shard(client, units, "claim alerts")  # an alert taken or changed since the query: another claimer won it
        claimed = sorted(won.values(), key=lambda pair: _age(pair[0]))
        alerts = await _gather(*(self._parts_of(client, entity) for entity, _ in claimed))
        for (entity, etag), alert in zip(claimed, alerts):
            self._claims.keep(alert.alert_id, _Claim(entity["PartitionKey"], entity["RowKey"], etag, until))
        return alerts

    async def _parts_of(self, client: Any, pending: Any) -> PendingAlert:
        """The parts of a claimed alert: those kept in its pending entry, or (overflow, revision) those of its
        head and, for parts too large for it, their own entities."""
        alert_id = pending["AlertId"]
        if not pending.get("Overflow"):
            parts = list(_parts_in(pending, "P", alert_id).values())
        else:
            key = _key(alert_id)
            head = await self._read_entity(client, pending["PartitionKey"], _head_key(key))
            listed = set(_Head.of(head).digests) if head is not None else set()
            in_head = _parts_in(head, "Q", alert_id) if head is not None else {}  # written with the head: committed
            parts = list(in_head.values())
            if len(in_head) < len(listed):  # the others have entities of their own
                low, high = _alert_range(key)
                for entity in await self._query(client, "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi", {"pk": pending["PartitionKey"], "lo": low + "0", "hi": high}):
                    digest = entity["RowKey"][len(low) :]
                    if digest in listed and digest not in in_head:  # one the head does not list yet is from an interrupted write
                        parts.append(AlertPart(alert_id=alert_id, rank=int(entity["Rank"]), data=orjson.loads(_joined(entity, "D")), digest=digest))
        parts.sort(key=PART_ORDER)
        return PendingAlert(alert_id=alert_id, parts=parts)

    async def mark_emitted(self, alert_ids: Sequence[str], *, now: float) -> None:
        from azure.core import MatchConditions
        from azure.data.tables import UpdateMode

        held = self._claims.of(alert_ids)
        self._claims.forget(held)
        if not held:
            return
        client = await self._table()
        units = []
        for alert_id, claim in held:
            key = _key(alert_id)
            state = {"State": "emitted", "EmittedAt": float(now), "Inline": 0, "InlineCount": 0}
            units.append([
                _Op(alert_id, ("delete", {"PartitionKey": claim.partition, "RowKey": claim.row}, {"etag": claim.etag, "match_condition": MatchConditions.IfNotModified})),
                _Op(alert_id, ("upsert", {"PartitionKey": claim.partition, "RowKey": _head_key(key), **state}, {"mode": UpdateMode.MERGE})),
                _Op(alert_id, ("upsert", {"PartitionKey": claim.partition, "RowKey": _emitted_key(key, now), "AlertId": alert_id, "EmittedAt": float(now)}, {"mode": UpdateMode.REPLACE})),
            ])
            # Forgotten, not remembered as emitted: the head this process knew may list fewer parts than the
            # table's (another instance may have added one since), and the head's new ETag would hide that.
            self._heads.pop(alert_id, None)
        # A claim lost (its lease ran out and another claimer took it) or an alert that got a new part
        # since: it stays pending, for its new holder or as a revision.
        await self._each_shard(client, units, "mark alerts emitted")

    async def release(self, alert_ids: Sequence[str]) -> None:
        """End the lease of claimed alerts that were not emitted (their batch raised), so they can be claimed again now."""
        from azure.core import MatchConditions
        from azure.data.tables import UpdateMode

        held = self._claims.of(alert_ids)
        self._claims.forget(held)
        if not held:
            return
        client = await self._table()
        units = [
            [_Op(alert_id, ("update", {"PartitionKey": c.partition, "RowKey": c.row, "LeaseUntil": 0.0, "LeaseOwner": ""},
                            {"mode": UpdateMode.MERGE, "etag": c.etag, "match_condition": MatchConditions.IfNotModified}), 256)]
            for alert_id, c in held
        ]
        await self._each_shard(client, units, "release alerts")

    async def _each_shard(self, client: Any, units: list[list[_Op]], what: str) -> set[str]:
        """Submit units (the operations of one alert, committed together), packed per shard into
        transactions, the shards at once; a unit that meets a conflict is dropped, the rest of its
        transaction submitted again. Returns the alerts dropped."""
        by_shard: dict[str, list[list[_Op]]] = {}
        for unit in units:
            by_shard.setdefault(unit[0].operation[1]["PartitionKey"], []).append(unit)

        async def shard(pending: list[list[_Op]]) -> set[str]:
            dropped: set[str] = set()
            while pending:
                retry: list[list[_Op]] = []
                for group in _packed(pending):
                    lost = await self._submit(client, group, what)
                    if lost is not None:
                        dropped.add(lost)
                        retry.extend(_by_alert(op for op in group if op.alert_id != lost))
                pending = retry
            return dropped

        return set().union(*await _gather(*(shard(pending) for pending in by_shard.values())))

    async def pending_count(self) -> int:
        client = await self._table()
        found = await _gather(*(self._query(client, "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi", {"pk": s, "lo": _P, "hi": _P_END}, select=["RowKey"]) for s in _shards()))
        return sum(len(entities) for entities in found)

    # -- purge ------------------------------------------------------------------------------------

    async def purge(self, *, emitted_before: float) -> int:
        """Delete the alerts emitted before `emitted_before` and not pending again since (head, parts and
        index entries), and the redelivery counts untouched for the forget window before it."""
        client = await self._table()
        cut = float(emitted_before)
        upper = f"{_E}{int(cut // 3600) + 1:08d}"

        async def shard(partition: str) -> int:
            marks = await self._query(
                client, "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi and EmittedAt lt @cut",
                {"pk": partition, "lo": _E, "hi": upper, "cut": cut}, select=["RowKey", "AlertId"],
            )
            deletes: list[list[_Op]] = []
            purged = 0
            for mark in marks:
                alert_id = mark["AlertId"]
                low, high = _alert_range(_key(alert_id))
                rows = await self._query(client, "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi", {"pk": partition, "lo": low, "hi": high},
                                         select=["RowKey", "State", "EmittedAt"])
                heads = [row for row in rows if row["RowKey"] == low]
                if heads and heads[0].get("State") == "emitted" and float(heads[0].get("EmittedAt", 0.0)) < cut:
                    purged += 1
                    deletes.extend([_Op(alert_id, ("delete", {"PartitionKey": partition, "RowKey": row["RowKey"]}))] for row in rows if row["RowKey"] != low)
                    deletes.append([_Op(alert_id, ("delete", {"PartitionKey": partition, "RowKey": low}))])  # the head last: parts are never left unlisted
                    self._heads.pop(alert_id, None)
                deletes.append([_Op(alert_id, ("delete", {"PartitionKey": partition, "RowKey": mark["RowKey"]}))])
            await self._deletes(client, deletes)
            return purged

        purged = sum(await _gather(*(shard(partition) for partition in _shards())))
        stale = await self._query(client, "PartitionKey eq @pk and LastAt lt @cut", {"pk": REDELIVERY_PARTITION, "cut": cut - REDELIVERY_FORGET_SECONDS}, select=["RowKey"])
        await self._deletes(client, [[_Op("", ("delete", {"PartitionKey": REDELIVERY_PARTITION, "RowKey": row["RowKey"]}))] for row in stale])
        return purged

    async def _deletes(self, client: Any, units: list[list[_Op]]) -> None:
        """Deletes in order, packed into transactions; one whose entity is already gone is skipped."""
        pending = units
        while pending:
            retry: list[list[_Op]] = []
            for group in _packed(pending):
                try:
                    await _call(client.submit_transaction([op.operation for op in group]), "purge emitted alerts")
                except _Conflict as conflict:
                    retry.extend([op] for i, op in enumerate(group) if i != conflict.index)
            pending = retry

    # -- redelivery counts ------------------------------------------------------------------------

    async def count_redelivery(self, fingerprint: str, *, now: float) -> int:
        """Count one more run of the batch with this fingerprint; returns the count including this one.
        A count untouched for the forget window starts again at 1."""
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
        from azure.data.tables import UpdateMode

        client = await self._table()
        for _ in range(_MAX_ROUNDS):
            try:
                try:
                    entity = await client.get_entity(REDELIVERY_PARTITION, fingerprint)
                except ResourceNotFoundError:
                    try:
                        await client.create_entity({"PartitionKey": REDELIVERY_PARTITION, "RowKey": fingerprint, "Attempts": 1, "LastAt": float(now)})
                    except ResourceExistsError:
                        continue  # another process counted first
                    return 1
                fresh = float(entity.get("LastAt", 0.0)) >= now - REDELIVERY_FORGET_SECONDS
                attempts = int(entity.get("Attempts", 0)) + 1 if fresh else 1
                try:
                    await client.update_entity(
                        {"PartitionKey": REDELIVERY_PARTITION, "RowKey": fingerprint, "Attempts": attempts, "LastAt": float(now)},
                        mode=UpdateMode.REPLACE, etag=entity.metadata["etag"], match_condition=MatchConditions.IfNotModified,
                    )
                except (ResourceModifiedError, ResourceNotFoundError):
                    continue
                return attempts
            except Exception as exc:
                raise _unavailable(exc, "count a batch redelivery") from exc
        raise StoreUnavailable("state table: other processes kept changing the same redelivery count; the batch will be run again and nothing is lost")

    async def forget_redelivery(self, fingerprint: str) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        client = await self._table()
        try:
            await client.delete_entity(REDELIVERY_PARTITION, fingerprint)
        except ResourceNotFoundError:
            pass
        except Exception as exc:
            raise _unavailable(exc, "forget a batch redelivery count") from exc

    # -- queries ----------------------------------------------------------------------------------

    async def _query(self, client: Any, query: str, parameters: dict[str, Any], *, limit: int | None = None, select: list[str] | None = None) -> list[Any]:
        found: list[Any] = []
        try:
            async for entity in client.query_entities(query, parameters=parameters, select=select, results_per_page=min(limit or 1000, 1000)):
                found.append(entity)
                if limit is not None and len(found) >= limit:
                    break
        except Exception as exc:
            raise _unavailable(exc, "read the state table") from exc
        return found


def _shards() -> Iterable[str]:
    return (f"s{index:02d}" for index in range(SHARDS))


def _age(pending: Any) -> tuple[float, str]:
    return float(pending.get("FirstPartAt", 0.0)), pending["RowKey"]


def _by_alert(ops: Iterable[_Op]) -> list[list[_Op]]:
    units: dict[str, list[_Op]] = {}
    for op in ops:
        units.setdefault(op.alert_id, []).append(op)
    return list(units.values())


def _packed(units: list[list[_Op]]) -> list[list[_Op]]:
    """Units (operations committed together) packed in order into transactions of at most
    `MAX_OPERATIONS` operations and `MAX_TRANSACTION_BYTES`; a unit is never split."""
    groups: list[list[_Op]] = []
    current: list[_Op] = []
    size = 0
    for unit in units:
        unit_size = sum(op.size for op in unit)
        if current and (len(current) + len(unit) > MAX_OPERATIONS or size + unit_size > MAX_TRANSACTION_BYTES):
            groups.append(current)
            current, size = [], 0
        current.extend(unit)
        size += unit_size
    if current:
        groups.append(current)
    return groups


async def _gather(*calls: Awaitable[T]) -> list[T]:
    """Every call at once; when one fails the others still run to their end (none is left behind) and the first error is raised."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return list(results)  # type: ignore[arg-type]


async def _call(call: Awaitable[T], what: str) -> T:
    """Await one transaction. A conflict (an entity changed, missing or already there) raises _Conflict
    with the index of the operation that met it; any other failure StoreUnavailable."""
    from azure.data.tables import TableTransactionError

    try:
        return await call
    except TableTransactionError as exc:
        if exc.status_code in (404, 409, 412):
            raise _Conflict(exc.index) from None
        raise _unavailable(exc, what) from exc
    except Exception as exc:
        raise _unavailable(exc, what) from exc


def _unavailable(exc: BaseException, what: str) -> StoreUnavailable:
    """A user-facing sentence for a failure of the Table service (no payload, no stack)."""
    status = getattr(exc, "status_code", None)
    reason = f"HTTP {status}" if status else type(exc).__name__
    if status in (401, 403) or "Authentication" in type(exc).__name__:
        hint = "check that the app's identity has Storage Table Data Contributor on the storage account"
    else:
        hint = "the batch will be run again and nothing is lost"
    return StoreUnavailable(f"state table: could not {what} ({reason}); {hint}")
