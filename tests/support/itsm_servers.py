"""In-memory ServiceNow Table API and Jira Cloud REST v3 servers for pytest-httpserver.

They follow the documented contracts closely enough that "never a second ticket" is tested for real:
tickets live in memory, searches filter them, and failures can be injected before (or after!) the
server has acted, as a lost response would look to the client. Besides HTTP statuses, a failure can
answer in a shape the API does not document (200 with an error body, a body cut short), and `Chaos`
injects every fault mode at random, from a seeded generator, at given rates.
"""

from __future__ import annotations

import base64
import itertools
import json
import random
import re
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs

from werkzeug import Request, Response


@dataclass
class Failure:
    method: str
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    after_acting: bool = False  # act (create/update) first, then answer with the failure
    path: str | None = None  # only for this path (else any path of the method)
    # "status": an error body with `status`; "error_body": the API's error document with `status`
    # (e.g. 200) instead of the documented answer; "cut_short": the real answer's body cut in half
    # (with after_acting: the server acted, then the client gets half an answer).
    shape: Literal["status", "error_body", "cut_short"] = "status"

    def applies(self, request: Request) -> bool:
        return self.method == request.method and (self.path is None or self.path == request.path)


@dataclass
class Chaos:
    """Random faults on every request, at these rates (each between 0 and 1, summing to at most 1).

    `unavailable`: 503 before acting; `error_body`: 200 with an error body, before acting;
    `cut_short`: acts, then answers with half its body; `fail_after_acting`: acts, then answers 500.
    """

    unavailable: float = 0.0
    error_body: float = 0.0
    cut_short: float = 0.0
    fail_after_acting: float = 0.0
    seed: int = 0
    drawn: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    def draw(self, request: Request) -> Failure | None:
        roll = self._random.random()
        for name, rate, failure in (
            ("unavailable", self.unavailable, Failure(request.method, 503)),
            ("error_body", self.error_body, Failure(request.method, 200, shape="error_body")),
            ("cut_short", self.cut_short, Failure(request.method, 200, after_acting=True, shape="cut_short")),
            ("fail_after_acting", self.fail_after_acting, Failure(request.method, 500, after_acting=True)),
        ):
            if roll < rate:
                self.drawn[name] = self.drawn.get(name, 0) + 1
                return failure
            roll -= rate
        return None


def _cut_short(response: Response) -> Response:
    """The answer's body cut in half, as a proxy or a dropped connection leaves it."""
    data = response.get_data()
    return Response(data[: len(data) // 2], status=response.status_code, headers=dict(response.headers))


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body), status=status, headers=headers or {}, content_type="application/json")


