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
from collections.abc import Sequence

import httpx
from pydantic import BaseModel

from pipeline.deliver.sinks import Outcome
from pipeline.enrich.contract import BaseEnricher
from pipeline.errors import SinkUnavailable, translate

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
    """One PUT per record to an ITSM-like endpoint; each record's HTTP error becomes its own outcome."""

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
            try:
                response = await self.client.put(f"/tickets/{record.record_id}", content=record.to_json(), headers={"content-type": "application/json"})
                response.raise_for_status()
            except httpx.HTTPError as exc:  # per record, classified as every sink must: through translate
                error = translate(exc, role="sink")
                if isinstance(error, SinkUnavailable):
                    outcomes.append(Outcome.retryable(str(error), error.retry_after))
                else:
                    outcomes.append(Outcome.rejected(str(error)))
                continue
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


class TicketServer:
    """An ITSM-like HTTP endpoint on pytest-httpserver: `PUT /tickets/<record_id>` creates or updates.

    `faults` is a queue of what the next requests meet, one per request:
    - an int status (413, 429, 500, ...): answered without writing (429 carries Retry-After: 0);
    - "500-after-write": the ticket is written, then 500 is answered (the client cannot know);
    - "timeout": the server sleeps past the client's timeout, then writes (a slow success the client gave up on);
    - "drop": the connection is closed without an answer, nothing written.
    `created[record_id]` counts creations: more than 1 would be a duplicate ticket.
    """

    def __init__(self, httpserver, *, sleep: float = 1.0) -> None:
        import re
        import threading

        self.httpserver = httpserver
        self.sleep = sleep
        self.faults: list[object] = []
        self.created: Counter[str] = Counter()
        self.updated: Counter[str] = Counter()
        self.requests = 0
        self._lock = threading.Lock()
        httpserver.expect_request(re.compile(r"^/tickets/[0-9a-f]+$"), method="PUT").respond_with_handler(self._handle)

    @property
    def url(self) -> str:
        return self.httpserver.url_for("/")

    def _write(self, record_id: str) -> None:
        with self._lock:
            if record_id in self.created:
                self.updated[record_id] += 1
            else:
                self.created[record_id] += 1

    def _handle(self, request):
        import socket
        import time

        from werkzeug import Response

        record_id = request.path.rsplit("/", 1)[1]
        with self._lock:
            self.requests += 1
            fault = self.faults.pop(0) if self.faults else None
        if fault is None:
            self._write(record_id)
            return Response("{}", status=201, content_type="application/json")
        if fault == "500-after-write":
            self._write(record_id)
            return Response("oops", status=500)
        if fault == "timeout":
            time.sleep(self.sleep)
            self._write(record_id)
            return Response("{}", status=201)
        if fault == "drop":
            sock = request.environ.get("werkzeug.socket")
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            return Response("", status=500)
        headers = {"Retry-After": "0"} if fault == 429 else {}
        return Response("no", status=int(fault), headers=headers)


BLOCKERS: list = []


class HttpTicketSinkThenStateDown(HttpTicketSink):
    """Writes its tickets, then another connection takes an exclusive lock on the state store:
    the store fails right after a sink write, before the runner marks the alerts emitted."""

    class Settings(HttpTicketSink.Settings):
        state_path: str = "state.sqlite"

    def __init__(self, settings, services):
        super().__init__(settings, services)
        self.state_path = services.data_path(settings.state_path)
        self.locked = False

    async def publish(self, records: Sequence) -> list[Outcome]:
        import sqlite3

        outcomes = await super().publish(records)
        if self.locked:
            return outcomes
        self.locked = True  # once: the rerun finds the store back
        blocker = sqlite3.connect(self.state_path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        BLOCKERS.append(blocker)
        return outcomes


def release_blockers() -> None:
    while BLOCKERS:
        blocker = BLOCKERS.pop()
        blocker.execute("ROLLBACK")
        blocker.close()
