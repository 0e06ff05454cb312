"""Names for the ids DLP records carry: sensitive information types and sensitivity labels.

- `builtin_types()`: the bundled table of Microsoft's built-in sensitive information types
  (enrichers/data/sensitive_types.csv: id, name, category), built by scripts/build_sensitive_types.py
  from the Microsoft Learn entity-definition pages (CC BY 4.0, attributed in the file's header);
- `TenantTypes`: the tenant's own list from the Office 365 Management Activity API,
  `GET {url}/{tenant}/activity/feed/resources/dlpSensitiveTypes` (`[{"id", "name"}]`, permission
  ActivityFeed.Read of the Office 365 Management APIs), which also names custom and newer types;
- `GraphLabels`: the tenant's sensitivity labels from Microsoft Graph,
  `GET {url}/security/dataSecurityAndGovernance/sensitivityLabels` (application permission
  SensitivityLabel.Read, or SensitivityLabels.Read.All), sublabels included.

Both remote lists are `RefreshedTable`s: fetched when first needed, then kept and fetched again
after `refresh_hours`; a failed fetch keeps the last list, logs one warning (host and status only)
and is not tried again for `retry_minutes`, so a missing permission costs one request per interval,
not one per batch. Nothing here ever fails an alert: an id no table knows stays unnamed.
"""

from __future__ import annotations

import asyncio
import csv
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Generic, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.enrich.http import BearerToken, HttpClient, check_base_url
from pipeline.errors import EnricherTimeout, EnricherUnavailable

log = logging.getLogger("pipeline.enrichers.sensitive_info")

GRAPH_SCOPE = "https://graph.microsoft.com/.default"
MANAGEMENT_SCOPE = "https://manage.office.com/.default"
_GUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
_MAX_PAGES = 50


def builtin_types_text() -> str:
    """The bundled table as shipped (package data), header comments included."""
    return resources.files("enrichers").joinpath("data", "sensitive_types.csv").read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def builtin_types() -> dict[str, tuple[str, str]]:
    """Microsoft's built-in sensitive information types: lowercase id -> (name, category)."""
    lines = [line for line in builtin_types_text().splitlines() if line and not line.startswith("#")]
    return {row["id"].lower(): (row["name"], row["category"]) for row in csv.DictReader(lines)}


class RemoteListSettings(BaseModel):
    """How a remote list is fetched and kept (shared by the tenant types and the labels)."""

    model_config = ConfigDict(extra="forbid")

    managed_identity_client_id: str | None = Field(None, description="a user-assigned identity; empty: the runner's shared credential")
    refresh_hours: float = Field(24, gt=0, le=24 * 7, description="the list is fetched again after this long")
    retry_minutes: float = Field(15, gt=0, description="after a failed fetch, the next try waits this long (the last list is kept)")
    timeout_seconds: float = Field(3.0, gt=0, le=30, description="the whole fetch, retries included: keep it under the enricher's timeout")
    max_retries: int = Field(2, ge=0, le=5, description="429/503 answers retried, honouring Retry-After")
    max_retry_after_seconds: float = Field(2.0, ge=0)
    allow_private_hosts: list[str] = Field(default_factory=list, description="hosts allowed over http/private addresses (tests)")


class TenantTypesSettings(RemoteListSettings):
    """The tenant's sensitive information types from the Management Activity API."""

    tenant_id: str = Field(pattern=_GUID_PATTERN, description="the tenant (directory) id the list is read for")
    url: str = Field("https://manage.office.com/api/v1.0", description="API root (GCC High: https://manage.office365.us/api/v1.0, ...)")
    scope: str = Field(MANAGEMENT_SCOPE, description="token scope (national clouds: https://manage.office365.us/.default, ...)")
    publisher_identifier: str | None = Field(None, pattern=_GUID_PATTERN, description="PublisherIdentifier: your own tenant id, for a dedicated request quota")
    language: str | None = Field(None, max_length=35, pattern=r"^[A-Za-z]{1,8}(-[A-Za-z0-9]{1,8})*$", description="Accept-Language of the names (one language, e.g. en-US)")

    @model_validator(mode="after")
    def _https(self):
        check_base_url(self.url, self.allow_private_hosts)
        return self


class GraphLabelsSettings(RemoteListSettings):
    """The tenant's sensitivity labels from Microsoft Graph."""

    url: str = Field("https://graph.microsoft.com/v1.0", description="Graph base URL")
    scope: str = Field(GRAPH_SCOPE, description="token scope (national clouds: https://graph.microsoft.us/.default, ...)")

    @model_validator(mode="after")
    def _https(self):
        check_base_url(self.url, self.allow_private_hosts)
        return self


class LabelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    names: dict[str, str] = Field(default_factory=dict, description="label id -> name, for labels Graph does not name (or without [graph])")
    graph: GraphLabelsSettings | None = Field(None, description="present = read the tenant's labels from Microsoft Graph")

    @field_validator("names")
    @classmethod
    def _lower_ids(cls, value: dict[str, str]) -> dict[str, str]:
        return {key.strip().lower(): name for key, name in value.items()}


@dataclass(frozen=True, slots=True)
class LabelName:
    name: str
    parent: str | None = None


T = TypeVar("T")