class ServiceNow:
    """`/api/now/table/incident` and `/oauth_token.do`."""

    def __init__(self, *, username: str = "svc-dlp", password: str = "pw-test", client_id: str = "cid", client_secret: str = "cs-test") -> None:
        self.tickets: dict[str, dict[str, Any]] = {}
        self.work_notes: dict[str, list[str]] = {}
        self.requests: list[tuple[str, str, Any]] = []  # method, path, body
        self.failures: deque[Failure] = deque()
        self.tokens_issued = 0
        self.ignore_query = False  # as ServiceNow does with a query on a field the table lacks
        self.chaos: Chaos | None = None
        self.basic = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
        self.client = (client_id, client_secret)
        self._numbers = itertools.count(10001)

    def install(self, server) -> None:
        server.expect_request(re.compile(r"^/api/now/table/incident(/[0-9a-f]+)?$")).respond_with_handler(self.table)
        server.expect_request("/oauth_token.do", method="POST").respond_with_handler(self.token)

    def token(self, request: Request) -> Response:
        form = parse_qs(request.get_data(as_text=True))
        if form.get("grant_type") != ["client_credentials"] or (form.get("client_id", [""])[0], form.get("client_secret", [""])[0]) != self.client:
            return _json({"error": "access_denied"}, 401)
        self.tokens_issued += 1
        return _json({"access_token": f"token-{self.tokens_issued}", "token_type": "Bearer", "expires_in": 1799})

    def _authorised(self, request: Request) -> bool:
        header = request.headers.get("Authorization", "")
        return header == self.basic or (header.startswith("Bearer token-") and int(header.rsplit("-", 1)[1]) <= self.tokens_issued)

    def table(self, request: Request) -> Response:
        body = request.get_json(silent=True)
        self.requests.append((request.method, request.path, body))
        if not self._authorised(request):
            return _json({"error": {"message": "User Not Authenticated"}, "status": "failure"}, 401)
        failure = self.failures.popleft() if self.failures and self.failures[0].applies(request) else None
        if failure is None and self.chaos is not None:
            failure = self.chaos.draw(request)
        if failure is not None and not failure.after_acting:
            return self._failure(failure, None)
        response = self._act(request, body)
        return self._failure(failure, response) if failure is not None else response

    @staticmethod
    def _failure(failure: Failure, response: Response | None) -> Response:
        if failure.shape == "cut_short" and response is not None:
            return _cut_short(response)
        message = "Rate limit exceeded" if failure.status == 429 else "failure"
        return _json({"error": {"message": message, "detail": "injected"}, "status": "failure"}, failure.status, failure.headers)

    def duplicates(self) -> int:
        """Tickets beyond the first of each correlation_id."""
        keys = [t.get("correlation_id") for t in self.tickets.values()]
        return len(keys) - len(set(keys))

    def _act(self, request: Request, body: Any) -> Response:
        sys_id = request.path.rsplit("/", 1)[1] if request.path.count("/") == 5 else None
        if request.method == "GET" and sys_id is None:
            conditions = [part.split("=", 1) for part in request.args.get("sysparm_query", "").split("^") if "=" in part and not part.startswith("ORDERBY")]
            found = [t for t in self.tickets.values() if self.ignore_query or all(str(t.get(k)) == v for k, v in conditions)]
            limit = int(request.args.get("sysparm_limit", "10000"))
            fields = request.args.get("sysparm_fields")
            rows = [{k: t[k] for k in fields.split(",")} if fields else t for t in found[:limit]]
            return _json({"result": rows}, headers={"X-Total-Count": str(len(found))})
        if request.method == "POST" and sys_id is None:
            if not isinstance(body, dict):
                return _json({"error": {"message": "invalid body"}}, 400)
            sys_id = uuid.uuid4().hex
            ticket = {k: v for k, v in body.items() if k != "work_notes"}
            ticket.update(sys_id=sys_id, number=f"INC{next(self._numbers):07d}", state="1")
            self.tickets[sys_id] = ticket
            self.work_notes[sys_id] = [body["work_notes"]] if body.get("work_notes") else []
            return _json({"result": ticket}, 201, {"Location": f"/api/now/table/incident/{sys_id}"})
        if request.method == "PATCH" and sys_id is not None:
            if sys_id not in self.tickets:
                return _json({"error": {"message": "No Record found"}, "status": "failure"}, 404)
            self.tickets[sys_id].update({k: v for k, v in body.items() if k != "work_notes"})
            if body.get("work_notes"):
                self.work_notes[sys_id].append(body["work_notes"])
            return _json({"result": self.tickets[sys_id]})
        return _json({"error": {"message": "not supported by the test server"}}, 405)


