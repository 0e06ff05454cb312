"""What the ITSM sinks (ServiceNow, Jira) share: HTTP status → Outcome, templates, the enrichment
summary, secrets from the environment, and the upsert loop.

Tickets are keyed by the *alert* (pipeline.deliver.minimise.alert_key): a redelivered record, and a
revised record of the same alert, update the one ticket instead of opening another. Neither service
has an idempotency key, so an upsert is "find by key, then update or create". Records of one call
are handled one after another (two revisions of one alert in a batch find the ticket the first one
created), concurrent calls hold a per-alert lock, and a sink remembers the tickets it created, so
the search index's lag cannot make it create a second one. Two pipeline instances racing on the same new alert within a second could
still both create: see the README ("ITSM tickets").

Faults, within one publish call (`upsert_each`, `CallBudget`):
- an answer that is not the documented shape (an error body with 200, a body cut short, a missing
  field) is a retryable failure, never "not found", so it cannot open a second ticket;
- a request that is safe to send again (a lookup, an update) is tried again at once with a short
  backoff; a failed create is never sent again blind: the record starts over with a lookup, which
  finds the ticket a create whose answer was lost did make, and the record counts as delivered;
- one record's transient failure does not hold back the others: each record gets its own tries,
  until the batch's budget for the sink (`publish_deadline`) runs out. Only a Retry-After longer
  than MAX_WAIT_SECONDS, or FAILED_IN_A_ROW records in a row failing every try (the service is
  down), makes the rest of the call retryable without sending it;
- every text field sent is neutralised against spreadsheet formulas (`neutralise_formula`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import urlparse

import httpx

from pipeline.deliver.minimise import alert_key
from pipeline.deliver.sinks import Outcome, publish_deadline
from pipeline.deliver.summary import fill
from pipeline.errors import SinkError, SinkUnavailable, is_retryable_status, translate
from pipeline.resilience.retry import backoff_wait, parse_retry_after

log = logging.getLogger("pipeline.deliver.sinks.itsm")

T = TypeVar("T")

FAILURES_PER_RECORD = 5  # failed requests a record may have in one call (lookups, updates, creates together)
FIRST_WAIT_SECONDS = 0.05  # doubled after each failed try, jittered; never shorter than a Retry-After
MAX_WAIT_SECONDS = 2.0  # a longer Retry-After is left to the router: the rest of the call is not sent
FAILED_IN_A_ROW = 3  # records in a row that failed every try: the service is down, the rest is not sent
DEFAULT_BUDGET_SECONDS = 30.0  # a call outside the deliver stage (no publish_deadline)

# A cell starting with one of these is a formula to Excel, LibreOffice or Google Sheets (an ITSM's
# CSV/Excel export): `=`, `+`, `-`, `@`, tab and carriage return, and their full-width forms.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\uff1d", "\uff0b", "\uff0d", "\uff20")


def neutralise_formula(text: str) -> str:
    """`text` with a leading `'` when it starts like a spreadsheet formula (OWASP's advice for CSV
    injection), so an exported ticket field shows the text instead of running it; else unchanged."""
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


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
    """Raise TicketError unless status is ok: retryable on 408/429/5xx (with Retry-After) and on a
    success code the API does not document for this call (e.g. 200 with an error body where a
    create answers 201: nothing says the ticket exists), else rejected."""
    status = response.status_code
    if status in ok:
        return response
    if 200 <= status < 300:
        raise not_documented(action)
    if is_retryable_status(status):
        raise TicketError(Outcome.retryable(f"{action}: HTTP {status}", parse_retry_after(response.headers.get("Retry-After"))))
    raise TicketError(Outcome.rejected(f"{action}: HTTP {status}"))


def not_documented(action: str) -> TicketError:
    """A retryable failure for an answer that is not the documented shape: never read as "not found"."""
    return TicketError(Outcome.retryable(f"{action}: the answer is not the documented shape"))


def read_json(response: httpx.Response, action: str) -> Any:
    """The answer's JSON; a body that is not JSON (cut short, an HTML error page) is retryable."""
    try:
        return response.json()
    except ValueError:  # json.JSONDecodeError, UnicodeDecodeError
        raise not_documented(action) from None


def failure_of(exc: BaseException) -> Outcome:
    """The Outcome a failed request means for its record (TicketError carries it; the rest is translated)."""
    if isinstance(exc, TicketError):
        return exc.outcome
    error = translate(exc, role="sink")
    return Outcome.retryable(str(error), error.retry_after) if isinstance(error, SinkUnavailable) else Outcome.rejected(str(error))


