"""Soak run: N alerts through the local run (`python -m pipeline run`) with one sink failing a fifth of its calls.

    python -m tests.soak --alerts 100000 [--out DIR] [--batch-size 100] [--fail-ratio 0.2]

Input: N Graph DLP alerts with distinct ids, one split Streaming API alert, and one poison message
per 1,000 alerts, as JSON lines. Sinks: the JSONL lake and `tests.faults:ScriptedSink`, which raises
a transient 503 on `--fail-ratio` of its calls (seeded). The run goes through the CLI's own code
(`pipeline.entrypoints.cli.main`) in this process, so the flaky sink's counters can be read afterwards.

It prints the run's summary, the time taken, and the accounting it checks; it exits 1 when any alert
is not accounted for: every alert must be in the lake exactly once and taken by the flaky sink or
dead-lettered for it, and every poison message dead-lettered. A small version runs in the default
test suite (tests/test_soak.py).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import orjson

from tests import faults
from tests.support.config import enricher_entry, pipeline_toml, sink_entry
from tests.support.paths import FIXTURES

POISON_EVERY = 1000


def config(batch_size: int, fail_ratio: float) -> str:
    """sensitive_info, the lake with its default settings, and a scripted sink failing `fail_ratio` of its calls."""
    return pipeline_toml(
        runner={"batch_size": batch_size},
        delivery={"max_attempts": 8, "backoff_initial_seconds": 0.005, "backoff_max_seconds": 0.05, "budget_seconds": 30},
        enrichers=[enricher_entry("sensitive_info")],
        sinks=[sink_entry("lake", "jsonl"), sink_entry("flaky", "tests.faults:ScriptedSink", {"label": "soak", "fail_ratio": fail_ratio, "seed": 7})],
    )


def write_input(path: Path, alerts: int) -> tuple[set[str], int]:
    alert = json.loads((FIXTURES / "graph_alert_v2_dlp.json").read_text())
    ids, poison = set(), 0
    with open(path, "wb") as out:
        for i in range(alerts):
            out.write(orjson.dumps(dict(alert, id=f"soak-{i:07d}")) + b"\n")
            ids.add(f"soak-{i:07d}")
            if i % POISON_EVERY == POISON_EVERY - 1:
                out.write(b'{"truncated": "message' + str(i).encode() + b"\n")
                poison += 1
        out.write(orjson.dumps(orjson.loads((FIXTURES / "streaming_dlp_batch.json").read_bytes())) + b"\n")
    return ids, poison


def soak(alerts: int, out: Path, *, batch_size: int = 100, fail_ratio: float = 0.2) -> dict:
    """Run the soak; returns the figures and the checks (see the module docstring)."""
    from pipeline.entrypoints.cli import main as cli_main

    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "soak.toml"
    config_path.write_text(config(batch_size, fail_ratio))
    ids, poison = write_input(out / "soak.jsonl", alerts)
    data = out / "data"
    captured = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(captured):
        code = cli_main(["run", str(out / "soak.jsonl"), "--config", str(config_path), "--out", str(data)])
    seconds = time.perf_counter() - started
    sink = faults.INSTANCES["soak"]

    lake = [orjson.loads(line) for path in (data / "lake").rglob("*.jsonl") for line in path.read_bytes().splitlines()]
    per_record = Counter(line["record_id"] for line in lake)
    lake_alerts = {line["alert"]["alert_id"] for line in lake}
    id_of = {line["record_id"]: line["alert"]["alert_id"] for line in lake}
    dead = [orjson.loads(p.read_bytes()) for p in (data / "dead-letter").glob("*.json")]
    dead_flaky = {d["record_id"] for d in dead if d["stage"] == "deliver" and d["sink"] == "flaky"}
    dead_decode = [d for d in dead if d["stage"] == "decode"]
    flaky_alerts = {id_of[r] for r in set(sink.stored) | dead_flaky if r in id_of}
    checks = {
        "exit code 0": code == 0,
        "every alert in the lake": ids <= lake_alerts and len(lake_alerts) == len(ids) + 1,
        "no record in the lake twice": max(per_record.values(), default=1) == 1,
        "every alert taken by the flaky sink or dead-lettered for it": flaky_alerts == lake_alerts,
        "no record stored twice by the flaky sink": max(sink.stored.values(), default=1) == 1,
        "every poison message dead-lettered": len(dead_decode) == poison,
    }
    return {
        "alerts": alerts,
        "seconds": round(seconds, 1),
        "alerts_per_second": round(alerts / seconds),
        "flaky_calls": sink.calls,
        "flaky_failed_calls": sink.failed_calls,
        "flaky_dead_lettered": len(dead_flaky),
        "summary": captured.getvalue(),
        "checks": checks,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--alerts", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one, removed afterwards)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--fail-ratio", type=float, default=0.2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="soak-") as temp:
        result = soak(args.alerts, args.out or Path(temp), batch_size=args.batch_size, fail_ratio=args.fail_ratio)
    print(result["summary"], end="")
    print(f"time:                {result['seconds']} s ({result['alerts_per_second']} alerts/s)")
    print(f"flaky sink calls:    {result['flaky_calls']} ({result['flaky_failed_calls']} failed with 503, retried)")
    print(f"flaky dead-lettered: {result['flaky_dead_lettered']}")
    for name, ok in result["checks"].items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