class Jira:
    """`/rest/api/3/search/jql`, `/rest/api/3/issue`, `/rest/api/3/issue/{key}`.

    `index_lag`: a created issue is not found by search until `catch_up()` (Jira's search index is
    eventually consistent).
    """

    def __init__(self, *, email: str = "dlp-bot@contoso.com", token: str = "jira-token-test", project: str = "SEC") -> None:
        self.issues: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, Any]] = []
        self.failures: deque[Failure] = deque()
        self.auth = "Basic " + base64.b64encode(f"{email}:{token}".encode()).decode()
        self.project = project
        self.index_lag = False
        self.issue_types = ["Task", "Bug"]  # of the project, as GET /project/{key} lists them
        self.permissions = {"BROWSE_PROJECTS": True, "CREATE_ISSUES": True, "EDIT_ISSUES": True}  # what /mypermissions grants
        self.chaos: Chaos | None = None
        self.done_transition = "31"  # the workflow's one transition: to Done (status "Done"), from any other status
        self._indexed: set[str] = set()
        self._ids = itertools.count(10001)

    def install(self, server) -> None:
        server.expect_request(re.compile(r"^/rest/api/3/(search/jql|issue(/[A-Z]+-\d+(/transitions)?)?|myself|mypermissions|project/[A-Z][A-Z0-9_]*)$")).respond_with_handler(self.handle)

    def catch_up(self) -> None:
        self._indexed = set(self.issues)

    def handle(self, request: Request) -> Response:
        body = request.get_json(silent=True)
        self.requests.append((request.method, request.path, body))
        if request.headers.get("Authorization") != self.auth:
            return _json({"errorMessages": ["Unauthorized"]}, 401)
        failure = self.failures.popleft() if self.failures and self.failures[0].applies(request) else None
        if failure is None and self.chaos is not None:
            failure = self.chaos.draw(request)
        if failure is not None and not failure.after_acting:
            return self._failure(failure, None)
        response = self._act(request, body)
        return self._failure(failure, response) if failure is not None else response

    @staticmethod
    def _failure(failure: Failure, response: Response | None) -> Response:
        if failure.shape == "cut_short" and response is not None:
            return _cut_short(response)
        return _json({"errorMessages": ["injected"], "errors": {}}, failure.status, failure.headers)

    def duplicates(self) -> int:
        """Issues beyond the first of each alert key label."""
        keys = [label for issue in self.issues.values() for label in issue["fields"].get("labels", []) if label.startswith("dlp-")]
        return len(keys) - len(set(keys))

    def _act(self, request: Request, body: Any) -> Response:
        path = request.path
        if request.method == "GET" and path == "/rest/api/3/myself":
            return _json({"accountId": "5b10ac8d82e05b22cc7d4ef5", "accountType": "atlassian", "active": True})
        if request.method == "GET" and path.startswith("/rest/api/3/project/"):
            key = path.rsplit("/", 1)[1]
            if key != self.project:
                return _json({"errorMessages": ["No project could be found with key '" + key + "'."]}, 404)
            return _json({"id": "10000", "key": key, "issueTypes": [{"id": str(10001 + i), "name": name} for i, name in enumerate(self.issue_types)]})
        if request.method == "GET" and path == "/rest/api/3/mypermissions":
            asked = [p for p in request.args.get("permissions", "").split(",") if p]
            if request.args.get("projectKey") != self.project:
                return _json({"errorMessages": ["No project could be found."]}, 404)
            return _json({"permissions": {p: {"key": p, "havePermission": self.permissions.get(p, False)} for p in asked}})
        if path == "/rest/api/3/search/jql" and request.method == "POST":
            if not isinstance(body, dict) or "jql" not in body or "startAt" in body:
                return _json({"errorMessages": ["Invalid request payload. Refer to the REST API documentation and try again."]}, 400)
            project = re.search(r'project = "([^"]+)"', body["jql"])
            label = re.search(r'labels = "([^"]+)"', body["jql"])
            visible = [k for k in self.issues if not self.index_lag or k in self._indexed]
            found = [
                k for k in visible
                if (not project or k.startswith(project.group(1) + "-")) and (not label or label.group(1) in self.issues[k]["fields"].get("labels", []))
            ]
            found = found[: body.get("maxResults", 50)]
            wanted = body.get("fields") or []
            return _json({"issues": [{"id": self.issues[k]["id"], "key": k, "fields": {f: self.issues[k]["fields"].get(f) for f in wanted}} for k in found]})
        if path == "/rest/api/3/issue" and request.method == "POST":
            fields = (body or {}).get("fields") or {}
            problems = self._check_fields(fields, creating=True)
            if problems:
                return _json({"errorMessages": [], "errors": problems}, 400)
            number = next(self._ids)
            key = f"{fields['project']['key']}-{number - 10000}"
            self.issues[key] = {"id": str(number), "key": key, "fields": fields}
            if not self.index_lag:
                self._indexed.add(key)
            return _json({"id": str(number), "key": key, "self": f"{request.host_url}rest/api/3/issue/{number}"}, 201)
        if path.endswith("/transitions") and request.method == "POST":
            key = path.split("/")[-2]
            if key not in self.issues:
                return _json({"errorMessages": ["Issue does not exist or you do not have permission to see it."]}, 404)
            wanted = ((body or {}).get("transition") or {}).get("id")
            if wanted != self.done_transition or self.issues[key].get("status") == "Done":
                return _json({"errorMessages": [f"Transition id '{wanted}' is not valid for this issue."]}, 400)
            self.issues[key]["status"] = "Done"
            return Response(status=204)
        if path.startswith("/rest/api/3/issue/") and request.method == "PUT":
            key = path.rsplit("/", 1)[1]
            if key not in self.issues:
                return _json({"errorMessages": ["Issue does not exist or you do not have permission to see it."]}, 404)
            fields = (body or {}).get("fields") or {}
            problems = self._check_fields(fields, creating=False)
            if problems:
                return _json({"errorMessages": [], "errors": problems}, 400)
            self.issues[key]["fields"].update(fields)
            return Response(status=204)
        return _json({"errorMessages": ["not supported by the test server"]}, 405)

    def _check_fields(self, fields: dict[str, Any], *, creating: bool) -> dict[str, str]:
        problems = {}
        if creating:
            if (fields.get("project") or {}).get("key") != self.project:
                problems["project"] = "valid project is required"
            if not (fields.get("issuetype") or {}).get("name"):
                problems["issuetype"] = "Specify an issue type"
            if not fields.get("summary"):
                problems["summary"] = "You must specify a summary of the issue."
            for label in fields.get("labels", []):
                if " " in label or len(label) > 255:
                    problems["labels"] = "label cannot contain spaces"
        if "description" in fields and not _is_adf(fields["description"]):
            problems["description"] = "Operation value must be an Atlassian Document (see the Atlassian Document Format)"
        if "summary" in fields and len(fields["summary"]) > 255:
            problems["summary"] = "Summary must be less than 255 characters."
        return problems


