"""The enricher contract.

An enricher adds one typed fragment to an alert's record. The runner, not the enricher, enforces
the timeout, records the outcome (ok / skipped / failed / timed_out, with duration) and makes sure
that one enricher's failure never drops the alert.

Write one by subclassing `BaseEnricher` (or by matching the `Enricher` protocol):

    class GeoIp(BaseEnricher["GeoIp.Settings"]):   # type checkers then see self.settings as GeoIp.Settings
        name = "geoip"
        depends_on = ("user_context",)      # must be configured; runs in a later wave
        timeout = 2.0                       # seconds; the config's timeout_seconds overrides it
        cache_policy = CachePolicy(ttl_seconds=600)

        class Settings(BaseEnricher.Settings):   # rejects unknown keys
            database: str

        class Fragment(BaseModel):
            country: str | None

        async def enrich(self, alert, ctx):
            if alert.user is None:
                return None                       # "skipped": nothing to add
            return self.Fragment(country=await ctx.cached(alert.user.upn, lambda: self.lookup(...)))

An enricher that looks things up per user, device or file gains from seeing the whole batch at once:
subclass `BatchEnricher["X.Settings"]` and write `enrich_batch(alerts, contexts)` instead, returning one result per
alert (a fragment, None, or the exception that alert failed with). The runner then calls it once per
batch, under the enricher's timeout; `enrich` of a `BatchEnricher` is a batch of one.
`pipeline.enrich.cache.load_many` loads each distinct key once through the enricher's cache.

Register it with the entry point group `dlp_pipeline.enrichers`, or name it as `module:Class`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar, cast, runtime_checkable

from pydantic import BaseModel, ConfigDict

from pipeline.enrich.cache import CachePolicy, TTLCache
from pipeline.models import DlpAlert, EnrichmentStatus

if TYPE_CHECKING:
    from pipeline.plugins import Services

V = TypeVar("V")
#: The Settings model of an enricher, what `self.settings` is typed as.
SettingsT = TypeVar("SettingsT", bound=BaseModel)


@runtime_checkable
class Enricher(Protocol):
    name: str
    depends_on: tuple[str, ...]
    runs_after: tuple[str, ...]
    timeout: float
    cache_policy: CachePolicy | None

    async def enrich(self, alert: DlpAlert, ctx: EnrichmentContext) -> BaseModel | None: ...


class BaseEnricher(Generic[SettingsT]):
    """Convenience base: typed settings, services, and no-op start/close hooks.

    Parametrise it with the plugin's own Settings model, `class Geo(BaseEnricher["Geo.Settings"])`
    (a string, since the nested class is not defined yet), and type checkers see `self.settings` as
    that model. Unparametrised, `class Geo(BaseEnricher)` works as before; `self.settings` is then
    untyped (Any) for a type checker. At run time `self.settings` is an instance of `self.Settings`.
    """

    name: ClassVar[str] = ""
    depends_on: ClassVar[tuple[str, ...]] = ()
    runs_after: ClassVar[tuple[str, ...]] = ()  # ordering only: honoured when those are configured
    timeout: float = 5.0
    cache_policy: ClassVar[CachePolicy | None] = None
    # True: a fragment it returned is never changed afterwards, for as long as the process runs (it
    # may return the same one again, in later batches too), so the engine may keep its dump across
    # batches. Leave it False if a fragment, or a model inside it, may change once returned.
    fragments_unchanged: ClassVar[bool] = False

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

    settings: SettingsT

    def __init__(self, settings: SettingsT | None = None, services: Services | None = None) -> None:
        # Without settings, the defaults of the subclass's Settings model: SettingsT by convention.
        self.settings = settings if settings is not None else cast(SettingsT, self.Settings())
        self.services = services

    async def start(self) -> None:
        """Called once before the first alert (open clients, load files)."""

    async def aclose(self) -> None:
        """Called once at shutdown."""

    async def enrich(self, alert: DlpAlert, ctx: EnrichmentContext) -> BaseModel | None:
        raise NotImplementedError


class BatchEnricher(BaseEnricher[SettingsT]):
    """Base of an enricher that works on the whole batch: write `enrich_batch`, get `enrich` for free.

    Guarantees the runner gives `enrich_batch`: `alerts` and `contexts` have the same length and
    order; it is called once per batch and wave, under the enricher's timeout (a timeout or a raise
    fails every alert of the batch; an exception *returned* for one alert fails that alert only).
    Give lookups `lookup_timeout` (`load_many(..., timeout=self.lookup_timeout)`): a slow key then
    fails only the alerts that need it, before the batch's own timeout would fail them all.
    """

    @property
    def lookup_timeout(self) -> float:
        """The share of the enricher's timeout one lookup may take (80 %)."""
        return self.timeout * 0.8

    async def enrich_batch(self, alerts: list[DlpAlert], contexts: list[EnrichmentContext]) -> Sequence[BaseModel | None | Exception]:
        raise NotImplementedError

    async def enrich(self, alert: DlpAlert, ctx: EnrichmentContext) -> BaseModel | None:
        (result,) = await self.enrich_batch([alert], [ctx])
        if isinstance(result, Exception):
            raise result
        return result


class EnrichmentContext:
    """What an enricher sees besides the alert: upstream fragments, its cache and the clock."""

    __slots__ = ("alert", "fragments", "statuses", "cache", "_clock")

    def __init__(
        self,
        alert: DlpAlert,
        *,
        fragments: dict[str, BaseModel],
        statuses: dict[str, EnrichmentStatus],
        cache: TTLCache[Any] | None = None,
        clock: Callable[[], float],
    ) -> None:
        self.alert = alert
        self.fragments = fragments
        self.statuses = statuses
        self.cache = cache
        self._clock = clock

    def fragment(self, name: str) -> BaseModel | None:
        """The fragment an earlier enricher produced for this alert, or None. Read it, do not change
        it: a fragment, or a model inside it, may be shared by several alerts' fragments."""
        return self.fragments.get(name)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), tz=UTC)

    async def cached(self, key: Hashable, loader: Callable[[], Awaitable[V]]) -> V:
        """Load through this enricher's TTL cache (single-flight); without a cache policy, just load."""
        if self.cache is None:
            return await loader()
        return await self.cache.get_or_load(key, loader)
