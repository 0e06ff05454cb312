"""Jira Cloud issues through REST v3: one issue per alert, found again by a label carrying its key.

For each record: `POST /rest/api/3/search/jql` with `project = "<key>" AND labels = "<alert key>"`,
then `PUT /rest/api/3/issue/<issue key>` (summary, description, priority) or
`POST /rest/api/3/issue` (201 `{"id", "key", "self"}`) with the labels `dlp` and the alert key. The
description is an Atlassian Document Format document with the enrichment summary of the record *as
projected for this sink*. With `undone_transition_id`, a record whose DLP match was undone
(`alert.lifecycle.state` = undone) also runs that workflow transition
(`POST /rest/api/3/issue/<issue key>/transitions`); a 400 (the transition is not available from the
issue's status, e.g. it is closed already) leaves the updated issue as it is. Basic auth with an
account e-mail and an API token from `api_token_env`.
408/429/5xx are retryable with Retry-After; other 4xx rejected. An answer that is not the documented
shape (a search without `issues`, an error body with 200, a body cut short) is retryable, never "no
issue"; the search and the update are tried again within the call, a failed create starts the record
over with the search (pipeline.deliver.sinks.itsm). The summary is neutralised against spreadsheet formulas.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import Any

import httpx
from pydantic import Field

from pipeline.config import StrictModel
from pipeline.deliver.minimise import alert_key, record_document
from pipeline.deliver.sinks import Outcome
from pipeline.deliver.sinks.itsm import (
    CallBudget,
    KeyLocks,
    TicketMemory,
    check,
    check_url,
    neutralise_formula,
    not_documented,
    read_json,
    render,
    upsert_each,
)
from pipeline.deliver.summary import SummarySettings, render_parts
from pipeline.secrets import SecretEnv

log = logging.getLogger("pipeline.deliver.sinks.jira")


def adf(heading: str, lines: list[str]) -> dict[str, Any]:
    """An Atlassian Document Format document: a heading and a bullet list of `Label: value` lines."""

    def text(value: str) -> dict[str, Any]:
        return {"type": "text", "text": value}

    content: list[dict[str, Any]] = [{"type": "heading", "attrs": {"level": 3}, "content": [text(heading or "DLP alert")]}]
    items = [{"type": "listItem", "content": [{"type": "paragraph", "content": [text(line)]}]} for line in lines if line]
    if items:
        content.append({"type": "bulletList", "content": items})
    return {"type": "doc", "version": 1, "content": content}


class JiraSink:
    class Settings(StrictModel):
        site_url: str = Field(description="https://<site>.atlassian.net")
        email: str = Field(min_length=3, description="the account the API token belongs to")
        api_token_env: SecretEnv = Field( description="environment variable with the API token")
        project_key: str = Field(pattern=r"^[A-Z][A-Z0-9_]+$")
        issue_type: str = "Task"
        labels: list[str] = Field(default_factory=lambda: ["dlp"], description="added to new issues (with the alert key)")
        summary: str = "DLP {alert.severity}: {alert.title}"
        description: SummarySettings = Field(default_factory=SummarySettings, description="the enrichment summary rendered as the issue description")
        priority_map: dict[str, str] = Field(default_factory=dict, description='severity → priority name, e.g. { high = "High" }')
        timeout_seconds: float = Field(15.0, gt=0)
        ca_bundle: str | None = None
        undone_transition_id: str | None = Field(
            None, pattern=r"^[0-9]+$",
            description="id of the workflow transition (e.g. to Done) run when the DLP match was undone; none: the issue is only updated",
        )

    @classmethod
    async def doctor(cls, settings: JiraSink.Settings, services: Any) -> list[Any]:
        """Sign-in (`/myself`), the project and its issue type, and the project permissions the sink
        uses (`/mypermissions`): GET requests only, no issue is created or changed."""
        from pipeline.doctor import Check

        sink = cls(settings, services)
        key = settings.project_key
        try:
            me = await sink.client.get(f"{sink.base}/rest/api/3/myself")
            if me.status_code in (401, 403):
                return [Check.failed("sign-in", f"e-mail and API token refused (HTTP {me.status_code})", f"check email and the API token in {settings.api_token_env} (tokens expire; create one at id.atlassian.com)")]
            if me.status_code != 200:
                return [Check.failed("sign-in", f"HTTP {me.status_code}", "check site_url")]
            checks = [Check.ok("sign-in", "accepted")]
            project = await sink.client.get(f"{sink.base}/rest/api/3/project/{key}")
            if project.status_code != 200:
                return [*checks, Check.failed(f"project {key}", f"not found or not visible to this account (HTTP {project.status_code})", "check project_key, and give the account Browse projects in that project")]
            types = [t.get("name") for t in project.json().get("issueTypes") or [] if isinstance(t, dict)]
            if types and settings.issue_type not in types:
                checks.append(Check.failed(f"project {key}", f"no issue type {settings.issue_type!r} (it has {', '.join(map(str, types))})", "set issue_type to one of them"))
            else:
                checks.append(Check.ok(f"project {key}", f"visible, issue type {settings.issue_type!r} present" if types else "visible"))
            wanted = ("BROWSE_PROJECTS", "CREATE_ISSUES", "EDIT_ISSUES")
            answer = await sink.client.get(f"{sink.base}/rest/api/3/mypermissions", params={"projectKey": key, "permissions": ",".join(wanted)})
            if answer.status_code != 200:
                checks.append(Check.failed("permissions", f"HTTP {answer.status_code} asking for them", "check site_url and project_key"))
                return checks
            held = answer.json().get("permissions") or {}
            missing = [p for p in wanted if not (held.get(p) or {}).get("havePermission")]
            if missing:
                checks.append(Check.failed("permissions", f"missing in {key}: {', '.join(missing)}", "add the account to a project role that has them in the project's permission scheme"))
            else:
                checks.append(Check.ok("permissions", ", ".join(wanted)))
            return checks
        except httpx.HTTPError as exc:
            return [Check.failed("sign-in", f"cannot reach {sink.base} ({type(exc).__name__})", "check site_url, DNS, proxy and firewall rules")]
        finally:
            await sink.aclose()

    def __init__(self, settings: JiraSink.Settings, services: Any) -> None:
        self.settings = settings
        self.base = check_url(settings.site_url, "site_url")
        token = settings.api_token_env.resolve().get_secret_value()
        self.client = httpx.AsyncClient(
            auth=httpx.BasicAuth(settings.email, token),
            timeout=settings.timeout_seconds,
            verify=settings.ca_bundle or True,
            headers={"Accept": "application/json", "Content-Type": "application/json"},
        )
        self._locks = KeyLocks()
        self._issues = TicketMemory()  # alert key → issue key and the record last delivered to it

    async def publish(self, records: Sequence[Any]) -> list[Outcome]:
        return await upsert_each(records, self._upsert, locks=self._locks, name="jira")

    def fields(self, record: Any, document: dict[str, Any]) -> dict[str, Any]:
        """The issue fields of `record`, from its document as projected for this sink."""
        summary = neutralise_formula(render(self.settings.summary, document) or "DLP alert")
        summary = summary if len(summary) <= 255 else summary[:254] + "…"
        fields: dict[str, Any] = {
            "summary": summary,
            "description": adf(*render_parts(document, record_id=record.record_id, settings=self.settings.description)),
        }
        priority = self.settings.priority_map.get((document.get("alert") or {}).get("severity") or "unknown")
        if priority:
            fields["priority"] = {"name": priority}
        return fields

    async def _upsert(self, record: Any, budget: CallBudget) -> None:  # under the alert's lock (upsert_each)
        key = alert_key(record)
        if self._issues.delivered(key, record.record_id):
            return  # this very record is on its issue already (a redelivered batch)
        document = record_document(record)
        fields = self.fields(record, document)
        undone = ((document.get("alert") or {}).get("lifecycle") or {}).get("state") == "undone"
        issue = self._issues.ticket(key) or await budget.repeat(partial(self._find, key))
        if issue is not None and not await budget.repeat(partial(self._update, issue, fields)):
            self._issues.forget(key)  # deleted meanwhile: look again, else create
            issue = await budget.repeat(partial(self._find, key))
            if issue is not None and not await budget.repeat(partial(self._update, issue, fields)):
                issue = None
        if issue is not None:
            await budget.repeat(partial(self._close_if_undone, issue, undone))
            self._issues.remember(key, issue, record.record_id)
            log.info("jira: updated %s for alert key %s", issue, key)
            return
        body = {
            "fields": {
                "project": {"key": self.settings.project_key},
                "issuetype": {"name": self.settings.issue_type},
                "labels": [*dict.fromkeys([*self.settings.labels, key])],
                **fields,
            }
        }
        # Not repeated here: a create whose answer was lost may have made the issue, so the record
        # starts over with the search (upsert_each), which finds it.
        action = "create issue"
        answer = read_json(check(await self.client.post(f"{self.base}/rest/api/3/issue", json=body), ok=(201,), action=action), action)
        created = answer.get("key") if isinstance(answer, dict) else None
        if not isinstance(created, str):
            raise not_documented(action)
        await budget.repeat(partial(self._close_if_undone, created, undone))
        self._issues.remember(key, created, record.record_id)
        log.info("jira: created %s for alert key %s", created, key)

    async def _close_if_undone(self, issue: str, undone: bool) -> None:
        transition = self.settings.undone_transition_id
        if transition is None or not undone:
            return
        response = await self.client.post(f"{self.base}/rest/api/3/issue/{issue}/transitions", json={"transition": {"id": transition}})
        if response.status_code == 400:  # not available from the issue's status (closed already, or another workflow)
            log.info("jira: transition %s not available for %s; the issue was updated only", transition, issue)
            return
        check(response, ok=(204,), action="close issue")
        log.info("jira: closed %s (DLP match undone)", issue)

    async def _find(self, key: str) -> str | None:
        """The key of the issue labelled `key`, None when the documented answer lists none."""
        jql = f'project = "{self.settings.project_key}" AND labels = "{key}" ORDER BY created ASC'
        action = "search issues"
        response = check(
            await self.client.post(f"{self.base}/rest/api/3/search/jql", json={"jql": jql, "fields": ["labels"], "maxResults": 1}),
            ok=(200,),
            action=action,
        )
        answer = read_json(response, action)
        found = answer.get("issues") if isinstance(answer, dict) else None
        if not isinstance(found, list) or not all(isinstance(i, dict) for i in found):
            raise not_documented(action)  # e.g. 200 with {"errorMessages": [...]}: not "no issue yet"
        issues = [i for i in found if key in ((i.get("fields") or {}).get("labels") or [])]
        if issues and not isinstance(issues[0].get("key"), str):
            raise not_documented(action)
        return issues[0]["key"] if issues else None

    async def _update(self, issue: str, fields: dict[str, Any]) -> bool:
        """PUT the issue's fields; False when it is gone (404). The documented success is 204; a 200
        counts only when its body is not an error document."""
        response = await self.client.put(f"{self.base}/rest/api/3/issue/{issue}", json={"fields": fields})
        if response.status_code == 404:
            return False
        action = "update issue"
        check(response, ok=(200, 204), action=action)
        if response.status_code == 200 and response.content:
            answer = read_json(response, action)
            if not isinstance(answer, dict) or answer.get("errorMessages") or answer.get("errors"):
                raise not_documented(action)
        return True

    async def aclose(self) -> None:
        await self.client.aclose()