def _is_adf(node: Any) -> bool:
    if not isinstance(node, dict) or node.get("type") != "doc" or node.get("version") != 1 or not isinstance(node.get("content"), list):
        return False

    def ok(n: Any) -> bool:
        if not isinstance(n, dict) or not isinstance(n.get("type"), str):
            return False
        if n["type"] == "text":
            return isinstance(n.get("text"), str) and n["text"] != ""
        return all(ok(c) for c in n.get("content", []))

    return all(ok(c) for c in node["content"])


def adf_text(node: Any) -> str:
    if isinstance(node, dict):
        return (node.get("text") or "") + "\n".join(adf_text(c) for c in node.get("content", []))
    return ""


# -- the sinks pointed at these servers ----------------------------------------------------------


def snow_settings(httpserver, **settings: Any) -> dict[str, Any]:
    """ServiceNow sink settings for the local Table API (basic auth, password in TEST_SNOW_PASSWORD);
    a setting given as None is left out (its default applies)."""
    values = {"instance_url": httpserver.url_for("/").rstrip("/"), "username": "svc-dlp", "password_env": "TEST_SNOW_PASSWORD", "timeout_seconds": 5, **settings}
    return {key: value for key, value in values.items() if value is not None}


def jira_settings(httpserver, **settings: Any) -> dict[str, Any]:
    """Jira sink settings for the local Jira Cloud API (project SEC, token in TEST_JIRA_TOKEN)."""
    values = {"site_url": httpserver.url_for("/").rstrip("/"), "email": "dlp-bot@contoso.com", "api_token_env": "TEST_JIRA_TOKEN", "project_key": "SEC", "timeout_seconds": 5, **settings}
    return {key: value for key, value in values.items() if value is not None}


def snow_sink(httpserver, **settings: Any):
    from pipeline.deliver.sinks.servicenow import ServiceNowSink

    return ServiceNowSink(ServiceNowSink.Settings(**snow_settings(httpserver, **settings)), None)


def jira_sink(httpserver, **settings: Any):
    from pipeline.deliver.sinks.jira import JiraSink

    return JiraSink(JiraSink.Settings(**jira_settings(httpserver, **settings)), None)


def snow_entry(httpserver, name: str = "snow", **settings: Any) -> dict[str, Any]:
    """The `[[sinks]]` entry of a ServiceNow sink on the local server."""
    from tests.support.config import sink_entry

    return sink_entry(name, "servicenow", snow_settings(httpserver, **settings))


def jira_entry(httpserver, name: str = "jira", **settings: Any) -> dict[str, Any]:
    from tests.support.config import sink_entry

    return sink_entry(name, "jira", jira_settings(httpserver, **settings))


async def publish(sink: Any, records: list[Any]) -> list[Any]:
    """One publish call, the sink closed after it."""
    try:
        return await sink.publish(records)
    finally:
        await sink.aclose()
