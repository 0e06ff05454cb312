"""State stores: where parts of split alerts wait to be joined, and how often a batch raised.

Two implementations: `SqliteStateStore` (pipeline/state/sqlite.py, one local file, the default) and
`TableStateStore` (pipeline/state/azure_table.py, Azure Table Storage, shared by every instance).

The protocol is everything its callers need (the assemble stage, the outage rule of the deliver
stage, the history enrichers); nobody reaches past it into an implementation's connection.
`open_state_store` builds the configured implementation. An implementation must be safe to call
again after a crash: every write is idempotent. The behaviour is pinned once, for every
implementation, by tests/support/state_contract.py.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, runtime_checkable

if TYPE_CHECKING:
    from pipeline.config import StateSettings
    from pipeline.ingest.formats.contract import AlertPart
    from pipeline.state.history import HistoryStore

#: A redelivery count not touched for this long is dropped (the outage that raised it is long over).
REDELIVERY_FORGET_SECONDS = 7 * 24 * 3600.0

#: Claims a handle remembers for `mark_emitted` and `release`, at most (the oldest are forgotten: a
#: claim never marked nor released, because its batch failed, ends when its lease runs out).
MAX_CLAIMS_HELD = 50_000

ClaimT = TypeVar("ClaimT")


class HeldClaims(OrderedDict[str, ClaimT], Generic[ClaimT]):
    """The claims a store handle made and has not marked emitted nor released yet, by alert id (what
    each store needs to mark only while its claim holds), at most MAX_CLAIMS_HELD: the oldest go first.
    `until` gives the time a claim's lease runs to."""

    def __init__(self, until: Callable[[ClaimT], float]) -> None:
        super().__init__()
        self._until = until

    def keep(self, alert_id: str, claim: ClaimT) -> None:
        self[alert_id] = claim
        self.move_to_end(alert_id)
        while len(self) > MAX_CLAIMS_HELD:
            self.popitem(last=False)

    def of(self, alert_ids: Sequence[str]) -> list[tuple[str, ClaimT]]:
        """(alert id, claim) of the given alerts this handle holds a claim on, each once, in order."""
        return [(alert_id, self[alert_id]) for alert_id in dict.fromkeys(alert_ids) if alert_id in self]

    def forget(self, claims: Sequence[tuple[str, ClaimT]]) -> None:
        """Forget these claims (as `of` gave them) once marked or released; an alert claimed again since keeps its new claim."""
        for alert_id, claim in claims:
            if self.get(alert_id) == claim:
                del self[alert_id]

    def holds(self, alert_id: str, now: float) -> bool:
        """Whether this handle claimed the alert and that claim's lease runs yet: its batch is still at
        work, and its mark must not be taken by a second claim's (nor a second claim's by it)."""
        claim = self.get(alert_id)
        return claim is not None and now < self._until(claim)


@dataclass(slots=True)
class PartsAdded:
    new: int = 0
    duplicate: int = 0
    # Parts not stored because their alert already holds `max_parts_per_alert` parts (hostile input).
    over_limit: list[AlertPart] = field(default_factory=list)
    # Parts not stored because they are larger than the store can hold (the Table store: 960 KiB of JSON).
    too_large: list[AlertPart] = field(default_factory=list)


@dataclass(slots=True)
class PendingAlert:
    alert_id: str
    parts: list[AlertPart]


