"""I/O-bound figures against local servers in the same process (aiohttp), never a remote address.

- `io_batch`: 1,000 alerts of 200 users, user_context (Graph `$batch`) and telemetry (an HTTP JSON
  lookup) served by a server that answers every request after 50 ms.
- `sentinel`: 10,000 records through the Sentinel sink and the real azure-monitor-ingestion SDK to a
  local TLS endpoint (a trustme CA) that decompresses each request and measures it.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import ssl
import tempfile
import time
from pathlib import Path

from aiohttp import web
from azure.core.credentials import AccessToken

from benchmarks.dataset import make_bodies


class StaticToken:
    """azure-core's async credential interface, for local endpoints."""

    async def get_token(self, *scopes, **kwargs) -> AccessToken:
        return AccessToken("benchmark-token", int(time.time()) + 3600)

    async def close(self) -> None:
        return None


async def _serve(app: web.Application, *, ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def io_batch(alerts: int = 1000, users: int = 200, latency: float = 0.05) -> dict[str, float]:
    from pipeline.config import EnricherConfig, SinkConfig, load_config
    from pipeline.runner import Message, Runner

    counts = {"graph_batches": 0, "graph_inner": 0, "lookups": 0}

    async def graph_batch(request: web.Request) -> web.Response:
        counts["graph_batches"] += 1
        body = await request.json()
        await asyncio.sleep(latency)
        responses = []
        for inner in body["requests"]:
            counts["graph_inner"] += 1
            upn = inner["url"].split("?")[0].removeprefix("/users/").replace("%40", "@").strip("'()")
            responses.append({"id": inner["id"], "status": 200, "body": {
                "id": f"oid-{upn}", "userPrincipalName": upn, "displayName": upn.split("@")[0], "department": "Finance",
                "jobTitle": "Analyst", "accountEnabled": True, "employeeType": "Employee",
                "manager": {"id": "oid-boss", "displayName": "Boss", "userPrincipalName": "boss@contoso.com"}}})
        return web.json_response({"responses": responses})

    async def lookup(request: web.Request) -> web.Response:
        counts["lookups"] += 1
        await asyncio.sleep(latency)
        return web.json_response([{"eventType": "user.session.start", "client": {"ipAddress": "198.51.100.7"}}])

    app = web.Application()
    app.router.add_post("/v1.0/$batch", graph_batch)
    app.router.add_get("/api/v1/logs", lookup)
    server, port = await _serve(app)
    base = f"http://127.0.0.1:{port}"
    try:
        with tempfile.TemporaryDirectory() as folder:
            loaded = load_config(None, data_dir=Path(folder))
            local = ["127.0.0.1"]
            loaded.config = loaded.config.model_copy(update={
                # one batch of `alerts` alerts: every split alert of it is emitted by that batch
                "assembly": loaded.config.assembly.model_copy(update={"settle_seconds": 0.0, "emit_batch_size": alerts}),
                "enrichers": [
                    EnricherConfig(name="user_context", settings={"graph": {"url": f"{base}/v1.0", "allow_private_hosts": local}}),
                    EnricherConfig(name="telemetry", settings={"http": [{
                        "name": "idp", "url": f"{base}/api/v1/logs", "params": {"filter": 'actor.alternateId eq "{upn}"'},
                        "allowed_hosts": local, "allow_private_hosts": local, "fields": {"last_event": "eventType", "ip": "client.ipAddress"}}]}),
                ],
                "sinks": [SinkConfig(name="serialise", kind="benchmarks.sinks:SerialiseSink")],
            })
            runner = Runner(loaded)
            for slot in runner.chain.slots:
                slot.plugin.credential = StaticToken()
            async with runner:
                bodies = make_bodies(alerts, users=users, seed=5)
                started = time.perf_counter()
                report = await runner.process_batch([Message(b) for b in bodies])
                elapsed = time.perf_counter() - started
        if report.alerts != alerts or report.enrichment_failures:
            raise SystemExit(f"benchmark error: io batch gave {report.alerts} alerts, failures {dict(report.enrichment_failures)}")
        return {"io_batch_seconds": elapsed, "io_graph_requests": counts["graph_batches"], "io_graph_inner_requests": counts["graph_inner"], "io_lookup_requests": counts["lookups"]}
    finally:
        await server.cleanup()


async def sentinel(records: int = 10_000) -> dict[str, float]:
    import trustme

    from pipeline.deliver.sinks.sentinel import SentinelSink
    from pipeline.runner import Message, Runner

    sizes: list[int] = []

    async def ingest(request: web.Request) -> web.Response:
        raw = await request.read()  # aiohttp already undoes Content-Encoding: gzip
        body = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        sizes.append(len(body))
        json.loads(body)
        return web.Response(status=204)

    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_post("/dataCollectionRules/{rule}/streams/{stream}", ingest)
    server, port = await _serve(app, ssl_context=context)
    try:
        with tempfile.TemporaryDirectory() as folder:
            ca_path = Path(folder) / "ca.pem"
            ca.cert_pem.write_to_path(str(ca_path))
            from benchmarks.__main__ import bench_config

            async with Runner(bench_config(Path(folder), sink="benchmarks.sinks:CollectSink")) as runner:  # real enriched records
                bodies = make_bodies(records, seed=11)
                for start in range(0, len(bodies), 500):
                    await runner.process_batch([Message(b) for b in bodies[start : start + 500]])
                enriched = runner.sinks[0][1].records
            settings = SentinelSink.Settings(endpoint=f"https://localhost:{port}", rule_id="dcr-benchmark", ca_bundle=str(ca_path))
            sink = SentinelSink(settings, None, credential=StaticToken())
            try:
                outcomes = await sink.publish(enriched)
            finally:
                await sink.aclose()
        delivered = sum(1 for o in outcomes if o.status == "delivered")
        payload = sum(sizes)
        return {
            "sentinel_records": delivered,
            "sentinel_requests": len(sizes),
            "sentinel_min_requests": math.ceil(payload / settings.max_request_bytes),
            "sentinel_max_request_bytes": max(sizes) if sizes else 0,
        }
    finally:
        await server.cleanup()
