"""Store and input errors as the user meets them: each classified once (pipeline.errors.store_error),
each saying what happened and what to do, with the exit code the README promises. Real files: a
SQLite lock held by another connection, files overwritten with garbage, a folder where a file is,
writes that fail with the kernel's ENOSPC (/dev/full)."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import tempfile

import pytest

from pipeline.errors import StoreUnavailable
from pipeline.runner import Message, Runner
from tests.entrypoints.test_cli import run_cli, summary
from tests.support.config import LAKE, pipeline_toml
from tests.support.paths import SAMPLES


@pytest.fixture
def used_out(tmp_path):
    """A data folder after one run of the samples: state, lake index and dead letters exist."""
    result = run_cli("run", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    return tmp_path / "out"


def damage(path) -> None:
    path.write_bytes(b"this is not a SQLite file\n" * 200)
    for extra in ("-wal", "-shm"):
        (path.parent / (path.name + extra)).unlink(missing_ok=True)


def test_a_state_file_locked_by_another_process_is_busy_exit_1_not_a_config_error(used_out, tmp_path):
    holder = sqlite3.connect(used_out / "state.sqlite", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process (here: another connection) holds the file
    try:
        result = run_cli("run", "--out", "out", cwd=tmp_path)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    (line,) = result.stderr.decode().strip().splitlines()
    assert result.returncode == 1, line
    assert "busy" in line and str(used_out / "state.sqlite") in line and "another process" in line
    assert "key '" not in line and "enrichers[" not in line and "nothing is lost" in line


@pytest.mark.parametrize("name", ["state.sqlite", "lake/_delivered.sqlite"])
def test_a_damaged_state_file_or_lake_index_exits_2_naming_it_and_what_to_do(used_out, tmp_path, name):
    damage(used_out / name)
    result = run_cli("run", "--out", "out", cwd=tmp_path)
    (line,) = result.stderr.decode().strip().splitlines()
    assert result.returncode == 2, line
    assert line.startswith(f"error: {used_out / name} is damaged") and "move it" in line
    assert "nothing is lost" not in line and "unexpected" not in line


@pytest.mark.parametrize("blocked", ["dead-letter", "lake"])
def test_an_output_path_that_cannot_be_written_exits_2(tmp_path, blocked):
    out = tmp_path / "out"
    out.mkdir()
    (out / blocked).write_text("a file where the pipeline needs a folder")
    result = run_cli("run", "--out", "out", cwd=tmp_path)
    (line,) = result.stderr.decode().strip().splitlines()
    assert result.returncode == 2, line
    assert str(out / blocked) in line and "run again" not in line


def test_a_pretty_printed_document_on_stdin_gets_one_hint(tmp_path):
    pretty = json.dumps(json.loads((SAMPLES / "03-graph-alert.json").read_text()), indent=2).encode()
    result = run_cli("run", "-", "--out", "out", cwd=tmp_path, stdin=pretty)
    assert result.returncode == 0
    counts = summary(result.stdout)
    assert int(counts["messages"]) == len(pretty.splitlines()) > 10 and counts["alerts enriched"] == "0"
    hints = [line for line in result.stderr.decode().splitlines() if line.startswith("hint:")]
    assert len(hints) == 1 and "one message per line" in hints[0] and ".json file" in hints[0]
    good = run_cli("run", str(SAMPLES), "--out", "out2", cwd=tmp_path)  # some dead letters among good messages: not this hint
    hints = [line for line in good.stderr.decode().splitlines() if line.startswith("hint:")]
    assert good.returncode == 0 and len(hints) == 1 and "undecoded" not in hints[0] and "replay-dead-letters" in hints[0]


async def test_on_a_full_disk_no_log_line_claims_dead_letters_were_written(write_config, monkeypatch, caplog):
    """Every dead-letter file write fails with ENOSPC from the kernel (/dev/full): the batch raises
    DiskFull saying 0 were written, and no log line says anything was dead-lettered."""
    loaded = write_config(pipeline_toml(sinks=[LAKE]))
    real_mkstemp = tempfile.mkstemp

    def full_disk(*args, **kwargs):
        handle, name = real_mkstemp(*args, **kwargs)
        os.close(handle)
        return os.open("/dev/full", os.O_WRONLY), name

    caplog.set_level(logging.INFO)
    async with Runner(loaded) as runner:
        monkeypatch.setattr(tempfile, "mkstemp", full_disk)
        with pytest.raises(StoreUnavailable) as raised:
            await runner.process_batch([Message(b"{not json", source=f"f:{i}") for i in range(25)])
        monkeypatch.undo()
        assert await runner.dead_letter.list() == []
    claims = [r.getMessage() for r in caplog.records if "dead-letter" in r.getMessage()]
    assert claims == [], claims
    assert type(raised.value).__name__ == "DiskFull" and "0 of 25 written" in str(raised.value) and "disk full" in str(raised.value)


def test_store_error_classifies_sqlite_and_os_errors_by_code(tmp_path):
    from pipeline.errors import DiskFull, PathUnusable, StoreBusy, StoreDamaged, store_error

    locked = tmp_path / "locked.sqlite"
    holder = sqlite3.connect(locked, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(sqlite3.OperationalError) as busy:
            sqlite3.connect(locked, timeout=0).execute("SELECT * FROM sqlite_master")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    damaged = tmp_path / "damaged.sqlite"
    damage(damaged)
    with pytest.raises(sqlite3.DatabaseError) as corrupt:
        sqlite3.connect(damaged).execute("SELECT * FROM sqlite_master")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError) as not_a_folder:
        (tmp_path / "file" / "sub").mkdir()
    assert isinstance(store_error(busy.value, path=locked, operation="read"), StoreBusy)
    assert isinstance(store_error(corrupt.value, path=damaged, operation="read"), StoreDamaged)
    assert isinstance(store_error(not_a_folder.value, path=tmp_path, operation="create"), PathUnusable)
    assert isinstance(store_error(OSError(28, "No space left on device"), path=tmp_path, operation="write"), DiskFull)


def test_a_damaged_dead_letter_file_stops_a_replay_with_exit_2_naming_it(used_out, tmp_path):
    (entry, *_) = sorted((used_out / "dead-letter").glob("*.json"))
    entry.write_bytes(b'{"stage": "decode", "reas')  # cut short, e.g. copied by hand
    result = run_cli("replay-dead-letters", "--out", "out", cwd=tmp_path)
    (line,) = result.stderr.decode().strip().splitlines()
    assert result.returncode == 2, line
    assert line.startswith(f"error: {entry} is damaged") and "move it out of the dead-letter folder" in line


async def test_a_damaged_dead_letter_entry_met_by_a_new_failure_names_the_file_and_what_to_do(tmp_path):
    """A put that meets an entry file which is not an entry said "run again" (StoreUnavailable),
    which reads the same file again; it is StoreDamaged, naming the file and what to do."""
    from pipeline.deadletter import DeadLetter, LocalDeadLetterStore
    from pipeline.errors import StoreDamaged

    store = LocalDeadLetterStore(tmp_path / "dead-letter")
    entry = DeadLetter(stage="decode", reason="invalid_json", detail="bad", body=b"{trunc", source="in.jsonl:1")
    await store.put([entry])
    (tmp_path / "dead-letter" / f"{entry.entry_id}.json").write_bytes(b"{trunc")  # damaged on disk
    with pytest.raises(StoreDamaged) as damaged:
        await store.put([entry])
    assert entry.entry_id in str(damaged.value) and "move it out of the dead-letter folder" in str(damaged.value)
