"""Packaging: the wheel ships every file the pipeline reads, the installed `dlp-pipeline` command runs
the bundled samples from any folder, and built-in and third-party plugins resolve through one path
(entry points), with the built-in tables standing in where the project is not pip-installed."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from importlib.metadata import distributions
from pathlib import Path

import pytest

from pipeline.config import LoadedConfig, PipelineConfig
from pipeline.errors import ConfigError
from pipeline.plugins import (
    BUILTIN_FALLBACK,
    DISTRIBUTION,
    ENRICHER_GROUP,
    SINK_GROUP,
    builtin_enrichers,
    builtin_sinks,
    load_plugin_class,
    provider,
    registered,
)
from tests.plugin_kit.test_plugin_scaffold import COPY_IGNORE
from tests.plugins import NeedsA, Recorder
from tests.support.paths import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_pyproject_entry_points_are_the_builtin_tables():
    tables = PYPROJECT["project"]["entry-points"]
    assert tables[ENRICHER_GROUP] == builtin_enrichers()
    assert tables[SINK_GROUP] == builtin_sinks()
    assert PYPROJECT["project"]["name"] == DISTRIBUTION


def _without_own_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    """sys.path minus every folder holding an installed dlp-pipeline, as in the Function App's folder."""
    kept = [entry for entry in sys.path if not any(dist.metadata["Name"] == DISTRIBUTION for dist in distributions(path=[entry]))]
    monkeypatch.setattr(sys, "path", kept)


