"""State stores: where parts of split alerts wait to be joined (and, for the enrichers, history).

Two implementations: `SqliteStateStore` (pipeline/state/sqlite.py, one local file, the default) and
`TableStateStore` (pipeline/state/azure_table.py, Azure Table Storage, shared by every instance).

The protocol is what the runner needs; `open_state_store` builds the configured implementation.
An implementation must be safe to call again after a crash: every write is idempotent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pipeline.config import StateSettings
    from pipeline.ingest.formats import AlertPart


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
    """Durable home of pending alert parts.

    - `add_parts` stores each part once (keyed by alert id and part digest); a part seen before is
      counted as duplicate and changes nothing. A new part of an alert already emitted makes that
      alert pending again, so late evidence produces a revised record. With `max_parts_per_alert`,
      a new part of an alert that already holds that many parts is not stored but returned in
      `over_limit` (the runner dead-letters it as `too_many_evidence`). A part larger than the store
      can hold is not stored but returned in `too_large` (dead-lettered as `part_too_large`).
    - `claim_due` returns the pending alerts whose parts have settled (no new part for
      `settle_seconds`, or first part older than `max_hold_seconds`, or every one with `force`), and
      leases them for `lease_seconds` so that a second consumer does not take them too; at most
      `limit` of them, oldest first, so a backlog is emitted in bounded chunks.
    - `mark_emitted` is called only after each claimed alert was delivered or dead-lettered; an alert
      whose lease runs out without it is claimed again (at-least-once).
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

    async def aclose(self) -> None: ...


def open_state_store(settings: StateSettings) -> StateStore:
    """Build the state store the settings name: `sqlite` (one local file) or `azure_table` (shared)."""
    if settings.kind == "azure_table":
        from pipeline.state.azure_table import TableStateStore

        return TableStateStore(settings)
    from pipeline.state.sqlite import SqliteStateStore

    return SqliteStateStore(settings.path)