class RefreshedTable(Generic[T]):
    """A table (id -> T) read from a service, fetched when first needed and every `refresh_seconds`.

    Guarantees: at most one fetch at a time; a failed or cancelled fetch keeps the last table and
    the next one waits `retry_seconds`; `current()` never raises."""

    def __init__(self, what: str, fetch: Callable[[], Awaitable[dict[str, T]]], *, refresh_seconds: float, retry_seconds: float, clock: Callable[[], float], hint: str) -> None:
        self.what = what
        self.hint = hint
        self._fetch = fetch
        self.refresh_seconds = refresh_seconds
        self.retry_seconds = retry_seconds
        self._clock = clock
        self.table: dict[str, T] = {}
        self.fetches = 0
        self.failures = 0
        self._next_attempt = float("-inf")
        self._lock = asyncio.Lock()

    async def current(self) -> dict[str, T]:
        if self._clock() < self._next_attempt:
            return self.table
        async with self._lock:
            now = self._clock()
            if now < self._next_attempt:
                return self.table
            # Set before the fetch: a fetch cancelled by the enricher's timeout is not retried at once.
            self._next_attempt = now + self.retry_seconds
            self.fetches += 1
            try:
                self.table = await self._fetch()
            except (EnricherUnavailable, EnricherTimeout) as exc:
                self.failures += 1
                log.warning(
                    "%s could not be read (%s); names come from the other tables until the next try in %g minutes. %s",
                    self.what, exc, self.retry_seconds / 60, self.hint,
                )
            else:
                self._next_attempt = now + self.refresh_seconds
                log.info("%s: %d names read, kept for %g hours", self.what, len(self.table), self.refresh_seconds / 3600)
        return self.table


class _RemoteList:
    """The HTTP client and token of one remote list. `credential` belongs to its maker."""

    def __init__(self, settings: RemoteListSettings, scope: str, credential: Any) -> None:
        self._token = BearerToken(credential, scope)
        self.http = HttpClient(
            timeout=settings.timeout_seconds,
            total_seconds=settings.timeout_seconds,
            max_retries=settings.max_retries,
            max_retry_after=settings.max_retry_after_seconds,
            allow_private_hosts=settings.allow_private_hosts,
        )

    async def headers(self) -> dict[str, str]:
        return await self._token.headers()

    async def aclose(self) -> None:
        await self.http.aclose()


class TenantTypes(_RemoteList):
    def __init__(self, settings: TenantTypesSettings, credential: Any) -> None:
        super().__init__(settings, settings.scope, credential)
        self.settings = settings

    async def fetch(self) -> dict[str, str]:
        """The tenant's types: lowercase id -> name (entries without both are ignored)."""
        s = self.settings
        headers = await self.headers()
        if s.language:
            headers["Accept-Language"] = s.language
        params = {"PublisherIdentifier": s.publisher_identifier} if s.publisher_identifier else None
        url = f"{s.url.rstrip('/')}/{s.tenant_id}/activity/feed/resources/dlpSensitiveTypes"
        payload = await self.http.json("GET", url, params=params, headers=headers)
        if not isinstance(payload, list):
            raise EnricherUnavailable(f"{httpx.URL(url).host}: dlpSensitiveTypes: malformed response (not a JSON array)")
        return {
            entry["id"].strip().lower(): entry["name"].strip()
            for entry in payload
            if isinstance(entry, dict) and isinstance(entry.get("id"), str) and isinstance(entry.get("name"), str) and entry["name"].strip()
        }


class GraphLabels(_RemoteList):
    def __init__(self, settings: GraphLabelsSettings, credential: Any) -> None:
        super().__init__(settings, settings.scope, credential)
        self.settings = settings

    async def fetch(self) -> dict[str, LabelName]:
        """Every label of the tenant, sublabels with their parent's name: lowercase id -> LabelName.
        Follows `@odata.nextLink` on the same host (at most 50 pages)."""
        first = httpx.URL(self.settings.url.rstrip("/") + "/security/dataSecurityAndGovernance/sensitivityLabels")
        labels: dict[str, LabelName] = {}
        url: httpx.URL | None = first
        for _page in range(_MAX_PAGES):
            if url is None:
                break
            payload = await self.http.json("GET", str(url), headers=await self.headers())
            values = payload.get("value") if isinstance(payload, dict) else None
            if not isinstance(values, list):
                raise EnricherUnavailable(f"{first.host}: sensitivityLabels: malformed response (no 'value' array)")
            _add_labels(labels, values, None)
            link = payload.get("@odata.nextLink")
            url = first.join(link) if isinstance(link, str) and link else None
            if url is not None and (url.scheme, url.host, url.port) != (first.scheme, first.host, first.port):
                raise EnricherUnavailable(f"{first.host}: sensitivityLabels: next page on another host refused")
        return labels


def _add_labels(labels: dict[str, LabelName], values: list[Any], parent: str | None, depth: int = 0) -> None:
    for value in values:
        if not isinstance(value, dict) or not isinstance(value.get("id"), str) or not isinstance(value.get("name"), str):
            continue
        labels[value["id"].strip().lower()] = LabelName(value["name"], parent)
        sublabels = value.get("sublabels")
        if isinstance(sublabels, list) and depth < 3:
            _add_labels(labels, sublabels, value["name"], depth + 1)