class CallBudget:
    """How long one publish call may keep trying: until `publish_deadline` (the batch's budget for
    the sink), or DEFAULT_BUDGET_SECONDS from now outside the deliver stage; and how many failed
    requests the current record may still have (FAILURES_PER_RECORD, counted from `start_record`)."""

    def __init__(self, deadline: float | None = None) -> None:
        found = deadline if deadline is not None else publish_deadline.get()
        self.deadline = found if found is not None else time.monotonic() + DEFAULT_BUDGET_SECONDS
        self.failures = 0

    def start_record(self) -> None:
        self.failures = 0

    def spent(self) -> bool:
        return time.monotonic() >= self.deadline

    async def wait_before_next(self, outcome: Outcome) -> bool:
        """Count a failed request; sleep before the next one and return True, or return False at once
        when the outcome is not retryable, the record has had FAILURES_PER_RECORD failures, the
        service asks for more than MAX_WAIT_SECONDS, or the wait would end past the deadline."""
        self.failures += 1
        if outcome.status != "retryable" or self.failures >= FAILURES_PER_RECORD or (outcome.retry_after or 0.0) > MAX_WAIT_SECONDS:
            return False
        wait = backoff_wait(FIRST_WAIT_SECONDS * 2 ** (self.failures - 1), [outcome.retry_after])
        if time.monotonic() + wait > self.deadline:
            return False
        await asyncio.sleep(wait)
        return True

    async def repeat(self, request: Callable[[], Awaitable[T]]) -> T:
        """`request` (one that is safe to send again: a lookup, an update) sent again while its
        failure is retryable and the record's failures and the deadline allow; else the failure is raised."""
        while True:
            try:
                return await request()
            except Exception as exc:
                if not await self.wait_before_next(failure_of(exc)):
                    raise
                log.debug("request failed, sending it again (failure %d of the record)", self.failures, exc_info=exc)


def render(template: str, document: dict[str, Any], *, summary: str = "") -> str:
    """`"DLP {alert.severity}: {alert.title}"` with values from the (projected) record; absent → "".
    `{summary}` is the enrichment summary (pipeline.deliver.summary)."""

    return fill(template, document, named={"summary": summary}, text=str)



async def upsert_each(
    records: Sequence[Any], upsert: Callable[[Any, CallBudget], Awaitable[None]], *, locks: KeyLocks, name: str
) -> list[Outcome]:
    """Run `upsert` for each record in order, holding its alert's lock (one ticket per alert, even
    when two batches carry the same alert at once); map failures to outcomes.

    Each record may have up to FAILURES_PER_RECORD failed requests within the call's budget, so one record's transient
    failure does not hold back the others. The rest of the call is reported retryable without
    calling the service when the service asks for a longer pause (Retry-After over
    MAX_WAIT_SECONDS), when FAILED_IN_A_ROW records in a row failed every try, or when the budget is
    spent.
    """
    budget = CallBudget()
    outcomes: list[Outcome] = []
    stop: Outcome | None = None
    failed_in_a_row = 0
    for record in records:
        if stop is None and budget.spent() and outcomes:
            stop = Outcome.retryable("not sent: the batch's time for this sink ran out")
        if stop is not None:
            outcomes.append(stop)
            continue
        outcome = await _upsert_with_tries(record, upsert, budget, locks)
        if outcome.status != "delivered":
            log.warning("%s: record %s not delivered: %s", name, record.record_id, outcome.reason)
        failed_in_a_row = failed_in_a_row + 1 if outcome.status == "retryable" else 0
        if outcome.status == "retryable" and ((outcome.retry_after or 0.0) > MAX_WAIT_SECONDS or failed_in_a_row >= FAILED_IN_A_ROW):
            stop = Outcome.retryable(f"not sent after an earlier failure ({outcome.reason})", outcome.retry_after)
        outcomes.append(outcome)
    return outcomes


async def _upsert_with_tries(record: Any, upsert: Callable[[Any, CallBudget], Awaitable[None]], budget: CallBudget, locks: KeyLocks) -> Outcome:
    """One record's outcome after its tries: each starts over with the lookup (the lock is not held
    while waiting), until FAILURES_PER_RECORD failed requests or the deadline."""
    budget.start_record()
    while True:
        try:
            async with locks.hold(alert_key(record)):
                await upsert(record, budget)
        except Exception as exc:  # TicketError, network errors, timeouts
            outcome = failure_of(exc)
            log.debug("record %s: upsert failed (failure %d)", record.record_id, budget.failures + 1, exc_info=exc)
            if not await budget.wait_before_next(outcome):
                return outcome
        else:
            return Outcome.delivered()
