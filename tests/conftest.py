"""Fixtures and hooks only; the constants and builders tests share live in tests/support."""

from __future__ import annotations

import pytest

from tests.support.config import load_toml
from tests.support.itsm_servers import Jira, ServiceNow
from tests.support.paths import FIXTURES

# The plugin-author fixtures (dlp_alert, run_enricher, ...), which an installed dlp-pipeline registers
# through its pytest11 entry point; named here so that a plain checkout gets them too.
pytest_plugins = ["pipeline.plugin_kit.pytest_plugin"]


def pytest_collection_modifyitems(items):
    """A test that uses the suite's Azurite is an integration test even where its file forgot the mark."""
    for item in items:
        if "azurite" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def fixture_bytes():
    def read(name: str) -> bytes:
        return (FIXTURES / name).read_bytes()

    return read


@pytest.fixture
def write_config(tmp_path):
    """Write a TOML config into tmp_path and load it (data dir = tmp_path/out)."""

    def write(body: str, *, name: str = "pipeline.toml"):
        return load_toml(tmp_path, body, name=name)

    return write


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


@pytest.fixture
def snow(httpserver, monkeypatch):
    """The local ServiceNow Table API, installed on the test's HTTP server (credentials in the environment)."""
    monkeypatch.setenv("TEST_SNOW_PASSWORD", "pw-test")
    monkeypatch.setenv("TEST_SNOW_SECRET", "cs-test")
    server = ServiceNow()
    server.install(httpserver)
    return server


@pytest.fixture
def jira(httpserver, monkeypatch):
    """The local Jira Cloud REST API, installed on the test's HTTP server."""
    monkeypatch.setenv("TEST_JIRA_TOKEN", "jira-token-test")
    server = Jira()
    server.install(httpserver)
    return server