def _prepend_site(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Put ``folder`` first on sys.path for this test only.

    Not ``monkeypatch.syspath_prepend``: its undo restores the sys.path it first saw, which after
    ``_without_own_distribution`` is the trimmed one, and would leave site-packages off for the rest of the run.
    """
    monkeypatch.setattr(sys, "path", [str(folder), *sys.path])
    importlib.invalidate_caches()


def _fake_distribution(folder: Path, name: str, entry_points: str) -> Path:
    """A real (minimal) installed distribution: a .dist-info folder importlib.metadata reads."""
    info = folder / f"{name.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(entry_points, encoding="utf-8")
    return folder


def _config(tmp_path: Path) -> LoadedConfig:
    return LoadedConfig(PipelineConfig(), file=None, data_dir=tmp_path)


def test_builtins_resolve_from_their_tables_where_the_project_is_not_installed(tmp_path, monkeypatch):
    _without_own_distribution(monkeypatch)
    for group, table in ((ENRICHER_GROUP, builtin_enrichers()), (SINK_GROUP, builtin_sinks())):
        found = registered(group)
        assert {name: [entry.value for entry in entries] for name, entries in found.items() if name in table} == {name: [target] for name, target in table.items()}
        assert {provider(entries[0]) for name, entries in found.items() if name in table} == {BUILTIN_FALLBACK}
    from pipeline.deliver.sinks.jsonl_lake import JsonlLakeSink

    assert load_plugin_class("jsonl", group=SINK_GROUP, config=_config(tmp_path), key="sinks[0].kind") is JsonlLakeSink


def test_the_tables_are_only_a_fallback_once_the_distribution_registers_its_own(tmp_path, monkeypatch):
    _without_own_distribution(monkeypatch)
    site = _fake_distribution(tmp_path / "site", DISTRIBUTION, "[dlp_pipeline.sinks]\njsonl = pipeline.deliver.sinks.jsonl_lake:JsonlLakeSink\n")
    _prepend_site(monkeypatch, site)
    (entry,) = registered(SINK_GROUP)["jsonl"]
    assert provider(entry) == DISTRIBUTION
    assert "sentinel" not in registered(SINK_GROUP)  # its metadata is the one source, not the table
    with pytest.raises(ConfigError, match="unknown plugin 'sentinel'; available: jsonl"):
        load_plugin_class("sentinel", group=SINK_GROUP, config=_config(tmp_path), key="sinks[0].kind")
    # the enricher group has no entry of the distribution's own: its table still stands in
    assert set(builtin_enrichers()) <= set(registered(ENRICHER_GROUP))


def test_a_third_party_plugin_resolves_the_way_builtins_do_and_a_contested_name_is_refused(tmp_path, monkeypatch):
    site = _fake_distribution(
        tmp_path / "site", "dlp-enricher-recorder",
        "[dlp_pipeline.enrichers]\nrecorder = tests.plugins:Recorder\ntriage = tests.plugins:NeedsA\n",
    )
    _prepend_site(monkeypatch, site)
    config = _config(tmp_path)
    assert load_plugin_class("recorder", group=ENRICHER_GROUP, config=config, key="enrichers[0].name") is Recorder
    assert provider(registered(ENRICHER_GROUP)["recorder"][0]) == "dlp-enricher-recorder"
    with pytest.raises(ConfigError, match=r"plugin name 'triage' is registered by more than one package: .*dlp-enricher-recorder \(tests.plugins:NeedsA\)"):
        load_plugin_class("triage", group=ENRICHER_GROUP, config=config, key="enrichers[0].name")
    assert load_plugin_class("tests.plugins:NeedsA", group=ENRICHER_GROUP, config=config, key="enrichers[0].use") is NeedsA
    with pytest.raises(ConfigError, match="write it as module:Class"):
        load_plugin_class("tests.plugins:", group=ENRICHER_GROUP, config=config, key="enrichers[0].use")


def _package_data_on_disk() -> set[str]:
    """Every non-Python file of the shipped packages: what the code reads with importlib.resources."""
    found = set()
    for top in ("pipeline", "enrichers"):
        for path in (ROOT / top).rglob("*"):
            if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts:
                found.add(path.relative_to(ROOT).as_posix())
    return found


def test_every_data_file_of_the_packages_is_declared_as_package_data():
    """What the wheel test below proves by building, cheaply: each data file on disk (the bundled
    sensitive-type table among them) matches a `[tool.setuptools.package-data]` pattern."""
    declared = set()
    for package, patterns in PYPROJECT["tool"]["setuptools"]["package-data"].items():
        folder = ROOT.joinpath(*package.split("."))
        for pattern in patterns:
            declared |= {path.relative_to(ROOT).as_posix() for path in folder.glob(pattern) if path.is_file()}
    assert "enrichers/data/sensitive_types.csv" in _package_data_on_disk()
    assert _package_data_on_disk() <= declared, sorted(_package_data_on_disk() - declared)


@pytest.mark.integration
@pytest.mark.slow
def test_installed_command_runs_the_bundled_samples_from_any_folder(tmp_path):
    # 1. build a wheel from a copy of the checkout (no build files land in it); it holds every data file
    project = tmp_path / "project"
    shutil.copytree(ROOT, project, symlinks=True, ignore=shutil.ignore_patterns(*COPY_IGNORE))
    wheel_build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path / "dist"), str(project)],
        capture_output=True, timeout=300, check=False,
    )
    assert wheel_build.returncode == 0, wheel_build.stderr.decode()[-3000:]
    (wheel,) = (tmp_path / "dist").glob("dlp_pipeline-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = _package_data_on_disk()
    assert {"pipeline/samples/pipeline.toml", "pipeline/samples/azure.toml", "pipeline/samples/directory/users.json"} <= expected
    assert expected - shipped == set()

    # 2. a fresh venv that borrows this one's dependencies (a .pth), then the wheel without its deps
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    venv_site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True).stdout.strip())
    (venv_site / "_shared_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)], env=env, capture_output=True, timeout=300, check=False)
    assert install.returncode == 0, install.stderr.decode()[-3000:]
    command = str(venv / "bin" / "dlp-pipeline")

    # 3. from another folder: run, validate, --help, new-enricher
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def dlp_pipeline(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([command, *args], cwd=elsewhere, env=env, capture_output=True, timeout=180, check=False)

    run = dlp_pipeline("run", "--out", "out")
    assert run.returncode == 0, run.stderr.decode()
    records = [json.loads(line) for path in (elsewhere / "out" / "lake").rglob("*.jsonl") for line in path.read_text().splitlines()]
    assert len(records) == 8 and {r["alert"]["source_format"] for r in records} == {"defender_streaming", "graph_alert", "management_activity", "sentinel_alert"}

    validate = dlp_pipeline("validate")
    assert validate.returncode == 0, validate.stderr.decode()
    assert validate.stdout.decode().startswith(str(venv_site / "pipeline" / "samples" / "pipeline.toml") + ": ok (enrichers: ")

    help_text = dlp_pipeline("--help")
    assert help_text.returncode == 0 and help_text.stdout.decode().startswith("usage: dlp-pipeline ")
    assert dlp_pipeline("run", "--help").stdout.decode().startswith("usage: dlp-pipeline run ")

    scaffold = dlp_pipeline("new-enricher", "geo_ip", "--dir", "plugins")
    assert scaffold.returncode == 0, scaffold.stderr.decode()
    assert (elsewhere / "plugins" / "dlp-enricher-geo-ip" / "src" / "dlp_enricher_geo_ip" / "enricher.py").is_file()

    # 4. installed, every built-in comes from the distribution's own entry points, not the tables
    providers = subprocess.run(
        [python, "-c", (
            "import json; from pipeline.plugins import ENRICHER_GROUP, SINK_GROUP, provider, registered;"
            "print(json.dumps({g: {n: provider(e[0]) for n, e in registered(g).items()} for g in (ENRICHER_GROUP, SINK_GROUP)}))"
        )],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert providers.returncode == 0, providers.stderr
    assert json.loads(providers.stdout) == {
        ENRICHER_GROUP: {name: DISTRIBUTION for name in builtin_enrichers()},
        SINK_GROUP: {name: DISTRIBUTION for name in builtin_sinks()},
    }
