"""Jira Cloud issues through REST v3: one issue per alert, found again by a label carrying its key.

For each record: `POST /rest/api/3/search/jql` with `project = "<key>" AND labels = "<alert key>"`,
then `PUT /rest/api/3/issue/<issue key>` (summary, description, priority) or
`POST /rest/api/3/issue` (201 `{"id", "key", "self"}`) with the labels `dlp` and the alert key. The
description is an Atlassian Document Format document with the enrichment summary of the record *as
projected for this sink*. With `undone_transition_id`, a record whose DLP match was undone
(`alert.lifecycle.state` = undone) also runs that workflow transition
(`POST /rest/api/3/issue/<issue key>/transitions`); a 400 (the transition is not available from the
issue's status, e.g. it is closed already) leaves the updated issue as it is. Basic auth with an account e-mail and an API token from `api_token_env`.
408/429/5xx are retryable with Retry-After; other 4xx rejected.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import httpx
from pydantic import Field

from pipeline.config import StrictModel
from pipeline.deliver.minimise import alert_key, record_document
from pipeline.deliver.sinks import Outcome
from pipeline.deliver.sinks.itsm import KeyLocks, TicketMemory, check, check_url, render, summary_lines, upsert_each
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
        priority_map: dict[str, str] = Field(default_factory=dict, description='severity → priority name, e.g. { high = "High" }')
        timeout_seconds: float = Field(15.0, gt=0)
        ca_bundle: str | None = None
        undone_transition_id: str | None = Field(
            None, pattern=r"^[0-9]+$",
            description="id of the workflow transition (e.g. to Done) run when the DLP match was undone; none: the issue is only updated",
        )

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

    def fields(self, record: Any) -> dict[str, Any]:
        document = record_document(record)
        summary = render(self.settings.summary, document) or "DLP alert"
        summary = summary if len(summary) <= 255 else summary[:254] + "…"
        fields: dict[str, Any] = {
            "summary": summary,
            "description": adf("Purview DLP alert", summary_lines(document, record_id=record.record_id)),
        }
        priority = self.settings.priority_map.get((document.get("alert") or {}).get("severity") or "unknown")
        if priority:
            fields["priority"] = {"name": priority}
        return fields

    async def _upsert(self, record: Any) -> None:  # under the alert's lock (upsert_each)
        key = alert_key(record)
        if self._issues.delivered(key, record.record_id):
            return  # this very record is on its issue already (a redelivered batch)
        fields = self.fields(record)
        issue = self._issues.ticket(key) or await self._find(key)
        if issue is not None:
            response: httpx.Response | None
            response = await self.client.put(f"{self.base}/rest/api/3/issue/{issue}", json={"fields": fields})
            if response.status_code == 404:  # deleted meanwhile: look again, else create
                self._issues.forget(key)
                issue = await self._find(key)
                response = await self.client.put(f"{self.base}/rest/api/3/issue/{issue}", json={"fields": fields}) if issue else None
            if response is not None and issue is not None:  # issue is always set when response is
                check(response, ok=(200, 204), action="update issue")
                await self._close_if_undone(record, issue)
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
        response = check(await self.client.post(f"{self.base}/rest/api/3/issue", json=body), ok=(201,), action="create issue")
        created = response.json()["key"]
        await self._close_if_undone(record, created)
        self._issues.remember(key, created, record.record_id)
        log.info("jira: created %s for alert key %s", created, key)

    async def _close_if_undone(self, record: Any, issue: str) -> None:
        transition = self.settings.undone_transition_id
        if transition is None or ((record_document(record).get("alert") or {}).get("lifecycle") or {}).get("state") != "undone":
            return
        response = await self.client.post(f"{self.base}/rest/api/3/issue/{issue}/transitions", json={"transition": {"id": transition}})
        if response.status_code == 400:  # not available from the issue's status (closed already, or another workflow)
            log.info("jira: transition %s not available for %s; the issue was updated only", transition, issue)
            return
        check(response, ok=(204,), action="close issue")
        log.info("jira: closed %s (DLP match undone)", issue)

    async def _find(self, key: str) -> str | None:
        jql = f'project = "{self.settings.project_key}" AND labels = "{key}" ORDER BY created ASC'
        response = check(
            await self.client.post(f"{self.base}/rest/api/3/search/jql", json={"jql": jql, "fields": ["labels"], "maxResults": 1}),
            ok=(200,),
            action="search issues",
        )
        issues = [i for i in response.json().get("issues") or [] if key in ((i.get("fields") or {}).get("labels") or [])]
        return issues[0]["key"] if issues else None

    async def aclose(self) -> None:
        await self.client.aclose()
