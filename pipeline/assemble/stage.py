"""The assemble stage: parts of split Streaming API alerts stored, and alerts whose parts settled claimed.

Guarantees:
- parts are made durable in the state store before any alert of the batch is enriched: a crash after
  this point loses no part that was read;
- a part over `limits.max_evidence_per_alert` is not stored: it comes back as a dead letter
  (`too_many_evidence`, stage "assemble"), one per alert; a part larger than the state store can hold
  (the Table store: 960 KiB of JSON) likewise (`part_too_large`), one per part;
- an alert is claimed (leased) when its parts have settled (`assembly.settle_seconds`), or its first
  part is older than `assembly.max_hold_seconds`, or `force` is given; at most
  `assembly.emit_batch_size` per call, so a backlog becomes bounded batches;
- claimed alerts are marked emitted only by `mark_emitted`, after delivery; `release` gives them back
  when the batch raises, so running it again claims them again (at-least-once);
- a claimed alert whose merged parts are not a valid alert is a dead letter (`invalid_alert`);
- an assemble-stage dead letter holds no free text (a kept override justification is scrubbed out);
- DLP lifecycle events (parts of rank `RANK_LIFECYCLE`) need no settling: each is a whole event, stored
  only to be folded with its match's other events, so it is claimable at once and the alert of its
  match is emitted (or revised) by the same batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import ValidationError

from pipeline.assemble.join import assemble, merge_parts
from pipeline.config import AssemblySettings
from pipeline.deadletter import DeadLetter
from pipeline.ingest.formats.common import scrub
from pipeline.ingest.formats.contract import RANK_LIFECYCLE, AlertPart
from pipeline.models import DlpAlert, validation_summary
from pipeline.state import StateStore

log = logging.getLogger("pipeline")


@dataclass
class Claimed:
    """Split alerts claimed in one call: joined alerts, their ids (to mark emitted or release), dead letters."""

    alerts: list[DlpAlert] = field(default_factory=list)
    alert_ids: list[str] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    warnings: int = 0  # broken optional fields nulled in the claimed alerts


class Assembler:
    """Joins split alerts through the state store (the only place their parts live)."""

    def __init__(self, state: StateStore, settings: AssemblySettings, *, max_parts_per_alert: int) -> None:
        self.state = state
        self.settings = settings
        self.max_parts_per_alert = max_parts_per_alert

    async def store(self, parts: list[AlertPart], *, now: float) -> tuple[int, list[DeadLetter]]:
        """Store the parts; returns (duplicates ignored, dead letters of the parts over the limit or too large to store)."""
        if not parts:  # a batch of alerts that are not split
            return 0, []
        settling = [part for part in parts if part.rank != RANK_LIFECYCLE]
        whole = [part for part in parts if part.rank == RANK_LIFECYCLE]
        added = await self.state.add_parts(settling, now=now, max_parts_per_alert=self.max_parts_per_alert)
        if whole:  # stored as already settled, so the claim of this batch takes them
            events = await self.state.add_parts(whole, now=now - self.settings.settle_seconds, max_parts_per_alert=self.max_parts_per_alert)
            added.duplicate += events.duplicate
            added.over_limit.extend(events.over_limit)
            added.too_large.extend(events.too_large)
        return added.duplicate, _over_limit_dead_letters(added.over_limit, self.max_parts_per_alert) + _too_large_dead_letters(added.too_large)

    async def claim(self, *, now: float, force: bool) -> Claimed:
        settings = self.settings
        pending = await self.state.claim_due(
            now=now, settle_seconds=settings.settle_seconds, max_hold_seconds=settings.max_hold_seconds, lease_seconds=settings.lease_seconds,
            force=force, limit=settings.emit_batch_size,
        )
        claimed = Claimed(alert_ids=[alert.alert_id for alert in pending])
        for alert in pending:
            try:
                assembled = assemble(alert.parts)
                claimed.alerts.append(assembled)
                if not any(part.rank == RANK_LIFECYCLE for part in alert.parts):  # lifecycle warnings were counted at decode
                    claimed.warnings += len(assembled.decode_warnings)
            except ValidationError as exc:
                body = orjson.dumps(scrub(merge_parts(alert.parts)))  # no kept justification in a dead letter
                claimed.dead.append(DeadLetter(stage="assemble", reason="invalid_alert", detail=validation_summary(exc), body=body, alert_id=alert.alert_id))
        return claimed

    async def mark_emitted(self, alert_ids: list[str], *, now: float) -> None:
        await self.state.mark_emitted(alert_ids, now=now)

    async def release(self, alert_ids: list[str]) -> None:
        """Give claimed split alerts back (their batch raised), so that running it again claims them."""
        if alert_ids:
            await self.state.release(alert_ids)


def _over_limit_dead_letters(parts: list[Any], limit: int) -> list[DeadLetter]:
    """One dead letter per alert whose split parts exceeded the evidence limit (parts are canonical, scrubbed)."""
    by_alert: dict[str, list[Any]] = {}
    for part in parts:
        by_alert.setdefault(part.alert_id, []).append(part)
    entries = []
    for alert_id, extra in by_alert.items():
        log.warning("alert %s: %d part(s) over the limit of %d parts per alert dead-lettered", alert_id, len(extra), limit)
        body = orjson.dumps([{"rank": p.rank, "digest": p.digest, "data": scrub(p.data)} for p in extra])
        detail = f"{len(extra)} part(s) refused: the alert already holds {limit} parts, limit {limit}"
        entries.append(DeadLetter(stage="assemble", reason="too_many_evidence", detail=detail, body=body, alert_id=alert_id))
    return entries


PART_TOO_LARGE = "part_too_large"


def _too_large_dead_letters(parts: list[AlertPart]) -> list[DeadLetter]:
    """One dead letter per part the state store could not hold (parts are canonical, scrubbed)."""
    entries = []
    for part in parts:
        body = orjson.dumps([{"rank": part.rank, "digest": part.digest, "data": scrub(part.data)}])
        log.warning("alert %s: a part of %d bytes is larger than the state store holds; dead-lettered", part.alert_id, len(body))
        detail = f"part of {len(body)} bytes, larger than the state store holds"
        entries.append(DeadLetter(stage="assemble", reason=PART_TOO_LARGE, detail=detail, body=body, alert_id=part.alert_id))
    return entries
