"""`python -m benchmarks [--quick] [--json]`: throughput and resource figures of the pipeline.

Every figure is measured in the same run, on this machine, against the cost no pipeline can avoid
(orjson loads + dumps of the same bodies). `--json` prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

from benchmarks.dataset import make_bodies

ROOT = Path(__file__).resolve().parent.parent


def best_of_passes(bodies: list[bytes], work, passes: int = 3) -> float:
    """Bodies per second of `work(body)` over every body: the best of `passes` passes."""
    best = 0.0
    for _ in range(passes):
        started = time.perf_counter()
        for body in bodies:
            work(body)
        best = max(best, len(bodies) / (time.perf_counter() - started))
    return best


def floor_alerts_per_s(bodies: list[bytes]) -> float:
    """orjson loads + dumps of the same bodies: the cost no pipeline can avoid."""
    return best_of_passes(bodies, lambda body: orjson.dumps(orjson.loads(body)))


def decode_alerts_per_s(bodies: list[bytes]) -> float:
    """`decode_message` alone (parse, limits, scrub, field extraction, validation; no state, no
    enrichment, no serialisation), measured like the floor: what the decoder leaves of the budget."""
    from pipeline.ingest.decode import decode_message

    return best_of_passes(bodies, decode_message)


def decode_by_format(bodies: list[bytes]) -> dict[str, dict[str, float]]:
    """Microseconds per body of the floor and of `decode_message`, for each input format of the dataset
    (each body holds one alert): where the decoder's time goes, format by format."""
    from pipeline.ingest.decode import decode_message

    groups: dict[str, list[bytes]] = {}
    for body in bodies:
        groups.setdefault(decode_message(body).format or "unknown", []).append(body)
    return {
        fmt: {"floor_us": round(1e6 / floor_alerts_per_s(group), 1), "decode_us": round(1e6 / decode_alerts_per_s(group), 1)}
        for fmt, group in sorted(groups.items())
    }


def validate_us(bodies: list[bytes]) -> float:
    """Microseconds per alert of a step that stays whatever else is made faster: validating the
    canonical alert (`DlpAlert`, from the JSON-typed fields a decoder extracts) and writing its JSON."""
    from pipeline.models import DlpAlert
    from pipeline.plugin_kit.testing import make_alerts

    fields = [alert.model_dump(mode="json") for body in bodies for alert in make_alerts(body)]
    return round(1e6 / best_of_passes(fields, lambda item: DlpAlert(**item).to_json()), 1)


def bench_config(data_dir: Path, *, sink: str = "benchmarks.sinks:SerialiseSink", history_reuse_seconds: float | None = None):
    """The embedded default config (every built-in enricher on local data), delivering to a serialising
    sink; `history_reuse_seconds` overrides the history enrichers' `store.reuse_seconds`."""
    from pipeline.config import SinkConfig, load_config

    loaded = load_config(None, data_dir=data_dir)
    enrichers = loaded.config.enrichers
    if history_reuse_seconds is not None:
        enrichers = [
            entry.model_copy(update={"settings": {**entry.settings, "store": {**entry.settings.get("store", {}), "reuse_seconds": history_reuse_seconds}}})
            if entry.name in HISTORY_ENRICHERS else entry
            for entry in enrichers
        ]
    loaded.config = loaded.config.model_copy(
        update={
            "assembly": loaded.config.assembly.model_copy(update={"settle_seconds": 0.0}),
            "enrichers": enrichers,
            "sinks": [SinkConfig(name="serialise", kind=sink)],
        }
    )
    return loaded


HISTORY_ENRICHERS = ("prior_incidents", "sensitive_info")  # the built-ins with a `store` (pipeline/state/history.py)


async def pipeline_alerts_per_s(bodies: list[bytes], warmup: list[bytes], batch_size: int = 100) -> float:
    """The full CPU path on one core: decode, validate, assemble, every built-in enricher, serialise."""
    from pipeline.runner import Message, Runner

    with tempfile.TemporaryDirectory() as folder:
        async with Runner(bench_config(Path(folder))) as runner:
            for start in range(0, len(warmup), batch_size):  # warm the enrichers' caches and files
                await runner.process_batch([Message(b) for b in warmup[start : start + batch_size]])
            gc.collect()
            started = time.perf_counter()
            alerts = 0
            for start in range(0, len(bodies), batch_size):
                report = await runner.process_batch([Message(b) for b in bodies[start : start + batch_size]])
                alerts += report.alerts
            elapsed = time.perf_counter() - started
    if alerts != len(bodies):
        raise SystemExit(f"benchmark error: {alerts} alerts out of {len(bodies)} bodies")
    return alerts / elapsed


