"""The CLI end to end, as a user runs it: a subprocess in a temp dir."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from pipeline.entrypoints.cli import MODULE_PROG, program_name
from tests.support.paths import ROOT, SAMPLES
from tests.support.samples import MATCHED_VALUES


def run_cli(*args: str, cwd: Path, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, input=stdin, capture_output=True, timeout=120)


def summary(stdout: bytes) -> dict[str, str]:
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in stdout.decode().splitlines()) if v}


def test_run_on_bundled_samples_with_embedded_defaults(tmp_path):
    result = run_cli("run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    out = tmp_path / "out"
    lines = [json.loads(line) for path in sorted((out / "lake").rglob("*.jsonl")) for line in path.read_text().splitlines()]
    formats = {line["alert"]["source_format"] for line in lines}
    assert formats == {"defender_streaming", "graph_alert", "management_activity", "sentinel_alert"}
    counts = summary(result.stdout)
    assert counts["alerts enriched"] == str(len(lines)) and counts["delivered"] == f"lake={len(lines)}"
    assert counts["dead-lettered"].startswith("3 ") and int(counts["skipped (not DLP)"]) >= 3
    assert len(list((out / "dead-letter").glob("*.json"))) == 3
    for line in lines:
        assert set(line) == {"record_id", "alert", "enrichments", "enrichment_status", "pipeline_version", "processed_at"}
    split = [line for line in lines if line["alert"]["alert_id"].startswith("dl9a8b7c6d")]
    assert split and split[0]["alert"]["user"]["upn"] == "adele.vance@contoso.com"  # joined across two messages
    everything = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file()) + result.stdout + result.stderr
    for value in MATCHED_VALUES:
        assert value.encode() not in everything


def test_run_is_idempotent_when_repeated(tmp_path):
    first = run_cli("run", cwd=tmp_path)
    second = run_cli("run", cwd=tmp_path)
    assert first.returncode == second.returncode == 0
    lines = [line for path in (tmp_path / "out" / "lake").rglob("*.jsonl") for line in path.read_text().splitlines()]
    ids = [json.loads(line)["record_id"] for line in lines]
    assert len(ids) == len(set(ids)) == int(summary(first.stdout)["alerts enriched"])


def test_run_reads_files_folders_and_stdin(tmp_path):
    graph = (SAMPLES / "03-graph-alert.json").read_bytes()
    mgmt = json.dumps(json.loads((SAMPLES / "05-management-activity.json").read_text())).encode()
    result = run_cli("run", "-", str(SAMPLES / "03-graph-alert.json"), "--out", "o", cwd=tmp_path, stdin=mgmt + b"\n\n" + b"garbage\n")
    assert result.returncode == 0, result.stderr.decode()
    counts = summary(result.stdout)
    assert counts["messages"] == "3" and counts["alerts enriched"] == "3" and counts["dead-lettered"].startswith("1 ")
    assert graph  # the file was read as one body


def test_unreadable_path_exits_2_with_one_line(tmp_path):
    result = run_cli("run", str(tmp_path / "nope.json"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.decode().strip().splitlines() == [f"error: {tmp_path / 'nope.json'}: no such file or folder"]
    assert not (tmp_path / "out").exists()


def test_bad_config_exits_2_naming_file_and_key(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[[sinks]]\nname = "lake"\nkind = "jsonl"\nsettings = { pth = "x" }\n')
    for command in ("run", "validate"):
        result = run_cli(command, "--config", str(config), cwd=tmp_path)
        assert result.returncode == 2
        lines = result.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and "bad.toml, key 'sinks[0].settings.pth': unknown key; did you mean 'path'?" in lines[0] and "Traceback" not in lines[0]


def test_validate_reports_the_plugins(tmp_path):
    result = run_cli("validate", cwd=tmp_path)
    assert result.returncode == 0 and b"ok (enrichers:" in result.stdout


def test_a_path_a_command_cannot_write_is_one_line_not_a_stack_trace(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_cli("new-enricher", "geo", "--dir", str(blocker / "sub"), cwd=tmp_path)
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in lines[0]


def test_usage_names_the_command_the_user_typed(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.decode().startswith("usage: python -m pipeline [-h]")
    assert run_cli("validate", "--help", cwd=tmp_path).stdout.decode().startswith("usage: python -m pipeline validate ")
    # an installed console script is named by its file (tests/test_packaging.py runs the real one)
    assert program_name("/opt/venv/bin/dlp-pipeline") == "dlp-pipeline"
    assert program_name(r"C:\venv\Scripts\dlp-pipeline.exe".replace("\\", "/")) == "dlp-pipeline"
    assert program_name(str(ROOT / "pipeline" / "__main__.py")) == "python -m pipeline"
    assert program_name("-m") == program_name("") == "python -m pipeline"


def test_a_run_that_dead_lettered_says_where_and_how_to_replay(tmp_path):
    (tmp_path / "broken.json").write_text('{"records": [ {"category": 1')
    result = run_cli("run", "broken.json", str(SAMPLES / "03-graph-alert.json"), "--out", "data", cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    hints = [line for line in result.stderr.decode().splitlines() if line.startswith("hint: ")]
    assert len(hints) == 1, result.stderr.decode()
    folder = tmp_path / "data" / "dead-letter"
    assert f"1 dead letter (decode=1) in {folder}" in hints[0] and len(list(folder.glob("*.json"))) == 1
    command = shlex.split(hints[0].split("`")[1])  # the command the hint gives, run as given
    assert command == [*MODULE_PROG.split(), "replay-dead-letters", "--out", str(tmp_path / "data")]
    replayed = run_cli(*command[3:], cwd=tmp_path)
    assert replayed.returncode == 0 and summary(replayed.stdout)["still dead"] == "1"  # undecodable input stays there


def test_a_run_without_dead_letters_gives_no_hint(tmp_path):
    result = run_cli("run", str(SAMPLES / "03-graph-alert.json"), "--out", "data", cwd=tmp_path)
    assert result.returncode == 0 and "hint:" not in result.stderr.decode()


async def test_the_dead_letter_hint_names_a_blob_store_and_the_config(tmp_path):
    from azure.storage.blob.aio import ContainerClient

    from pipeline.config import load_config
    from pipeline.deadletter.blob import BlobDeadLetterStore
    from pipeline.entrypoints.commands.run import dead_letter_hint
    from pipeline.report import BatchReport

    loaded = load_config(None, data_dir=tmp_path / "data")
    async with ContainerClient("https://a.blob.core.windows.net", "dead-letter") as container:  # no request is made
        store = BlobDeadLetterStore(container, prefix="dlp/")
    total = BatchReport()
    total.dead_lettered.update({"deliver": 2, "decode": 1})
    hint = dead_letter_hint(total, store.where, loaded, "my config.toml")
    assert hint is not None and "3 dead letters (decode=1, deliver=2) in blob container 'dead-letter' under 'dlp/'" in hint
    assert shlex.split(hint.split("`")[1])[3:] == ["replay-dead-letters", "--config", "my config.toml", "--out", str(tmp_path / "data")]
