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
from pipeline.enrich.contract import BaseEnricher
from pipeline.errors import ConfigError
from pipeline.runner import Runner
from pipeline.secrets import SecretEnv, SecretNotSet, check_config_secrets, is_secret_key, secret_from_env
from tests.support.paths import ROOT

SECRET = "S3cr3t-Value-4711"  # must never appear in an error message or a log line


class SecretEnricher(BaseEnricher):
    """An enricher with secret settings, as a plugin author writes one (loaded as tests.test_secrets:SecretEnricher)."""

    name = "secret_enricher"

    class Settings(BaseEnricher.Settings):
        api_key_env: SecretEnv | None = None
        authorization_env: SecretEnv | None = None
        password_env: SecretEnv | None = None
        endpoint: str = "https://api.example.invalid"
        retries: int = 1
        project_key: str | None = None

    def __init__(self, settings=None, services=None) -> None:
        super().__init__(settings, services)
        self.api_key: SecretStr | None = self.settings.api_key_env.resolve() if self.settings.api_key_env else None

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
    'api_key = "${API_KEY}"',  # a reference too: there is one way, api_key_env
    'authorization = "Bearer ${AUTH_TOKEN}"',
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
    assert f"secrets are not written in the config; name the environment variable that holds it: {key}_env = " in message
    assert "Key Vault" in message
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
    with pytest.raises(ConfigError, match=r"key 'sinks\[0\]\.settings\.credentials\.client_id'.*client_id_env = \"CLIENT_ID\""):
        check_config_secrets({"sinks": [{"settings": {"credentials": {"client_id": "${CLIENT_ID}"}}}]}, file="c.toml")
    names = check_config_secrets({"sinks": [{"settings": {"credentials": {"client_id_env": "CLIENT_ID", "enabled": True}}}]}, file="c.toml")
    assert names == {"CLIENT_ID"}


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
    path = config(tmp_path, '''api_key_env = "API_KEY"
        authorization_env = "AUTH_TOKEN"
        password_env = "SN_PASSWORD"
        project_key = "SEC"''')
    loaded = load_config(path, data_dir=tmp_path / "out")
    runner = Runner(loaded)
    plugin = runner.chain.slots[0].plugin
    assert plugin.api_key.get_secret_value() == SECRET
    assert plugin.settings.authorization_env.resolve().get_secret_value() == SECRET
    assert SECRET not in repr(plugin.settings) and SECRET not in str(plugin.settings) and SECRET not in repr(plugin.api_key)
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
    path = config(tmp_path, 'endpoint = "${API_KEY}"')
    with pytest.raises(ConfigError, match=r"key 'enrichers\[0\]\.settings\.endpoint': environment variable API_KEY holds an unresolved Key Vault reference: check that the app's managed identity"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"key 'enrichers\[0\]\.settings': SecretEnricher cannot start: api_key_env: environment variable API_KEY holds an unresolved Key Vault reference: check that the app's managed identity"):
        Runner(load_config(config(tmp_path, 'api_key_env = "API_KEY"'), data_dir=tmp_path / "out"))
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
    path = config(tmp_path, 'api_key_env = "API_KEY"\nretries = "${API_KEY}"')
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
    loaded = load_config(config(tmp_path, 'api_key_env = "API_KEY"'), data_dir=tmp_path / "out")

    async def run():
        async with Runner(loaded) as runner:
            await runner.process_batch([Message(fixture_bytes("graph_alert_v2_dlp.json")), Message(b"garbage")])

    asyncio.run(run())
    assert caplog.records and SECRET not in caplog.text


