"""The unit every entry point hands the runner: one message body and where it came from."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(slots=True)
class Message:
    """One Event Hub message body and where it came from (file:line, partition/sequence, …).

    `index`: its position in the whole input (counted by the reader across every file), kept as the
    dead letter's message index; None where no reader counts (the runner then uses the batch index).
    `damaged`: set by a reader for input it could not read (why, and where); the body is then the
    reader's note, not a message, and the runner dead-letters it as `damaged_input`."""

    body: bytes
    source: str = ""
    enqueued_time: datetime | None = None
    index: int | None = None
    damaged: str | None = None
