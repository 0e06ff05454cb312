"""What an input format provides to the decode loop (pipeline/ingest/decode.py), and what it returns.

A format module defines one `Decoder` and registers it when imported
(`pipeline.ingest.formats.registry.register`); the loop finds it there, in the registry's detection
order. Adding a format is a new module with a decoder; the loop is not edited.

What the loop guarantees to every decoder, so that no decoder repeats it:
- `decode` is given one record at a time, already scrubbed of matched content and free text
  (`common.scrub`) and within the depth and string limits (pipeline/ingest/limits.py);
- an exception raised by `decode` costs that record only (rejected as `decoder_error`);
- fields passed to `RecordOutput.alert` are validated as a `DlpAlert`; invalid ones reject the record
  (`invalid_record`, with a summary that holds no input values).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Protocol

import orjson

from pipeline.models import SourceFormat

# Parts of one alert are merged in this order (see pipeline/assemble/join.py).
RANK_ALERT_INFO = 0
RANK_EVIDENCE = 1
# One event of a DLP match's lifecycle (Management Activity DlpRuleMatch / DlpInfo / DlpRuleUndo):
# parts of this rank are folded by `pipeline.assemble.join.merge_lifecycle`, and need no settling.
RANK_LIFECYCLE = 2


@dataclass(slots=True)
class AlertPart:
    """One row of a split alert (Streaming API AlertInfo/AlertEvidence), reduced to canonical fields."""

    alert_id: str
    rank: int
    data: dict[str, Any]
    digest: str = ""

    def __post_init__(self) -> None:
        if not self.digest:
            payload = orjson.dumps([self.rank, self.data], option=orjson.OPT_SORT_KEYS)
            self.digest = hashlib.sha256(payload).hexdigest()[:32]


# The order of an alert's parts wherever they are put together: by rank, then digest.
PART_ORDER = attrgetter("rank", "digest")


class RecordOutput(Protocol):
    """Where a decoder reports what one record is. The decode loop implements it.

    A decoder reports one outcome per record: `skip`, `reject`, `alert` or `part`; after
    `within_evidence_limit` returned False the record is already rejected and nothing more is reported.
    """

    def skip(self) -> None:
        """The record is of this format but not DLP: counted as skipped, never dead-lettered."""

    def reject(self, reason: str, detail: str) -> None:
        """The record is unusable: dead-lettered with a reason code and a detail that holds no content."""

    def within_evidence_limit(self, count: int, what: str) -> bool:
        """Whether `count` evidence items (`what` names them: "entities", …) are within
        `max_evidence_per_alert`; False rejects the record as `too_many_evidence`."""

    def alert(self, fields: dict[str, Any]) -> None:
        """The canonical fields of one complete alert (validated as a `DlpAlert`)."""

    def part(self, part: AlertPart) -> None:
        """One part of a split alert, joined with its other parts later (pipeline/assemble/)."""

    # Free text of the record a decoder asked to keep (`Decoder.kept_free_text`, read from the record
    # before it was scrubbed), only when `[lifecycle] keep_user_justification` is set; else empty.
    free_text: dict[str, str]


class Decoder(Protocol):
    """One input format. A format either owns whole bodies that are envelopes of its rows
    (`envelope_rows`), or owns single records (`owns_record`): the other method says no."""

    @property
    def name(self) -> SourceFormat:
        """The format's name: `Decoded.format` of what it decodes, and its key in the registry."""

    def envelope_rows(self, body: Any) -> list[Any] | None:
        """The rows of `body` (the parsed message) when it is this format's envelope; None otherwise.
        Every decoder is asked this about the body, in detection order, before any record is looked at."""

    def owns_record(self, record: dict[str, Any]) -> bool:
        """Whether one record (an element of a list body or of a `{"value": [...]}` page, or a
        single-object body) is in this format. Looks at the record as received: it is not scrubbed yet."""

    # Optional: `kept_free_text(record) -> dict[str, str]`, the free text (e.g. an override
    # justification) of a record not yet scrubbed, that the decoder would keep when the setting asks.

    def decode(self, record: Any, out: RecordOutput) -> None:
        """Decode one record it owns (or one row of its envelope, of any JSON type) and report it to `out`."""
