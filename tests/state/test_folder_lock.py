"""Several processes on one data folder (`--out`): none loses or duplicates a record.

The local stores (SQLite state, JSONL lake and its delivered-index, dead-letter folder) are written by
one process at a time. Real CLI processes on one folder: either both finish, or the second refuses
at once with one line and exit 2; after running the refused one again, every alert is in the lake
exactly once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

import pytest

from pipeline.deadletter import DeadLetter, LocalDeadLetterStore
from pipeline.state.folder_lock import LOCK_FILE, FolderLock
from tests.support.processes import ROOT, cli, lake_line_count, lake_lines, source_alert_id, write_alerts

ALERTS_PER_RUN = 4000
DEAD_LETTERS = 1000

CONFIG = """
[runner]
batch_size = 100

[[enrichers]]
name = "sensitive_info"

[[sinks]]
name = "lake"
kind = "jsonl"
"""

# Enough for `consume` to get past its config check; it never connects while the folder is held.
CONSUMER = """
[consumer]
eventhub_name = "dlp"
connection_string_env = "NOT_USED_EVENTHUB"
checkpoint_connection_string_env = "NOT_USED_STORAGE"
"""

REFUSAL = "is using"


def finish(process, *, timeout: float = 60) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=timeout)
    return process.returncode, stderr.decode()


def assert_refused_or_ok(code: int, stderr: str, out: Path) -> bool:
    """True when the process refused because the folder was busy (exit 2, one line naming it)."""
    if code == 2:
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and REFUSAL in lines[0] and str(out) in lines[0], stderr
        return True
    assert code == 0, stderr
    return False


def assert_each_alert_once(out: Path, expected: set[str]) -> None:
    lines = lake_lines(out)
    per_alert = Counter(source_alert_id(line) for line in lines)
    missing, twice = expected - set(per_alert), sum(n - 1 for n in per_alert.values())
    assert not missing and not twice and set(per_alert) == expected, (
        f"{len(lines)} lines for {len(expected)} alerts: {len(missing)} missing, {twice} written twice"
    )
    assert len({line["record_id"] for line in lines}) == len(lines)


@pytest.mark.slow
def test_two_runs_on_one_folder_lose_nothing_and_write_nothing_twice(tmp_path):
    (tmp_path / "pipeline.toml").write_text(CONFIG)
    inputs = {tmp_path / f"in{seed}": write_alerts(tmp_path / f"in{seed}", ALERTS_PER_RUN, seed=seed) for seed in (1, 2)}
    out = tmp_path / "out"

    def run(folder: Path):
        return cli("run", str(folder), "--config", "pipeline.toml", "--out", "out", cwd=tmp_path)

    processes = {folder: run(folder) for folder in inputs}  # both started before either can finish
    refused = [folder for folder, process in processes.items() if assert_refused_or_ok(*finish(process), out)]
    for folder in refused:  # as the line says: once the other one has finished
        code, stderr = finish(run(folder))
        assert code == 0, stderr
    assert_each_alert_once(out, set().union(*inputs.values()))


def test_a_writing_command_refuses_at_once_while_another_process_holds_the_folder(tmp_path):
    (tmp_path / "pipeline.toml").write_text(CONFIG + CONSUMER)
    write_alerts(tmp_path / "in", 10, seed=3)
    out = tmp_path / "out"
    holder = FolderLock(out)  # this test process is the other holder
    holder.acquire()
    try:
        for command in (["run", "in"], ["replay-dead-letters"], ["consume"]):
            code, stderr = finish(cli(*command, "--config", "pipeline.toml", "--out", "out", cwd=tmp_path), timeout=30)
            assert code == 2 and stderr == (
                f"error: another dlp-pipeline process (pid {os.getpid()}) is using {out}; wait for it to finish or give this run its own --out\n"
            ), (command, stderr)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE], "a refused command wrote into the folder"
        # validate and schema read and never write: they do not lock
        for command in (["validate", "--config", "pipeline.toml", "--out", "out"], ["schema", "sentinel"]):
            code, stderr = finish(cli(*command, cwd=tmp_path), timeout=30)
            assert code == 0, stderr
    finally:
        holder.release()
    code, stderr = finish(cli("run", "in", "--config", "pipeline.toml", "--out", "out", cwd=tmp_path))
    assert code == 0, stderr
    assert len(lake_lines(out)) == 10


@pytest.mark.slow
def test_a_run_and_a_replay_on_one_folder_lose_nothing_and_write_nothing_twice(tmp_path):
    (tmp_path / "pipeline.toml").write_text(CONFIG)
    run_alerts = write_alerts(tmp_path / "in", ALERTS_PER_RUN, seed=4)
    replay_alerts = write_alerts(tmp_path / "dead", DEAD_LETTERS, seed=5)
    out = tmp_path / "out"
    store = LocalDeadLetterStore(out / "dead-letter")  # decode-stage entries that decode now (e.g. an older version's bug)
    bodies = (tmp_path / "dead" / "messages.jsonl").read_bytes().splitlines()
    asyncio.run(store.put([DeadLetter(stage="decode", reason="old_bug", detail="", body=body, source=f"old:{i}") for i, body in enumerate(bodies)]))

    commands = {"run": ["run", "in"], "replay": ["replay-dead-letters"]}
    processes = {name: cli(*command, "--config", "pipeline.toml", "--out", "out", cwd=tmp_path) for name, command in commands.items()}
    refused = [name for name, process in processes.items() if assert_refused_or_ok(*finish(process), out)]
    for name in refused:
        code, stderr = finish(cli(*commands[name], "--config", "pipeline.toml", "--out", "out", cwd=tmp_path))
        assert code == 0, stderr
    assert_each_alert_once(out, run_alerts | replay_alerts)
    assert asyncio.run(store.list()) == [], "a replayed entry is still in the dead-letter folder"


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_the_lock_of_a_sigkilled_run_does_not_block_the_next_run(tmp_path):
    (tmp_path / "pipeline.toml").write_text(CONFIG.replace("batch_size = 100", "batch_size = 10"))
    expected = write_alerts(tmp_path / "in", ALERTS_PER_RUN, seed=6)
    out = tmp_path / "out"
    first = cli("run", "in", "--config", "pipeline.toml", "--out", "out", cwd=tmp_path)
    deadline = time.monotonic() + 30
    while first.poll() is None and lake_line_count(out) < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    assert first.returncode == -signal.SIGKILL, "the first run ended before it was killed"
    assert (out / LOCK_FILE).read_text().strip() == str(first.pid), "the killed run left no lock file behind"

    code, stderr = finish(cli("run", "in", "--config", "pipeline.toml", "--out", "out", cwd=tmp_path))
    assert code == 0, stderr
    assert_each_alert_once(out, expected)


# `python -m pipeline ARGS...` that SIGKILLs itself right after its `nth` fsync of a lake file
# ("lines") or of a folder ("folder"): a crash between making lines durable and marking them delivered.
KILLED_AFTER_FSYNC = """
import os, signal, stat, sys
real_fsync, kind, nth, seen = os.fsync, sys.argv[1], int(sys.argv[2]), [0]
def fsync(fd):
    real_fsync(fd)
    is_folder = stat.S_ISDIR(os.fstat(fd).st_mode)
    if (kind == "folder" and is_folder) or (kind == "lines" and os.readlink(f"/proc/self/fd/{fd}").endswith("records.jsonl")):
        seen[0] += 1
        if seen[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
os.fsync = fsync
from pipeline.entrypoints.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="names open files through /proc")
@pytest.mark.parametrize(("kind", "nth"), [("lines", 3), ("folder", 1)], ids=["after-the-lines", "after-a-new-file's-folder-entry"])
def test_a_record_is_marked_delivered_only_after_its_line_is_durable_and_a_kill_between_loses_nothing(tmp_path, kind, nth):
    """The lake's order: lines fsynced, then the folder entry of a file the append created (a new
    file's lines are not durable before its name is), and only then the ids in the index."""
    (tmp_path / "pipeline.toml").write_text(CONFIG)
    expected = write_alerts(tmp_path / "in", 400, seed=7)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", KILLED_AFTER_FSYNC, kind, str(nth), "run", "in", "--config", "pipeline.toml", "--out", "out"]
    killed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL, f"no {kind} fsync #{nth} before the run ended: {killed.stderr.decode()}"

    with closing(sqlite3.connect(out / "lake" / "_delivered.sqlite")) as index:
        delivered = {row[0] for row in index.execute("SELECT record_id FROM delivered")}
    in_lake = {line["record_id"] for line in lake_lines(out)}
    assert delivered <= in_lake, f"{len(delivered - in_lake)} records marked delivered with no line in the lake"
    assert len(in_lake) > len(delivered), "the kill did not fall between the lines and the index"

    code, stderr = finish(cli("run", "in", "--config", "pipeline.toml", "--out", "out", cwd=tmp_path))
    assert code == 0, stderr
    assert_each_alert_once(out, expected)


def test_a_store_configured_outside_the_data_folder_is_locked_too(tmp_path):
    shared_lake = tmp_path / "shared-lake"
    (tmp_path / "pipeline.toml").write_text(CONFIG + f'settings = {{ path = "{shared_lake}" }}\n')
    write_alerts(tmp_path / "in", 10, seed=8)
    holder = FolderLock(shared_lake)  # e.g. a run with another --out writing the same lake
    holder.acquire()
    try:
        code, stderr = finish(cli("run", "in", "--config", "pipeline.toml", "--out", "out", cwd=tmp_path), timeout=30)
    finally:
        holder.release()
    assert code == 2 and f"is using {shared_lake};" in stderr, stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.sqlite")), "the refused run opened its stores"
