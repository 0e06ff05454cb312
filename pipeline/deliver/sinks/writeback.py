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
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
from pydantic import Field

from pipeline.config import StrictModel
from pipeline.deliver.minimise import get_path
from pipeline.deliver.sinks import Outcome
from pipeline.deliver.sinks.itsm import TicketError, TicketMemory, check, not_documented, read_json
from pipeline.deliver.summary import fill
from pipeline.errors import is_retryable_status

if TYPE_CHECKING:
    from pipeline.doctor import Check

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
    value = get_path(document, path)
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
    """Raise TicketError unless the status is ok: 401/403 rejected naming the permission to grant;
    404 rejected; the rest as `itsm.check` (408/429/5xx and undocumented 2xx retryable)."""
    status = response.status_code
    if status in (401, 403) and status not in ok:
        raise TicketError(Outcome.rejected(f"{action}: HTTP {status}: the pipeline's identity lacks {permission}; grant it as docs/deploy.md shows"))
    if status == 404 and status not in ok:
        raise TicketError(Outcome.rejected(f"{action}: HTTP 404: not found (deleted, or in another tenant or workspace)"))
    return check(response, ok=ok, action=action)


def answer_object(response: httpx.Response, *, ok: Sequence[int], action: str, permission: str) -> dict[str, Any]:
    """`answer`, then its JSON object; a body cut short or not an object is retryable (never read as empty)."""
    found = read_json(answer(response, ok=ok, action=action, permission=permission), action)
    if not isinstance(found, dict):
        raise not_documented(action)
    return found


async def send(client: httpx.AsyncClient, token: BearerToken, method: str, url: str, **kwargs: Any) -> httpx.Response:
    """One request with the token's header; on 401 (an expired or revoked token) one fresh token, one more try."""
    response = await client.request(method, url, headers=await token.header(), **kwargs)
    if response.status_code == 401:
        token.forget()
        response = await client.request(method, url, headers=await token.header(), **kwargs)
    return response


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
        self._known = TicketMemory(maxsize)  # alert id → incident id

    async def incident_of(self, record: Any) -> str:
        alert = record.alert
        if alert.incident_id:
            return str(alert.incident_id)
        alert_id = alert.alert_id
        if not alert_id:
            raise TicketError(Outcome.rejected("the record has no alert id (is alert.alert_id outside the sink's fields?)"))
        known = self._known.ticket(str(alert_id))
        if known is not None:
            return known
        url = f"{self.graph_url}/security/alerts_v2/{quote(str(alert_id), safe='')}"
        found = answer_object(await self.request("GET", url, params={"$select": "id,incidentId"}), ok=(200,), action="look up alert", permission=ALERT_PERMISSION)
        if not found.get("incidentId"):
            raise TicketError(Outcome.rejected("the alert belongs to no Defender incident yet"))
        self._known.remember(str(alert_id), str(found["incidentId"]), None)
        return str(found["incidentId"])


# -- `doctor`: one GET of one item each, never a write ------------------------------------------

#: Where the permissions of both sinks, and how to grant them, are written down.
GRANT_DOCS = 'docs/deploy.md, "Incident write-back permissions"'


def doctor_client(timeout_seconds: float, ca_bundle: str | None) -> httpx.AsyncClient:
    """The client of a doctor check: the sink's CA bundle, at most 10 s a call."""
    return httpx.AsyncClient(timeout=min(timeout_seconds, 10.0), verify=ca_bundle or True, headers={"Accept": "application/json"})


async def read_one(client: httpx.AsyncClient, credential: Any, scope: str, url: str, params: dict[str, str]) -> httpx.Response:
    """One GET with a token for `scope` (raises httpx.HTTPError when the host does not answer)."""
    token = await credential.get_token(scope)
    return await client.get(url, params=params, headers={"Authorization": f"Bearer {token.token}"})


def status_text(response: httpx.Response) -> str:
    """`HTTP 403 Forbidden`: the status and the `error.code` of a Graph or Resource Manager error
    answer, never its message (it may name users or resources)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return f"HTTP {response.status_code} {str(code)[:80]}" if isinstance(code, str) and code.isprintable() else f"HTTP {response.status_code}"


def is_list(response: httpx.Response) -> bool:
    """The answer is a collection, as the documented list calls return it (`value`: a list)."""
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and isinstance(body.get("value"), list)


async def graph_read_check(name: str, client: httpx.AsyncClient, credential: Any, *, scope: str, base: str, collection: str, missing: str, ok: str) -> Check:
    """`GET {base}/security/{collection}?$top=1` (the documented list call of Graph security v1.0),
    as a check: `ok` on a list; 401 a refused token; 403 `missing` (the permission, and what fails
    without it); 404 a graph_url that is not Graph v1.0; unreachable: the network path."""
    from pipeline.doctor import ROLE_DELAY, Check

    call = f"GET /security/{collection}?$top=1"
    try:
        response = await read_one(client, credential, scope, f"{base}/security/{collection}", {"$top": "1"})
    except httpx.HTTPError as exc:
        return Check.failed(name, f"cannot reach {base} ({type(exc).__name__})", "check graph_url, DNS, proxy and firewall rules (the app needs outbound HTTPS to Microsoft Graph)")
    status, shown = response.status_code, status_text(response)
    if status == 200 and is_list(response):
        return Check.ok(name, ok)
    if status == 401:
        return Check.failed(name, f"token refused ({shown}): wrong tenant or audience", f"check that scope ({scope}) is the .default of graph_url's cloud, and the identity's tenant")
    if status == 403:
        return Check.failed(name, f"{call}: {shown}: {missing}", f"grant it as an application permission, with admin consent ({GRANT_DOCS}); {ROLE_DELAY}")
    if status == 404:
        return Check.failed(name, f"{call}: HTTP 404: no Graph security API at {base}", "set graph_url to Microsoft Graph v1.0 (https://graph.microsoft.com/v1.0, or the national cloud's)")
    if is_retryable_status(status):
        return Check.failed(name, f"{call}: {shown}: Graph is busy or down", "run the doctor again in a few minutes")
    if status == 200:
        return Check.failed(name, f"{call}: HTTP 200 but not a list", "check that graph_url is Microsoft Graph v1.0")
    return Check.failed(name, f"{call}: {shown}", "check graph_url and scope")


async def alert_lookup_check(client: httpx.AsyncClient, credential: Any, *, scope: str, base: str) -> Check:
    """The Graph alert lookup of rows without an incident id (`AlertIncidents`): one alert listed."""
    return await graph_read_check(
        "alert lookup", client, credential, scope=scope, base=base, collection="alerts_v2",
        missing=f"the identity lacks the application permission {ALERT_PERMISSION}: Streaming API rows, which carry no incident id, cannot find their incident (Graph alerts carry it)",
        ok=f"alerts readable ({ALERT_PERMISSION}): Streaming API rows, which carry no incident id, can find their incident",
    )
