"""Small enrichers and sinks used by the runner tests (real classes loaded through `module:Class`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from pydantic import BaseModel

from pipeline.deliver.sinks import Outcome
from pipeline.enrich.cache import CachePolicy
from pipeline.enrich.contract import BaseEnricher, BatchEnricher
from pipeline.errors import SinkUnavailable

CALLS: list[tuple[str, str]] = []


class Value(BaseModel):
    value: str
    seen_upstream: list[str] = []


class Recorder(BaseEnricher):
    """Records the order in which it ran and what upstream fragments it saw."""

    name = "recorder"
    timeout = 1.0

    class Settings(BaseEnricher.Settings):
        label: str = "r"
        delay: float = 0.0
        upstream: list[str] = []

    async def enrich(self, alert, ctx):
        CALLS.append(("start", self.settings.label))
        await asyncio.sleep(self.settings.delay)
        CALLS.append(("end", self.settings.label))
        return Value(value=self.settings.label, seen_upstream=[n for n in self.settings.upstream if ctx.fragment(n) is not None])


class NeedsA(Recorder):
    name = "needs_a"
    depends_on = ("a",)


class NeedsB(Recorder):
    name = "needs_b"
    depends_on = ("b",)


class Hangs(BaseEnricher):
    name = "hangs"
    timeout = 0.05

    async def enrich(self, alert, ctx):
        await asyncio.sleep(30)


class Explodes(BaseEnricher):
    name = "explodes"

    async def enrich(self, alert, ctx):
        raise RuntimeError("backend said no: contains megan.bowen@contoso.com")


class ReturnsDict(BaseEnricher):
    name = "returns_dict"

    async def enrich(self, alert, ctx):
        return {"not": "a model"}


class CachedLookup(BaseEnricher):
    """Looks the user up through the TTL cache; counts real lookups."""

    name = "cached_lookup"
    cache_policy = CachePolicy(ttl_seconds=60)
    lookups = 0

    async def enrich(self, alert, ctx):
        if alert.user is None:
            return None

        async def load():
            type(self).lookups += 1
            await asyncio.sleep(0.02)
            return alert.user.upn.upper()

        return Value(value=await ctx.cached(alert.user.upn, load))


class PerBatch(BatchEnricher):
    """Works on the whole batch; `mode` chooses how it misbehaves. Counts its calls and their sizes."""

    name = "per_batch"
    runs_after = ("first",)
    timeout = 0.2
    calls: list[int] = []

    class Settings(BatchEnricher.Settings):
        mode: str = "ok"  # ok | fail_second | raise | hang | short

    async def enrich_batch(self, alerts, contexts):
        type(self).calls.append(len(alerts))
        mode = self.settings.mode
        if mode == "raise":
            raise RuntimeError("backend down")
        if mode == "hang":
            await asyncio.sleep(30)
        results = [Value(value=alert.alert_id, seen_upstream=sorted(ctx.fragments)) for alert, ctx in zip(alerts, contexts)]
        if mode == "fail_second" and len(results) > 1:
            results[1] = LookupError("no such user")
        return results[:-1] if mode == "short" else results


class FlakySink:
    """Fails the first `failures` calls with a retryable error, then delivers; rejects ids in `reject`."""

    class Settings(BaseModel):
        model_config = {"extra": "forbid"}
        failures: int = 0
        reject_alert_ids: list[str] = []
        raise_instead: bool = False
        retry_after: float | None = None

    def __init__(self, settings, services):
        self.settings = settings
        self.calls = 0
        self.delivered: list[str] = []

    async def publish(self, records: Sequence) -> list[Outcome]:
        self.calls += 1
        if self.calls <= self.settings.failures:
            if self.settings.raise_instead:
                raise SinkUnavailable("HTTP 503", retry_after=self.settings.retry_after)
            return [Outcome.retryable("HTTP 503", self.settings.retry_after)] * len(records)
        outcomes = []
        for record in records:
            if record.alert.alert_id in self.settings.reject_alert_ids:
                outcomes.append(Outcome.rejected("HTTP 400"))
            else:
                self.delivered.append(record.record_id)
                outcomes.append(Outcome.delivered())
        return outcomes

    async def aclose(self):
        return None


class BusyThenWaits(BatchEnricher):
    """Computes for `busy_seconds` without yielding, then waits `wait_seconds`: its timeout must count
    from the call's start, not from its first wait."""

    name = "busy_then_waits"
    timeout = 0.2

    class Settings(BatchEnricher.Settings):
        busy_seconds: float = 0.15
        wait_seconds: float = 5.0

    async def enrich_batch(self, alerts, contexts):
        time.sleep(self.settings.busy_seconds)
        await asyncio.sleep(self.settings.wait_seconds)
        return [Value(value=alert.alert_id) for alert in alerts]


class TimesItself(BatchEnricher):
    """Opens its own `asyncio.timeout` before its first wait, and answers when it fires: a timer bound
    to the task the call started in, which must be the task it goes on in."""

    name = "times_itself"
    timeout = 2.0

    class Settings(BatchEnricher.Settings):
        own_timeout: float = 0.05

    async def enrich_batch(self, alerts, contexts):
        try:
            async with asyncio.timeout(self.settings.own_timeout):
                await asyncio.sleep(5)
        except TimeoutError:
            pass
        return [Value(value=alert.alert_id) for alert in alerts]


class ReusesOne(BatchEnricher):
    """Returns one fragment object for every alert, changed in place before each batch; with
    `fragments_unchanged` set in settings, it claims (wrongly, for the test) that it never changes it."""

    name = "reuses_one"
    timeout = 1.0

    def __init__(self, settings=None, services=None) -> None:
        super().__init__(settings, services)
        self.fragment = Value(value="0")
        self.batches = 0

    async def enrich_batch(self, alerts, contexts):
        self.batches += 1
        self.fragment.value = str(self.batches)
        return [self.fragment] * len(alerts)


class ReusesOneUnchanged(ReusesOne):
    name = "reuses_one_unchanged"
    fragments_unchanged = True
