"""ServiceNow incidents through the Table API: one ticket per alert, upserted by `correlation_id`.

For each record: `GET /api/now/table/<table>?sysparm_query=correlation_id=<alert key>` (any state: a
closed ticket is updated, not duplicated), then `PATCH /api/now/table/<table>/<sys_id>` or
`POST /api/now/table/<table>` (201). Fields come from `field_map` templates over the record *as
projected for this sink* (`{summary}` is the enrichment summary) plus `severity_map`; a work note carries the enrichment summary.
Auth: basic (`username` + password from `password_env`) or OAuth client credentials (`client_id` +
secret from `client_secret_env`, token from `<instance>/oauth_token.do`). 408/429/5xx are retryable
with Retry-After; other 4xx rejected. An answer without the documented `result` (e.g. 200 with
`{"error": {...}}`, a body cut short) is retryable, never "no ticket"; the lookup and the update are
tried again within the call, a failed create starts the record over with the lookup (pipeline.deliver.sinks.itsm).
Every text field sent is neutralised against spreadsheet formulas.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import httpx
from pydantic import Field, model_validator

from pipeline.config import StrictModel
from pipeline.deliver.minimise import alert_key, record_document
from pipeline.deliver.sinks import Outcome
from pipeline.deliver.sinks.itsm import (
    CallBudget,
    KeyLocks,
    TicketError,
    TicketMemory,
    check,
    check_url,
    neutralise_formula,
    not_documented,
    read_json,
    render,
    upsert_each,
)
from pipeline.deliver.summary import SummarySettings, render_text
from pipeline.secrets import SecretEnv

log = logging.getLogger("pipeline.deliver.sinks.servicenow")

DEFAULT_FIELDS = {
    "short_description": "DLP {alert.severity}: {alert.title}",
    "description": "{summary}",
}
DEFAULT_SEVERITY = {
    "high": {"impact": "1", "urgency": "1"},
    "medium": {"impact": "2", "urgency": "2"},
    "low": {"impact": "3", "urgency": "3"},
    "informational": {"impact": "3", "urgency": "3"},
    "unknown": {"impact": "3", "urgency": "3"},
}
LIMITS = {"short_description": 160, "correlation_display": 100}


class ServiceNowSink:
    class Settings(StrictModel):
        instance_url: str = Field(description="https://<instance>.service-now.com")
        table: str = Field("incident", pattern=r"^[a-z0-9_]+$")
        auth: Literal["basic", "oauth"] = "basic"
        username: str | None = None
        password_env: SecretEnv | None = Field(None, description="environment variable with the password (basic)")
        client_id: str | None = None
        client_secret_env: SecretEnv | None = Field(None, description="environment variable with the OAuth client secret")
        token_url: str | None = Field(None, description="default <instance_url>/oauth_token.do")
        correlation_display: str = "Purview DLP"
        field_map: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_FIELDS), description="incident field → template")
        severity_map: dict[str, dict[str, str]] = Field(default_factory=lambda: {k: dict(v) for k, v in DEFAULT_SEVERITY.items()})
        create_only_fields: list[str] = Field(
            default_factory=lambda: ["assignment_group", "assigned_to", "caller_id"],
            description="mapped fields set when the ticket is created, never overwritten by an update",
        )
        summary: SummarySettings = Field(default_factory=SummarySettings, description="the enrichment summary in `{summary}` and the work note")
        work_notes: bool = Field(True, description="add a work note with the enrichment summary on every delivery")
        close_when_undone: bool = Field(
            False, description="close the ticket (with `closed_fields`) when the DLP match's policy action was undone (alert.lifecycle.state = undone)"
        )
        closed_fields: dict[str, str] = Field(
            default_factory=lambda: {"state": "6", "close_code": "Resolved by request", "close_notes": "The DLP policy action was undone ({alert.exception.reason})."},
            description="incident field → template, set when an undone match closes its ticket",
        )
        timeout_seconds: float = Field(15.0, gt=0)
        ca_bundle: str | None = Field(None, description="CA bundle to verify the instance with (default: system CAs)")

        @model_validator(mode="after")
        def _auth(self) -> ServiceNowSink.Settings:
            if self.auth == "basic" and not (self.username and self.password_env):
                raise ValueError("auth = 'basic' needs username and password_env")
            if self.auth == "oauth" and not (self.client_id and self.client_secret_env):
                raise ValueError("auth = 'oauth' needs client_id and client_secret_env")
            return self

    @classmethod
    async def doctor(cls, settings: ServiceNowSink.Settings, services: Any) -> list[Any]:
        """Sign-in (the OAuth token, or basic) and one read of the table (`sysparm_limit=1`); no ticket is written."""
        from pipeline.doctor import Check

        sink = cls(settings, services)
        name = f"table {settings.table}"
        try:
            response = await sink._request("GET", sink._table_url, params={"sysparm_limit": "1", "sysparm_fields": "sys_id,correlation_id"})
        except TicketError as err:  # the OAuth token request was refused
            return [Check.failed("sign-in", f"OAuth token refused ({err.outcome.reason})", f"check client_id and the secret in {settings.client_secret_env}, and that the OAuth application is active")]
        except httpx.HTTPError as exc:
            return [Check.failed(name, f"cannot reach {sink.base} ({type(exc).__name__})", "check instance_url, DNS, proxy and firewall rules")]
        finally:
            await sink.aclose()
        status = response.status_code
        if status == 401:
            who = f"username {settings.username} and the password in {settings.password_env}" if settings.auth == "basic" else "the OAuth application's access to the REST API"
            return [Check.failed("sign-in", "credentials refused (HTTP 401)", f"check {who}; the account needs 'Web service access only' or a password login")]
        if status == 403:
            return [Check.ok("sign-in", "accepted"), Check.failed(name, "the account cannot read the table (HTTP 403)", f"give it a role that reads and writes {settings.table} records (itil for incident) through the Table API")]
        if status != 200:
            return [Check.ok("sign-in", "accepted") if status != 404 else Check.skipped("sign-in", "not known"),
                    Check.failed(name, f"HTTP {status}", f"check instance_url and that the table {settings.table} exists")]
        return [Check.ok("sign-in", f"{settings.auth} accepted"), Check.ok(name, "readable (the right to write it is proven by the first ticket)")]

    def __init__(self, settings: ServiceNowSink.Settings, services: Any) -> None:
        self.settings = settings
        self.base = check_url(settings.instance_url, "instance_url")
        self.token_url = check_url(settings.token_url or f"{self.base}/oauth_token.do", "token_url")
        auth: httpx.Auth | None = None
        if settings.auth == "basic" and settings.password_env is not None:  # the Settings validator guarantees it
            auth = httpx.BasicAuth(settings.username or "", settings.password_env.resolve().get_secret_value())
        elif settings.client_secret_env is not None:
            self._client_secret = settings.client_secret_env.resolve().get_secret_value()
        self._token: tuple[str, float] | None = None
        self.client = httpx.AsyncClient(
            auth=auth,
            timeout=settings.timeout_seconds,
            verify=settings.ca_bundle or True,
            headers={"Accept": "application/json", "Content-Type": "application/json"},
        )
        self._locks = KeyLocks()
        self._tickets = TicketMemory()  # alert key → sys_id and the record last delivered to it

    @property
    def _table_url(self) -> str:
        return f"{self.base}/api/now/table/{self.settings.table}"

    async def publish(self, records: Sequence[Any]) -> list[Outcome]:
        return await upsert_each(records, self._upsert, locks=self._locks, name="servicenow")

    def ticket(self, record: Any) -> dict[str, str]:
        document = record_document(record)
        key = alert_key(record)
        summary = render_text(document, record_id=record.record_id, settings=self.settings.summary)
        body: dict[str, str] = {"correlation_id": key, "correlation_display": self.settings.correlation_display}
        for field, template in self.settings.field_map.items():
            body[field] = render(template, document, summary=summary)
        severity = (document.get("alert") or {}).get("severity")
        body.update(self.settings.severity_map.get(severity or "unknown", {}))
        if self.settings.close_when_undone and ((document.get("alert") or {}).get("lifecycle") or {}).get("state") == "undone":
            for field, template in self.settings.closed_fields.items():
                body[field] = render(template, document, summary=summary)
        if self.settings.work_notes:
            body["work_notes"] = "DLP pipeline enrichment summary\n" + summary
        body = {field: neutralise_formula(value) for field, value in body.items()}
        for field, limit in LIMITS.items():
            if field in body and len(body[field]) > limit:
                body[field] = body[field][: limit - 1] + "…"
        return body

    async def _upsert(self, record: Any, budget: CallBudget) -> None:  # under the alert's lock (upsert_each)
        key = alert_key(record)
        if self._tickets.delivered(key, record.record_id):
            return  # this very record is on its ticket already (a redelivered batch)
        body = self.ticket(record)
        update = {k: v for k, v in body.items() if k not in self.settings.create_only_fields}
        sys_id = self._tickets.ticket(key) or await budget.repeat(partial(self._find, key))
        if sys_id is not None and not await budget.repeat(partial(self._update, sys_id, update)):
            self._tickets.forget(key)  # deleted meanwhile: look again, else create
            sys_id = await budget.repeat(partial(self._find, key))
            if sys_id is not None and not await budget.repeat(partial(self._update, sys_id, update)):
                sys_id = None
        if sys_id is not None:
            self._tickets.remember(key, sys_id, record.record_id)
            log.info("servicenow: updated ticket %s for alert key %s", sys_id, key)
            return
        # Not repeated here: a create whose answer was lost may have made the ticket, so the record
        # starts over with the lookup (upsert_each), which finds it.
        created = await self._create(body)
        self._tickets.remember(key, created[0], record.record_id)
        log.info("servicenow: created %s for alert key %s", created[1], key)

    async def _find(self, key: str) -> str | None:
        """The sys_id of the ticket carrying `key`, None when the documented answer lists none."""
        params = {
            "sysparm_query": f"correlation_id={key}^ORDERBYsys_created_on",
            "sysparm_fields": "sys_id,number,correlation_id",
            "sysparm_limit": "1",
        }
        action = "find incident"
        answer = read_json(check(await self._request("GET", self._table_url, params=params), ok=(200,), action=action), action)
        results = answer.get("result") if isinstance(answer, dict) else None
        if not isinstance(results, list) or not all(isinstance(row, dict) for row in results):
            raise not_documented(action)  # e.g. 200 with {"error": {...}}: not "no ticket yet"
        # ServiceNow silently ignores an invalid query part (e.g. no correlation_id on a custom table)
        # and then returns any row: never update a ticket that does not carry our key.
        matching = [row for row in results if row.get("correlation_id") == key]
        if results and not matching:
            raise TicketError(Outcome.rejected(f"find incident: the {self.settings.table} table ignored the correlation_id query"))
        if matching and not isinstance(matching[0].get("sys_id"), str):
            raise not_documented(action)
        return matching[0]["sys_id"] if matching else None

    async def _update(self, sys_id: str, update: dict[str, str]) -> bool:
        """PATCH the ticket; False when it is gone (404)."""
        response = await self._request("PATCH", f"{self._table_url}/{sys_id}", json=update)
        if response.status_code == 404:
            return False
        action = "update incident"
        answer = read_json(check(response, ok=(200,), action=action), action)
        if not isinstance(answer, dict) or not isinstance(answer.get("result"), dict):
            raise not_documented(action)
        return True

    async def _create(self, body: dict[str, str]) -> tuple[str, str]:
        """POST the ticket; its sys_id and number (the sys_id when the answer has no number)."""
        action = "create incident"
        answer = read_json(check(await self._request("POST", self._table_url, json=body), ok=(200, 201), action=action), action)
        created = answer.get("result") if isinstance(answer, dict) else None
        if not isinstance(created, dict) or not isinstance(created.get("sys_id"), str):
            raise not_documented(action)
        return created["sys_id"], str(created.get("number") or created["sys_id"])

    async def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        headers = {}
        if self.settings.auth == "oauth":
            headers["Authorization"] = f"Bearer {await self._access_token()}"
        response = await self.client.request(method, url, headers=headers, **kwargs)
        if response.status_code == 401 and self.settings.auth == "oauth" and self._token is not None:
            self._token = None  # expired or revoked: one fresh token, one more try
            headers["Authorization"] = f"Bearer {await self._access_token()}"
            response = await self.client.request(method, url, headers=headers, **kwargs)
        return response

    async def _access_token(self) -> str:
        if self._token is not None and self._token[1] > time.monotonic():
            return self._token[0]
        data = {"grant_type": "client_credentials", "client_id": self.settings.client_id, "client_secret": self._client_secret}
        response = check(await self.client.post(self.token_url, data=data, headers={"Content-Type": "application/x-www-form-urlencoded"}), ok=(200,), action="oauth token")
        answer = response.json()
        lifetime = float(answer.get("expires_in") or 1800)
        self._token = (answer["access_token"], time.monotonic() + max(30.0, lifetime - 60))
        return self._token[0]

    async def aclose(self) -> None:
        await self.client.aclose()
