"""A TTL cache with single-flight loading: many alerts of one user cause one lookup.

Guarantees:
- concurrent `get_or_load` calls for the same key share one call of the loader;
- the load runs as its own task, so a caller that times out or is cancelled does not cancel it
  for the others, and its result is still cached;
- failures are not cached: the next call loads again;
- at most `max_entries` values are kept, least recently used dropped first.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Generic, Literal, TypeVar

V = TypeVar("V")


class _Miss(enum.Enum):
    MISS = enum.auto()


_MISS: Final = _Miss.MISS  # "not cached", where None is a value that can be cached


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """How long an enricher's lookups may be reused, and how many are kept."""

    ttl_seconds: float = 300.0
    max_entries: int = 10_000


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    failures: int = 0


class TTLCache(Generic[V]):
    def __init__(self, policy: CachePolicy, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._values: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()
        self._inflight: dict[Hashable, asyncio.Task[V]] = {}
        self.stats = CacheStats()

    def get(self, key: Hashable) -> V | None:
        """The cached value, or None when absent or expired."""
        entry = self._values.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires <= self._clock():
            del self._values[key]
            return None
        self._values.move_to_end(key)
        return value

    def put(self, key: Hashable, value: V) -> None:
        self._values[key] = (self._clock() + self.policy.ttl_seconds, value)
        self._values.move_to_end(key)
        while len(self._values) > self.policy.max_entries:
            self._values.popitem(last=False)

    def _hit(self, key: Hashable) -> V | Literal[_Miss.MISS]:
        """The value when fresh (counted as a hit, kept as most recently used), else `_MISS`."""
        entry = self._values.get(key)
        if entry is None or entry[0] <= self._clock():
            return _MISS
        self.stats.hits += 1
        self._values.move_to_end(key)
        return entry[1]

    async def get_or_load(self, key: Hashable, loader: Callable[[], Awaitable[V]]) -> V:
        value = self._hit(key)
        if value is not _MISS:
            return value
        self.stats.misses += 1
        task = self._inflight.get(key)
        if task is None:
            self.stats.loads += 1
            task = asyncio.ensure_future(self._load(key, loader))
            self._inflight[key] = task
            task.add_done_callback(_retrieve_exception)
        return await asyncio.shield(task)

    async def _load(self, key: Hashable, loader: Callable[[], Awaitable[V]]) -> V:
        try:
            value = await loader()
        except BaseException:
            self.stats.failures += 1
            raise
        else:
            self.put(key, value)
            return value
        finally:
            self._inflight.pop(key, None)

    def __len__(self) -> int:
        return len(self._values)


K = TypeVar("K", bound=Hashable)


async def load_many(
    cache: TTLCache[V] | None, keys: Iterable[K], loader: Callable[[K], Awaitable[V]], *, timeout: float | None = None
) -> dict[K, V | Exception]:
    """Each distinct key's value through `cache` (single-flight, as `get_or_load`), or the exception
    its load raised. Values still fresh in the cache are taken without a task or a wait; only the
    misses are loaded, all at once. Without a cache, every key is loaded.

    `timeout`: a key whose load takes longer gets a TimeoutError of its own, and the others keep
    their values, so one slow lookup fails only the alerts that need it (the load itself goes on
    in the cache and is kept when it ends). Cancellation is never swallowed."""
    found: dict[K, V | Exception] = {}
    missing: list[K] = []
    for key in dict.fromkeys(keys):
        value = cache._hit(key) if cache is not None else _MISS
        if value is _MISS:
            missing.append(key)
        else:
            found[key] = value

    async def load(key: K) -> V | Exception:
        try:
            async with asyncio.timeout(timeout):
                if cache is None:
                    return await loader(key)
                return await cache.get_or_load(key, lambda: loader(key))
        except Exception as exc:  # TimeoutError included; CancelledError is not an Exception
            return exc

    if missing:
        found.update(zip(missing, await asyncio.gather(*(load(key) for key in missing))))
    return found


def _retrieve_exception(task: asyncio.Task[Any]) -> None:
    # Mark a failed load's exception as retrieved even when every waiter was cancelled.
    if not task.cancelled():
        task.exception()
