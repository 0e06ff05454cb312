"""The dead-letter store: what could not be decoded or delivered, with why and where it came from.

Three stages put entries here:
- `decode`: a whole message body that is not usable (JSON bodies are stored with matched sensitive
  content removed; bodies that cannot be scrubbed are withheld, see `pipeline.ingest.decode.stored_body`
  and docs/security.md), or one bad record of a message (that record, scrubbed);
- `assemble`: the parts of a split alert that do not make a valid alert, or parts refused because
  their alert already holds `limits.max_evidence_per_alert` parts (`too_many_evidence`), or a part
  larger than the state store can hold (`part_too_large`);
- `deliver`: an enriched record a sink rejected, or that was still failing when retries ran out.

Entry ids are deterministic (stage, sink and content), so a redelivered message or a replayed record
that fails again updates its entry (attempts, last failure) instead of adding a second one.
A store that cannot write raises StoreUnavailable: the batch must then be retried, never skipped.

Two stores hold entries in the same format (one JSON document per entry id): `LocalDeadLetterStore`
(files under the data dir) and `BlobDeadLetterStore` (pipeline/deadletter/blob.py, one blob per
entry). `open_dead_letter_store` builds the one `[dead_letter]` names.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import orjson

from pipeline.durable import fsync_folder
from pipeline.errors import StoreDamaged, store_error

if TYPE_CHECKING:
    from pipeline.config import LoadedConfig
    from pipeline.plugins import Services

Stage = Literal["decode", "assemble", "deliver"]

DAMAGED_ENTRY_ADVICE = "move it out of the dead-letter folder (keep it for diagnosis), then run again"


@dataclass(slots=True)
class DeadLetter:
    stage: Stage
    reason: str
    detail: str
    body: bytes
    source: str = ""
    message_index: int | None = None
    record_index: int | None = None
    sink: str | None = None
    alert_id: str | None = None
    record_id: str | None = None
    attempts: int = 1
    first_failure_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    last_failure_at: datetime | None = None
    # Each later attempt that failed again (a replay), oldest first: {"at", "reason", "detail"}. The
    # entry's own reason, source and indexes stay those of the first failure. A store appends the
    # attempts of an entry it is given to those it holds.
    replay_attempts: list[dict[str, str]] = field(default_factory=list)

    @property
    def entry_id(self) -> str:
        digest = hashlib.sha256()
        for piece in (self.stage, self.sink or "", self.source if self.stage == "decode" else ""):
            digest.update(piece.encode() + b"\0")
        # A delivery failure is about one record: its id identifies it across runs (the body holds
        # processing times that differ on every run).
        digest.update(self.record_id.encode() if self.stage == "deliver" and self.record_id else self.body)
        if self.record_index is not None:
            digest.update(str(self.record_index).encode())
        return digest.hexdigest()[:32]

    def to_document(self) -> dict[str, Any]:
        """The stored form. `body` is base64 of the exact bytes; `summary` never holds payload content."""
        return {
            "entry_id": self.entry_id,
            "stage": self.stage,
            "reason": self.reason,
            "detail": self.detail,
            "source": self.source,
            "message_index": self.message_index,
            "record_index": self.record_index,
            "sink": self.sink,
            "alert_id": self.alert_id,
            "record_id": self.record_id,
            "attempts": self.attempts,
            "first_failure_at": self.first_failure_at.isoformat(),
            "last_failure_at": (self.last_failure_at or self.first_failure_at).isoformat(),
            "replay_attempts": list(self.replay_attempts),
            "body_base64": base64.b64encode(self.body).decode("ascii"),
        }

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> DeadLetter:
        return cls(
            stage=document["stage"],
            reason=document["reason"],
            detail=document.get("detail", ""),
            body=base64.b64decode(document["body_base64"]),
            source=document.get("source", ""),
            message_index=document.get("message_index"),
            record_index=document.get("record_index"),
            sink=document.get("sink"),
            alert_id=document.get("alert_id"),
            record_id=document.get("record_id"),
            attempts=document.get("attempts", 1),
            first_failure_at=datetime.fromisoformat(document["first_failure_at"]),
            last_failure_at=datetime.fromisoformat(document["last_failure_at"]),
            replay_attempts=list(document.get("replay_attempts") or []),
        )

    def merged_with(self, previous: dict[str, Any]) -> None:
        """Fold the stored document of this entry in: attempts add up, the first failure time and the
        earlier replay attempts are kept (this entry's own attempts appended after them)."""
        self.attempts = int(previous.get("attempts", 1)) + self.attempts
        self.first_failure_at = datetime.fromisoformat(previous["first_failure_at"])
        self.last_failure_at = datetime.now(UTC)
        self.replay_attempts = list(previous.get("replay_attempts") or []) + self.replay_attempts


class DeadLetterStore(Protocol):
    #: Where the entries are, for a person: a folder, or a blob container and prefix.
    where: str

    async def put(self, entries: Sequence[DeadLetter]) -> None: ...

    async def list(self) -> list[DeadLetter]: ...

    async def remove(self, entry_ids: Sequence[str]) -> None: ...

    async def aclose(self) -> None: ...


class LocalDeadLetterStore:
    """One JSON file per entry under a folder. Each is written to a temp file in that folder, fsynced,
    renamed over its name, and the folder fsynced: an entry is whole or absent, and durable once
    `put` returns. A `put` that fails raises StoreUnavailable (or PathUnusable) saying how many of
    its entries were written."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.where = str(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise store_error(exc, path=self.root, operation="create the dead-letter folder") from exc

    async def put(self, entries: Sequence[DeadLetter]) -> None:
        written = 0
        for entry in entries:
            path = self.root / f"{entry.entry_id}.json"
            try:
                earlier = path.read_bytes() if path.exists() else None
            except OSError as exc:
                raise store_error(exc, path=path, operation="read a dead letter") from exc
            if earlier is not None:
                try:  # an entry already there that is not one: running again reads it again, so say what to do
                    entry.merged_with(orjson.loads(earlier))
                except (ValueError, KeyError, TypeError) as exc:
                    raise StoreDamaged(str(path), what=f"not a dead-letter entry: {type(exc).__name__}", advice=DAMAGED_ENTRY_ADVICE) from None
            try:
                self._write_atomically(path, orjson.dumps(entry.to_document(), option=orjson.OPT_INDENT_2))
            except (OSError, ValueError, KeyError) as exc:
                error = store_error(exc, path=self.root, operation=f"write dead letters ({written} of {len(entries)} written)")
                raise error from exc
            written += 1
        if written:
            try:
                fsync_folder(self.root)
            except OSError as exc:
                raise store_error(exc, path=self.root, operation="make the dead letters durable") from exc

    async def list(self) -> list[DeadLetter]:
        """Every entry; a file that is not an entry raises StoreDamaged naming it (and what to do)."""
        entries = []
        for path in sorted(self.root.glob("*.json")):
            try:
                entries.append(DeadLetter.from_document(orjson.loads(path.read_bytes())))
            except OSError as exc:
                raise store_error(exc, path=path, operation="read a dead letter") from exc
            except (ValueError, KeyError, TypeError) as exc:  # orjson.JSONDecodeError is a ValueError
                raise StoreDamaged(str(path), what=f"not a dead-letter entry: {type(exc).__name__}", advice=DAMAGED_ENTRY_ADVICE) from None
        return entries

    async def remove(self, entry_ids: Sequence[str]) -> None:
        for entry_id in entry_ids:
            try:
                (self.root / f"{entry_id}.json").unlink(missing_ok=True)
            except OSError as exc:
                raise store_error(exc, path=self.root, operation="remove a replayed dead letter") from exc

    async def aclose(self) -> None:
        return None

    def _write_atomically(self, path: Path, data: bytes) -> None:
        handle, temp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise



def open_dead_letter_store(config: LoadedConfig, services: Services) -> DeadLetterStore:
    """The dead-letter store `[dead_letter]` names: local files (default) or Blob storage (signed in
    with the services' default credential when it names an `account_url`)."""
    settings = config.config.dead_letter
    if settings.kind == "blob":
        from pipeline.deadletter.blob import BlobDeadLetterStore

        return BlobDeadLetterStore.from_settings(settings, credential=None if settings.connection_string_env else services.credential())
    return LocalDeadLetterStore(config.data_path(settings.path))
