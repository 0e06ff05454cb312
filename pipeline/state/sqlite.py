"""The embedded default state store: one SQLite file on local disk.

Calls are synchronous under an async signature: each is a short local transaction (microseconds to
a few milliseconds), cheaper than a thread hop. One process owns the file; for several Functions
instances sharing state, use a shared store instead.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from pipeline.errors import BUSY_WAIT_SECONDS, store_error  # BUSY_WAIT_SECONDS: SQLite's busy handler sleeps in growing steps (1 ms up to 100 ms) meanwhile: the backoff
from pipeline.ingest.formats.contract import PART_ORDER, AlertPart
from pipeline.state import REDELIVERY_FORGET_SECONDS, HeldClaims, PartsAdded, PendingAlert

if TYPE_CHECKING:
    from pipeline.state.history import SqliteHistoryStore

log = logging.getLogger("pipeline")

# A rowid table: a part's `data` (~0.3-2 KB of JSON) is too large for WITHOUT ROWID, whose cells
# spill past ~1 KB into overflow pages: a batch's parts wrote ~5 pages to the log, now ~2 (the rows,
# appended, and the (alert_id, digest) index). A file written by an earlier version keeps its
# WITHOUT ROWID table, which the same statements serve: converting it would copy every kept part
# under the write lock when the file is opened (~6 s for 400,000 parts, past the other processes'
# busy wait).
_PARTS_TABLE = """
CREATE TABLE IF NOT EXISTS alert_parts (
    alert_id   TEXT NOT NULL,
    digest     TEXT NOT NULL,
    rank       INTEGER NOT NULL,
    data       BLOB NOT NULL,
    UNIQUE (alert_id, digest)
)"""

_SCHEMA = _PARTS_TABLE + """;
CREATE TABLE IF NOT EXISTS alerts (
    alert_id       TEXT PRIMARY KEY,
    state          TEXT NOT NULL,          -- pending | emitted
    first_part_at  REAL NOT NULL,
    last_part_at   REAL NOT NULL,
    lease_until    REAL NOT NULL DEFAULT 0,
    emitted_at     REAL
) WITHOUT ROWID;
-- One index for the claims and the pending count (state = 'pending') and for the purge (state =
-- 'emitted', by emitted_at). An alert's entry moves from ('pending', ...) to ('emitted', now), next to
-- it: a batch's commits write one page of it, not the two or three of two indexes. Files written by
-- earlier versions (alerts_pending on (state, last_part_at), alerts_emitted on (emitted_at)) lose
-- those on open.
DROP INDEX IF EXISTS alerts_pending;
DROP INDEX IF EXISTS alerts_emitted;
CREATE INDEX IF NOT EXISTS alerts_state ON alerts (state, emitted_at);
CREATE TABLE IF NOT EXISTS batch_redeliveries (
    fingerprint TEXT PRIMARY KEY,
    attempts    INTEGER NOT NULL,
    last_at     REAL NOT NULL
) WITHOUT ROWID;
"""


# A commit folds the write-ahead log into the database (with an fsync) when it holds this many pages
# (4 KiB each), not SQLite's default 1,000: the log file grows to ~40 MiB at most. With the background
# checkpointer (`WalCheckpointer`) keeping up, the commits never reach it. Benchmarked in docs/performance.md.
WAL_CHECKPOINT_PAGES = 10_000

# Parts a handle keeps of those it stored, for its own claims (`StoredParts`): at most this many, and
# at most this many bytes of their JSON (a part's memory in all is a few times its JSON: ~4 KB for a
# typical ~0.5 KB part, so ~8 MB at most here; a message of 25 split alerts has 100 parts). A part
# may hold strings up to the record limits: the byte bound keeps a stream of large parts from
# filling memory, and a part larger than 1/64 of it is not kept at all.
STORED_PARTS_KEPT = 2048
STORED_PARTS_BYTES = 1 << 20


DAMAGED_STATE_ADVICE = (
    "move it (and its -wal and -shm files) aside and run again: a new state store is created; split alerts "
    "whose parts were pending in the old one come out again only if their messages are read again"
)


# How often the background checkpointer (`WalCheckpointer`) folds the log into the database.
CHECKPOINT_EVERY_SECONDS = 0.25


class WalCheckpointer:
    """Folds a SQLite file's write-ahead log into the database from a thread of its own, every
    CHECKPOINT_EVERY_SECONDS, so that a batch's commit does not wait for a checkpoint's copy and fsync
    (tens of milliseconds, every few thousand small commits otherwise).

    Guarantees: the checkpoints are SQLite's PASSIVE ones (they never block a writer or a reader, and
    are crash-safe); the connections keep their own `wal_autocheckpoint` (`connect`), so the log stays
    bounded if this thread falls behind; `close` stops the thread and waits for it. Its own connection
    runs only the checkpoint (SQLite releases the GIL meanwhile); the thread ends with `close`, or
    when its owner is garbage."""

    def __init__(self, path: Path, *, owner: object, every_seconds: float = CHECKPOINT_EVERY_SECONDS) -> None:
        """`owner`: the store whose file it is; when it is garbage without having been closed, the thread ends too."""
        self.path = path
        self.every_seconds = every_seconds
        self.checkpoints = 0  # rounds that found the whole log folded into the database (tests)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sqlite-checkpoint:{path.name}", daemon=True)
        self._thread.start()
        weakref.finalize(owner, self._stop.set)

    def _run(self) -> None:
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_WAIT_SECONDS)
        except sqlite3.Error as exc:
            log.warning("no background checkpoints for %s (%s): the commits make them", self.path.name, type(exc).__name__)
            return
        try:
            while not self._stop.wait(self.every_seconds):
                try:
                    busy, frames, folded = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as exc:  # the next round tries again; the commits' own checkpoints bound the log
                    log.debug("background checkpoint of %s failed: %s", self.path.name, type(exc).__name__)
                    continue
                if busy == 0 and frames == folded:
                    self.checkpoints += 1
        finally:
            db.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def connect(path: Path) -> sqlite3.Connection:
    """A connection to a local store's SQLite file as every local store opens it: WAL journal,
    synchronous=NORMAL (durable across a crash of the process), and a busy wait of
    BUSY_WAIT_SECONDS set before the first statement (changing the journal mode takes a lock too)."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=BUSY_WAIT_SECONDS)
    db.execute(f"PRAGMA busy_timeout={int(BUSY_WAIT_SECONDS * 1000)}")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
    return db


