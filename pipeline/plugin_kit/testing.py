"""Test helpers for enricher plugin authors (public and stable).

    from pipeline.plugin_kit.testing import make_alert, make_context, run_enricher

    alert = make_alert("graph_alert", severity="high", user={"upn": "adele.vance@contoso.com"})
    fragment, status = await run_enricher(MyEnricher, alert, settings={"threshold": 3})
    assert status.state == "ok" and fragment.score > 0

- `make_alert` decodes a real payload with the pipeline's own decoders (and joins the parts of a
  split Streaming API alert with its assembler): one of the bundled samples by format name
  (`SAMPLE_FORMATS`), or your own bytes / str / dict / list. Keyword overrides are validated
  against `DlpAlert`, so a typo fails loudly.
- `make_context` builds the `EnrichmentContext` an enricher receives, with a `FakeClock`.
- `run_enricher` runs one enricher on one alert through the runner's own code path (timeout,
  outcome `ok` / `skipped` / `failed` / `timed_out`, duration) and returns `(fragment, status)`.
  It never raises for the enricher's failure: look at `status.state` and `status.error`.

With `pip install dlp-pipeline`, pytest gets these as fixtures (see `pipeline/plugin_kit/pytest_plugin.py`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path
from typing import Any, NamedTuple

import orjson
from pydantic import BaseModel

from pipeline.enrich.cache import TTLCache
from pipeline.enrich.contract import EnrichmentContext
from pipeline.models import DlpAlert, EnrichmentStatus

__all__ = [
    "SAMPLE_FORMATS",
    "DEFAULT_NOW",
    "EnricherResult",
    "FakeClock",
    "make_alert",
    "make_alerts",
    "make_context",
    "run_enricher",
    "sample_bytes",
]

#: The bundled sample payloads, one per input format (synthetic data, same as the pipeline's tests).
SAMPLE_FORMATS: tuple[str, ...] = ("defender_streaming", "graph_alert", "management_activity", "sentinel_alert")

#: The fake clock's default time: shortly after the bundled samples' alerts.
DEFAULT_NOW = datetime(2025, 3, 14, 10, 0, 0, tzinfo=UTC)


def sample_bytes(fmt: str) -> bytes:
    """The bundled sample message body of one format (see SAMPLE_FORMATS)."""
    if fmt not in SAMPLE_FORMATS:
        raise ValueError(f"unknown sample format {fmt!r}; one of: {', '.join(SAMPLE_FORMATS)}")
    return files("pipeline.plugin_kit").joinpath("testing_samples", f"{fmt}.json").read_bytes()


def make_alerts(source: str | bytes | Mapping[str, Any] | list[Any] = "graph_alert") -> list[DlpAlert]:
    """Every DLP alert (and rule-match activity) in one message body, decoded as the pipeline does.

    `source` is a format name of the bundled samples, or a message body (bytes, str, dict, list).
    Streaming API parts (AlertInfo + AlertEvidence rows) are joined per AlertId.
    Raises `pipeline.errors.DecodeError` for a body the pipeline would dead-letter.
    """
    from pipeline.assemble.join import assemble
    from pipeline.ingest.decode import decode_message

    if isinstance(source, str) and source in SAMPLE_FORMATS:
        body = sample_bytes(source)
    elif isinstance(source, str):
        body = source.encode()
    elif isinstance(source, bytes):
        body = source
    else:
        body = orjson.dumps(source)
    decoded = decode_message(body)
    if decoded.rejected:
        first = decoded.rejected[0]
        raise ValueError(f"record {first.index} of the body was rejected: {first.reason}: {first.detail}")
    alerts = list(decoded.alerts)
    by_id: dict[str, list[Any]] = {}
    for part in decoded.parts:
        by_id.setdefault(part.alert_id, []).append(part)
    alerts = [assemble(parts) for parts in by_id.values()] + alerts
    return alerts


def make_alert(source: str | bytes | Mapping[str, Any] | list[Any] = "graph_alert", /, **overrides: Any) -> DlpAlert:
    """One alert (the first of kind "alert", else the first activity) with fields replaced by `overrides`.

    `make_alert("sentinel_alert", severity="high", user=None)`; nested values may be dicts
    (`user={"upn": "x@contoso.com"}`). The result is validated like any decoded alert.
    """
    alerts = make_alerts(source)
    if not alerts:
        raise ValueError("the body holds no DLP alert (only non-DLP records)")
    alert = next((a for a in alerts if a.kind == "alert"), alerts[0])
    if not overrides:
        return alert
    unknown = set(overrides) - set(DlpAlert.model_fields)
    if unknown:
        raise TypeError(f"DlpAlert has no field(s): {', '.join(sorted(unknown))}")
    return DlpAlert.model_validate({**alert.model_dump(), **overrides})


class FakeClock:
    """A clock you move by hand: `clock()` is epoch seconds, `clock.advance(60)` moves it on."""

    def __init__(self, now: datetime | float = DEFAULT_NOW) -> None:
        self.now = now.timestamp() if isinstance(now, datetime) else float(now)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    @property
    def datetime(self) -> datetime:
        return datetime.fromtimestamp(self.now, tz=UTC)


def make_context(
    alert: DlpAlert | None = None,
    *,
    fragments: Mapping[str, BaseModel] | None = None,
    now: datetime | float | FakeClock = DEFAULT_NOW,
    cache_policy: Any = None,
) -> EnrichmentContext:
    """The context an enricher receives: upstream `fragments` (by enricher name), a fake clock, a cache."""
    alert = alert if alert is not None else make_alert()
    clock = now if isinstance(now, FakeClock) else FakeClock(now)
    upstream = _fragments(fragments)
    statuses = {name: EnrichmentStatus(state="ok") for name in upstream}
    cache: TTLCache[Any] | None = TTLCache(cache_policy, clock=clock) if cache_policy is not None else None
    return EnrichmentContext(alert, fragments=upstream, statuses=statuses, cache=cache, clock=clock)


class EnricherResult(NamedTuple):
    """What `run_enricher` returns; unpacks as `fragment, status`."""

    fragment: BaseModel | None
    status: EnrichmentStatus


async def run_enricher(
    enricher: Any,
    alert: DlpAlert | None = None,
    *,
    settings: Mapping[str, Any] | BaseModel | None = None,
    upstream: Mapping[str, BaseModel] | None = None,
    now: datetime | float | FakeClock = DEFAULT_NOW,
    timeout: float | None = None,
    name: str | None = None,
    config_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
) -> EnricherResult:
    """Run one enricher on one alert exactly as the runner does; return `(fragment, status)`.

    `enricher` is a class (built with `settings` validated by its own Settings model, then started and
    closed), a plugin reference as in a config file (`"module:Class"`, an entry-point name, a
    built-in name), or an already built instance (not started or closed here). `upstream` holds the
    fragments of the enrichers it depends on. `config_dir` is where relative input files in its
    settings are looked up; `data_dir` where its outputs go (default: a new temporary folder).
    A bad setting raises `pipeline.errors.ConfigError`, as it would at start-up.
    """
    from pipeline.config import LoadedConfig, PipelineConfig
    from pipeline.enrich.engine import run_enricher
    from pipeline.plugins import ENRICHER_GROUP, EnricherSlot, Services, instantiate, load_plugin_class

    clock = now if isinstance(now, FakeClock) else FakeClock(now)
    alert = alert if alert is not None else make_alert()
    loaded = LoadedConfig(PipelineConfig(), file=None, data_dir=Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="dlp-enricher-")))
    if config_dir is not None:
        loaded.config_dir = Path(config_dir)
    services = Services(state=None, config=loaded, clock=clock)

    built_here = not _is_instance(enricher)
    if isinstance(enricher, str):
        enricher = load_plugin_class(enricher, group=ENRICHER_GROUP, config=loaded, key="enrichers[0].use")
    if built_here:
        raw = settings.model_dump() if isinstance(settings, BaseModel) else dict(settings or {})
        plugin = instantiate(enricher, raw, services, key="enrichers[0]")
    else:
        if settings is not None:
            raise TypeError("settings are for a class or a reference; this enricher is already built")
        plugin = enricher
    policy = getattr(plugin, "cache_policy", None)
    slot = EnricherSlot(
        name=name or getattr(plugin, "name", "") or type(plugin).__name__,
        plugin=plugin,
        timeout=timeout or float(getattr(plugin, "timeout", 5.0)),
        depends_on=tuple(getattr(plugin, "depends_on", ()) or ()),
        runs_after=tuple(getattr(plugin, "runs_after", ()) or ()),
        cache=TTLCache(policy, clock=clock) if policy is not None else None,
    )
    fragments = _fragments(upstream)
    statuses = {dependency: EnrichmentStatus(state="ok") for dependency in fragments}
    if built_here and getattr(plugin, "start", None) is not None:
        await plugin.start()
    try:
        # The runner's own enricher step (enrich_batch or enrich, timeout, outcome, duration).
        await run_enricher(slot, [alert], [fragments], [statuses], clock=clock)
    finally:
        if built_here and getattr(plugin, "aclose", None) is not None:
            await plugin.aclose()
        await services.aclose()  # any Azure credential the enricher asked the services for
    return EnricherResult(fragments.get(slot.name), statuses[slot.name])


def _is_instance(enricher: Any) -> bool:
    return not isinstance(enricher, (str, type))


def _fragments(fragments: Mapping[str, BaseModel] | None) -> dict[str, BaseModel]:
    out = dict(fragments or {})
    for name, fragment in out.items():
        if not isinstance(fragment, BaseModel):
            raise TypeError(f"upstream fragment {name!r} must be a pydantic model (what that enricher returns), not {type(fragment).__name__}")
    return out
