"""What the ITSM sinks (ServiceNow, Jira) share: HTTP status → Outcome, templates, the enrichment
summary, secrets from the environment, and the upsert loop.

Tickets are keyed by the *alert* (pipeline.deliver.minimise.alert_key): a redelivered record, and a
revised record of the same alert, update the one ticket instead of opening another. Neither service
has an idempotency key, so an upsert is "find by key, then update or create". Records of one call
are handled one after another (two revisions of one alert in a batch find the ticket the first one
created), concurrent calls hold a per-alert lock, and a sink remembers the tickets it created, so
the search index's lag cannot make it create a second one. Two pipeline instances racing on the same new alert within a second could
still both create: see the README ("ITSM tickets").
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlparse

import httpx

from pipeline.deliver.minimise import alert_key, get_path
from pipeline.deliver.sinks import Outcome
from pipeline.errors import SinkError, SinkUnavailable, is_retryable_status, translate
from pipeline.resilience.retry import parse_retry_after

log = logging.getLogger("pipeline.deliver.sinks.itsm")

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)\}")


class KeyLocks:
    """One asyncio lock per alert key: concurrent publish calls of one process (several Event Hub
    partitions in one worker) never search-then-create the same alert's ticket at the same time."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


class TicketMemory:
    """What a sink learnt in this process: alert key → (ticket id, record_id last delivered to it).

    Bounded (oldest entries go first). A record already delivered to its ticket is not sent again
    (a redelivered batch costs no API calls and adds no second work note); a ticket created here is
    found without the search index.
    """

    def __init__(self, maxsize: int = 50_000) -> None:
        self.maxsize = maxsize
        self._entries: dict[str, tuple[str, str | None]] = {}

    def ticket(self, key: str) -> str | None:
        entry = self._entries.get(key)
        return entry[0] if entry else None

    def delivered(self, key: str, record_id: str) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry[1] == record_id

    def remember(self, key: str, ticket: str, record_id: str | None) -> None:
        self._entries.pop(key, None)
        self._entries[key] = (ticket, record_id)
        while len(self._entries) > self.maxsize:
            del self._entries[next(iter(self._entries))]

    def forget(self, key: str) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)


class TicketError(SinkError):
    """An HTTP answer that is not success; carries the Outcome for the record."""

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome
        super().__init__(outcome.reason)


def check_url(url: str, what: str) -> str:
    """https only, except for a loopback host (local tests, a local proxy)."""
    parsed = urlparse(url)
    if parsed.scheme == "https" or (parsed.scheme == "http" and parsed.hostname in ("localhost", "127.0.0.1", "::1")):
        return url.rstrip("/")
    raise ValueError(f"{what} must be an https:// URL")


def check(response: httpx.Response, *, ok: Sequence[int], action: str) -> httpx.Response:
    """Raise TicketError (retryable on 408/429/5xx with Retry-After, else rejected) unless status is ok."""
    status = response.status_code
    if status in ok:
        return response
    if is_retryable_status(status):
        raise TicketError(Outcome.retryable(f"{action}: HTTP {status}", parse_retry_after(response.headers.get("Retry-After"))))
    raise TicketError(Outcome.rejected(f"{action}: HTTP {status}"))


def render(template: str, document: dict[str, Any], *, summary: str = "") -> str:
    """`"DLP {alert.severity}: {alert.title}"` with values from the (projected) record; absent → "".
    `{summary}` is the enrichment summary (summary_lines)."""

    def value(match: re.Match[str]) -> str:
        if match.group(1) == "summary":
            return summary
        found = get_path(document, match.group(1))
        if found is None:
            return ""
        if isinstance(found, list):
            return ", ".join(str(item) for item in found if item is not None)
        return str(found)

    return _PLACEHOLDER.sub(value, template).strip()


