"""Find, validate and build plugins (enrichers and sinks) before the first event.

A plugin reference is resolved one way for built-ins and third-party plugins alike:
1. `module:Class` is imported directly;
2. a name is looked up among the entry points of its group (`dlp_pipeline.enrichers` /
   `dlp_pipeline.sinks`) of every installed distribution. dlp-pipeline registers its own built-ins
   there (pyproject.toml); where it is not pip-installed (a checkout, the Function App's folder), its
   built-in tables (`enrichers.BUILTIN_ENRICHERS`, `pipeline.deliver.sinks.BUILTIN_SINKS`) stand in
   for its entry points. Built-ins are `module:Class` strings, so the framework never imports a
   concrete enricher it is not asked for.

Everything that can be wrong (unknown name, import error, bad settings, duplicate name, missing
dependency, dependency cycle) raises ConfigError naming the config file and key.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from pipeline.config import EnricherConfig, LoadedConfig, SinkConfig, config_error_from_validation
from pipeline.enrich.cache import TTLCache

ENRICHER_GROUP = "dlp_pipeline.enrichers"
SINK_GROUP = "dlp_pipeline.sinks"
#: The distribution whose entry points register the built-ins (pyproject.toml's [project] name).
DISTRIBUTION = "dlp-pipeline"
#: `provider()` of a built-in resolved from its table, where the distribution is not installed.
BUILTIN_FALLBACK = "built-in table"

log = logging.getLogger("pipeline.plugins")


#: Builds one azure-core async credential for a user-assigned identity's client id (None: the default identity).
CredentialFactory = Callable[[str | None], Any]


def azure_identity_credential(managed_identity_client_id: str | None = None) -> Any:
    """The production credential: `ManagedIdentityCredential` for a user-assigned identity when a client
    id is given, else `DefaultAzureCredential` (managed identity in Azure, developer sign-in locally).
    Building one makes no network call."""
    from azure.identity.aio import DefaultAzureCredential, ManagedIdentityCredential

    if managed_identity_client_id:
        return ManagedIdentityCredential(client_id=managed_identity_client_id)
    return DefaultAzureCredential()


@dataclass
class Services:
    """What the runner hands every plugin at construction time.

    `credential(client_id)` is the one Azure credential of that identity for every client the runner
    and its plugins build (sinks, enrichers, stores, the consumer): made on first use by
    `credential_factory` (default `azure_identity_credential`; tests pass their own), cached, and
    closed once by `aclose`, which the runner calls last. A plugin never closes it.
    """

    state: Any
    config: LoadedConfig
    clock: Callable[[], float]
    credential_factory: CredentialFactory = azure_identity_credential
    _credentials: dict[str | None, Any] = field(default_factory=dict, init=False, repr=False)

    @property
    def config_dir(self) -> Path:
        return self.config.config_dir

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir

    def input_path(self, value: str | Path) -> Path:
        """An input file named in the config, relative to the config file's folder."""
        return self.config.input_path(value)

    def data_path(self, value: str | Path) -> Path:
        """An output location named in the config, relative to the data dir (`--out`)."""
        return self.config.data_path(value)

    def credential(self, managed_identity_client_id: str | None = None) -> Any:
        """The shared async credential of this identity (an empty client id is the default identity):
        the same object on every call, until `aclose`."""
        key = managed_identity_client_id or None
        if key not in self._credentials:
            self._credentials[key] = self.credential_factory(key)
        return self._credentials[key]

    async def aclose(self) -> None:
        """Close every credential made here, once each; a failure to close one is logged, not raised."""
        made, self._credentials = list(self._credentials.values()), {}
        for credential in made:
            closer = getattr(credential, "close", None)
            if closer is None:
                continue
            try:
                result = closer()
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:  # closing must not hide the run's own result
                log.warning("error while closing an Azure credential: %s", type(exc).__name__)


def shared_credential(services: Services | None, managed_identity_client_id: str | None = None) -> Any:
    """For plugins: `services.credential(...)`. A plugin built without the runner's services (a test,
    a tool) must be given its credential instead."""
    if services is None:
        raise ValueError("built without the runner's services: give it a credential (an azure-core async credential)")
    return services.credential(managed_identity_client_id)


@dataclass
class EnricherSlot:
    """One configured enricher, ready to run."""

    name: str
    plugin: Any
    timeout: float
    depends_on: tuple[str, ...]
    runs_after: tuple[str, ...]
    cache: TTLCache[Any] | None = None


