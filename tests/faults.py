"""Fault-injecting sinks and enrichers for the delivery tests (real plugins, loaded through `module:Class`).

- `ScriptedSink` fails chosen calls or records in chosen ways and counts what it stored per record_id;
  like a real sink it is idempotent by record_id (a second delivery of an id stores nothing new).
- `HttpTicketSink` is a minimal ITSM-like sink over httpx: `PUT {url}/tickets/{record_id}` (an upsert
  by correlation key). It raises what httpx raises; the runner maps it through pipeline.errors.translate.
- `CountingExplodes` / `CountingHangs` enrichers count how often they were really called.
Instances register themselves in INSTANCES so tests can inspect the one the runner built.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Sequence

import httpx
from pydantic import BaseModel

from pipeline.enricher import BaseEnricher
from pipeline.errors import SinkUnavailable
from pipeline.sinks import Outcome

INSTANCES: dict[str, object] = {}


class ScriptedSink:
    class Settings(BaseModel):
        model_config = {"extra": "forbid"}
        label: str = "scripted"
        fail_first_calls: int = 0  # raise SinkUnavailable on the first N calls
        fail_ratio: float = 0.0  # raise SinkUnavailable on this share of calls (seeded)
        seed: int = 1
        retryable_alert_ids: list[str] = []  # always retryable
        reject_alert_ids: list[str] = []  # always rejected
        retry_after: float | None = None

    def __init__(self, settings, services):
        self.settings = settings
        self.calls = 0
        self.failed_calls = 0
        self.stored: Counter[str] = Counter()
        self._rng = random.Random(settings.seed)
        INSTANCES[settings.label] = self

    async def publish(self, records: Sequence) -> list[Outcome]:
        self.calls += 1
        if self.calls <= self.settings.fail_first_calls or (self.settings.fail_ratio and self._rng.random() < self.settings.fail_ratio):
            self.failed_calls += 1
            raise SinkUnavailable("HTTP 503", retry_after=self.settings.retry_after)
        outcomes = []
        for record in records:
            alert_id = record.alert.alert_id
            if alert_id in self.settings.reject_alert_ids:
                outcomes.append(Outcome.rejected("HTTP 400"))
            elif alert_id in self.settings.retryable_alert_ids:
                outcomes.append(Outcome.retryable("HTTP 503"))
            else:
                if record.record_id not in self.stored:
                    self.stored[record.record_id] += 1
                outcomes.append(Outcome.delivered())
        return outcomes

    async def aclose(self):
        return None


class HttpTicketSink:
    """One PUT per record to an ITSM-like endpoint; any HTTP error is raised for the runner to classify."""

    class Settings(BaseModel):
        model_config = {"extra": "forbid"}
        url: str
        timeout_seconds: float = 0.5

    def __init__(self, settings, services):
        self.settings = settings
        self.client = httpx.AsyncClient(base_url=settings.url, timeout=settings.timeout_seconds)
        INSTANCES["http"] = self

    async def publish(self, records: Sequence) -> list[Outcome]:
        outcomes = []
        for record in records:
            response = await self.client.put(f"/tickets/{record.record_id}", content=record.to_json(), headers={"content-type": "application/json"})
            response.raise_for_status()
            outcomes.append(Outcome.delivered())
        return outcomes

    async def aclose(self):
        await self.client.aclose()


class Tag(BaseModel):
    ok: bool = True


class CountingExplodes(BaseEnricher):
    name = "counting_explodes"
    calls = 0

    async def enrich(self, alert, ctx):
        type(self).calls += 1
        raise ConnectionError("enrichment backend down")


class CountingHangs(BaseEnricher):
    name = "counting_hangs"
    timeout = 0.05
    calls = 0

    async def enrich(self, alert, ctx):
        type(self).calls += 1
        await asyncio.sleep(30)
