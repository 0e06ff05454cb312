"""The ingest stage: a batch of message bodies in, DLP alerts, split-alert parts and dead letters out.

Guarantees (the decode loop's own rules are in pipeline/ingest/decode.py, the formats' contract in
pipeline/ingest/formats/contract.py):
- every message is decoded on its own: a body that is unusable as a whole becomes one dead letter
  (stage "decode") with its reason and its position; a bad record inside a usable body becomes a dead
  letter of its own and the rest of the body goes on;
- a stored body is scrubbed of matched content, or withheld (docs/security.md);
- records of a known format that are not DLP are counted as skipped, never dead-lettered;
- logs name positions and reasons, one line per message at most, never payload content.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipeline import observability
from pipeline.deadletter import DeadLetter
from pipeline.errors import DecodeError
from pipeline.ingest.decode import decode_message, stored_body
from pipeline.ingest.formats.contract import AlertPart
from pipeline.ingest.limits import Limits
from pipeline.ingest.message import Message
from pipeline.models import DlpAlert

log = logging.getLogger("pipeline")


@dataclass
class Ingested:
    """What one batch of messages decoded to."""

    alerts: list[DlpAlert] = field(default_factory=list)
    parts: list[AlertPart] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    records: int = 0
    skipped: int = 0
    warnings: int = 0  # broken optional fields set to null (the records are kept)


def ingest(messages: Sequence[Message], *, limits: Limits, now: float, keep_user_justification: bool = False) -> Ingested:
    """Decode every message of a batch; never raises for a message's content. `keep_user_justification`:
    see `decode_message` (the justification is never logged)."""
    out = Ingested()
    for index, message in enumerate(messages):
        observability.record_lag(message.enqueued_time, now)
        error: DecodeError | None = None
        try:
            decoded = decode_message(message.body, limits=limits, keep_user_justification=keep_user_justification)
        except DecodeError as err:
            error = err.with_traceback(None)  # drop the decoder's frames (and the parsed document) now
            error.__context__ = None
        if error is not None:
            log.warning("message %s (%s) dead-lettered: %s", index, message.source, str(error))
            body = stored_body(message.body, error.reason)  # scrubbed, or withheld (docs/security.md)
            out.dead.append(DeadLetter(stage="decode", reason=error.reason, detail=error.detail, body=body, source=message.source, message_index=index))
            continue
        out.records += decoded.records
        out.skipped += decoded.skipped
        out.warnings += decoded.warnings
        out.alerts.extend(decoded.alerts)
        out.parts.extend(decoded.parts)
        if decoded.rejected:  # one line per message, not per record: hostile input cannot flood the log
            reasons = Counter(rejected.reason for rejected in decoded.rejected)
            first = ", ".join(str(rejected.index) for rejected in decoded.rejected[:5]) + (", ..." if len(decoded.rejected) > 5 else "")
            log.warning(
                "message %s (%s): %d record(s) dead-lettered (%s; records %s)",
                index, message.source, len(decoded.rejected), ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())), first,
            )
        for rejected in decoded.rejected:
            out.dead.append(
                DeadLetter(stage="decode", reason=rejected.reason, detail=rejected.detail, body=rejected.record, source=message.source, message_index=index, record_index=rejected.index)
            )
    return out
