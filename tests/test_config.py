from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError


def test_default_config_is_valid():
    loaded = load_config()
    assert loaded.file.name == "pipeline.toml" and loaded.config.sinks


def test_env_substitution_with_default_and_missing(tmp_path, monkeypatch):
    path = tmp_path / "c.toml"
    path.write_text('data_dir = "${DLP_TEST_DIR}"\n[state]\npath = "${DLP_TEST_STATE:-fallback.sqlite}"\n')
    monkeypatch.setenv("DLP_TEST_DIR", str(tmp_path / "data"))
    loaded = load_config(path)
    assert loaded.data_dir == tmp_path / "data" and loaded.config.state.path == "fallback.sqlite"
    monkeypatch.delenv("DLP_TEST_DIR")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}, key 'data_dir': environment variable DLP_TEST_DIR is not set"


@pytest.mark.parametrize("body,key,needle", [
    ("[runner]\nmax_concurent_alerts = 3\n", "runner.max_concurent_alerts", "unknown key"),
    ("[runner]\nmax_concurrent_alerts = 0\n", "runner.max_concurrent_alerts", "greater than or equal to 1"),
    ('[[sinks]]\nname = "l"\nkind = "jsonl"\n[sinks.when]\nseverity_at_least = "severe"\n', "sinks[0].when.severity_at_least", "Input should be"),
    ('[[enrichers]]\nname = "x"\ntimeout_seconds = -1\n', "enrichers[0].timeout_seconds", "greater than 0"),
])
def test_bad_values_name_the_file_and_the_key(tmp_path, body, key, needle):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert f"bad.toml, key '{key}'" in str(caught.value) and needle in str(caught.value)


@pytest.mark.parametrize("body,expected", [
    # a typo: the key it most likely meant
    ("[runner]\nmax_concurent_alerts = 3\n", "key 'runner.max_concurent_alerts': unknown key; did you mean 'max_concurrent_alerts'?"),
    ("[assembly]\nsettle_secondz = 3\n", "key 'assembly.settle_secondz': unknown key; did you mean 'settle_seconds'?"),
    # inside a list of tables, and at the top level
    ('[[sinks]]\nname = "l"\nkind = "jsonl"\nenabeld = false\n', "key 'sinks[0].enabeld': unknown key; did you mean 'enabled'?"),
    ('dat_dir = "x"\n', "key 'dat_dir': unknown key; did you mean 'data_dir'?"),
    # nothing close: the keys the table has
    ("[dead_letter]\ncolour = 1\n", "key 'dead_letter.colour': unknown key; the keys of 'dead_letter': account_url, connection_string_env, container, kind, path"),
    ("colour = 1\n", "key 'colour': unknown key; the top-level keys: assembly, consumer, data_dir, "),
])
def test_an_unknown_key_says_which_keys_the_table_has(tmp_path, body, expected):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert expected in str(caught.value)


def test_invalid_toml_and_missing_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[runner\n")
    with pytest.raises(ConfigError, match="broken.toml: not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="missing.toml: cannot read config file"):
        load_config(tmp_path / "missing.toml")