def test_secret_values_are_redacted_from_every_log_line_third_party_included(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("API_KEY", SECRET)
    monkeypatch.setenv("SN_PASSWORD", "pw-" + SECRET[::-1])
    caplog.set_level(logging.INFO)
    loaded = load_config(config(tmp_path, 'api_key_env = "API_KEY"\npassword_env = "SN_PASSWORD"'), data_dir=tmp_path / "out")
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


# One way to name a secret: a `<what>_env` setting that names the environment variable (docs/security.md, Secrets).

def test_a_reference_under_a_sink_secret_key_names_the_env_setting_to_write(tmp_path, monkeypatch):
    """The mistake the README once taught: `password = "${SERVICENOW_PASSWORD}"` for the ServiceNow sink."""
    monkeypatch.setenv("SERVICENOW_PASSWORD", SECRET)
    path = tmp_path / "pipeline.toml"
    path.write_text('[[sinks]]\nname = "servicenow"\nkind = "servicenow"\n[sinks.settings]\ninstance_url = "https://x.service-now.com"\n'
                    'username = "svc"\npassword = "${SERVICENOW_PASSWORD}"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(
        f"{path}, key 'sinks[0].settings.password': secrets are not written in the config; "
        'name the environment variable that holds it: password_env = "SERVICENOW_PASSWORD"'
    )
    assert SECRET not in str(caught.value)
    path.write_text(path.read_text().replace('password = "${SERVICENOW_PASSWORD}"', 'password_env = "SERVICENOW_PASSWORD"'))
    runner = Runner(load_config(path, data_dir=tmp_path / "out"))  # the way the message names is the way the sink takes
    import asyncio

    asyncio.run(runner.aclose())


def _readme_toml_blocks() -> list[str]:
    import re

    return re.findall(r"```toml\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)


def _plugin_class(reference: str) -> type:
    import importlib

    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


def test_every_readme_example_config_names_its_secrets_the_one_way(tmp_path, monkeypatch):
    """Each TOML example of the README passes the secrets check and its plugin's own Settings model."""
    import re
    import tomllib

    from pipeline.plugins import builtin_enrichers, builtin_sinks

    blocks = _readme_toml_blocks()
    assert any("password_env" in block for block in blocks) and any("api_token_env" in block for block in blocks)
    for block in blocks:
        for name in set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", block)):
            monkeypatch.setenv(name, "dcr-0000" if name.endswith("_ID") else "https://example.invalid" if name.endswith(("_URL", "_ENDPOINT")) else "ns.servicebus.windows.net")
        path = tmp_path / "pipeline.toml"
        path.write_text(block)
        loaded = load_config(path)  # check_config_secrets runs here
        for entry in loaded.config.enrichers:
            _plugin_class(builtin_enrichers()[entry.use or entry.name]).Settings.model_validate(entry.settings)
        for entry in (sink for sink in loaded.config.sinks if sink.settings):  # one block only shows `fields` and `when`
            _plugin_class(builtin_sinks()[entry.kind]).Settings.model_validate(entry.settings)
    assert not tomllib.loads(blocks[-1]) == {}


def test_a_number_under_a_category_word_is_a_weight_not_a_secret():
    check_config_secrets({"enrichers": [{"settings": {"weights": {"credentials": 20}}}]}, file="c.toml")
    with pytest.raises(ConfigError, match="secrets are not written in the config"):
        check_config_secrets({"enrichers": [{"settings": {"weights": {"credentials": "20"}}}]}, file="c.toml")


def _settings_models() -> dict[str, type]:
    """Every Settings model of the built-in enrichers and sinks, plus the pipeline's own config."""
    from pipeline.config import PipelineConfig
    from pipeline.plugins import builtin_enrichers, builtin_sinks

    models: dict[str, type] = {"pipeline config": PipelineConfig}
    for name, reference in {**builtin_enrichers(), **builtin_sinks()}.items():
        models[name] = _plugin_class(reference).Settings
    return models


def _walk_fields(model: type, prefix: str, seen: set[type]):
    """(dotted field name, names SecretEnv) of a model and of every model nested in its fields."""
    from typing import get_args

    from pydantic import BaseModel

    if model in seen:
        return
    seen.add(model)
    for field_name, field in model.model_fields.items():
        pending, kinds = [field.annotation], []
        while pending:
            annotation = pending.pop()
            kinds.append(annotation)
            pending.extend(get_args(annotation))
        yield f"{prefix}{field_name}", field_name, kinds
        for kind in kinds:
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                yield from _walk_fields(kind, f"{prefix}{field_name}.", seen)


def test_every_built_in_secret_setting_is_an_env_name():
    """No built-in setting takes a secret's value; every one that names a secret variable ends in `_env` and is a SecretEnv."""
    from pipeline.secrets import normalised

    found = []
    for owner, model in _settings_models().items():
        for dotted, name, kinds in _walk_fields(model, f"{owner}: ", set()):
            names_secret = SecretEnv in kinds
            if is_secret_key(name):  # only a number may sit under a secret word (triage's weights.credentials)
                assert not {str, SecretStr} & set(kinds), f"{dotted} takes a secret's value; name it {name}_env and type it SecretEnv"
            assert SecretStr not in kinds, f"{dotted} is a SecretStr; take a SecretEnv `<what>_env` setting instead"
            if names_secret:
                assert normalised(name).endswith("_env"), f"{dotted} names a secret variable; its name must end in _env"
                found.append(dotted)
            elif normalised(name).endswith("_env"):
                stem = normalised(name)[: -len("_env")]
                assert not is_secret_key(stem), f"{dotted} names a secret variable; type it SecretEnv"
    assert {"servicenow: password_env", "servicenow: client_secret_env", "jira: api_token_env", "blob: connection_string_env",
            "eventhub: connection_string_env", "pipeline config: sinks.pseudonymise.key_env", "telemetry: http.headers_from_env"} <= set(found)


def test_secret_env_takes_only_a_variable_name_and_resolves_it(monkeypatch):
    from pydantic import BaseModel, ValidationError

    class Settings(BaseModel):
        password_env: SecretEnv

    with pytest.raises(ValidationError, match="names an environment variable") as caught:
        Settings(password_env=SECRET + "!")
    assert SECRET not in str(caught.value.errors(include_input=False))
    settings = Settings(password_env="SN_PASSWORD")
    assert settings.password_env == "SN_PASSWORD" and settings.model_dump() == {"password_env": "SN_PASSWORD"}
    monkeypatch.delenv("SN_PASSWORD", raising=False)
    with pytest.raises(SecretNotSet, match="^password_env: environment variable SN_PASSWORD is not set$"):
        settings.password_env.resolve()
    monkeypatch.setenv("SN_PASSWORD", SECRET)
    value = settings.password_env.resolve()
    assert value.get_secret_value() == SECRET and SECRET not in repr(value)


def test_pseudonymisation_key_is_redacted_too(tmp_path):
    path = tmp_path / "pipeline.toml"
    path.write_text('[[sinks]]\nname = "lake"\nkind = "jsonl"\npseudonymise = { key_env = "LAKE_PSEUDONYM_KEY" }\n')
    assert "LAKE_PSEUDONYM_KEY" in load_config(path).secret_env_names
