"""What the incident write-back sinks (defender_incident, sentinel_incident) share: an azure-identity
bearer token, HTTP status → Outcome with what the user can do, tag templates, and the memory of
what was written.

Neither Defender XDR nor Sentinel offers an idempotency key for a comment. The sinks make a comment
idempotent themselves: Defender comments end with a marker line naming the record id, and the sink
reads the incident's comments before it writes; Sentinel comments are written with an id derived
from the record id (PUT creates or updates). A redelivered record therefore never adds a second
comment, in this process or after a restart.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import Field

from pipeline.config import StrictModel
from pipeline.deliver.sinks import Outcome
from pipeline.deliver.sinks.itsm import TicketError
from pipeline.deliver.summary import fill
from pipeline.errors import is_retryable_status
from pipeline.resilience.retry import parse_retry_after

RECORD_MARKER = "[dlp-pipeline record {record_id}]"
_COMMENT_NAMESPACE = uuid.UUID("5b0e4c52-7d0a-4c3e-9a51-6f1d2f0d6a10")


class TagRule(StrictModel):
    """A tag to set on the incident: `tag` is a template over the record; with `if_set`, only when
    that dotted path of the record holds a true value (a non-empty string, true, a number not 0)."""

    tag: str = Field(min_length=1, max_length=200)
    if_set: str | None = Field(None, description="e.g. enrichments.user_context.departing")

    def render(self, document: dict[str, Any]) -> str | None:
        if self.if_set is not None and not _truthy(document, self.if_set):
            return None
        text = fill(self.tag, document)
        return text if text and not text.endswith((":", "-")) else None


DEFAULT_TAGS: list[dict[str, str]] = [
    {"tag": "DLP:triage-{enrichments.triage.band}", "if_set": "enrichments.triage.band"},
    {"tag": "DLP:departing-user", "if_set": "enrichments.user_context.departing"},
    {"tag": "DLP:departed-user", "if_set": "enrichments.user_context.departed"},
]


def _truthy(document: dict[str, Any], path: str) -> bool:
    value: Any = document
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    return bool(value) and value not in ("false", "False", "0")


def render_tags(rules: Sequence[TagRule], document: dict[str, Any]) -> list[str]:
    return [*dict.fromkeys(tag for rule in rules if (tag := rule.render(document)))]


def merge_tags(existing: Sequence[str], wanted: Sequence[str]) -> list[str]:
    """The existing tags (others' too, in their order) followed by the wanted ones not there yet."""
    return [*dict.fromkeys([*existing, *wanted])]


def marker(record_id: str) -> str:
    return RECORD_MARKER.format(record_id=record_id)


def comment_id(record_id: str) -> str:
    """The Sentinel comment id of a record: the same record always gives the same id."""
    return str(uuid.uuid5(_COMMENT_NAMESPACE, record_id))


def bounded(text: str, limit: int, tail: str) -> str:
    """`text` then `tail` (the marker line), cut so the whole is at most `limit` characters; the tail is always kept."""
    whole = f"{text}\n{tail}" if text else tail
    if len(whole) <= limit:
        return whole
    room = max(0, limit - len(tail) - 2)
    return text[:room] + "…\n" + tail


def answer(response: httpx.Response, *, ok: Sequence[int], action: str, permission: str) -> httpx.Response:
    """Raise TicketError unless the status is ok: 408/429/5xx retryable with Retry-After; 401/403
    rejected naming the permission to grant; 404 rejected; other 4xx rejected."""
    status = response.status_code
    if status in ok:
        return response
    if is_retryable_status(status):
        raise TicketError(Outcome.retryable(f"{action}: HTTP {status}", parse_retry_after(response.headers.get("Retry-After"))))
    if status in (401, 403):
        raise TicketError(Outcome.rejected(f"{action}: HTTP {status}: the pipeline's identity lacks {permission}; grant it as docs/deploy.md shows"))
    if status == 404:
        raise TicketError(Outcome.rejected(f"{action}: HTTP 404: not found (deleted, or in another tenant or workspace)"))
    raise TicketError(Outcome.rejected(f"{action}: HTTP {status}"))


class BearerToken:
    """An azure-core async credential's token for one scope, reused until a minute before it expires."""

    def __init__(self, credential: Any, scope: str) -> None:
        self.credential = credential
        self.scope = scope
        self._token: tuple[str, float] | None = None

    async def header(self) -> dict[str, str]:
        if self._token is None or self._token[1] <= time.time():
            token = await self.credential.get_token(self.scope)
            self._token = (token.token, float(token.expires_on) - 60)
        return {"Authorization": f"Bearer {self._token[0]}"}

    def forget(self) -> None:
        self._token = None


ALERT_PERMISSION = "SecurityAlert.Read.All"


class AlertIncidents:
    """The Defender incident id of a record's alert: `alert.incident_id` when it has one, else
    `GET {graph}/security/alerts_v2/{alert id}` → `incidentId` (Streaming API rows carry none),
    remembered (bounded) so the alerts of one incident cost one lookup each."""

    def __init__(self, graph_url: str, request: Callable[..., Awaitable[httpx.Response]], *, maxsize: int = 50_000) -> None:
        self.graph_url = graph_url
        self.request = request
        self.maxsize = maxsize
        self._known: dict[str, str] = {}

    async def incident_of(self, record: Any) -> str:
        alert = record.alert
        if alert.incident_id:
            return str(alert.incident_id)
        alert_id = alert.alert_id
        if not alert_id:
            raise TicketError(Outcome.rejected("the record has no alert id (is alert.alert_id outside the sink's fields?)"))
        if alert_id not in self._known:
            url = f"{self.graph_url}/security/alerts_v2/{quote(str(alert_id), safe='')}"
            found = answer(await self.request("GET", url, params={"$select": "id,incidentId"}), ok=(200,), action="look up alert", permission=ALERT_PERMISSION).json()
            if not found.get("incidentId"):
                raise TicketError(Outcome.rejected("the alert belongs to no Defender incident yet"))
            if len(self._known) >= self.maxsize:
                self._known.pop(next(iter(self._known)))
            self._known[alert_id] = str(found["incidentId"])
        return self._known[alert_id]
