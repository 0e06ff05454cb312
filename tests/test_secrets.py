"""Secrets only from the environment (app settings, possibly Key Vault references); never in the config file, never echoed."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
from pydantic import SecretStr

from pipeline.config import load_config
from pipeline.enricher import BaseEnricher
from pipeline.errors import ConfigError
from pipeline.runner import Runner
from pipeline.secrets import check_config_secrets, is_secret_key, secret_from_env
from tests.conftest import ROOT

SECRET = "S3cr3t-Value-4711"  # must never appear in an error message or a log line


class SecretEnricher(BaseEnricher):
    """An enricher with secret settings, as a plugin author writes one (loaded as tests.test_secrets:SecretEnricher)."""

    name = "secret_enricher"

    class Settings(BaseEnricher.Settings):
        api_key: SecretStr | None = None
        authorization: SecretStr | None = None
        password_env: str | None = None
        endpoint: str = "https://api.example.invalid"
        retries: int = 1
        project_key: str | None = None

    async def enrich(self, alert, ctx):
        return None


def config(tmp_path, settings: str, *, name: str = "pipeline.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(f"""
        [[enrichers]]
        name = "secret_enricher"
        use = "tests.test_secrets:SecretEnricher"
        [enrichers.settings]
        {settings}

        [[sinks]]
        name = "lake"
        kind = "jsonl"
        """))
    return path


@pytest.mark.parametrize("line", [
    f'api_key = "{SECRET}"',
    f'authorization = "Bearer {SECRET}"',
    'api_key = "${API_KEY:-' + SECRET + '}"',  # a default is a literal secret too
    f'api_key = "x${{API_KEY}}{SECRET}"',
    "api_key = 4711",
])
def test_a_secret_written_in_the_config_is_refused_naming_file_and_key(tmp_path, line, monkeypatch):
    monkeypatch.setenv("API_KEY", "from-the-environment")
    path = config(tmp_path, line)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    key = line.split(" ")[0]
    assert message.startswith(f"{path}, key 'enrichers[0].settings.{key}': ")
    assert "${ENV_VAR}" in message and "Key Vault" in message
    assert SECRET not in message and "4711" not in message


@pytest.mark.parametrize("name", [
    "password", "Password", "client_secret", "clientSecret", "api_key", "apiKey", "api-key", "token", "access_token", "sas_token",
    "sas", "connection_string", "ConnectionString", "hmac_key", "storage_account_key", "private_key", "credentials", "authorization",
])
def test_secret_like_names(name):
    assert is_secret_key(name)
    with pytest.raises(ConfigError) as caught:
        check_config_secrets({"sinks": [{"settings": {name: SECRET}}]}, file="c.toml")
    assert caught.value.key == f"sinks[0].settings.{name}" and SECRET not in str(caught.value)


@pytest.mark.parametrize("name", ["password_env", "project_key", "partition_key", "key", "token_url", "max_tokens", "keyvault_url", "endpoint", "kind"])
def test_names_that_are_not_secrets(name):
    assert not is_secret_key(name)


def test_a_secret_table_is_checked_key_by_key():
    with pytest.raises(ConfigError, match=r"key 'sinks\[0\]\.settings\.credentials\.client_id'"):
        check_config_secrets({"sinks": [{"settings": {"credentials": {"client_id": "abc"}}}]}, file="c.toml")
    check_config_secrets({"sinks": [{"settings": {"credentials": {"client_id": "${CLIENT_ID}", "enabled": True}}}]}, file="c.toml")


@pytest.mark.parametrize("value,what", [
    ("DefaultEndpointsProtocol=https;AccountName=a;AccountKey=" + SECRET + ";EndpointSuffix=core.windows.net", "connection string"),
    ("Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey=" + SECRET, "connection string"),
    ("https://acct.blob.core.windows.net/lake?sv=2022-11-02&sp=racwl&sig=" + SECRET, "SAS signature"),
    ("https://svc:" + SECRET + "@instance.service-now.com/api", "URL with a password"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIE" + SECRET, "private key"),
    ("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.sig" + SECRET, "JSON Web Token"),
    ("@Microsoft.KeyVault(SecretUri=https://v.vault.azure.net/secrets/x/)", "Key Vault reference"),
    ("${URL:-https://acct.blob.core.windows.net/c?sig=" + SECRET + "}", "SAS signature"),
])
def test_credentials_embedded_in_any_value_are_refused(tmp_path, value, what):
    path = config(tmp_path, f"endpoint = {value!r}".replace("\n", "\\n") if "\n" in value else f'endpoint = "{value}"')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "key 'enrichers[0].settings.endpoint'" in str(caught.value) and what in str(caught.value)
    assert SECRET not in str(caught.value)


def test_references_and_env_names_are_accepted_and_resolved_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("API_KEY", SECRET)
    monkeypatch.setenv("AUTH_TOKEN", SECRET)
    path = config(tmp_path, '''api_key = "${API_KEY}"
        authorization = "Bearer ${AUTH_TOKEN}"
        password_env = "SN_PASSWORD"
        project_key = "SEC"''')
    loaded = load_config(path, data_dir=tmp_path / "out")
    runner = Runner(loaded)
    plugin = runner.chain.slots[0].plugin
    assert plugin.settings.api_key.get_secret_value() == SECRET
    assert SECRET not in repr(plugin.settings) and SECRET not in str(plugin.settings)  # SecretStr never prints
    import asyncio

    asyncio.run(runner.aclose())


def test_a_secret_from_the_environment_may_look_like_anything(tmp_path, monkeypatch):
    # The check runs on the raw file: a connection string that comes from the environment is fine.
    monkeypatch.setenv("CONN", "Endpoint=sb://ns/;SharedAccessKeyName=a;SharedAccessKey=" + SECRET)
    path = config(tmp_path, 'endpoint = "${CONN}"')
    assert load_config(path).config.enrichers[0].settings["endpoint"].endswith(SECRET)


def test_other_env_suffixed_keys_are_ordinary_settings():
    check_config_secrets({"sinks": [{"settings": {"target_env": "prod-eu", "azure_env": "AzureUSGovernment"}}]}, file="c.toml")
    assert check_config_secrets({"x": {"api_key_env": "K", "hmac_key_env": "H"}}, file="c.toml") == {"K", "H"}


def test_env_names_must_be_names(tmp_path):
    path = config(tmp_path, f'password_env = "{SECRET}!"')
    with pytest.raises(ConfigError, match=r"key 'enrichers\[0\]\.settings\.password_env': a \*_env key names an environment variable") as caught:
        load_config(path)
    assert SECRET not in str(caught.value)


def test_an_unresolved_key_vault_reference_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("API_KEY", "@Microsoft.KeyVault(SecretUri=https://v.vault.azure.net/secrets/api-key/)")
    path = config(tmp_path, 'api_key = "${API_KEY}"')
    with pytest.raises(ConfigError, match=r"key 'enrichers\[0\]\.settings\.api_key': environment variable API_KEY holds an unresolved Key Vault reference: check that the app's managed identity"):
        load_config(path)
    with pytest.raises(ConfigError, match="unresolved Key Vault reference"):
        secret_from_env("API_KEY")


def test_secret_from_env(monkeypatch):
    monkeypatch.setenv("SN_PASSWORD", SECRET)
    value = secret_from_env("SN_PASSWORD")
    assert value.get_secret_value() == SECRET and SECRET not in repr(value) and SECRET not in f"{value}"
    monkeypatch.delenv("SN_PASSWORD")
    with pytest.raises(ConfigError, match="environment variable SN_PASSWORD is not set"):
        secret_from_env("SN_PASSWORD")


@pytest.mark.parametrize("settings,table", [
    ('retries = "${API_KEY}"', ""),  # a secret substituted where a number is expected
    ('retries = "${API_KEY}"\nunknown = "${API_KEY}"', ""),
    ("", '[runner]\nmax_concurrent_alerts = "${API_KEY}"\n'),
    ("", '[state]\nkind = "${API_KEY}"\n'),
    ("", '[[sinks]]\nname = "x"\nkind = "jsonl"\n[sinks.settings]\nfsync = "${API_KEY}"\n'),
])
def test_config_errors_never_echo_a_value(tmp_path, monkeypatch, settings, table):
    monkeypatch.setenv("API_KEY", SECRET)
    path = config(tmp_path, settings)
    path.write_text(path.read_text() + table)
    with pytest.raises(ConfigError) as caught:
        Runner(load_config(path, data_dir=tmp_path / "out"))
    assert str(caught.value).startswith(str(path)) and SECRET not in str(caught.value)


def test_the_cli_never_prints_a_secret(tmp_path):
    path = config(tmp_path, 'api_key = "${API_KEY}"\nretries = "${API_KEY}"')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "API_KEY": SECRET}
    for args in (["run", "--config", str(path)], ["-vv", "validate", "--config", str(path)]):
        result = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=tmp_path, env=env, capture_output=True, timeout=60)
        assert result.returncode == 2
        assert b"key 'enrichers[0].settings.retries'" in result.stderr
        assert SECRET.encode() not in result.stdout + result.stderr


def test_no_secret_in_logs_of_a_run(tmp_path, monkeypatch, caplog, fixture_bytes):
    import asyncio

    from pipeline.runner import Message

    monkeypatch.setenv("API_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    loaded = load_config(config(tmp_path, 'api_key = "${API_KEY}"'), data_dir=tmp_path / "out")

    async def run():
        async with Runner(loaded) as runner:
            await runner.process_batch([Message(fixture_bytes("graph_alert_v2_dlp.json")), Message(b"garbage")])

    asyncio.run(run())
    assert caplog.records and SECRET not in caplog.text


def test_secret_values_are_redacted_from_every_log_line_third_party_included(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("API_KEY", SECRET)
    monkeypatch.setenv("SN_PASSWORD", "pw-" + SECRET[::-1])
    caplog.set_level(logging.INFO)
    loaded = load_config(config(tmp_path, 'api_key = "${API_KEY}"\npassword_env = "SN_PASSWORD"'), data_dir=tmp_path / "out")
    assert loaded.secret_env_names == {"API_KEY", "SN_PASSWORD"}
    runner = Runner(loaded)
    logging.getLogger("httpx").info('HTTP Request: GET https://api.example.invalid/v1?key=%s "HTTP/1.1 200 OK"', SECRET)
    try:
        raise RuntimeError(f"auth failed with pw-{SECRET[::-1]}")
    except RuntimeError:
        logging.getLogger("some.plugin").exception("call failed")
    second = Runner(loaded)  # a second runner replaces the filter instead of stacking another
    assert sum(1 for h in logging.getLogger().handlers for f in h.filters if type(f).__name__ == "RedactSecrets") == len(logging.getLogger().handlers)
    text = "\n".join(caplog.handler.format(r) for r in caplog.records)
    assert "key=[redacted]" in text and "auth failed with [redacted]" in text
    assert SECRET not in text and SECRET[::-1] not in text
    import asyncio

    asyncio.run(runner.aclose())
    asyncio.run(second.aclose())


def test_a_table_of_environment_variable_names_is_not_a_secret(tmp_path):
    """`headers_from_env = { Authorization = "OKTA_AUTH" }` names a variable; a literal header value is refused."""
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    ok = tmp_path / "ok.toml"
    ok.write_text('[[enrichers]]\nname = "telemetry"\n[[enrichers.settings.http]]\nname = "idp"\nurl = "https://idp.example/x"\n'
                  'allowed_hosts = ["idp.example"]\nheaders_from_env = { Authorization = "OKTA_AUTH" }\n')
    load_config(ok)
    bad = tmp_path / "bad.toml"
    bad.write_text(ok.read_text().replace('"OKTA_AUTH"', '"SSWS 00abcdefghijklmnop"'))
    with pytest.raises(ConfigError) as caught:
        load_config(bad)
    assert "headers_from_env.Authorization" in str(caught.value) and "SSWS" not in str(caught.value)
