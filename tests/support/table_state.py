"""Helpers for tests of the shared state store on Azurite: settings, split alerts from the real
Defender streaming sample, a request counter (an azure-core hook), and an HTTP proxy in front of
Azurite that can be told to answer 503 (the Table service failing mid-batch)."""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import uuid
from importlib.resources import files
from typing import Any

import orjson
from aiohttp import ClientSession, web

from pipeline.config import StateSettings

ENV = "TEST_STATE_TABLES"  # the environment variable tests put Azurite's connection string in


def table_name(prefix: str = "state") -> str:
    """A table of its own for one test (letters and digits, as Table Storage wants)."""
    return prefix + uuid.uuid4().hex[:16]


def table_settings(table: str, env: str = ENV) -> StateSettings:
    return StateSettings(kind="azure_table", connection_string_env=env, table=table)


def state_toml(table: str, env: str = ENV) -> str:
    return f'[state]\nkind = "azure_table"\nconnection_string_env = "{env}"\ntable = "{table}"\n'


def split_alert_records(count: int, *, tag: str = "t") -> tuple[list[dict[str, Any]], list[str]]:
    """`count` split alerts from the bundled Defender streaming sample (one AlertInfo and three
    AlertEvidence rows each, ids changed): every row as its own record, and the alert ids."""
    sample = json.loads(files("pipeline").joinpath("samples", "messages", "01-defender-streaming-batch.json").read_text())
    rows = sample["records"][:4]
    records, ids = [], []
    for index in range(count):
        alert_id = f"dl{index:06d}-{tag}-split"
        ids.append(alert_id)
        for row in rows:
            record = copy.deepcopy(row)
            record["properties"]["AlertId"] = alert_id
            records.append(record)
    return records, ids


def as_message(*records: dict[str, Any]) -> bytes:
    """A Streaming API message body holding these records."""
    return orjson.dumps({"records": list(records)})


class RequestCounter:
    """An azure-core `raw_request_hook`: counts every HTTP request the client sends (retries too)."""

    def __init__(self) -> None:
        self.requests = 0
        self.by_method: dict[str, int] = {}

    def __call__(self, request: Any) -> None:
        self.requests += 1
        method = request.http_request.method
        self.by_method[method] = self.by_method.get(method, 0) + 1

    def options(self) -> dict[str, Any]:
        return {"raw_request_hook": self}


class FlakyProxy:
    """A local HTTP server forwarding to `target` (Azurite's Table endpoint, host:port), in a thread of
    its own. `fail_after(n)`: the next n requests pass, every later one gets 503; `heal()` passes all."""

    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.passed = 0
        self._budget: int | None = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.port = 0

    def __enter__(self) -> FlakyProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def fail_after(self, requests: int) -> None:
        self._budget = requests

    def heal(self) -> None:
        self._budget = None

    def connection_string(self, key: str, account: str) -> str:
        return f"DefaultEndpointsProtocol=http;AccountName={account};AccountKey={key};TableEndpoint=http://127.0.0.1:{self.port}/{account};"

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.run_until_complete(self._session.close())

    async def _start(self) -> None:
        self._session = ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        if self._budget is not None:
            if self._budget <= 0:
                return web.Response(status=503, text="injected: the Table service is unavailable")
            self._budget -= 1
        self.passed += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length", "transfer-encoding")}
        body = await request.read()
        async with self._session.request(  # raw_path: the path exactly as signed (quoted keys)
           request.method, self.target + request.raw_path, headers=headers, data=body or None) as upstream:  # no body: no Content-Type added (it is signed)
            payload = await upstream.read()
            drop = ("content-length", "transfer-encoding", "content-encoding", "connection")
            return web.Response(status=upstream.status, body=payload, headers={k: v for k, v in upstream.headers.items() if k.lower() not in drop})


def reference_content_ids(records: list[dict[str, Any]]) -> dict[str, str]:
    """Each alert's content id when every part of it is joined (the complete record), decoded as the pipeline does."""
    from pipeline.plugin_kit.testing import make_alerts

    return {alert.alert_id: alert.content_id() for alert in make_alerts(as_message(*records))}


def lake_lines(out: Any) -> list[dict[str, Any]]:
    """Every line of the JSONL lake under a data dir."""
    from pathlib import Path

    lake = Path(out) / "lake"
    return [orjson.loads(line) for path in sorted(lake.rglob("*.jsonl")) for line in path.read_bytes().splitlines()] if lake.exists() else []


def content_id_of(line: dict[str, Any]) -> str:
    from pipeline.models import DlpAlert

    return DlpAlert.model_validate(line["alert"]).content_id()