def summary_lines(document: dict[str, Any], *, record_id: str) -> list[str]:
    """The enrichment summary for a responder, from the projected record only (what is absent is skipped)."""
    alert = document.get("alert") or {}
    lines: list[str] = []

    def add(label: str, value: Any) -> None:
        if value not in (None, "", [], {}):
            lines.append(f"{label}: {value}")

    add("Alert id", alert.get("alert_id"))
    add("Severity", alert.get("severity"))
    add("Policy", " / ".join(p for p in (alert.get("policy_name"), alert.get("rule_name")) if p) or None)
    add("Workload", alert.get("workload"))
    user = alert.get("user") or {}
    add("User", user.get("upn") or user.get("display_name"))
    files = [name for f in alert.get("files") or [] if isinstance(f, dict) and isinstance(name := f.get("name"), str) and name]
    add("Files", ", ".join(files[:10]) + (f" (+{len(files) - 10} more)" if len(files) > 10 else "") if files else None)
    infos = [
        f"{i.get('name') or i.get('type_id')} x{i.get('count')}" if i.get("count") is not None else str(i.get("name") or i.get("type_id"))
        for i in alert.get("sensitive_info") or []
        if isinstance(i, dict) and (i.get("name") or i.get("type_id"))
    ]
    add("Sensitive info", ", ".join(infos) or None)
    add("Shared externally", alert.get("shared_externally"))
    lifecycle = alert.get("lifecycle") or {}
    exception = alert.get("exception") or {}
    add("DLP lifecycle", str(lifecycle.get("state", "")).replace("_", " ") or None)
    add("Exception reason", exception.get("reason") if isinstance(exception, dict) else None)
    rules = [
        f"{rule.get('name') or rule.get('rule_id')} ({rule.get('severity')})"
        for policy in alert.get("policies") or [] if isinstance(policy, dict)
        for rule in policy.get("rules") or [] if isinstance(rule, dict) and (rule.get("name") or rule.get("rule_id"))
    ]
    add("Rules matched", ", ".join(rules[:10]) + (f" (+{len(rules) - 10} more)" if len(rules) > 10 else "") if rules else None)
    enrichments = document.get("enrichments") or {}
    triage = enrichments.get("triage") or {}
    add("Triage score", triage.get("score"))
    statuses = document.get("enrichment_status") or {}
    add("Enrichment", ", ".join(f"{name}={s.get('state')}" for name, s in sorted(statuses.items()) if isinstance(s, dict)) or None)
    add("Alert", alert.get("alert_url"))
    add("Incident", alert.get("incident_url"))
    lines.append(f"Pipeline record: {record_id}")
    return lines


async def upsert_each(records: Sequence[Any], upsert: Callable[[Any], Awaitable[None]], *, locks: KeyLocks, name: str) -> list[Outcome]:
    """Run `upsert` for each record in order, holding its alert's lock (one ticket per alert, even
    when two batches carry the same alert at once); map failures to outcomes.

    After a retryable failure (throttling, server error) the remaining records are reported
    retryable with the same Retry-After, without calling the service again.
    """
    outcomes: list[Outcome] = []
    stop: Outcome | None = None
    for record in records:
        if stop is not None:
            outcomes.append(stop)
            continue
        try:
            async with locks.hold(alert_key(record)):
                await upsert(record)
        except TicketError as err:
            outcome = err.outcome
        except Exception as exc:  # network errors, timeouts, bad JSON answers
            error = translate(exc, role="sink")
            log.debug("%s: upsert failed", name, exc_info=exc)
            outcome = Outcome.retryable(str(error), error.retry_after) if isinstance(error, SinkUnavailable) else Outcome.rejected(str(error))
        else:
            outcome = Outcome.delivered()
        if outcome.status != "delivered":
            log.warning("%s: record %s not delivered: %s", name, record.record_id, outcome.reason)
        if outcome.status == "retryable":
            stop = Outcome.retryable(f"not sent after an earlier failure ({outcome.reason})", outcome.retry_after)
        outcomes.append(outcome)
    return outcomes
