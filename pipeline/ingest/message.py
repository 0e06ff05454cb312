"""The unit every entry point hands the runner: one message body and where it came from."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(slots=True)
class Message:
    """One Event Hub message body and where it came from (file:line, partition/sequence, …)."""

    body: bytes
    source: str = ""
    enqueued_time: datetime | None = None
