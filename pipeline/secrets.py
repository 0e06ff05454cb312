"""Secrets come from the environment only: never written in the config file, never logged.

The one way (docs/security.md, "Secrets"): a setting that needs a secret is named `<what>_env` and
its value is the NAME of the environment variable that holds the secret:

    password_env = "SNOW_PASSWORD"          # not password = "..." and not password = "${SNOW_PASSWORD}"

The variable is an app setting of the Functions app, whose value may be a Key Vault reference
`@Microsoft.KeyVault(SecretUri=https://<vault>.vault.azure.net/secrets/<name>/)`: the platform
resolves it with the app's managed identity before the worker starts. A plugin declares such a
setting with the `SecretEnv` type and reads the secret with `settings.password_env.resolve()`.

`check_config_secrets` runs on the raw TOML document, before `${...}` substitution, over every
table including plugin `settings`. It refuses, with a ConfigError naming the file and the key and
never the value:
- any value but a boolean under a secret-like key name (`is_secret_key`), a `${NAME}` reference
  included; the message names the `<key>_env` setting to write instead;
- under any key, a value that embeds a credential: a connection string with AccountKey /
  SharedAccessKey / SharedAccessSignature / Password, a URL with a SAS `sig=` or a password, a
  private key, a JSON Web Token;
- a Key Vault reference written in the config file: only app settings are resolved by the platform.
- a `<secret name>_env` key (`password_env`, `api_key_env`) whose value is not the name of an
  environment variable.

`install_log_redaction` (called when a Runner is built) adds a filter to the root logger's handlers
that replaces the values of those variables with `[redacted]` in every record, whoever logs it.

`check_resolved` runs on every substituted variable and every resolved `SecretEnv`: a value still
starting with `@Microsoft.KeyVault(` means the platform could not resolve the reference (identity,
access policy / RBAC, network rules or syntax); starting with it would send the reference as a password.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from pydantic import GetCoreSchemaHandler, SecretStr
from pydantic_core import core_schema

from pipeline.errors import ConfigError

# Last word of a key name (snake_case, camelCase and kebab-case are normalised) that marks a secret.
SECRET_WORDS = frozenset(
    {"secret", "password", "passwd", "pwd", "passphrase", "token", "apikey", "credential", "credentials", "sas", "signature", "authorization"}
)
# Whole key names that mark a secret besides the words above (`<anything>_key` too, see below).
SECRET_SUFFIXES = ("connection_string", "connectionstring", "conn_str", "sas_token", "private_key", "api_key", "access_key")
# `<anything>_key` names that are identifiers, not secrets.
NOT_SECRET_KEYS = frozenset(
    {
        "key", "partition_key", "row_key", "sort_key", "idempotency_key", "dedup_key", "dedupe_key", "correlation_key",
        "cache_key", "lookup_key", "join_key", "match_key", "group_key", "project_key", "issue_key",
    }
)

_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
KEY_VAULT_REFERENCE = re.compile(r"^\s*@Microsoft\.KeyVault\(", re.IGNORECASE)
_EMBEDDED: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?i)(^|;)\s*(AccountKey|SharedAccessKey|SharedAccessSignature|Password|Pwd)\s*="), "a connection string with a key or password"),
    (re.compile(r"(?i)[?&]sig="), "a URL with a SAS signature (sig=)"),
    (re.compile(r"(?i)^[a-z][a-z0-9+.-]*://[^/?#@\s:]+:[^/?#@\s]+@"), "a URL with a password"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\."), "a JSON Web Token"),
)
HOW = "set it as an app setting (its value may be a Key Vault reference @Microsoft.KeyVault(SecretUri=...)); see docs/security.md, Secrets"


def how_to_name(key: str, variable: str | None = None) -> str:
    """What to write instead of a secret under `key`: `password_env = "PASSWORD"`, then where the value goes."""
    variable = variable or normalised(key).upper() or "ENV_VAR"
    return f'name the environment variable that holds it: {key}_env = "{variable}", and {HOW}'


def normalised(key: str) -> str:
    """`clientSecret`, `client-secret`, `Client.Secret` → `client_secret`."""
    return re.sub(r"[^a-z0-9]+", "_", _CAMEL.sub("_", key).lower()).strip("_")


def is_secret_key(key: str) -> bool:
    name = normalised(key)
    if name in NOT_SECRET_KEYS or name.endswith("_env"):
        return False
    words = name.split("_")
    return words[-1] in SECRET_WORDS or name.endswith(SECRET_SUFFIXES) or (len(words) > 1 and words[-1] == "key")


def check_config_secrets(document: Any, *, file: str) -> frozenset[str]:
    """Refuse secrets written in the config file (see the module docstring). Never echoes a value.

    Returns the names of the environment variables that hold secrets (referenced under secret-like
    keys, or named by `*_env` keys), for `install_log_redaction`.
    """
    from pipeline.config import key_path

    names: set[str] = set()
    # (location, value, under a secret-like key, inside a `*_env` table such as headers_from_env)
    stack: list[tuple[tuple[Any, ...], Any, bool, bool]] = [((), document, False, False)]
    while stack:
        location, value, secret, env_table = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                names_env = env_table or (isinstance(key, str) and isinstance(item, dict) and normalised(key).endswith("_env"))
                stack.append(((*location, key), item, secret or (not names_env and isinstance(key, str) and is_secret_key(key)), names_env))
            continue
        if isinstance(value, list):
            stack.extend(((*location, index), item, secret, False) for index, item in enumerate(value))
            continue
        key = key_path(location)
        name = next((part for part in reversed(location) if isinstance(part, str)), "")
        # Inside a secret-like table (`credentials = { client_secret_env = "..." }`) every `*_env` key names a variable.
        names_variable = _names_a_secret_variable(name) or (secret and normalised(name).endswith("_env"))
        if env_table or (names_variable and not isinstance(value, bool)):
            # `headers_from_env = { Authorization = "OKTA_AUTH" }`: the values name variables.
            if not isinstance(value, str) or not _ENV_NAME.match(value):
                raise ConfigError("a *_env key names an environment variable (letters, digits, _), not a value", file=file, key=key)
            names.add(value)
            continue
        if isinstance(value, str):
            problem = _embedded_credential(value)
            if problem:
                raise ConfigError(f"holds {problem}: secrets must not be written in the config file; {HOW}", file=file, key=key)
        if secret and not isinstance(value, bool) and not _a_count(name, value):
            reference = _REFERENCE.fullmatch(value.strip()) if isinstance(value, str) else None
            variable = reference.group(1) if reference and reference.group(2) is None else None
            raise ConfigError(f"secrets are not written in the config; {how_to_name(name, variable)}", file=file, key=key)
    return frozenset(names)


# Category words that are also secret words: a number under them counts or weighs matches (the triage
# enricher's `weights.credentials = 20`), where a number under `password` or `api_key` may be a PIN.
COUNTED_CATEGORIES = frozenset({"credential", "credentials"})


def _a_count(name: str, value: Any) -> bool:
    return isinstance(value, (int, float)) and normalised(name) in COUNTED_CATEGORIES


def _names_a_secret_variable(name: str) -> bool:
    """`password_env`, `apiKeyEnv`, `hmac_key_env`: a `*_env` key whose stem is a secret-like name."""
    stem = normalised(name)
    return stem.endswith("_env") and is_secret_key(stem[: -len("_env")])


def _embedded_credential(value: str) -> str | None:
    if KEY_VAULT_REFERENCE.match(value):
        return "a Key Vault reference, which only app settings resolve"
    literal = _REFERENCE.sub(lambda match: match.group(2) or "", value) if "${" in value else value  # defaults are literal
    for pattern, what in _EMBEDDED:
        if pattern.search(literal):
            return what
    return None


def check_resolved(name: str, value: str, *, file: str, key: str) -> None:
    """Refuse an environment variable that still holds an unresolved Key Vault reference."""
    if KEY_VAULT_REFERENCE.match(value):
        raise ConfigError(
            f"environment variable {name} holds an unresolved Key Vault reference: check that the app's managed identity "
            "may read the secret (Key Vault Secrets User or an access policy), the vault's network rules and the reference syntax",
            file=file,
            key=key,
        )


def secret_from_env(name: str, *, file: str | None = None, key: str | None = None, environ: dict[str, str] | None = None) -> SecretStr:
    """The secret held by environment variable `name` (for `*_env` settings), as a SecretStr that never prints."""
    env = os.environ if environ is None else environ
    if not _ENV_NAME.match(name or ""):
        raise ConfigError("not an environment variable name", file=file, key=key)
    value = env.get(name)
    if not value:
        raise ConfigError(f"environment variable {name} is not set", file=file, key=key)
    check_resolved(name, value, file=file or "(environment)", key=key or name)
    return SecretStr(value)


class SecretNotSet(ConfigError, ValueError):
    """A `SecretEnv` setting names a variable that is not set (or holds an unresolved Key Vault reference).

    A ConfigError that cannot know the config file. Also a ValueError on purpose: the plugin loader
    reports it, raised from a plugin's constructor, as a ConfigError naming the config file and the
    plugin's `settings` table; raised from a pydantic validator it becomes a validation error of
    that setting; and plugins written against `except ValueError` keep working."""


class SecretEnv(str):
    """A setting that names the environment variable holding a secret: the one way to take a secret.

    Declare it on a settings field named `<what>_env` and read the secret when the plugin is built:

        class Settings(BaseEnricher.Settings):
            api_key_env: SecretEnv                     # api_key_env = "VT_API_KEY" in the config

        def __init__(self, settings, services):
            super().__init__(settings, services)
            self.api_key = settings.api_key_env.resolve()   # SecretStr; SecretNotSet if unset

    Validation guarantees the value is a variable name (letters, digits, `_`), never a secret; the
    value is a `str`, so code that reads `os.environ[settings.password_env]` keeps working.
    """

    __slots__ = ("setting",)
    setting: str | None  # the settings field it was validated for, for error messages

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.with_info_after_validator_function(
            cls._validate, core_schema.str_schema(), serialization=core_schema.plain_serializer_function_ser_schema(str)
        )

    @classmethod
    def _validate(cls, value: str, info: core_schema.ValidationInfo) -> SecretEnv:
        if not _ENV_NAME.match(value):
            raise ValueError("names an environment variable (letters, digits, _), not a value")
        return cls.named(value, setting=info.field_name)

    @classmethod
    def named(cls, name: str, *, setting: str | None = None) -> SecretEnv:
        variable = cls(name)
        variable.setting = setting
        return variable

    def resolve(self, *, environ: dict[str, str] | None = None) -> SecretStr:
        """The secret the variable holds, as a SecretStr that never prints.

        Raises SecretNotSet (naming the setting and the variable, never a value) when the variable is
        unset or empty, or still holds an unresolved Key Vault reference."""
        env = os.environ if environ is None else environ
        what = getattr(self, "setting", None) or "secret"
        value = env.get(str(self))
        if not value:
            raise SecretNotSet(f"{what}: environment variable {self} is not set")
        if KEY_VAULT_REFERENCE.match(value):
            raise SecretNotSet(f"{what}: environment variable {self} holds an unresolved Key Vault reference: check that the app's "
                               "managed identity may read the secret (Key Vault Secrets User or an access policy), the vault's "
                               "network rules and the reference syntax")
        return SecretStr(value)


REDACTED = "[redacted]"
_MIN_REDACTED_LENGTH = 6  # shorter values would redact ordinary words


class RedactSecrets(logging.Filter):
    """Replaces known secret values in every log record a handler emits, third-party loggers included
    (an HTTP client logging a URL with a key in its query string, an exception quoting a token)."""

    def __init__(self, values: set[str]) -> None:
        super().__init__("redact-secrets")
        self.values = sorted((v for v in values if len(v) >= _MIN_REDACTED_LENGTH), key=len, reverse=True)

    def redact(self, text: str) -> str:
        for value in self.values:
            if value in text:
                text = text.replace(value, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.values:
            return True
        message = record.getMessage()
        redacted = self.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


def install_log_redaction(names: frozenset[str] | set[str], *, environ: dict[str, str] | None = None) -> RedactSecrets:
    """Redact the values of the environment variables `names` from every handler of the root logger.

    Replaces a filter installed before (one per handler), so calling it again (a second runner,
    a config reload) does not stack filters. Handlers added later are not covered.
    """
    env = os.environ if environ is None else environ
    redactor = RedactSecrets({env[name] for name in names if env.get(name)})
    for handler in logging.getLogger().handlers:
        for existing in [f for f in handler.filters if isinstance(f, RedactSecrets)]:
            handler.removeFilter(existing)
        handler.addFilter(redactor)
    return redactor


__all__ = [
    "RedactSecrets", "SecretEnv", "SecretNotSet", "check_config_secrets", "check_resolved", "how_to_name", "install_log_redaction",
    "is_secret_key", "secret_from_env",
]
