"""The shared state store on the Azure Storage emulator (Azurite), against the SQLite store, in one run.

- `table_requests_per_alert`: HTTP requests the Table store sends per split alert, counted by an
  azure-core `raw_request_hook` on its client (every request, retries included), while batches of
  100 messages, each one split alert (an AlertInfo and three AlertEvidence rows), are stored,
  claimed, delivered and marked emitted. Target: at most 2.
- `table_alerts_per_s` / `sqlite_alerts_per_s`: the same batches through the same runner (every
  built-in enricher, a serialising sink), the state store the only difference. Azurite answers in
  about a millisecond on loopback; the Table service in a region answers in a few, so take the
  Table figure as the pipeline's cost, not as a production throughput.
- `table_cpu_ms_per_alert` / `sqlite_cpu_ms_per_alert`: CPU time of this process per alert in the
  same runs; the difference is what the Table client costs (mostly building and parsing the
  multipart bodies of entity group transactions).

Azurite is started here (its Table service only, in a temporary folder, on a free port) from
`.tools/node_modules/.bin/azurite-table` or the PATH; without it the figures are skipped with the reason.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from benchmarks.dataset import SAMPLES

ROOT = Path(__file__).resolve().parent.parent
ACCOUNT = "devstoreaccount1"
# The well-known development key of Azurite (public, documented, not a secret).
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
ENV = "DLP_BENCHMARK_TABLES"


def make_split_bodies(alerts: int, *, users: int = 200, seed: int = 3) -> list[bytes]:
    """`alerts` Streaming API messages, each the four rows of one split alert (ids and users varied)."""
    sample = json.loads((SAMPLES / "01-defender-streaming-batch.json").read_text())
    rows = sample["records"][:4]
    bodies = []
    for index in range(alerts):
        doc = {"records": copy.deepcopy(rows)}
        for record in doc["records"]:
            record["properties"]["AlertId"] = f"dl{seed:04d}{index:08d}-split"
        evidence = doc["records"][1]["properties"]
        user = f"user{(index * 7919 + seed) % users:04d}"
        evidence["AccountUpn"], evidence["AccountName"] = f"{user}@contoso.com", user
        bodies.append(orjson.dumps(doc))
    return bodies


class RequestCounter:
    """An azure-core `raw_request_hook`: counts every HTTP request a client sends."""

    def __init__(self) -> None:
        self.requests = 0

    def __call__(self, request: Any) -> None:
        self.requests += 1


def azurite_table_program() -> str | None:
    local = ROOT / ".tools" / "node_modules" / ".bin" / "azurite-table"
    return str(local) if local.exists() else shutil.which("azurite-table")


class AzuriteTables:
    """Azurite's Table service in a temporary folder on a free loopback port."""

    def __init__(self, program: str) -> None:
        self.program = program
        self.folder = tempfile.mkdtemp(prefix="azurite-bench-")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.process: subprocess.Popen | None = None

    @property
    def connection_string(self) -> str:
        return f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};TableEndpoint=http://127.0.0.1:{self.port}/{ACCOUNT};"

    def __enter__(self) -> AzuriteTables:
        self.process = subprocess.Popen(
            [self.program, "--silent", "--disableTelemetry", "--skipApiVersionCheck", "--loose",
             "--location", self.folder, "--tableHost", "127.0.0.1", "--tablePort", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"azurite-table exited with code {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("azurite-table did not listen in time")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.folder, ignore_errors=True)


async def _run(bodies: list[bytes], warmup: list[bytes], *, state: Any | None, folder: Path, batch_size: int, counter: RequestCounter | None = None) -> tuple[float, float]:
    """Alerts per second and CPU milliseconds per alert (this process) of the measured batches, after warm-up batches on the same store."""
    import gc

    from benchmarks.__main__ import bench_config
    from pipeline.runner import Message, Runner

    async with Runner(bench_config(folder), state=state) as runner:
        for start in range(0, len(warmup), batch_size):
            await runner.process_batch([Message(b) for b in warmup[start : start + batch_size]])
        gc.collect()
        if counter is not None:
            counter.requests = 0  # the measured batches only (the table was created in the warm-up)
        started, cpu = time.perf_counter(), time.process_time()
        alerts = 0
        for start in range(0, len(bodies), batch_size):
            report = await runner.process_batch([Message(b) for b in bodies[start : start + batch_size]])
            alerts += report.alerts
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    if alerts != len(bodies):
        raise SystemExit(f"benchmark error: {alerts} alerts out of {len(bodies)} split alerts")
    return alerts / elapsed, cpu * 1000 / alerts


async def table_vs_sqlite(alerts: int, *, batch_size: int = 100) -> dict[str, Any]:
    """The figures of this module's docstring, or {"table_state_skipped": reason}."""
    program = azurite_table_program()
    if program is None:
        return {"table_state_skipped": "Azurite is not installed (npm install azurite, or `make setup-dev`): no Table service to measure against"}
    from pipeline.config import StateSettings
    from pipeline.state.azure_table import TableStateStore

    bodies = make_split_bodies(alerts)
    warmup = make_split_bodies(batch_size * 2, seed=4)
    try:
        server = AzuriteTables(program).__enter__()
    except RuntimeError as exc:
        return {"table_state_skipped": f"Azurite did not start: {exc}"}
    try:
        os.environ[ENV] = server.connection_string
        counter = RequestCounter()
        store = TableStateStore(
            StateSettings(kind="azure_table", connection_string_env=ENV, table="bench" + uuid.uuid4().hex[:12]), client_options={"raw_request_hook": counter},
        )
        with tempfile.TemporaryDirectory() as folder:
            table, table_cpu = await _run(bodies, warmup, state=store, folder=Path(folder), batch_size=batch_size, counter=counter)
        requests = counter.requests
        with tempfile.TemporaryDirectory() as folder:
            sqlite, sqlite_cpu = await _run(bodies, warmup, state=None, folder=Path(folder), batch_size=batch_size)
    finally:
        os.environ.pop(ENV, None)
        server.__exit__()
    return {
        "table_state_alerts": alerts,
        "table_state_batch_size": batch_size,
        "table_requests_per_alert": round(requests / alerts, 3),
        "table_requests_per_batch": round(requests / (alerts / batch_size), 1),
        "table_alerts_per_s": round(table),
        "sqlite_alerts_per_s": round(sqlite),
        "table_to_sqlite": round(table / sqlite, 3),
        "table_cpu_ms_per_alert": round(table_cpu, 2),
        "sqlite_cpu_ms_per_alert": round(sqlite_cpu, 2),
    }
