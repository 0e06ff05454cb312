"""In-memory Microsoft Graph security (v1.0) and Microsoft.SecurityInsights (api-version 2025-09-01)
incident servers for pytest-httpserver, following the documented contracts:

Graph (learn.microsoft.com/graph/api/security-incident-update, security-incident-post-comments,
security-alert-get, security-list-incidents, security-list-alerts_v2):
- `GET /security/incidents` and `GET /security/alerts_v2` list, `$top` at a time (`@odata.nextLink`
  for the rest); SecurityIncident.Read.All or .ReadWrite.All lists incidents, SecurityAlert.Read.All
  (or .ReadWrite.All) lists and reads alerts;
- `GET /security/incidents/{id}` → the incident with `customTags` and `comments`; 404 when unknown;
- `PATCH /security/incidents/{id}`: only assignedTo, classification, determination, status and
  customTags are updatable, and a property given *replaces* the stored value (a list too); 200 with
  the incident;
- `POST /security/incidents/{id}/comments` appends (no idempotency, no edit), 200 with the whole list;
- `GET /security/alerts_v2/{id}` → the alert with `incidentId`;
- a token without the permission gets 403 (`granted`, `alerts_granted`; `read_only`: the app holds
  SecurityIncident.Read.All only, so reads pass and writes get 403); injected failures (429 with Retry-After, 5xx) answer
  before acting, or after it (`after_acting`: a lost answer).

Sentinel (Azure/azure-rest-api-specs, SecurityInsights stable/2025-09-01, Incidents.json):
- `GET …/incidents?$filter=properties/providerIncidentId eq '<id>'&$top=<n>` lists (`nextLink` with a
  `$skipToken` for the rest), `GET …/incidents/{id}` reads with its `etag`;
- without a role on the workspace 403 AuthorizationFailed naming the action (`granted`; `read_only`:
  Microsoft Sentinel Reader, reads pass and writes get 403); a workspace that is not there 404
  ResourceNotFound (`exists`);
- `PUT …/incidents/{id}` needs title, severity and status; with an `etag` that is not the current
  one: 409 "Newer version of resource … exists"; labels are replaced by what is sent, labelType is
  read-only; each write gives a new etag;
- `PUT …/incidents/{id}/comments/{commentId}` creates (201) or updates (200) the comment of that id;
  30,000 characters per message and 100 comments per incident at most (400 beyond);
- `GET …/incidents/{id}/comments` lists.
"""

from __future__ import annotations

import itertools
import json
import re
import uuid
from collections import deque
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from werkzeug import Request, Response

from tests.support.itsm_servers import Failure

UPDATABLE = ("assignedTo", "classification", "determination", "status", "customTags")


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body), status=status, headers=headers or {}, content_type="application/json")


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return _json({"error": {"code": code, "message": message}}, status, headers)


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class _Recording:
    """What a local incident server keeps of each request: (method, path, JSON body) and its query."""

    requests: list[tuple[str, str, Any]]
    queries: list[dict[str, str]]

    @property
    def writes(self) -> list[tuple[str, str, Any]]:
        return [r for r in self.requests if r[0] in ("PATCH", "POST", "PUT", "DELETE")]

    def record(self, request: Request) -> Any:
        """Keep the request; returns its JSON body (None when it has none)."""
        body = request.get_json(silent=True)
        self.requests.append((request.method, request.path, body))
        self.queries.append(dict(request.args))
        return body


