"""Retry helpers: the one Retry-After parser, the backoff wait and the fingerprint of a batch's redeliveries.

Every client that honours Retry-After (the enrichers' HTTP client, the Graph `$batch` answers,
the ITSM sinks, and through `pipeline.errors.translate` every sink on an Azure SDK or httpx) reads
it with `parse_retry_after`, so they agree on what a value means.

A batch whose sink is down raises (SinkOutage) so the caller runs it again before checkpointing.
That must be bounded, or one dead sink blocks a partition for ever: the state store counts
(`StateStore.count_redelivery`) how often the same records met the same outage, keyed by
`fingerprint` of the (sink, record_id) pairs, so the count survives restarts and is shared by
every process that shares the state store.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from collections.abc import Iterable
from datetime import UTC
from email.utils import parsedate_to_datetime

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
