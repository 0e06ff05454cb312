"""`python -m pipeline new-enricher`: the generated package passes its own tests and, once installed,
is picked up by the pipeline through its entry point. Everything is installed into a temporary
--target folder, never into the project's virtualenv."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.plugin_kit.scaffold import ScaffoldError, generate, names
from tests.entrypoints.test_cli import run_cli
from tests.support.paths import ROOT, SAMPLES

PROJECT_FILES = ("pyproject.toml", "README.md", "requirements.txt", "pipeline", "enrichers")
COPY_IGNORE = (".git", ".venv", ".tools", "node_modules", "tests", "out", ".azurite", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", ".pytest_cache", ".hypothesis", "__azurite_db*", "__blobstorage__", "__queuestorage__")


@pytest.mark.integration
@pytest.mark.slow
def test_generated_plugin_passes_its_tests_and_is_picked_up_once_installed(tmp_path):
    # 1. scaffold, as a user would
    result = run_cli("new-enricher", "geo_ip", "--dir", "plugins", cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    package = tmp_path / "plugins" / "dlp-enricher-geo-ip"
    assert f"created {Path('plugins') / 'dlp-enricher-geo-ip'}" in result.stdout.decode()

    # 2. install this project (from a copy, so no build files land in the checkout) and the plugin
    project = tmp_path / "project"
    shutil.copytree(ROOT, project, symlinks=True, ignore=shutil.ignore_patterns(*COPY_IGNORE))
    assert all((project / name).exists() for name in PROJECT_FILES)
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(project), str(package)],
        capture_output=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr.decode()[-3000:]
    env = {**os.environ, "PYTHONPATH": str(site)}  # the installed copies only, not the checkout

    # 3. the generated tests pass, with the fixtures of the pytest11 plugin and no conftest.py
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=package, env=env, capture_output=True, timeout=300)
    output = tests.stdout.decode()
    assert tests.returncode == 0, output[-3000:] + tests.stderr.decode()[-2000:]
    assert "9 passed" in output
    assert not (package / "conftest.py").exists() and not (package / "tests" / "conftest.py").exists()

    # 4. the pipeline picks it up by its entry-point name
    config = tmp_path / "pipeline.toml"
    config.write_text(
        """
[[enrichers]]
name = "sensitive_info"

[[enrichers]]
name = "geo_ip"
[enrichers.settings]
watched_domains = ["contoso.com"]

[[sinks]]
name = "lake"
kind = "jsonl"
"""
    )
    validate = subprocess.run([sys.executable, "-m", "pipeline", "validate", "--config", str(config)], cwd=tmp_path, env=env, capture_output=True, timeout=120)
    assert validate.returncode == 0, validate.stderr.decode()
    assert "enrichers: sensitive_info, geo_ip" in validate.stdout.decode()
    run = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(SAMPLES / "03-graph-alert.json"), "--config", str(config), "--out", "out"],
        cwd=tmp_path, env=env, capture_output=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr.decode()
    (line,) = [json.loads(x) for p in (tmp_path / "out" / "lake").rglob("*.jsonl") for x in p.read_text().splitlines()]
    assert line["enrichment_status"]["geo_ip"]["state"] == "ok"
    assert line["enrichments"]["geo_ip"] == {
        "file_count": 1, "largest_file_bytes": line["alert"]["files"][0]["size"], "large_files": 0, "user_domain": "contoso.com", "watched_domain": True,
    }


def test_names_and_refusals(tmp_path):
    assert names("geo_ip") == {"name": "geo_ip", "package": "dlp_enricher_geo_ip", "dist": "dlp-enricher-geo-ip", "cls": "GeoIpEnricher", "camel": "GeoIp"}
    for bad in ("Geo", "1geo", "geo-ip", "class", "g", "geo_"):
        with pytest.raises(ScaffoldError):
            names(bad)
    generate("hr_lookup", tmp_path)
    with pytest.raises(ScaffoldError, match="already exists"):
        generate("hr_lookup", tmp_path)
    result = run_cli("new-enricher", "Bad-Name", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.decode().startswith("error: enricher name 'Bad-Name'")
