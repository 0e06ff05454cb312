"""The CLI end to end, as a user runs it: a subprocess in a temp dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline.entrypoints.cli import program_name
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