async def pipeline_seconds(bodies: list[bytes], warmup: list[bytes], *, alerts: int, batch_size: int = 100) -> float:
    """Seconds of the full CPU path (decode, assemble, every built-in enricher, serialise) over `bodies`
    in batches of `batch_size` messages, on a fresh runner warmed with `warmup`; checks that `alerts`
    alerts came out."""
    from pipeline.runner import Message, Runner

    with tempfile.TemporaryDirectory() as folder:
        async with Runner(bench_config(Path(folder))) as runner:
            for start in range(0, len(warmup), batch_size):
                await runner.process_batch([Message(b) for b in warmup[start : start + batch_size]])
            gc.collect()
            emitted = 0
            started = time.perf_counter()
            for start in range(0, len(bodies), batch_size):
                emitted += (await runner.process_batch([Message(b) for b in bodies[start : start + batch_size]])).alerts
            emitted += (await runner.flush()).alerts  # a batch claims at most `assembly.emit_batch_size` split alerts
            elapsed = time.perf_counter() - started
    if emitted != alerts:
        raise SystemExit(f"benchmark error: {emitted} alerts out of {alerts}")
    return elapsed


async def _timed_run(folder: Path, bodies: list[bytes], alerts: int) -> float:
    """Seconds of the full path over `bodies` (batches of 100) on the state and history in `folder`."""
    from pipeline.runner import Message, Runner

    async with Runner(bench_config(folder)) as runner:
        gc.collect()
        emitted = 0
        started = time.perf_counter()
        for start in range(0, len(bodies), 100):
            emitted += (await runner.process_batch([Message(b) for b in bodies[start : start + 100]])).alerts
        elapsed = time.perf_counter() - started
    if emitted != alerts:
        raise SystemExit(f"benchmark error: {emitted} alerts out of {alerts}")
    return elapsed


def history_figure(quick: bool) -> dict[str, float]:
    """Throughput after `prior` alerts of the same 10 users ÷ throughput on fresh state, in turns: the
    history is built once (not timed) and copied for each turn; both sides get the same new alerts."""
    import shutil

    from benchmarks import streams

    prior, measured, users = (2_000, 500, 10) if quick else (20_000, 2_000, 10)
    bodies = make_bodies(measured, users=users, seed=41)
    with tempfile.TemporaryDirectory() as root:
        built = Path(root) / "built"
        asyncio.run(_timed_run(built, make_bodies(prior, users=users, seed=42), prior))
        turn = [0]

        def run(with_history: bool) -> float:
            turn[0] += 1
            folder = Path(root) / f"turn{turn[0]}"
            if with_history:
                shutil.copytree(built, folder)
            try:
                return asyncio.run(_timed_run(folder, bodies, measured))
            finally:
                shutil.rmtree(folder, ignore_errors=True)

        ratio = streams.in_turns(lambda: run(False), lambda: run(True), 3)
    return {"history_to_fresh": round(ratio, 3), "history_prior_alerts": prior}


def stream_figures(quick: bool) -> dict[str, float]:
    """The Targets figures on the stream shapes of benchmarks/streams.py, each a median of paired
    ratios (floor and pipeline in turns)."""
    from benchmarks import streams

    rounds = 3 if quick else 7
    messages = 60 if quick else 300
    figures: dict[str, float] = {}
    warm_mixed = streams.mixed_bodies(8, 0.02, seed=98)
    for percent in (0.1, 1, 2):
        bodies = streams.mixed_bodies(messages, percent / 100)
        alerts = streams.mixed_alerts(bodies)
        ratio = streams.in_turns(
            lambda b=bodies: streams.loads_seconds(b),
            lambda b=bodies, a=alerts: asyncio.run(pipeline_seconds(b, warm_mixed, alerts=a)),
            rounds,
        )
        figures[f"mixed_{percent}pct_to_loads"] = round(ratio, 3)
    dense = streams.dense_bodies(8 if quick else 40)
    warm_dense = streams.dense_bodies(4, seed=97)
    figures["dense_to_loads_dumps"] = round(streams.in_turns(
        lambda: streams.loads_dumps_seconds(dense),
        lambda: asyncio.run(pipeline_seconds(dense, warm_dense, alerts=len(dense) * 25)),
        rounds,
    ), 3)
    # Batches of one message against batches of 100, same bodies (one alert each), in turns.
    single = make_bodies(300 if quick else 2_000, seed=5)
    warm_single = make_bodies(200, seed=96)
    # The same turns give the fixed cost of a batch: the seconds a batch of one message costs more, per
    # message, than its share of a batch of 100 (item 5's own measure, in µs).
    turns: dict[int, list[float]] = {1: [], 100: []}

    def timed(batch_size: int) -> float:
        seconds = asyncio.run(pipeline_seconds(single, warm_single, alerts=len(single), batch_size=batch_size))
        turns[batch_size].append(seconds)
        return seconds

    figures["batch_of_1_to_batch_of_100"] = round(streams.in_turns(lambda: timed(100), lambda: timed(1), rounds), 3)
    figures["batch_fixed_cost_us"] = round(statistics.median(
        (one - hundred) / len(single) * 1e6 for one, hundred in zip(turns[1], turns[100])
    ), 1)
    return figures


