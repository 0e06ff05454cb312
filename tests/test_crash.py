"""Crash between a sink write and the checkpoint: `python -m pipeline run` is SIGKILLed part-way, twice,
then run again to the end. Every alert must be in the lake exactly once and every poison message
dead-lettered; the lake's append journal must leave no repeated or torn line behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from tests.support.config import enricher_entry, pipeline_toml, sink_entry
from tests.support.paths import FIXTURES, ROOT

ALERTS = 2000
POISON_EVERY = 500

# The lake with fsync on: what a SIGKILL leaves behind is what a crash on a real disk leaves.
CONFIG = pipeline_toml(runner={"batch_size": 10}, enrichers=[enricher_entry("sensitive_info")], sinks=[sink_entry("lake", "jsonl", {"fsync": True})])


def write_input(path: Path) -> set[str]:
    alert = json.loads((FIXTURES / "graph_alert_v2_dlp.json").read_text())
    streaming = (FIXTURES / "streaming_dlp_batch.json").read_bytes()
    ids = set()
    with open(path, "wb") as out:
        for i in range(ALERTS):
            out.write(orjson.dumps(dict(alert, id=f"crash-{i:05d}")) + b"\n")
            ids.add(f"crash-{i:05d}")
            if i % POISON_EVERY == 0:
                out.write(b'{"poison": ' + str(i).encode() + b"\n")
        out.write(orjson.dumps(orjson.loads(streaming)) + b"\n")  # a split alert (parts in the state store)
    return ids


def lake_lines(out: Path) -> int:
    return sum(path.read_bytes().count(b"\n") for path in (out / "lake").rglob("*.jsonl")) if (out / "lake").exists() else 0


def start(tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "pipeline", "run", "in.jsonl", "--config", "pipeline.toml", "--out", "out"]
    return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def kill_after(process: subprocess.Popen, out: Path, lines: int) -> int:
    deadline = time.monotonic() + 60
    while lake_lines(out) < lines and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    return lake_lines(out)


@pytest.mark.slow
def test_sigkill_part_way_then_run_again_loses_nothing_and_writes_nothing_twice(tmp_path):
    (tmp_path / "pipeline.toml").write_text(CONFIG)
    expected = write_input(tmp_path / "in.jsonl") | {"da1b2c3d4e5f60718293a4b5c6d7e8f90"}
    out = tmp_path / "out"

    first = start(tmp_path)
    at_first_kill = kill_after(first, out, 400)
    assert first.returncode == -signal.SIGKILL and 0 < at_first_kill < ALERTS, "the first run was not killed part-way"
    second = start(tmp_path)
    at_second_kill = kill_after(second, out, at_first_kill + 600)
    assert second.returncode == -signal.SIGKILL and at_second_kill < ALERTS, "the second run was not killed part-way"

    final = start(tmp_path)
    stdout, stderr = final.communicate(timeout=120)
    assert final.returncode == 0, stderr.decode()

    raw = b"".join(path.read_bytes() for path in (out / "lake").rglob("*.jsonl"))
    lines = [json.loads(line) for line in raw.splitlines()]  # a torn line would not parse
    per_record = Counter(line["record_id"] for line in lines)
    assert max(per_record.values()) == 1, "a record is in the lake twice"
    alert_ids = {line["alert"]["alert_id"] for line in lines}
    split_ids = {a for a in alert_ids if not a.startswith("crash-")}
    assert {a for a in alert_ids if a.startswith("crash-")} == {a for a in expected if a.startswith("crash-")}, "an alert is missing"
    assert len(split_ids) == 1, "the split alert is missing"
    dead = [orjson.loads(p.read_bytes()) for p in (out / "dead-letter").glob("*.json")]
    assert len(dead) == ALERTS // POISON_EVERY and all(d["reason"] == "invalid_json" for d in dead)
    assert b"delivered:           lake=" in stdout