_CLAIM_ANY = "SELECT alert_id FROM alerts WHERE state = 'pending' ORDER BY first_part_at LIMIT ?"
_CLAIM_DUE = """SELECT alert_id FROM alerts WHERE state = 'pending' AND lease_until <= ?
   AND (last_part_at <= ? OR first_part_at <= ?) ORDER BY first_part_at LIMIT ?"""


class SqliteStateStore:
    """See `pipeline.state.StateStore` for the guarantees."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = connect(self.path)
            self._db.executescript(_SCHEMA)
            self._checkpointer = WalCheckpointer(self.path, owner=self)
            self._joined: _JoinedWrites | None = None
            self._held = HeldWrites()
            self._stored = StoredParts()
            # The lease each alert this handle claimed got (its `lease_until`): the mark and the release
            # apply only while the row still holds it. A new part resets it to 0, another claim moves it.
            self._leases: HeldClaims[float] = HeldClaims(until=float)
        except (OSError, sqlite3.Error) as exc:
            raise store_error(exc, path=self.path, operation="open the state store", advice=DAMAGED_STATE_ADVICE) from exc

    async def add_parts(self, parts: Sequence[AlertPart], *, now: float, max_parts_per_alert: int | None = None) -> PartsAdded:
        added = PartsAdded()
        if not parts:
            return added
        try:
            with self._transaction() as db:
                known = self._known_digests(db, {part.alert_id for part in parts})
                held = Counter(alert_id for alert_id, _ in known)  # the parts each alert holds already
                fresh: dict[str, dict[str, AlertPart]] = {}  # alert id -> digest -> part, in the order given
                for part in parts:
                    alert_id, digest = part.alert_id, part.digest
                    of_alert = fresh.get(alert_id)
                    if of_alert is None:
                        of_alert = fresh[alert_id] = {}
                    if digest in of_alert or (alert_id, digest) in known:
                        added.duplicate += 1
                    elif max_parts_per_alert is not None and held[alert_id] + len(of_alert) >= max_parts_per_alert:
                        added.over_limit.append(part)
                    else:
                        of_alert[digest] = part
                rows: list[PartRow] = []
                written: dict[str, dict[str, tuple[bytes, AlertPart]] | None] = {}  # per alert: the JSON of each part, None if one is not plain JSON
                for alert_id, of_alert in fresh.items():
                    if of_alert:
                        written[alert_id] = _rows_of(alert_id, of_alert, rows)
                added.new = len(rows)
                db.executemany("INSERT OR IGNORE INTO alert_parts (alert_id, digest, rank, data) VALUES (?, ?, ?, ?)", rows)
                db.executemany(
                    """INSERT INTO alerts (alert_id, state, first_part_at, last_part_at) VALUES (?, 'pending', ?, ?)
                       ON CONFLICT (alert_id) DO UPDATE SET
                         first_part_at = CASE WHEN state = 'emitted' THEN excluded.first_part_at ELSE first_part_at END,
                         last_part_at = excluded.last_part_at,
                         state = 'pending', lease_until = 0""",
                    [(alert_id, now, now) for alert_id in written],
                )
                self._stored.keep(written)
                if self._joined is not None:
                    self._joined.stored(written, held)
        except sqlite3.Error as exc:
            raise store_error(exc, path=self.path, operation="write the state store", advice=DAMAGED_STATE_ADVICE) from exc
        return added

    @staticmethod
    def _known_digests(db: sqlite3.Connection, alert_ids: set[str]) -> set[tuple[str, str]]:
        known: set[tuple[str, str]] = set()
        for chunk, marks in _chunks(list(alert_ids)):
            known.update(db.execute(f"SELECT alert_id, digest FROM alert_parts WHERE alert_id IN ({marks})", chunk))
        return known

    async def claim_due(
        self, *, now: float, settle_seconds: float, max_hold_seconds: float, lease_seconds: float, force: bool = False, limit: int | None = None
    ) -> list[PendingAlert]:
        most = -1 if limit is None else limit  # SQLite: LIMIT -1 is no limit
        arguments: tuple[float, ...]
        if force:
            query, arguments = _CLAIM_ANY, (most,)
        else:
            query, arguments = _CLAIM_DUE, (now, now - settle_seconds, now - max_hold_seconds, most)
        try:
            # Nothing due (most batches of a quiet hub): one read, no write transaction. What is due is
            # read again inside the transaction, so an alert claimed elsewhere in between is not taken.
            # In a joined block whose transaction has begun (the batch stored parts) the lock is held
            # already: no need to look first.
            in_transaction = self._joined is not None and self._joined.begun
            if not in_transaction and self._db.execute(query, arguments).fetchone() is None:
                return []
            with self._transaction() as db:
                ids = [row[0] for row in db.execute(query, arguments).fetchall()]
                if not force:  # not an alert this handle's own claim still holds (a part that came since made it due again)
                    ids = [alert_id for alert_id in ids if not self._leases.holds(alert_id, now)]
                lease = now + lease_seconds
                for chunk, marks in _chunks(ids):  # one statement per chunk of alerts, not one per alert
                    db.execute(f"UPDATE alerts SET lease_until = ? WHERE alert_id IN ({marks})", [lease, *chunk])
                # An alert this transaction stored every part of needs no read (`_JoinedWrites.whole`);
                # the parts of the others are read, those this handle stored lately not parsed again.
                whole = self._joined.whole if self._joined is not None else {}
                by_alert: dict[str, list[AlertPart]] = {}
                unread: list[str] = []
                kept: dict[str, dict[str, tuple[bytes, AlertPart]]] = {}
                for alert_id in ids:
                    kept_parts = self._stored.take(alert_id)
                    if (parts := whole.get(alert_id)) is not None:
                        by_alert[alert_id] = sorted(parts, key=PART_ORDER)
                    else:
                        by_alert[alert_id] = []
                        unread.append(alert_id)
                        if kept_parts:
                            kept[alert_id] = kept_parts
                for chunk, marks in _chunks(unread):
                    # No ORDER BY: SQLite would sort every row, JSON and all, in a temporary tree; each
                    # alert's few parts are put in (rank, digest) order below.
                    for alert_id, digest, rank, data in db.execute(f"SELECT alert_id, digest, rank, data FROM alert_parts WHERE alert_id IN ({marks})", chunk):
                        mine = kept.get(alert_id, _NONE_KEPT).get(digest)
                        if mine is not None and mine[0] == data and mine[1].rank == rank:  # the row holds what was written for it
                            part = mine[1]
                        else:
                            part = AlertPart(alert_id=alert_id, rank=rank, data=orjson.loads(data), digest=digest)
                        by_alert[alert_id].append(part)
                for alert_id in unread:
                    by_alert[alert_id].sort(key=PART_ORDER)
                claimed = [PendingAlert(alert_id=alert_id, parts=parts) for alert_id, parts in by_alert.items()]
        except sqlite3.Error as exc:
            raise store_error(exc, path=self.path, operation="read the state store", advice=DAMAGED_STATE_ADVICE) from exc
        for alert_id in ids:
            self._leases.keep(alert_id, lease)
        if self._joined is not None:  # committed, or rolled back, when the block ends
            self._joined.leases.extend((alert_id, lease) for alert_id in ids)
        return claimed

    async def mark_emitted(self, alert_ids: Sequence[str], *, now: float) -> None:
        held_leases = self._leases.of(alert_ids)
        if not held_leases:
            return
        try:
            with self._transaction() as db:
                # Only while the claim holds (`lease_until` as it set it): an alert that got a new part since
                # (its lease reset to 0) or another claim stays pending, so the new part is not lost behind the mark.
                db.executemany(
                    "UPDATE alerts SET state = 'emitted', emitted_at = ?, lease_until = 0 WHERE alert_id = ? AND lease_until = ?",
                    [(now, alert_id, lease) for alert_id, lease in held_leases],
                )
                held = self._held.execute(db) if self._joined is None else 0
            self._held.committed(held)
            self._leases.forget(held_leases)
        except sqlite3.Error as exc:
            raise store_error(exc, path=self.path, operation="write the state store", advice=DAMAGED_STATE_ADVICE) from exc

    async def release(self, alert_ids: Sequence[str]) -> None:
        """End the lease of claimed alerts that were not emitted (their batch raised), so they can be claimed again now."""
        held_leases = self._leases.of(alert_ids)
        if not held_leases:
            return
        try:
            with self._transaction() as db:
                db.executemany(
                    "UPDATE alerts SET lease_until = 0 WHERE alert_id = ? AND state = 'pending' AND lease_until = ?",
                    [(alert_id, lease) for alert_id, lease in held_leases],
                )
                held = self._held.execute(db) if self._joined is None else 0
            self._held.committed(held)
            self._leases.forget(held_leases)
        except sqlite3.Error as exc:
            raise store_error(exc, path=self.path, operation="write the state store", advice=DAMAGED_STATE_ADVICE) from exc

    async def pending_count(self) -> int:
        try:
            return self._db.execute("SELECT count(*) FROM alerts WHERE state = 'pending'").fetchone()[0]
        except sqlite3.Error as exc:
            raise store_error(exc, path=self.path, operation="read the state store", advice=DAMAGED_STATE_ADVICE) from exc

    async def purge(self, *, emitted_before: float) -> int:
        try:
            with self._transaction() as db:
                # one range of alerts_state (state, emitted_at): the alerts it drops, not every emitted one
                ids = [r[0] for r in db.execute("SELECT alert_id FROM alerts WHERE state = 'emitted' AND emitted_at < ?", (emitted_before,))]
                db.executemany("DELETE FROM alert_parts WHERE alert_id = ?", [(i,) for i in ids])
                db.executemany("DELETE FROM alerts WHERE alert_id = ?", [(i,) for i in ids])
        except sqlite3.Error as exc:
            raise store_error(exc, path=self.path, operation="purge the state store", advice=DAMAGED_STATE_ADVICE) from exc
        return len(ids)

    async def count_redelivery(self, fingerprint: str, *, now: float) -> int:
        try:
            with self._transaction() as db:
                db.execute("DELETE FROM batch_redeliveries WHERE last_at < ?", (now - REDELIVERY_FORGET_SECONDS,))
                db.execute(
                    """INSERT INTO batch_redeliveries (fingerprint, attempts, last_at) VALUES (?, 1, ?)
                       ON CONFLICT (fingerprint) DO UPDATE SET attempts = attempts + 1, last_at = excluded.last_at""",
                    (fingerprint, now),
                )
                (count,) = db.execute("SELECT attempts FROM batch_redeliveries WHERE fingerprint = ?", (fingerprint,)).fetchone()
        except sqlite3.Error as exc:
            raise store_error(exc, path=self.path, operation="write the state store", advice=DAMAGED_STATE_ADVICE) from exc
        return int(count)

    async def forget_redelivery(self, fingerprint: str) -> None:
        try:
            self._db.execute("DELETE FROM batch_redeliveries WHERE fingerprint = ?", (fingerprint,))
        except sqlite3.Error as exc:
            raise store_error(exc, path=self.path, operation="write the state store", advice=DAMAGED_STATE_ADVICE) from exc

    def local_history(self, *, retention_days: float) -> SqliteHistoryStore:
        """The history tables in this same file, on this connection (closed with the state, not the history)."""
        from pipeline.state.history import SqliteHistoryStore

        return SqliteHistoryStore(connection=self._db, path=self.path, retention_days=retention_days, held=self._held)

    async def aclose(self) -> None:
        try:
            self._held.commit(self._db)  # what a batch that raised left held
        except sqlite3.Error as exc:  # closing must not hide the run's own result; that batch was not accounted for
            log.warning("history writes held by the state store not committed at close: %s", type(exc).__name__)
        finally:
            self._checkpointer.close()
            self._db.close()

    def holding_history_writes(self) -> _HoldingHistoryWrites:
        """While the block runs (it may wait), the local history's writes are held in memory and
        committed with the state's next write transaction (`mark_emitted`, `release`), or before the
        history is read, or when the block ends, whichever comes first: a batch's history and its
        mark cost one commit. Every held write is committed before the block ends; when the block
        raises, a commit that fails there is not raised (the batch raises, and the writes stay held
        for the next commit)."""
        return _HoldingHistoryWrites(self)

    def joined_writes(self) -> _JoinedWrites:
        """While the block runs, the store's writes share one transaction, begun at the first of them
        and committed when the block ends (rolled back when it raises): a batch's parts and its claim
        cost one commit, not three."""
        return _JoinedWrites(self)

    def _transaction(self) -> Transaction | _JoinedStep:
        if self._joined is not None:
            return _JoinedStep(self._joined)
        return Transaction(self._db)


class _HoldingHistoryWrites:
    """The block of `SqliteStateStore.holding_history_writes` (a class, not a generator: one per batch)."""

    __slots__ = ("store",)

    def __init__(self, store: SqliteStateStore) -> None:
        self.store = store

    def __enter__(self) -> None:
        self.store._held.holders += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        store = self.store
        store._held.holders -= 1
        if exc_type is not None:
            try:
                store._held.commit(store._db)
            except sqlite3.Error as error:  # the batch's own error is what is raised; the writes stay held
                log.warning("history writes held by a failed batch not committed yet (%s): they go with the next commit", type(error).__name__)
            return
        try:
            store._held.commit(store._db)
        except sqlite3.Error as error:
            raise store_error(error, path=store.path, operation="write the state store", advice=DAMAGED_STATE_ADVICE) from error


class _JoinedWrites:
    """One transaction for every write of a block (`SqliteStateStore.joined_writes`)."""

    def __init__(self, store: SqliteStateStore) -> None:
        self.store = store
        self.begun = False
        # The split alerts every stored part of which this transaction stored, with those parts (reset
        # when a transaction begins). It holds the write lock: nothing else adds a part meanwhile, so
        # they are exactly the alert's rows, and a claim in the same transaction needs no read of them.
        self.whole: dict[str, list[AlertPart]] = {}
        self.leases: list[tuple[str, float]] = []  # the claims made in the block: forgotten unless it commits

    def stored(self, written: dict[str, dict[str, tuple[bytes, AlertPart]] | None], held: dict[str, int]) -> None:
        """Parts were just stored by this transaction (per alert, by digest, None: not plain JSON);
        `held`: how many parts each alert held before."""
        whole = self.whole
        for alert_id, parts in written.items():
            before = whole.get(alert_id, [])
            if parts is None or len(before) != held.get(alert_id, 0):
                whole.pop(alert_id, None)  # it holds parts stored elsewhere, or not plain JSON
            else:
                whole[alert_id] = before + [part for _, part in parts.values()]

    def __enter__(self) -> None:
        if self.store._joined is not None:
            raise RuntimeError("joined_writes is not re-entrant")
        self.store._joined = self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.store._joined = None
        leases, self.leases = self.leases, []
        committed = False
        try:
            if self.begun:
                self.begun = False
                self.store._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
                committed = exc_type is None
        except sqlite3.Error as error:
            if exc_type is None:
                raise store_error(error, path=self.store.path, operation="write the state store", advice=DAMAGED_STATE_ADVICE) from error
        finally:
            if not committed:  # the file holds none of the block's claims: the handle holds none either
                self.store._leases.forget(leases)


class _JoinedStep:
    """One write inside a joined block: begins the block's transaction if it is the first; a step
    that raises rolls the whole block back (the block then raises too)."""

    def __init__(self, joined: _JoinedWrites) -> None:
        self.joined = joined

    def __enter__(self) -> sqlite3.Connection:
        db = self.joined.store._db
        if not self.joined.begun:
            db.execute("BEGIN IMMEDIATE")
            self.joined.begun = True
            self.joined.whole = {}
        return db

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.joined.begun:
            self.joined.begun = False
            self.joined.store._db.execute("ROLLBACK")


def _chunks(ids: list[str], size: int = 500) -> Iterator[tuple[list[str], str]]:
    """`ids` in chunks of at most `size` (within SQLite's bound on a statement's parameters), each with
    its `?, ?, …` marks for an `IN (…)`."""
    for start in range(0, len(ids), size):
        chunk = ids[start : start + size]
        yield chunk, ",".join("?" * len(chunk))


_JSON_ONLY = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_SUBCLASS
_NONE_KEPT: dict[str, tuple[bytes, AlertPart]] = {}

PartRow = tuple[str, str, int, bytes]  # alert_id, digest, rank, JSON of the data: one row of alert_parts


def _rows_of(alert_id: str, parts: dict[str, AlertPart], rows: list[PartRow]) -> dict[str, tuple[bytes, AlertPart]] | None:
    """Append the rows of one alert's `parts` (by digest) to `rows`; returns the JSON written for each
    part, or None when the data of one are not plain JSON values (a time, a dataclass, a subclass of
    str, int, dict or list: parsing the JSON would not give them back), so none is handed back as given."""
    written: dict[str, tuple[bytes, AlertPart]] | None = {}
    for digest, part in parts.items():
        try:
            data = orjson.dumps(part.data, option=_JSON_ONLY)
        except TypeError:
            data = orjson.dumps(part.data)
            written = None
        if written is not None:
            written[digest] = (data, part)
        rows.append((alert_id, digest, part.rank, data))
    return written


class StoredParts:
    """The parts this handle stored lately, with the JSON it wrote for each, so that claiming them
    need not parse that JSON again (split alerts are mostly claimed by the process that stored them,
    soon after).

    Guarantees: a kept part is used for a row only when the row holds exactly the JSON written for it
    (`claim_due` compares the bytes), so it is what parsing the row gives (part data are JSON values,
    not changed once stored: `pipeline.state.StateStore`); any other row is parsed. An alert's kept
    parts are taken by its first claim (a claim rolled back or released parses its rows next time).
    Bounded: beyond `limit` parts or `max_bytes` bytes of their JSON, the alerts stored first are
    forgotten first; an alert with a part of more than `max_bytes // 64` bytes is not kept (its
    claim parses its rows)."""

    __slots__ = ("count", "limit", "max_bytes", "parts", "size")

    def __init__(self, limit: int = STORED_PARTS_KEPT, max_bytes: int = STORED_PARTS_BYTES) -> None:
        self.limit = limit
        self.max_bytes = max_bytes
        self.count = 0
        self.size = 0  # bytes of the kept parts' JSON
        self.parts: dict[str, dict[str, tuple[bytes, AlertPart]]] = {}  # alert id -> digest -> (JSON written, part)

    def keep(self, written: dict[str, dict[str, tuple[bytes, AlertPart]] | None]) -> None:
        """Keep the parts just written, per alert by digest with their JSON (None: none of that alert's)."""
        kept = self.parts
        largest = self.max_bytes // 64
        for alert_id, parts in written.items():
            if parts is None:
                continue
            if any(len(json) > largest for json, _ in parts.values()):
                self._forget(kept.pop(alert_id, None))  # its claim parses its rows, the earlier ones too
                continue
            of_alert = kept.get(alert_id)
            if of_alert is None:
                kept[alert_id] = parts
                self.count += len(parts)
                self.size += sum(len(json) for json, _ in parts.values())
            else:
                for digest, kept_part in parts.items():
                    if digest not in of_alert:
                        self.count += 1
                        self.size += len(kept_part[0])
                    of_alert[digest] = kept_part
        while self.count > self.limit or self.size > self.max_bytes:
            self._forget(kept.pop(next(iter(kept))))

    def take(self, alert_id: str) -> dict[str, tuple[bytes, AlertPart]] | None:
        """The parts kept for the alert (then forgotten), by digest, with the JSON written for each."""
        of_alert = self.parts.pop(alert_id, None)
        self._forget(of_alert)
        return of_alert

    def _forget(self, of_alert: dict[str, tuple[bytes, AlertPart]] | None) -> None:
        if of_alert is not None:
            self.count -= len(of_alert)
            self.size -= sum(len(json) for json, _ in of_alert.values())


Statement = tuple[str, list[tuple[Any, ...]]]  # SQL and the rows of one `executemany`


class HeldWrites:
    """The writes of a store that shares the state's connection (its local history), held back while
    a batch runs (`SqliteStateStore.holding_history_writes`) to be committed with a later transaction.

    Guarantees: writes are held while some batch holds them (`holders`), or while earlier held ones
    wait for a commit that failed (a later write goes behind them, so writes commit in their order);
    held writes are kept, in their order, until a transaction that executed them has committed, so
    a commit that fails loses none of them."""

    __slots__ = ("holders", "statements")

    def __init__(self) -> None:
        self.holders = 0
        self.statements: list[Statement] = []

    def hold(self, statements: list[Statement]) -> bool:
        """Hold the statements if a batch holds writes now or earlier ones are still held (True), else
        leave them to the caller (False)."""
        if not self.holders and not self.statements:
            return False
        self.statements.extend(statements)
        return True

    def execute(self, db: sqlite3.Connection) -> int:
        """Execute the held statements in the caller's transaction; returns how many, for `committed`."""
        count = len(self.statements)
        for sql, rows in self.statements[:count]:
            db.executemany(sql, rows)
        return count

    def committed(self, count: int) -> None:
        """The transaction that executed the first `count` held statements has committed."""
        del self.statements[:count]

    def commit(self, db: sqlite3.Connection) -> None:
        """Commit the held statements now, in one transaction of their own (nothing held: nothing done)."""
        if self.statements:
            with Transaction(db):
                count = self.execute(db)
            self.committed(count)


class Transaction:
    """`with Transaction(db) as db:` one write transaction (BEGIN IMMEDIATE), committed when the block
    ends, rolled back when it raises. For every store that keeps tables in a SQLite file."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
