"""The one configuration file (TOML), validated at start-up.

- `${NAME}` and `${NAME:-default}` in string values are replaced from the environment.
- Every table rejects unknown keys. An error names the file and the key, for example
  `pipeline.toml, key 'enrichers[1].timeout_seconds': Input should be greater than 0`; an unknown
  key is answered with the key it most likely meant (`…: unknown key; did you mean 'settle_seconds'?`)
  or, when none is close, with the keys of its table.
- Relative paths of inputs (HR files, lookup tables) are relative to the config file's folder;
  relative paths of outputs (state, lake, dead letters) are relative to `data_dir` (`--out`).
- Plugin `settings` tables are validated by each plugin's own Settings model when the pipeline is
  built (pipeline/plugins.py), still before any event is read.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
import types
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from pipeline.deliver.routing import When
from pipeline.errors import ConfigError
from pipeline.ingest.limits import Limits
from pipeline.secrets import SecretEnv, check_config_secrets, check_resolved

#: The embedded default config, package data beside the bundled samples it reads (importlib.resources).
DEFAULT_CONFIG = Path(str(files("pipeline").joinpath("samples", "pipeline.toml")))
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunnerSettings(StrictModel):
    max_concurrent_alerts: int = Field(64, ge=1, description="alerts of one batch in flight at once in an enricher without enrich_batch")
    batch_size: int = Field(100, ge=1, description="messages per batch in the CLI")
    enricher_breaker_threshold: int = Field(5, ge=1, description="consecutive failures or timeouts of one enricher that open its circuit breaker")
    enricher_breaker_cooldown_seconds: float = Field(30.0, ge=0, description="how long an open enricher breaker refuses calls before one trial")


class AssemblySettings(StrictModel):
    settle_seconds: float = Field(30.0, ge=0, description="emit a split alert once no part arrived for this long")
    max_hold_seconds: float = Field(600.0, ge=0, description="emit a split alert at the latest this long after its first part")
    lease_seconds: float = Field(300.0, gt=0, description="how long a claimed alert is reserved for one consumer")
    retention_hours: float = Field(72.0, gt=0, description="how long emitted parts are kept to recognise redeliveries")
    emit_batch_size: int = Field(500, ge=1, description="settled split alerts emitted by one batch at most (bounds memory after a backlog)")


class LifecycleSettings(StrictModel):
    """The DLP lifecycle (docs/architecture.md, "DLP lifecycle")."""

    keep_user_justification: bool = Field(
        False,
        description="keep the user's override justification on alert.exception.justification (user-written free text that may hold "
        "anything, even the matched values: dropped unless set; never logged)",
    )


class StateSettings(StrictModel):
    """Where pending split-alert parts, their claims and the redelivery counts live (docs/delivery.md, "The state model").

    `sqlite` (default): one file under the data dir, for one process. `azure_table`: one table shared by
    every instance and process, reached with `account_url` (managed identity) or a connection string
    from the variable named by `connection_string_env`."""

    kind: Literal["sqlite", "azure_table"] = "sqlite"
    path: str = Field("state.sqlite", description="sqlite: the file, under the data dir")
    account_url: str | None = Field(None, description="azure_table: https://<account>.table.core.windows.net, signed in with the app's managed identity")
    connection_string_env: SecretEnv | None = Field(None, description="azure_table: environment variable holding a connection string (Azurite, development)")
    table: str = Field("dlpstate", pattern=r"^[A-Za-z][A-Za-z0-9]{2,62}$", description="azure_table: the table (created if missing)")
    managed_identity_client_id: str | None = Field(None, description="azure_table: client id of a user-assigned identity (default: DefaultAzureCredential)")

    @field_validator("account_url", "connection_string_env", "table", "managed_identity_client_id")
    @classmethod
    def _only_for_azure_table(cls, value: Any, info: ValidationInfo) -> Any:
        if info.data.get("kind") != "azure_table":
            raise ValueError(f"{info.field_name} is a setting of kind 'azure_table' (kind is '{info.data.get('kind')}')")
        if info.field_name == "connection_string_env" and info.data.get("account_url"):
            raise ValueError("set account_url (managed identity) or connection_string_env, not both")
        return value

    @field_validator("path")
    @classmethod
    def _only_for_sqlite(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("kind") == "azure_table":
            raise ValueError("path is a setting of kind 'sqlite' (kind is 'azure_table')")
        return value

    @model_validator(mode="after")
    def _table_needs_an_account(self) -> StateSettings:
        if self.kind == "azure_table" and not (self.account_url or self.connection_string_env):
            raise ValueError("kind 'azure_table' needs account_url or connection_string_env")
        return self


class DeadLetterSettings(StrictModel):
    kind: Literal["local", "blob"] = "local"
    path: str = Field("dead-letter", description="local: folder under the data dir; blob: name prefix inside the container")
    container: str = Field("dead-letter", description="blob: the container (created if missing)")
    account_url: str | None = Field(None, description="blob: https://<account>.blob.core.windows.net, signed in with DefaultAzureCredential")
    connection_string_env: SecretEnv | None = Field(None, description="blob: name of the environment variable holding a connection string")

    @model_validator(mode="after")
    def _blob_needs_an_account(self) -> DeadLetterSettings:
        if self.kind == "blob" and not (self.account_url or self.connection_string_env):
            raise ValueError("kind 'blob' needs account_url or connection_string_env")
        return self


class DeliverySettings(StrictModel):
    max_attempts: int = Field(4, ge=1, description="calls per record and sink before it is dead-lettered")
    backoff_initial_seconds: float = Field(0.5, ge=0)
    backoff_max_seconds: float = Field(10.0, ge=0)
    budget_seconds: float = Field(60.0, ge=0, description="time a batch may spend retrying one sink")
    on_outage: Literal["raise", "dead_letter"] = Field(
        "raise", description="a sink that took none of a batch's records within the budget: raise so the batch is run again, or dead-letter them"
    )
    max_batch_redeliveries: int = Field(5, ge=0, description="runs of the same batch that may raise for a sink outage before its records are dead-lettered")
    breaker_threshold: int = Field(5, ge=1, description="consecutive failed calls of one sink that open its circuit breaker")
    breaker_cooldown_seconds: float = Field(30.0, ge=0, description="how long an open sink breaker refuses calls before one trial")


class ConsumerSettings(StrictModel):
    """`python -m pipeline consume`: the standalone Event Hub consumer."""

    fully_qualified_namespace: str | None = Field(None, description="<namespace>.servicebus.windows.net, signed in with DefaultAzureCredential")
    connection_string_env: SecretEnv | None = Field(None, description="name of the environment variable holding the Event Hubs connection string")
    eventhub_name: str = Field(min_length=1)
    consumer_group: str = "$Default"
    checkpoint_container: str = Field("checkpoints", min_length=3)
    checkpoint_account_url: str | None = Field(None, description="Blob account of the checkpoint store, signed in with DefaultAzureCredential")
    checkpoint_connection_string_env: SecretEnv | None = Field(None, description="name of the environment variable holding the storage connection string")
    max_batch_size: int = Field(100, ge=1)
    max_wait_seconds: float = Field(5.0, gt=0)
    starting_position: str = Field("-1", description="where a partition without checkpoint starts: -1 (beginning) or @latest")
    retry_initial_seconds: float = Field(1.0, ge=0, description="first wait before a batch that could not be accounted for is run again")
    retry_max_seconds: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _needs_endpoints(self) -> ConsumerSettings:
        if not (self.fully_qualified_namespace or self.connection_string_env):
            raise ValueError("needs fully_qualified_namespace or connection_string_env")
        if not (self.checkpoint_account_url or self.checkpoint_connection_string_env):
            raise ValueError("needs checkpoint_account_url or checkpoint_connection_string_env")
        return self


class EnricherConfig(StrictModel):
    name: str = Field(min_length=1, description="name in the record's enrichments; also the plugin to load unless `use` is given")
    use: str | None = Field(None, description="plugin: a built-in or entry-point name, or module:Class")
    enabled: bool = True
    timeout_seconds: float | None = Field(None, gt=0)
    settings: dict[str, Any] = Field(default_factory=dict)


# User identifiers, plus file paths: OneDrive URLs and endpoint paths (C:\\Users\\<name>\\…) carry the user's name.
USER_IDENTIFIERS = ("alert.user.upn", "alert.user.object_id", "alert.user.display_name", "alert.files.path")


class PseudonymiseSettings(StrictModel):
    """Keyed pseudonymisation of a sink's output (see pipeline/deliver/minimise.py)."""

    key_env: SecretEnv = Field(description="environment variable holding the HMAC key (at least 16 bytes)")
    fields: list[str] = Field(default_factory=lambda: list(USER_IDENTIFIERS), description="dotted paths whose values are pseudonymised")