class GraphSecurity(_Recording):
    """Defender XDR incidents and alerts as Microsoft Graph v1.0 serves them."""

    def __init__(self, *, token: str = "test-token") -> None:
        self.incidents: dict[str, dict[str, Any]] = {}
        self.alerts: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, Any]] = []
        self.queries: list[dict[str, str]] = []  # the query parameters of each request, in order
        self.failures: deque[Failure] = deque()
        self.token = token
        self.granted = True  # False: the app lacks SecurityIncident.ReadWrite.All → 403
        self.read_only = False  # True: the app holds SecurityIncident.Read.All only → writes get 403
        self.alerts_granted = True  # False: the app lacks SecurityAlert.Read.All → 403 on alerts_v2

    def add_incident(self, incident_id: str, *, tags: list[str] | None = None, alert_ids: tuple[str, ...] = ()) -> dict[str, Any]:
        incident = {
            "id": incident_id, "displayName": f"DLP incident {incident_id}", "status": "active", "assignedTo": None,
            "classification": "unknown", "determination": "unknown", "customTags": list(tags or []), "comments": [],
            "incidentWebUrl": f"https://security.microsoft.com/incidents/{incident_id}",
        }
        self.incidents[incident_id] = incident
        for alert_id in alert_ids:
            self.alerts[alert_id] = {"id": alert_id, "incidentId": incident_id, "incidentWebUrl": incident["incidentWebUrl"]}
        return incident

    def install(self, server) -> None:
        server.expect_request(re.compile(r"^/v1\.0/security/(incidents|alerts_v2)(/[^/]+(/comments)?)?$")).respond_with_handler(self.handle)

    def handle(self, request: Request) -> Response:
        body = self.record(request)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return _error(401, "InvalidAuthenticationToken", "Access token is empty or invalid.")
        failure = self.failures.popleft() if self.failures and self.failures[0].applies(request) else None
        if failure is not None and failure.shape == "cut_short":  # the real answer, its body cut in half
            answer = self._act(request, body).get_data()
            return Response(answer[: len(answer) // 2], status=failure.status, content_type="application/json")
        if failure is not None and not failure.after_acting:
            return self._failure(failure)
        response = self._act(request, body)
        return self._failure(failure) if failure is not None else response

    @staticmethod
    def _failure(failure: Failure) -> Response:
        return _error(failure.status, "TooManyRequests" if failure.status == 429 else "ServiceUnavailable", "injected", failure.headers)

    def _act(self, request: Request, body: Any) -> Response:
        parts = request.path.split("/")  # "", v1.0, security, kind[, id[, comments]]
        kind = parts[3]
        if kind == "alerts_v2":
            if request.method != "GET":
                return _error(405, "MethodNotAllowed", "not supported by the test server")
            if not self.alerts_granted:
                return _error(403, "Forbidden", "Missing application permission SecurityAlert.Read.All")
            if len(parts) == 4:
                return self._list(request, kind, list(self.alerts.values()))
            alert = self.alerts.get(parts[4])
            return _json(alert) if alert else _error(404, "NotFound", "Alert not found")
        if not self.granted or (self.read_only and request.method != "GET"):
            return _error(403, "Forbidden", "Missing application permission SecurityIncident.ReadWrite.All")
        if len(parts) == 4:
            if request.method != "GET":
                return _error(405, "MethodNotAllowed", "not supported by the test server")
            return self._list(request, kind, list(self.incidents.values()))
        item = parts[4]
        incident = self.incidents.get(item)
        if incident is None:
            return _error(404, "NotFound", f"Incident {item} not found")
        if len(parts) == 6:
            if request.method != "POST" or not isinstance(body, dict) or not isinstance(body.get("comment"), str):
                return _error(400, "BadRequest", "comment required")
            incident["comments"].append({"comment": body["comment"], "createdByDisplayName": "DLP pipeline", "createdDateTime": _now()})
            return _json({"value": incident["comments"]})
        if request.method == "GET":
            return _json(incident)
        if request.method == "PATCH":
            if not isinstance(body, dict) or any(key not in UPDATABLE for key in body):
                return _error(400, "BadRequest", "only assignedTo, classification, determination, status and customTags can be updated")
            incident.update(body)  # a given property replaces the stored one: customTags is the new list
            return _json(incident)
        return _error(405, "MethodNotAllowed", "not supported by the test server")

    @staticmethod
    def _list(request: Request, kind: str, items: list[dict[str, Any]]) -> Response:
        """One page of `$top` items (all without it) from `$skip`, with `@odata.nextLink` when more remain."""
        try:
            top = int(request.args.get("$top", len(items) or 1))
            skip = int(request.args.get("$skip", 0))
        except ValueError:
            return _error(400, "BadRequest", "Invalid $top or $skip value")
        if top < 1 or skip < 0:
            return _error(400, "BadRequest", "Invalid $top or $skip value")
        page: dict[str, Any] = {"@odata.context": f"https://graph.microsoft.com/v1.0/$metadata#security/{kind}", "value": items[skip:skip + top]}
        if skip + top < len(items):
            page["@odata.nextLink"] = f"{request.base_url}?$top={top}&$skip={skip + top}"
        return _json(page)


class SentinelIncidents(_Recording):
    """Microsoft Sentinel incidents of one workspace through the ARM SecurityInsights provider."""

    API_VERSION = "2025-09-01"

    def __init__(self, workspace_resource_id: str, *, token: str = "test-token") -> None:
        self.workspace = workspace_resource_id
        self.prefix = f"{workspace_resource_id}/providers/Microsoft.SecurityInsights/incidents"
        self.incidents: dict[str, dict[str, Any]] = {}
        self.comments: dict[str, dict[str, dict[str, Any]]] = {}
        self.requests: list[tuple[str, str, Any]] = []
        self.queries: list[dict[str, str]] = []  # the query parameters of each request, in order
        self.failures: deque[Failure] = deque()
        self.token = token
        self.granted = True  # False: no role on the workspace → 403
        self.read_only = False  # True: Microsoft Sentinel Reader (reads pass, writes get 403)
        self.exists = True  # False: no such workspace → 404
        self.ignore_filter = False  # answer a list without applying $filter
        self.concurrent_label: str | None = None  # set by "someone else" just before our next PUT
        self._etags = itertools.count(1)

    def add_incident(self, provider_incident_id: str, *, labels: list[str] | None = None, provider: str = "Microsoft Defender XDR") -> dict[str, Any]:
        name = str(uuid.uuid4())
        self.incidents[name] = {
            "id": f"{self.prefix}/{name}", "name": name, "type": "Microsoft.SecurityInsights/Incidents", "etag": self._etag(),
            "properties": {
                "title": f"DLP incident {provider_incident_id}", "severity": "Medium", "status": "New", "description": "",
                "labels": [{"labelName": label, "labelType": "User"} for label in labels or []],
                "providerName": provider, "providerIncidentId": provider_incident_id, "incidentNumber": len(self.incidents) + 1,
                "additionalData": {"alertsCount": 1, "providerIncidentUrl": f"https://security.microsoft.com/incidents/{provider_incident_id}"},
                "createdTimeUtc": _now(), "lastModifiedTimeUtc": _now(),
            },
        }
        self.comments[name] = {}
        return self.incidents[name]

    def by_provider_id(self, provider_incident_id: str) -> dict[str, Any]:
        return next(i for i in self.incidents.values() if i["properties"]["providerIncidentId"] == provider_incident_id)

    def _etag(self) -> str:
        return f'"{next(self._etags):08x}-0000-0000-0000-000000000000"'

    def install(self, server) -> None:
        server.expect_request(re.compile("^" + re.escape(self.prefix) + r"(/[^/]+(/comments(/[^/]+)?)?)?$")).respond_with_handler(self.handle)

    def handle(self, request: Request) -> Response:
        body = self.record(request)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return _error(401, "AuthenticationFailed", "Authentication failed.")
        if request.args.get("api-version") != self.API_VERSION:
            return _error(400, "InvalidApiVersionParameter", f"The api-version '{request.args.get('api-version')}' is invalid.")
        if not self.granted or (self.read_only and request.method != "GET"):
            action = "read" if request.method == "GET" else "write"
            return _error(403, "AuthorizationFailed", f"The client does not have authorization to perform action 'Microsoft.SecurityInsights/incidents/{action}' over scope '{self.workspace}'.")
        if not self.exists:
            return _error(404, "ResourceNotFound", f"The Resource '{self.workspace}' was not found.")
        if self.failures and self.failures[0].applies(request):
            failure = self.failures.popleft()
            return _error(failure.status, "TooManyRequests" if failure.status == 429 else "ServiceUnavailable", "injected", failure.headers)
        rest = request.path[len(self.prefix):].strip("/").split("/") if request.path != self.prefix else []
        if not rest:
            return self._list(request)
        name = rest[0]
        incident = self.incidents.get(name)
        if len(rest) == 1:
            if request.method == "GET":
                return _json(incident) if incident else _error(404, "NotFound", "Incident not found")
            if request.method == "PUT":
                return self._put_incident(name, incident, body)
            return _error(405, "MethodNotAllowed", "not supported by the test server")
        if incident is None:
            return _error(404, "NotFound", "Incident not found")
        comments = self.comments[name]
        if len(rest) == 2:
            return _json({"value": list(comments.values())})
        comment_id = rest[2]
        if request.method == "GET":
            return _json(comments[comment_id]) if comment_id in comments else _error(404, "NotFound", "Comment not found")
        if request.method != "PUT":
            return _error(405, "MethodNotAllowed", "not supported by the test server")
        message = ((body or {}).get("properties") or {}).get("message")
        if not isinstance(message, str) or not message:
            return _error(400, "BadRequest", "properties.message is required")
        if len(message) > 30_000:
            return _error(400, "BadRequest", "The comment exceeds 30000 characters")
        if comment_id not in comments and len(comments) >= 100:
            return _error(400, "BadRequest", "An incident can have at most 100 comments")
        created = comment_id not in comments
        comments[comment_id] = {
            "id": f"{incident['id']}/comments/{comment_id}", "name": comment_id, "etag": self._etag(),
            "properties": {"message": message, "createdTimeUtc": _now(), "author": {"name": "DLP pipeline"}},
        }
        return _json(comments[comment_id], 201 if created else 200)

    def _list(self, request: Request) -> Response:
        wanted = None
        match = re.fullmatch(r"properties/providerIncidentId eq '([^']*)'", request.args.get("$filter", ""))
        if match and not self.ignore_filter:
            wanted = match.group(1)
        found = [i for i in self.incidents.values() if wanted is None or i["properties"]["providerIncidentId"] == wanted]
        try:
            top = int(request.args.get("$top", len(found) or 1))
            skip = int(request.args.get("$skipToken", 0))
        except ValueError:
            return _error(400, "BadRequest", "Invalid $top or $skipToken value")
        page: dict[str, Any] = {"value": found[skip:skip + top]}
        if skip + top < len(found):
            query = {k: v for k, v in request.args.items() if k != "$skipToken"}
            page["nextLink"] = f"{request.base_url}?{urlencode({**query, '$skipToken': str(skip + top)})}"
        return _json(page)

    def _put_incident(self, name: str, incident: dict[str, Any] | None, body: Any) -> Response:
        properties = (body or {}).get("properties") or {}
        if not all(properties.get(k) for k in ("title", "severity", "status")):
            return _error(400, "BadRequest", "properties.title, properties.severity and properties.status are required")
        if incident is not None and self.concurrent_label is not None:  # an analyst labels the incident meanwhile
            incident["properties"]["labels"].append({"labelName": self.concurrent_label, "labelType": "User"})
            incident["etag"] = self._etag()
            self.concurrent_label = None
        if incident is not None and body.get("etag") not in (None, incident["etag"]):
            return _error(409, "Conflict", f"Newer version of resource '{name}' exists. Data was not saved")
        if incident is None:
            return _error(404, "NotFound", "Incident not found (the test server does not create incidents)")
        labels = [{"labelName": label["labelName"], "labelType": "User"} for label in properties.get("labels") or []]
        incident["properties"].update({k: v for k, v in properties.items() if k not in ("incidentNumber", "additionalData", "createdTimeUtc", "providerName", "providerIncidentId")})
        incident["properties"]["labels"] = labels
        incident["properties"]["lastModifiedTimeUtc"] = _now()
        incident["etag"] = self._etag()
        return _json(incident)
