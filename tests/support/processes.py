"""The CLI as separate processes on one data folder, and what they left in its JSONL lake."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.dataset import make_bodies

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, cwd: Path) -> subprocess.Popen:
    """Start `python -m pipeline ARGS` in `cwd` on this checkout's code; stdout and stderr piped."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def write_alerts(folder: Path, count: int, *, seed: int) -> set[str]:
    """`count` messages of one distinct DLP alert each (all four formats, split Streaming API alerts
    among them) into `folder/messages.jsonl`; returns their alert ids. Seeds give disjoint ids."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "messages.jsonl").write_bytes(b"\n".join(make_bodies(count, seed=seed)) + b"\n")
    return {f"dl{seed:04d}{index:08d}-bench" for index in range(count)}


def source_alert_id(line: dict) -> str:
    """The id a generated alert was given in its message (`write_alerts`): the alert id, or for a
    Management Activity match (whose alert id is the match's) the audit id of its first event."""
    events = (line["alert"].get("lifecycle") or {}).get("events") or []
    return events[0]["record_id"] if events and events[0].get("record_id") else line["alert"]["alert_id"]


def lake_lines(out: Path) -> list[dict]:
    """Every line of the JSONL lake under `out/lake`, parsed (a torn line fails to parse)."""
    return [json.loads(line) for path in sorted((out / "lake").rglob("*.jsonl")) for line in path.read_bytes().splitlines()]


def lake_line_count(out: Path) -> int:
    """Complete lines in the lake so far: safe to call while a run is still appending (its last line may be torn)."""
    lake = out / "lake"
    return sum(path.read_bytes().count(b"\n") for path in lake.rglob("*.jsonl")) if lake.exists() else 0
