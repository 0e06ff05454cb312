"""Advanced Hunting through Microsoft Graph: `POST /security/runHuntingQuery` (ThreatHunting.Read.All).

Body `{"Query": "<KQL>", "Timespan": "P30D"}`; answer `{"schema": [...], "results": [{...row...}]}`.
Values put into a query go through `kql_string`, which refuses anything but the characters of
user names, ids and file names, so an alert's content cannot change the query.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.enrich.http import BearerToken, HttpClient, check_base_url
from pipeline.errors import EnricherUnavailable

GRAPH_SCOPE = "https://graph.microsoft.com/.default"
_SAFE = re.compile(r"^[\w@.\-+#' ()\[\]~,&$%=!]{1,400}$")


class HuntingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field("https://graph.microsoft.com/v1.0", description="Graph base URL")
    managed_identity_client_id: str | None = None
    scope: str = Field(GRAPH_SCOPE, description="token scope (national clouds: https://graph.microsoft.us/.default, ...)")
    lookback_days: int = Field(30, ge=1, le=30, description="Advanced Hunting keeps 30 days")
    timeout_seconds: float = Field(10.0, gt=0)
    max_retries: int = Field(2, ge=0, le=10)
    max_retry_after_seconds: float = Field(5.0, ge=0)
    allow_private_hosts: list[str] = Field(default_factory=list, description="hosts allowed over http/private addresses (tests)")

    @model_validator(mode="after")
    def _https(self):
        check_base_url(self.url, self.allow_private_hosts)
        return self


async def hunting_checks(hunting: HuntingSettings | None, services: Any) -> list[Any]:
    """The doctor's Advanced Hunting lines (prior_incidents, sensitive_info): a token for its scope;
    the query itself is not sent."""
    if hunting is None:
        return []
    from pipeline.doctor import Check, token_check
    from pipeline.plugins import shared_credential

    credential = shared_credential(services, hunting.managed_identity_client_id)
    return [
        await token_check("Advanced Hunting token", credential, hunting.scope),
        Check.skipped("Advanced Hunting query", "not sent by the doctor (ThreatHunting.Read.All is proven by the first query)"),
    ]


def kql_string(value: str) -> str:
    """A KQL string literal for `value`; EnricherUnavailable for characters that have no business in it."""
    if not _SAFE.match(value):
        raise EnricherUnavailable("value not usable in a hunting query")
    return orjson.dumps(value).decode()


def user_filter(user: Any, *, upn_column: str, object_id_column: str) -> str:
    """A KQL condition matching the alert's user by UPN (case-insensitive) or object id, values quoted."""
    conditions = []
    if user.upn:
        conditions.append(f"{upn_column} =~ {kql_string(user.upn)}")
    if user.object_id:
        conditions.append(f"{object_id_column} == {kql_string(user.object_id)}")
    return " or ".join(conditions)


class HuntingClient:
    """Advanced Hunting over Graph. `credential` (the enricher sets it before `start`, from the
    services) belongs to its maker: the client never closes it."""

    def __init__(self, settings: HuntingSettings, *, credential: Any = None) -> None:
        self.settings = settings
        self.credential = credential
        self._http: HttpClient | None = None
        self._token: BearerToken | None = None
        self.queries = 0

    async def start(self) -> None:
        if self._http is not None:
            return
        s = self.settings
        if self.credential is None:
            raise ValueError("the hunting client needs a credential before it starts")
        self._token = BearerToken(self.credential, s.scope)
        self._http = HttpClient(
            timeout=s.timeout_seconds, max_retries=s.max_retries, max_retry_after=s.max_retry_after_seconds, allow_private_hosts=s.allow_private_hosts
        )

    async def query(self, kql: str) -> list[dict[str, Any]]:
        await self.start()
        assert self._http is not None and self._token is not None
        self.queries += 1
        body = {"Query": kql, "Timespan": f"P{self.settings.lookback_days}D"}
        payload = await self._http.json("POST", self.settings.url.rstrip("/") + "/security/runHuntingQuery", json=body, headers=await self._token.headers())
        results = payload.get("results", payload.get("Results")) if isinstance(payload, dict) else None
        if not isinstance(results, list):
            raise EnricherUnavailable("runHuntingQuery: malformed response (no 'results' array)")
        return [row for row in results if isinstance(row, dict)]

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