@dataclass
class EnricherChain:
    """Configured enrichers grouped in dependency-ordered waves; a wave's members run concurrently."""

    slots: list[EnricherSlot] = field(default_factory=list)
    waves: list[list[EnricherSlot]] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [slot.name for slot in self.slots]


def builtin_enrichers() -> dict[str, str]:
    """The built-in enrichers as `name -> module:Class` (enrichers/__init__.py); empty without that package."""
    try:
        module = importlib.import_module("enrichers")
    except ImportError:
        return {}
    return dict(getattr(module, "BUILTIN_ENRICHERS", {}))


def builtin_sinks() -> dict[str, str]:
    """The built-in sinks as `name -> module:Class` (pipeline/deliver/sinks/__init__.py)."""
    from pipeline.deliver.sinks import BUILTIN_SINKS

    return dict(BUILTIN_SINKS)


def builtin_table(group: str) -> dict[str, str]:
    """The built-in plugins of a group, exactly as pyproject.toml registers them as entry points."""
    if group == ENRICHER_GROUP:
        return builtin_enrichers()
    if group == SINK_GROUP:
        return builtin_sinks()
    raise ValueError(f"unknown plugin group {group!r}")


def registered(group: str) -> dict[str, list[EntryPoint]]:
    """Every plugin of a group by name: the entry points of the installed distributions.

    Where the `dlp-pipeline` distribution itself is not installed with that group's entry points (a
    plain checkout, or the Function App's folder with only requirements.txt installed), the built-in
    table stands in for them, as entry points of the same names and targets. Once installed, the
    built-ins come from the distribution's metadata like any third-party plugin. A name can map to
    several entry points when different distributions register it; `load_plugin_class` refuses
    such a name.
    """
    found: dict[str, list[EntryPoint]] = {}
    own_distribution_registers = False
    for entry in entry_points(group=group):
        if entry.dist is not None and _normalised(entry.dist.name) == DISTRIBUTION:
            own_distribution_registers = True
        found.setdefault(entry.name, []).append(entry)
    if not own_distribution_registers:
        for name, target in builtin_table(group).items():
            found.setdefault(name, []).append(EntryPoint(name=name, value=target, group=group))
    return found


def provider(entry: EntryPoint) -> str:
    """Who registered an entry point: its distribution's name, or the built-in table's fallback."""
    return entry.dist.name if entry.dist is not None else BUILTIN_FALLBACK


def available(group: str) -> list[str]:
    return sorted(registered(group))


def load_plugin_class(reference: str, *, group: str, config: LoadedConfig, key: str) -> type:
    """Resolve a plugin reference to its class (see the module docstring for the order)."""
    if ":" in reference:
        if not re.fullmatch(r"[\w.]+:[\w.]+", reference):
            raise config.error(f"plugin reference '{reference}': write it as module:Class, or give an entry point's name", key)
        entry = EntryPoint(name=reference, value=reference, group=group)
    else:
        candidates = registered(group).get(reference)
        if not candidates:
            raise config.error(f"unknown plugin '{reference}'; available: {', '.join(available(group)) or 'none'}", key)
        if len({candidate.value for candidate in candidates}) > 1:
            claims = ", ".join(f"{provider(candidate)} ({candidate.value})" for candidate in candidates)
            raise config.error(f"plugin name '{reference}' is registered by more than one package: {claims}; name the class as module:Class instead", key)
        entry = candidates[0]
    try:
        return entry.load()
    except (ImportError, AttributeError) as exc:
        raise config.error(f"cannot load plugin '{entry.value}': {type(exc).__name__}: {exc}", key) from exc
    except Exception as exc:  # a plugin module that fails while it is imported
        raise config.error(f"plugin '{reference}' ({entry.value}) failed to load: {type(exc).__name__}: {exc}", key) from exc


def _normalised(distribution_name: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution_name).lower()


def instantiate(cls: type, raw_settings: dict[str, Any], services: Services, *, key: str) -> Any:
    """Validate a plugin's settings with its own Settings model, then build it."""
    settings_model = getattr(cls, "Settings", None)
    settings: Any = raw_settings
    if isinstance(settings_model, type) and issubclass(settings_model, BaseModel):
        try:
            settings = settings_model.model_validate(raw_settings)
        except ValidationError as exc:
            raise config_error_from_validation(exc, file=services.config.display_name, prefix=(*_split_key(key), "settings"), model=settings_model) from None
    elif raw_settings:
        raise services.config.error(f"plugin {cls.__name__} takes no settings", f"{key}.settings")
    try:
        return cls(settings, services)
    except (ValueError, OSError) as exc:  # a settings combination, an input file or a secret (SecretNotSet) the plugin rejects
        # Other ConfigErrors are no ValueErrors: they name the file and the key themselves and pass through.
        raise services.config.error(f"{cls.__name__} cannot start: {exc}", f"{key}.settings") from exc