class SinkConfig(StrictModel):
    name: str = Field(min_length=1)
    kind: str = Field(min_length=1, description="a built-in sink kind, an entry-point name, or module:Class")
    enabled: bool = True
    when: When = Field(default_factory=When)
    settings: dict[str, Any] = Field(default_factory=dict)
    fields: list[str] | None = Field(None, description="allow-list of dotted paths the sink receives (default: the full record)")
    pseudonymise: PseudonymiseSettings | None = Field(None, description="HMAC-pseudonymise user identifiers in what this sink receives")


class PipelineConfig(StrictModel):
    data_dir: str = "out"
    runner: RunnerSettings = Field(default_factory=RunnerSettings)
    assembly: AssemblySettings = Field(default_factory=AssemblySettings)
    state: StateSettings = Field(default_factory=StateSettings)
    dead_letter: DeadLetterSettings = Field(default_factory=DeadLetterSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    consumer: ConsumerSettings | None = None
    limits: Limits = Field(default_factory=Limits)
    lifecycle: LifecycleSettings = Field(default_factory=LifecycleSettings)
    enrichers: list[EnricherConfig] = Field(default_factory=list)
    sinks: list[SinkConfig] = Field(default_factory=list)


class LoadedConfig:
    """A validated config plus where it came from, for resolving paths and naming errors."""

    # Environment variables that hold secrets (see pipeline/secrets.py); their values are redacted from logs.
    secret_env_names: frozenset[str] = frozenset()

    def __init__(self, config: PipelineConfig, *, file: Path | None, data_dir: Path) -> None:
        self.config = config
        self.file = file
        self.config_dir = file.parent if file else Path.cwd()
        self.data_dir = data_dir

    @property
    def display_name(self) -> str:
        return str(self.file) if self.file else "(built-in defaults)"

    def input_path(self, value: str | Path) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.config_dir / path

    def data_path(self, value: str | Path) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.data_dir / path

    def error(self, message: str, key: str | None = None) -> ConfigError:
        return ConfigError(message, file=self.display_name, key=key)


def key_path(location: tuple[Any, ...] | list[Any]) -> str:
    """`('enrichers', 1, 'settings', 'x')` → `enrichers[1].settings.x`."""
    out = ""
    for part in location:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def config_error_from_validation(
    exc: ValidationError, *, file: str, prefix: tuple[Any, ...] = (), model: type[BaseModel] | None = None
) -> ConfigError:
    """The first problem of a pydantic ValidationError as a ConfigError (never echoing values).
    `model`: the model that was validated (at `prefix`), so that an unknown key is answered with the
    key it most likely meant, or with the keys its table has."""
    error = exc.errors(include_url=False, include_input=False, include_context=False)[0]
    extra = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    location = tuple(error["loc"])
    if error["type"] == "extra_forbidden":
        message = "unknown key" + _known_keys_hint(model, location, prefix)
    else:
        message = error["msg"]
    return ConfigError(message + extra, file=file, key=key_path((*prefix, *location)) or None)


def _known_keys_hint(model: type[BaseModel] | None, location: tuple[Any, ...], prefix: tuple[Any, ...]) -> str:
    """"; did you mean 'x'?" for an unknown key at `location` of `model` close to one of its table's
    keys, else "; the keys of 'table': a, b, …"; empty when the table is not known."""
    keys = _table_keys(model, location[:-1]) if model is not None and location else None
    if not keys:
        return ""
    close = difflib.get_close_matches(str(location[-1]), keys, n=1, cutoff=0.7)
    if close:
        return f"; did you mean '{close[0]}'?"
    table = key_path((*prefix, *location[:-1]))
    return (f"; the keys of '{table}': " if table else "; the top-level keys: ") + ", ".join(sorted(keys))


def _table_keys(model: type[BaseModel], location: tuple[Any, ...]) -> list[str] | None:
    """The keys of the table at `location` (field names or aliases, as a file spells them) of
    `model`, following fields, list items and dict values; None when it is not one model there."""
    kind: Any = model
    for part in location:
        kind = _one_type(kind)
        if isinstance(part, int):
            if get_origin(kind) not in (list, tuple) or not get_args(kind):
                return None
            kind = get_args(kind)[0]
        elif isinstance(kind, type) and issubclass(kind, BaseModel):
            found = next((field for name, field in kind.model_fields.items() if part in (name, field.alias)), None)
            if found is None:
                return None
            kind = found.annotation
        elif get_origin(kind) is dict and len(get_args(kind)) == 2:
            kind = get_args(kind)[1]
        else:
            return None
    kind = _one_type(kind)
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        return [field.alias or name for name, field in kind.model_fields.items()]
    return None


def _one_type(kind: Any) -> Any:
    """`kind` without Annotated and without None in a union (`X | None` is X); a union of several
    types is left as it is (no one table is meant)."""
    while True:
        origin = get_origin(kind)
        if origin is Annotated:
            kind = get_args(kind)[0]
        elif origin is Union or origin is types.UnionType:
            others = [arg for arg in get_args(kind) if arg is not type(None)]
            if len(others) != 1:
                return kind
            kind = others[0]
        else:
            return kind


def substitute_env(value: Any, *, file: str, location: tuple[Any, ...] = (), environ: dict[str, str] | None = None) -> Any:
    """Replace `${NAME}` / `${NAME:-default}` in every string of a parsed TOML document."""
    env = os.environ if environ is None else environ
    if isinstance(value, dict):
        return {k: substitute_env(v, file=file, location=(*location, k), environ=environ) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_env(v, file=file, location=(*location, i), environ=environ) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            check_resolved(name, env[name], file=file, key=key_path(location))
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"environment variable {name} is not set", file=file, key=key_path(location))

    return _ENV_REF.sub(replace, value)


def load_config(path: str | Path | None = None, *, data_dir: str | Path | None = None) -> LoadedConfig:
    """Read, substitute and validate a config file; None loads the bundled default config.

    `data_dir` (the CLI's `--out`) overrides the file's `data_dir`.
    """
    file = Path(path) if path is not None else DEFAULT_CONFIG
    name = str(file)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file ({exc.strerror or exc})", file=name) from None
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=name) from None
    secret_env_names = check_config_secrets(document, file=name)  # on the raw document: no secret written in the file
    document = substitute_env(document, file=name)
    try:
        config = PipelineConfig.model_validate(document)
    except ValidationError as exc:
        raise config_error_from_validation(exc, file=name, model=PipelineConfig) from None
    resolved_data_dir = Path(data_dir) if data_dir is not None else Path(config.data_dir)
    loaded = LoadedConfig(config, file=file.resolve(), data_dir=resolved_data_dir.resolve())
    loaded.secret_env_names = secret_env_names | secret_env_values(config)
    return loaded


def secret_env_values(value: Any) -> frozenset[str]:
    """The variables named by every `SecretEnv` field of a validated model (`pseudonymise.key_env`, ...)."""
    if isinstance(value, SecretEnv):
        return frozenset({str(value)})
    if isinstance(value, BaseModel):
        return frozenset().union(*(secret_env_values(getattr(value, field)) for field in type(value).model_fields))
    if isinstance(value, dict):
        return frozenset().union(*(secret_env_values(item) for item in value.values()))
    if isinstance(value, (list, tuple)):
        return frozenset().union(*(secret_env_values(item) for item in value))
    return frozenset()
