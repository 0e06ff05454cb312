"""Find, validate and build plugins (enrichers and sinks) before the first event.

A plugin reference is resolved in this order:
1. `module:Class` — imported directly;
2. an entry point of the group (`dlp_pipeline.enrichers` / `dlp_pipeline.sinks`) of that name,
   which is how installed third-party packages register;
3. a built-in of that name (`enrichers.BUILTIN_ENRICHERS`, `pipeline.sinks.BUILTIN_SINKS`); built-ins
   are listed as `module:Class` strings so that the framework never imports a concrete enricher.

Everything that can be wrong (unknown name, import error, bad settings, duplicate name, missing
dependency, dependency cycle) raises ConfigError naming the config file and key.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ValidationError

from pipeline.cache import TTLCache
from pipeline.config import EnricherConfig, LoadedConfig, SinkConfig, config_error_from_validation
from pipeline.errors import ConfigError
from pipeline.sinks.shaping import minimised

ENRICHER_GROUP = "dlp_pipeline.enrichers"
SINK_GROUP = "dlp_pipeline.sinks"


@dataclass
class Services:
    """What the runner hands every plugin at construction time."""

    state: Any
    config: LoadedConfig
    clock: Callable[[], float]

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
    try:
        module = importlib.import_module("enrichers")
    except ImportError:
        return {}
    return dict(getattr(module, "BUILTIN_ENRICHERS", {}))


def builtin_sinks() -> dict[str, str]:
    from pipeline.sinks import BUILTIN_SINKS

    return dict(BUILTIN_SINKS)


def available(group: str) -> list[str]:
    names = set(builtin_enrichers() if group == ENRICHER_GROUP else builtin_sinks())
    names.update(ep.name for ep in entry_points(group=group))
    return sorted(names)


def load_plugin_class(reference: str, *, group: str, builtins: dict[str, str], config: LoadedConfig, key: str) -> type:
    """Resolve a plugin reference to its class (see the module docstring for the order)."""
    target: str | None = None
    if ":" in reference:
        target = reference
    else:
        for ep in entry_points(group=group):
            if ep.name == reference:
                try:
                    return ep.load()
                except Exception as exc:  # an installed plugin that does not import
                    raise config.error(f"plugin '{reference}' ({ep.value}) failed to load: {type(exc).__name__}: {exc}", key) from exc
        target = builtins.get(reference)
    if target is None:
        raise config.error(f"unknown plugin '{reference}'; available: {', '.join(available(group)) or 'none'}", key)
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attribute)
    except (ImportError, AttributeError) as exc:
        raise config.error(f"cannot load plugin '{target}': {type(exc).__name__}: {exc}", key) from exc


def instantiate(cls: type, raw_settings: dict[str, Any], services: Services, *, key: str) -> Any:
    """Validate a plugin's settings with its own Settings model, then build it."""
    settings_model = getattr(cls, "Settings", None)
    settings: Any = raw_settings
    if isinstance(settings_model, type) and issubclass(settings_model, BaseModel):
        try:
            settings = settings_model.model_validate(raw_settings)
        except ValidationError as exc:
            raise config_error_from_validation(exc, file=services.config.display_name, prefix=(*_split_key(key), "settings")) from None
    elif raw_settings:
        raise services.config.error(f"plugin {cls.__name__} takes no settings", f"{key}.settings")
    try:
        return cls(settings, services)
    except ConfigError:
        raise
    except (ValueError, OSError) as exc:  # e.g. a settings combination or an input file the plugin rejects
        raise services.config.error(f"{cls.__name__} cannot start: {exc}", f"{key}.settings") from exc


def _split_key(key: str) -> tuple[Any, ...]:
    # "enrichers[2]" -> ("enrichers", 2)
    name, _, index = key.partition("[")
    return (name, int(index.rstrip("]"))) if index else (name,)


def build_enricher_chain(configs: list[EnricherConfig], services: Services) -> EnricherChain:
    config = services.config
    builtins = builtin_enrichers()
    slots: list[EnricherSlot] = []
    seen: dict[str, str] = {}
    for index, entry in enumerate(configs):
        key = f"enrichers[{index}]"
        if not entry.enabled:
            continue
        if entry.name in seen:
            raise config.error(f"enricher name '{entry.name}' is used twice (also at {seen[entry.name]})", f"{key}.name")
        seen[entry.name] = key
        cls = load_plugin_class(entry.use or entry.name, group=ENRICHER_GROUP, builtins=builtins, config=config, key=f"{key}.use" if entry.use else f"{key}.name")
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
    builtins = builtin_sinks()
    built: list[tuple[SinkConfig, Any]] = []
    names: set[str] = set()
    for index, entry in enumerate(configs):
        key = f"sinks[{index}]"
        if not entry.enabled:
            continue
        if entry.name in names:
            raise config.error(f"sink name '{entry.name}' is used twice", f"{key}.name")
        names.add(entry.name)
        cls = load_plugin_class(entry.kind, group=SINK_GROUP, builtins=builtins, config=config, key=f"{key}.kind")
        if not inspect.iscoroutinefunction(getattr(cls, "publish", None)):
            raise config.error(f"{cls.__module__}.{cls.__qualname__} is not a sink: it needs `async def publish(self, records)`", key)
        sink = instantiate(cls, entry.settings, services, key=key)
        built.append((entry, minimised(entry, sink, config, key)))
    if not built:
        raise config.error("no sink is configured: every alert would be lost", "sinks")
    return built