async def naive_alerts_per_s(bodies: list[bytes], warmup: list[bytes]) -> float:
    """The same work written the straightforward way (benchmarks/naive.py), same enrichers and data."""
    from benchmarks.naive import naive_run
    from pipeline.runner import Runner

    with tempfile.TemporaryDirectory() as folder:
        # The straightforward way reads the user's history for each alert: the pipeline's reuse of a
        # history read across alerts and batches is not part of it.
        async with Runner(bench_config(Path(folder), history_reuse_seconds=0)) as runner:
            enrichers = [(slot.name, slot.plugin) for wave in runner.chain.waves for slot in wave]
            state = str(Path(folder) / "naive.sqlite")
            await naive_run(warmup, enrichers, state)
            gc.collect()
            started = time.perf_counter()
            written = await naive_run(bodies, enrichers, state)
            elapsed = time.perf_counter() - started
    if written != len(bodies):
        raise SystemExit(f"benchmark error: naive run wrote {written} records out of {len(bodies)} bodies")
    return written / elapsed


def peak_rss_mb(alerts: int) -> float:
    """Peak resident memory of a local CLI run over `alerts` alerts (one JSONL file)."""
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "messages.jsonl"
        with open(source, "wb") as out:
            for start in range(0, alerts, 5000):
                out.write(b"\n".join(make_bodies(min(5000, alerts - start), seed=start + 1)) + b"\n")
        # A child's ru_maxrss counts the pages it shared with its parent between fork and exec, so
        # the run is started by a small launcher process and measured there, not from this (large) one.
        launcher = (
            "import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], capture_output=True); "
            "sys.stderr.buffer.write(done.stderr); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(done.returncode)"
        )
        result = subprocess.run(
            [sys.executable, "-c", launcher, sys.executable, "-m", "pipeline", "run", str(source), "--out", str(Path(folder) / "out")],
            cwd=ROOT, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        if result.returncode != 0:
            raise SystemExit(f"benchmark error: local run failed: {result.stderr.decode()[-500:]}")
    return int(result.stdout.decode().split()[-1]) / 1024.0


def import_function_app_seconds() -> float:
    code = "import time; t = time.perf_counter(); import function_app; print(time.perf_counter() - t)"
    best = float("inf")
    for _ in range(3):
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        best = min(best, float(result.stdout.decode().strip().splitlines()[-1]))
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a run of a minute or two (smaller datasets)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--streams-only", action="store_true", help="only the figures up to the stream shapes (benchmarks/streams.py)")
    args = parser.parse_args(argv)
    size = 2_000 if args.quick else 20_000
    bodies = make_bodies(size)
    warmup = make_bodies(min(size, 2_000), seed=99)
    results: dict[str, object] = {"quick": args.quick, "alerts": size, "python": sys.version.split()[0], "cpus": os.cpu_count()}
    results["floor_alerts_per_s"] = round(floor_alerts_per_s(bodies))
    results["decode_alerts_per_s"] = round(decode_alerts_per_s(bodies))
    results["decode_ratio_to_floor"] = round(results["decode_alerts_per_s"] / results["floor_alerts_per_s"], 3)
    results["decode_us_by_format"] = decode_by_format(bodies)
    results["validate_us"] = validate_us(bodies)
    results.update(stream_figures(args.quick))
    results.update(history_figure(args.quick))
    if args.streams_only:
        return _print(results, args.json)
    # Best of `repeats` runs for the pipeline and the naive version alike (the floor and decode take
    # the best of 3 passes), taken in turns: on a shared machine whose speed drifts, one slow spell
    # must not fall on one side of the ratio only. Each run has its own fresh state.
    repeats = 1 if args.quick else 3
    pipeline, naive = [], []
    for _ in range(repeats):
        pipeline.append(asyncio.run(pipeline_alerts_per_s(bodies, warmup)))
        naive.append(asyncio.run(naive_alerts_per_s(bodies, warmup)))
    results["pipeline_alerts_per_s"] = round(max(pipeline))
    results["ratio_to_floor"] = round(results["pipeline_alerts_per_s"] / results["floor_alerts_per_s"], 3)
    results["naive_alerts_per_s"] = round(max(naive))
    results["pipeline_to_naive"] = round(results["pipeline_alerts_per_s"] / results["naive_alerts_per_s"], 2)
    from benchmarks import io

    results.update({k: round(v, 3) for k, v in asyncio.run(io.io_batch()).items()})
    results.update(asyncio.run(io.sentinel(2_000 if args.quick else 10_000)))
    from benchmarks import state

    results.update(asyncio.run(state.table_vs_sqlite(500 if args.quick else 5_000)))
    results["peak_rss_mb"] = round(peak_rss_mb(10_000 if args.quick else 100_000), 1)
    results["peak_rss_alerts"] = 10_000 if args.quick else 100_000
    small, large = (1_000, 10_000) if args.quick else (5_000, 50_000)
    results["peak_rss_ratio"] = round(peak_rss_mb(large) / peak_rss_mb(small), 3)
    results["peak_rss_ratio_alerts"] = f"{large} / {small}"
    results["import_function_app_s"] = round(import_function_app_seconds(), 3)
    return _print(results, args.json)


def _print(results: dict[str, object], as_json: bool) -> int:
    for key, value in results.items():
        print(f"{key:28} {value}")
    if as_json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
