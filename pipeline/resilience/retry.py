"""Retry helpers of the runner: the backoff wait and the fingerprint of a batch's redeliveries.

A batch whose sink is down raises (SinkOutage) so the caller runs it again before checkpointing.
That must be bounded, or one dead sink blocks a partition for ever: the state store counts
(`StateStore.count_redelivery`) how often the same records met the same outage, keyed by
`fingerprint` of the (sink, record_id) pairs, so the count survives restarts and is shared by
every process that shares the state store.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable


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