@runtime_checkable
class StateStore(Protocol):
    """Durable home of pending alert parts and of batch redelivery counts.

    - `add_parts` stores each part once (keyed by alert id and part digest); a part seen before is
      counted as duplicate and changes nothing. A new part of an alert already emitted makes that
      alert pending again, so late evidence produces a revised record. With `max_parts_per_alert`,
      a new part of an alert that already holds that many parts is not stored but returned in
      `over_limit` (the runner dead-letters it as `too_many_evidence`). A part larger than the store
      can hold is not stored but returned in `too_large` (dead-lettered as `part_too_large`).
      A part's data are JSON values (dict, list, str, int, float, bool, None, as parsed JSON gives
      them), not changed once given: a store may hand the same objects back from `claim_due`.
    - `claim_due` returns the pending alerts whose parts have settled (no new part for
      `settle_seconds`, or first part older than `max_hold_seconds`, or every one with `force`), and
      leases them for `lease_seconds` so that a second consumer does not take them too; at most
      `limit` of them, oldest first (by first part), so a backlog is emitted in bounded chunks.
      `force` (a flush at the end of a run) takes leased alerts too. Claimed parts come back
      whole (rank, data, digest), ordered by rank. Without `force`, a handle does not claim again
      an alert whose lease from its own earlier claim runs yet, even when a new part made it due:
      the batch of that claim is still at work, and the two marks must not be confused.
    - `mark_emitted` is called only after each claimed alert was delivered or dead-lettered; an alert
      whose lease runs out without it is claimed again (at-least-once). It marks an alert emitted
      only while this handle's claim of it holds: an alert that got a new part since the claim (from
      any handle), or that another handle claimed since, stays pending, so the new part comes out in
      a revision and is never lost behind the mark. `release` ends this handle's lease of alerts
      still pending, likewise only while its claim holds; an emitted alert stays emitted. An id
      this handle did not claim changes nothing.
    - A late part reopens an emitted alert: it settles again from that part, and `max_hold_seconds`
      counts from it too; the claim returns every part, old and new.
    - `purge` forgets alerts emitted before the cutoff (their parts count as new if seen again) and
      returns how many; pending alerts are never purged.
    - `count_redelivery` counts, durably and for every process sharing the store, one more run of the
      batch with this fingerprint (the outage rule, pipeline/deliver/stage.py) and returns the count
      including this one; counts not touched for `REDELIVERY_FORGET_SECONDS` are dropped.
      `forget_redelivery` drops one (the batch was dead-lettered).
    - `joined_writes()` is a context manager: the writes made while its block runs may be committed
      together when it ends (SQLite: one transaction, begun at the first write, so a block that
      writes nothing costs nothing), or none of them when it raises. A store that commits each write
      as it comes makes it a no-op. Nothing else may use the store while the block runs.
    - `holding_history_writes()` is a context manager that may span awaits (a batch's enrichment and
      delivery): while it runs, the writes of the `local_history` may be held in memory and committed
      with the store's next write (`mark_emitted`, `release`: a batch's history and its mark in one
      commit), before that history is read (a read sees every write before it), or when the block
      ends; every write held is committed before the block ends without raising. A store without a
      local history makes it a no-op.
    - `local_history` is a history store that lives beside this state (same file, same lifetime:
      closing the history leaves the state open), or None when the store has none; the history
      settings then decide where the history lives (pipeline/state/history.py).
    """

    async def add_parts(self, parts: Sequence[AlertPart], *, now: float, max_parts_per_alert: int | None = None) -> PartsAdded: ...

    async def claim_due(
        self, *, now: float, settle_seconds: float, max_hold_seconds: float, lease_seconds: float, force: bool = False, limit: int | None = None
    ) -> list[PendingAlert]: ...

    async def mark_emitted(self, alert_ids: Sequence[str], *, now: float) -> None: ...

    async def release(self, alert_ids: Sequence[str]) -> None:
        """Give claimed alerts back before their lease ends (their batch raised and will run again)."""
        ...

    async def pending_count(self) -> int: ...

    async def purge(self, *, emitted_before: float) -> int: ...

    async def count_redelivery(self, fingerprint: str, *, now: float) -> int: ...

    async def forget_redelivery(self, fingerprint: str) -> None: ...

    def joined_writes(self) -> AbstractContextManager[None]: ...

    def holding_history_writes(self) -> AbstractContextManager[None]: ...

    def local_history(self, *, retention_days: float) -> HistoryStore | None: ...

    async def aclose(self) -> None: ...


def open_state_store(settings: StateSettings, *, credential: Any = None) -> StateStore:
    """Build the state store the settings name: `sqlite` (one local file) or `azure_table` (shared).

    `credential` is the azure-core async credential the Table store signs in with when it has an
    `account_url` (the runner passes its shared one, `Services.credential`); the store never closes
    a credential it was given."""
    if settings.kind == "azure_table":
        from pipeline.state.azure_table import TableStateStore

        return TableStateStore(settings, credential=credential)
    from pipeline.state.sqlite import SqliteStateStore

    return SqliteStateStore(settings.path)
