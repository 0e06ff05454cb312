"""pipeline.enrich.cache: the TTL cache's single-flight loads and load_many's batch loads."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.enrich.cache import CachePolicy, TTLCache, load_many


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_load_many_loads_each_distinct_miss_once_and_serves_fresh_values_without_loading():
    clock = Clock()
    cache: TTLCache[str] = TTLCache(CachePolicy(ttl_seconds=60), clock=clock)
    loaded: list[str] = []

    async def loader(key: str) -> str:
        loaded.append(key)
        await asyncio.sleep(0)
        return key.upper()

    assert await load_many(cache, ["a", "b", "a"], loader) == {"a": "A", "b": "B"}
    assert sorted(loaded) == ["a", "b"]
    assert await load_many(cache, ["b", "c"], loader) == {"b": "B", "c": "C"}
    assert sorted(loaded) == ["a", "b", "c"]  # b came from the cache
    assert cache.stats.hits == 1
    clock.now += 61  # expired: loaded again
    assert await load_many(cache, ["a"], loader) == {"a": "A"}
    assert loaded.count("a") == 2


async def test_load_many_returns_a_failed_load_for_its_key_only_and_does_not_cache_it():
    cache: TTLCache[str] = TTLCache(CachePolicy(ttl_seconds=60))
    attempts = {"bad": 0}

    async def loader(key: str) -> str:
        if key == "bad":
            attempts["bad"] += 1
            raise LookupError(key)
        return key

    found = await load_many(cache, ["good", "bad"], loader)
    assert found["good"] == "good" and isinstance(found["bad"], LookupError)
    found = await load_many(cache, ["bad"], loader)
    assert isinstance(found["bad"], LookupError) and attempts["bad"] == 2


async def test_load_many_shares_a_load_already_in_flight():
    cache: TTLCache[int] = TTLCache(CachePolicy(ttl_seconds=60))
    calls = 0
    release = asyncio.Event()

    async def slow(_: str) -> int:
        nonlocal calls
        calls += 1
        await release.wait()
        return calls

    first = asyncio.ensure_future(cache.get_or_load("k", lambda: slow("k")))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(load_many(cache, ["k"], slow))
    await asyncio.sleep(0)
    release.set()
    assert await first == 1 and (await second) == {"k": 1} and calls == 1


async def test_load_many_without_a_cache_loads_every_key():
    calls: list[str] = []

    async def loader(key: str) -> str:
        calls.append(key)
        return key

    assert await load_many(None, ["x", "y", "x"], loader) == {"x": "x", "y": "y"}
    assert calls == ["x", "y"]


async def test_load_many_lets_cancellation_through():
    async def loader(_: str) -> str:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await load_many(TTLCache(CachePolicy()), ["k"], loader)


async def test_load_many_gives_a_slow_key_its_own_timeout_and_keeps_its_late_value():
    cache: TTLCache[str] = TTLCache(CachePolicy(ttl_seconds=60))
    release = asyncio.Event()

    async def loader(key: str) -> str:
        if key == "slow":
            await release.wait()
        return key.upper()

    found = await load_many(cache, ["fast", "slow"], loader, timeout=0.05)
    assert found["fast"] == "FAST" and isinstance(found["slow"], TimeoutError)
    release.set()
    await asyncio.sleep(0.01)  # the load went on in the cache and finished
    assert cache.get("slow") == "SLOW"
