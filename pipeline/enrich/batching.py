"""A micro-batching loader: many `load(key)` calls within a short window become few backend calls.

Keys requested within `window_seconds` of the first one (or until `max_size` keys are waiting) are
deduplicated and handed to `fetch(keys)` in chunks of at most `max_size`; every caller gets the
value (or the error) of its own key. Combined with the enricher's TTL single-flight cache, N alerts
of M distinct users cost ceil(M / max_size) backend calls when they arrive together.

At most `max_concurrent` fetch calls run at once; the others wait their turn.
`fetch` returns a mapping key -> value or exception; a key it leaves out gets `missing(key)`
(default: None). If `fetch` itself raises, every key of that chunk gets the error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class MicroBatcher(Generic[K, V]):
    def __init__(
        self,
        fetch: Callable[[list[K]], Awaitable[Mapping[K, V | BaseException]]],
        *,
        max_size: int = 20,
        window_seconds: float = 0.005,
        max_concurrent: int = 4,
    ) -> None:
        self._fetch = fetch
        self.max_size = max_size
        self.window_seconds = window_seconds
        self._pending: dict[K, asyncio.Future[V]] = {}
        self._inflight: dict[K, asyncio.Future[V]] = {}  # sent, not answered yet: joined, not sent again
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._concurrency = asyncio.Semaphore(max_concurrent)  # fetch calls at once (backend throttling)
        self.calls = 0  # fetch calls made

    async def load(self, key: K) -> V:
        future = self._pending.get(key) or self._inflight.get(key)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._pending[key] = future
            if len(self._pending) >= self.max_size:
                self._flush()
            elif self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(self.window_seconds, self._flush)
        return await asyncio.shield(future)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, {}
        keys = list(pending)
        for start in range(0, len(keys), self.max_size):
            chunk = {k: pending[k] for k in keys[start : start + self.max_size]}
            self._inflight.update(chunk)
            task = asyncio.ensure_future(self._run(chunk))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, chunk: dict[K, asyncio.Future[V]]) -> None:
        try:
            async with self._concurrency:
                self.calls += 1
                await self._answer(chunk)
        finally:
            for key, future in chunk.items():
                if self._inflight.get(key) is future:
                    del self._inflight[key]
                if not future.done():
                    future.cancel()

    async def _answer(self, chunk: dict[K, asyncio.Future[V]]) -> None:
        try:
            results = await self._fetch(list(chunk))
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter of the chunk
            for future in chunk.values():
                if not future.done():
                    future.set_exception(exc)
                    future.exception()  # retrieved: a waiter may have gone away
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            return
        for key, future in chunk.items():
            if future.done():
                continue
            value = results.get(key)
            if isinstance(value, BaseException):
                future.set_exception(value)
                future.exception()
            else:
                future.set_result(value)  # type: ignore[arg-type]

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