def _split_key(key: str) -> tuple[Any, ...]:
    # "enrichers[2]" -> ("enrichers", 2)
    name, _, index = key.partition("[")
    return (name, int(index.rstrip("]"))) if index else (name,)


def build_enricher_chain(configs: list[EnricherConfig], services: Services) -> EnricherChain:
    config = services.config
    slots: list[EnricherSlot] = []
    seen: dict[str, str] = {}
    for index, entry in enumerate(configs):
        key = f"enrichers[{index}]"
        if not entry.enabled:
            continue
        if entry.name in seen:
            raise config.error(f"enricher name '{entry.name}' is used twice (also at {seen[entry.name]})", f"{key}.name")
        seen[entry.name] = key
        cls = load_plugin_class(entry.use or entry.name, group=ENRICHER_GROUP, config=config, key=f"{key}.use" if entry.use else f"{key}.name")
        if not inspect.iscoroutinefunction(getattr(cls, "enrich", None)):
            raise config.error(f"{cls.__module__}.{cls.__qualname__} is not an enricher: it needs `async def enrich(self, alert, ctx)`", key)
        plugin = instantiate(cls, entry.settings, services, key=key)
        timeout = entry.timeout_seconds or float(getattr(plugin, "timeout", 5.0))
        if entry.timeout_seconds:
            plugin.timeout = timeout  # the enricher sizes its own budgets (HTTP retries, lookups) from it
        policy = getattr(plugin, "cache_policy", None)
        slots.append(
            EnricherSlot(
                name=entry.name,
                plugin=plugin,
                timeout=timeout,
                depends_on=tuple(getattr(plugin, "depends_on", ()) or ()),
                runs_after=tuple(getattr(plugin, "runs_after", ()) or ()),
                cache=TTLCache(policy) if policy is not None else None,
            )
        )
    by_name = {slot.name: slot for slot in slots}
    for slot in slots:
        for dependency in slot.depends_on:
            if dependency not in by_name:
                raise config.error(f"enricher '{slot.name}' depends on '{dependency}', which is not configured (or is disabled)", f"{seen[slot.name]}")
    return EnricherChain(slots=slots, waves=_waves(slots, config, seen))


def _waves(slots: list[EnricherSlot], config: LoadedConfig, keys: dict[str, str]) -> list[list[EnricherSlot]]:
    """Kahn's algorithm by layers: a wave holds every enricher whose predecessors are all done."""
    names = {slot.name for slot in slots}
    before = {slot.name: {d for d in (*slot.depends_on, *slot.runs_after) if d in names} for slot in slots}
    done: set[str] = set()
    waves: list[list[EnricherSlot]] = []
    remaining = list(slots)
    while remaining:
        wave = [slot for slot in remaining if before[slot.name] <= done]
        if not wave:
            cycle = " -> ".join(sorted(slot.name for slot in remaining))
            raise config.error(f"enricher dependencies form a cycle among: {cycle}", keys[remaining[0].name])
        waves.append(wave)
        done.update(slot.name for slot in wave)
        remaining = [slot for slot in remaining if slot.name not in done]
    return waves


def build_sinks(configs: list[SinkConfig], services: Services) -> list[tuple[SinkConfig, Any]]:
    config = services.config
    built: list[tuple[SinkConfig, Any]] = []
    names: set[str] = set()
    for index, entry in enumerate(configs):
        key = f"sinks[{index}]"
        if not entry.enabled:
            continue
        if entry.name in names:
            raise config.error(f"sink name '{entry.name}' is used twice", f"{key}.name")
        names.add(entry.name)
        cls = load_plugin_class(entry.kind, group=SINK_GROUP, config=config, key=f"{key}.kind")
        if not inspect.iscoroutinefunction(getattr(cls, "publish", None)):
            raise config.error(f"{cls.__module__}.{cls.__qualname__} is not a sink: it needs `async def publish(self, records)`", key)
        sink = instantiate(cls, entry.settings, services, key=key)
        built.append((entry, sink))
    if not built:
        raise config.error("no sink is configured: every alert would be lost", "sinks")
    return built
