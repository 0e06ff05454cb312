from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pipeline.config import load_config

# The plugin-author fixtures (dlp_alert, run_enricher, ...), which an installed dlp-pipeline registers
# through its pytest11 entry point; named here so that a plain checkout gets them too.
pytest_plugins = ["pipeline.plugin_kit.pytest_plugin"]

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "formats"
SAMPLES = ROOT / "pipeline" / "samples" / "messages"

# Test card numbers and context strings present in the shared samples' DetectedValues.
MATCHED_VALUES = ("4111 1111 1111 1111", "5555 5555 5555 4444", "SYNTHETIC TEST DATA", "card on file")


@pytest.fixture
def fixture_bytes():
    def read(name: str) -> bytes:
        return (FIXTURES / name).read_bytes()

    return read


@pytest.fixture
def write_config(tmp_path):
    """Write a TOML config into tmp_path and load it (data dir = tmp_path/out)."""

    def write(body: str, *, name: str = "pipeline.toml"):
        path = tmp_path / name
        path.write_text(textwrap.dedent(body))
        return load_config(path, data_dir=tmp_path / "out")

    return write


LAKE_ONLY = """
[assembly]
settle_seconds = 0

[[sinks]]
name = "lake"
kind = "jsonl"
[sinks.settings]
fsync = false
"""


@pytest.fixture(scope="session")
def azurite():
    """A running Azurite for the whole session (see tests/support/azurite.py)."""
    from tests.support.azurite import AzuriteDocker, AzuriteNpm, azurite_program, docker_available

    if docker_available():
        server = AzuriteDocker()
    else:
        program = azurite_program()
        if program is None:
            pytest.fail("Azurite is needed: no Docker engine and no `azurite` program; run `make setup-dev` (npm install azurite)")
        server = AzuriteNpm(program)
    try:
        yield server.start()
    finally:
        server.stop()
