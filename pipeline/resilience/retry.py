"""Retry helpers: the one Retry-After parser, the backoff wait and the durable count of batch redeliveries.

Every client that honours Retry-After (the enrichers' HTTP client, the Graph `$batch` answers,
the ITSM sinks, and through `pipeline.errors.translate` every sink on an Azure SDK or httpx) reads
it with `parse_retry_after`, so they agree on what a value means.

A batch whose sink is down raises (SinkOutage) so the caller runs it again before checkpointing.
That must be bounded, or one dead sink blocks a partition for ever: `RedeliveryCounter` counts, in
the state store's SQLite file, how often the same records met the same outage. Keyed by a
fingerprint of (sink, record_id) pairs, it survives restarts and is shared by every process that
shares the state store.
"""

from __future__ import annotations

import hashlib
import random
import re
import sqlite3
import time
from collections.abc import Iterable
from datetime import UTC
from email.utils import parsedate_to_datetime

from pipeline.errors import StoreUnavailable
from pipeline.state.sqlite import Transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batch_redeliveries (
    fingerprint TEXT PRIMARY KEY,
    attempts    INTEGER NOT NULL,
    last_at     REAL NOT NULL
) WITHOUT ROWID;
"""
_FORGET_AFTER_SECONDS = 7 * 24 * 3600.0
# RFC 9110 says delta-seconds is 1*DIGIT; a fraction ("0.5") is taken too, as clients here always did.
_DELTA_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header value (RFC 9110, section 10.2.3).

    - delta-seconds ("120", or "0.5") -> that many seconds;
    - an HTTP-date (IMF-fixdate, or the obsolete RFC 850 and asctime forms, read as GMT) -> the
      seconds from `now` (epoch seconds; default: the current time) until then, 0.0 once past;
    - absent, empty, negative or unparseable -> None: the caller applies its own backoff.
    Not capped: each caller bounds the wait by its own budget (and fails rather than wait longer).
    """
    if value is None:
        return None
    text = str(value).strip()
    if _DELTA_SECONDS.fullmatch(text):
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # the asctime form carries no zone; HTTP dates are GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_wait(delay: float, retry_afters: Iterable[float | None], *, rng: random.Random | None = None) -> float:
    """Jittered wait (between half and all of `delay`), but never shorter than any Retry-After."""
    jitter = (rng or random).random()
    return max([delay * (0.5 + jitter / 2)] + [value or 0.0 for value in retry_afters])


def fingerprint(pairs: Iterable[tuple[str, str]]) -> str:
    """A stable id of the (sink, record_id) pairs a batch could not deliver."""
    digest = hashlib.sha256()
    for sink, record_id in sorted(set(pairs)):
        digest.update(f"{sink}\0{record_id}\n".encode())
    return digest.hexdigest()[:32]


class RedeliveryCounter:
    """How many times a batch with this fingerprint raised for an outage. Durable when the state store is SQLite."""

    def __init__(self, state: object) -> None:
        self._db: sqlite3.Connection | None = getattr(state, "connection", None)
        self._memory: dict[str, int] = {}
        if self._db is not None:
            try:
                self._db.executescript(_SCHEMA)
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"cannot create the redelivery table: {exc}") from exc

    @property
    def durable(self) -> bool:
        return self._db is not None

    def increment(self, key: str, *, now: float) -> int:
        """Count one more run of this batch; returns the count including this one."""
        if self._db is None:
            self._memory[key] = self._memory.get(key, 0) + 1
            return self._memory[key]
        try:
            with Transaction(self._db) as db:
                db.execute("DELETE FROM batch_redeliveries WHERE last_at < ?", (now - _FORGET_AFTER_SECONDS,))
                db.execute(
                    """INSERT INTO batch_redeliveries (fingerprint, attempts, last_at) VALUES (?, 1, ?)
                       ON CONFLICT (fingerprint) DO UPDATE SET attempts = attempts + 1, last_at = excluded.last_at""",
                    (key, now),
                )
                (count,) = db.execute("SELECT attempts FROM batch_redeliveries WHERE fingerprint = ?", (key,)).fetchone()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"state store write failed: {exc}") from exc
        return int(count)

    def forget(self, key: str) -> None:
        if self._db is None:
            self._memory.pop(key, None)
            return
        try:
            self._db.execute("DELETE FROM batch_redeliveries WHERE fingerprint = ?", (key,))
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"state store write failed: {exc}") from exc
