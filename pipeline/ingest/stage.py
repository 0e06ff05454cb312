"""The ingest stage: a batch of message bodies in, DLP alerts, split-alert parts and dead letters out.

Guarantees (the decode loop's own rules are in pipeline/ingest/decode.py, the formats' contract in
pipeline/ingest/formats/contract.py):
- every message is decoded on its own: a body that is unusable as a whole becomes one dead letter
  (stage "decode") with its reason and its position; a bad record inside a usable body becomes a dead
  letter of its own and the rest of the body goes on;
- a stored body is scrubbed of matched content, or withheld (docs/security.md);
- records of a known format that are not DLP are counted as skipped, never dead-lettered;
- logs name positions and reasons, one line per message at most, never payload content; they say
  what could not be decoded, and the runner says what was dead-lettered once the store has it;
- a message's position is its index in the whole input when the reader numbers messages
  (`Message.index`), else its index in the batch.
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

# The reason of the dead letter a reader makes of input it could not read (e.g. the damaged end of an
# Event Hubs Capture file); its body is the reader's note (size, SHA-256, where the damage starts).
DAMAGED_INPUT = "damaged_input"


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
        position = message.index if message.index is not None else index  # across the whole input, when the reader counts
        observability.record_lag(message.enqueued_time, now)
        error: DecodeError | None = None
        if message.damaged is not None:  # the reader could not read this part of its input
            error = DecodeError(DAMAGED_INPUT, message.damaged)
        else:
            try:
                decoded = decode_message(message.body, limits=limits, keep_user_justification=keep_user_justification)
            except DecodeError as err:
                error = err.with_traceback(None)  # drop the decoder's frames (and the parsed document) now
                error.__context__ = None
        if error is not None:
            log.warning("message %s (%s) cannot be decoded: %s", position, message.source, str(error))
            # scrubbed, or withheld (docs/security.md); a reader's note on damaged input is stored as it is
            body = message.body if message.damaged is not None else stored_body(message.body, error.reason)
            out.dead.append(DeadLetter(stage="decode", reason=error.reason, detail=error.detail, body=body, source=message.source, message_index=position))
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
                "message %s (%s): %d record(s) cannot be decoded (%s; records %s)",
                position, message.source, len(decoded.rejected), ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())), first,
            )
        for rejected in decoded.rejected:
            out.dead.append(
                DeadLetter(stage="decode", reason=rejected.reason, detail=rejected.detail, body=rejected.record, source=message.source, message_index=position, record_index=rejected.index)
            )
    return out
