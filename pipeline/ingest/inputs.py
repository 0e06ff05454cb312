"""Where the CLI reads message bodies from: files, folders and standard input.

- a `.json` file is one message body;
- a `.jsonl` file holds one body per line (blank lines are ignored);
- a folder is read recursively in sorted path order (other file types are skipped);
- `-` reads JSON lines from standard input;
- an `.avro` file is an Event Hubs Capture file: each record's `Body` is one message body, with its
  `EnqueuedTimeUtc`, `SequenceNumber` and `Offset` (backfill from a Capture container);
- a Defender XDR Streaming API storage-account export (`PT1H.json` under
  `tenantId=…/y=…/m=…/d=…/h=…/m=…/`, or any `.json` file whose first line is one streaming record)
  holds one *record* `{time, tenantId, category, properties}` per line (CRLF): consecutive lines are
  grouped into envelopes `{"records": [...]}` of up to `EXPORT_RECORDS_PER_MESSAGE` records, as the
  Event Hub would have delivered them. A line that is not JSON is passed on alone, to be dead-lettered.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.ingest.message import Message

SUFFIXES = (".json", ".jsonl", ".avro")
EXPORT_RECORDS_PER_MESSAGE = 100
_AVRO_MAGIC = b"Obj\x01"


class InputError(ConfigError):
    """A path the user gave that cannot be read; the message names it (the CLI reports it like a bad setting)."""


def _files(path: Path) -> Iterator[Path]:
    if path.is_dir():
        yield from sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    elif path.is_file():
        yield path
    else:
        raise InputError(f"{path}: no such file or folder")


def check_paths(paths: Iterable[str]) -> list[Path]:
    """Fail early, before any message is processed, on a path that does not exist or cannot be read.

    Returns the files that `read_messages` will read (stdin excluded), e.g. for a progress display."""
    files: list[Path] = []
    for raw in paths:
        if raw == "-":
            continue
        path = Path(raw)
        if not path.exists():
            raise InputError(f"{path}: no such file or folder")
        for file in _files(path):
            try:
                with open(file, "rb"):
                    pass
            except OSError as exc:
                raise InputError(f"{file}: cannot read ({exc.strerror})") from None
            if file.suffix.lower() == ".avro":
                _check_avro(file)
            files.append(file)
    return files


def read_messages(paths: Iterable[str], on_file: Callable[[Path], None] | None = None) -> Iterator[Message]:
    """Every message of `paths` in order, each numbered (`Message.index`) across the whole input."""
    for index, message in enumerate(_read(paths, on_file)):
        message.index = index
        yield message


def _read(paths: Iterable[str], on_file: Callable[[Path], None] | None) -> Iterator[Message]:
    for raw in paths:
        if raw == "-":
            yield from _lines(sys.stdin.buffer, "stdin")
            continue
        for file in _files(Path(raw)):
            if on_file is not None:
                on_file(file)
            try:
                if file.suffix.lower() == ".avro":
                    yield from read_capture(file)
                elif file.suffix.lower() == ".json" and is_storage_export(file):
                    yield from read_storage_export(file)
                elif file.suffix.lower() == ".jsonl":
                    with open(file, "rb") as handle:
                        yield from _lines(handle, str(file))
                else:
                    yield Message(body=file.read_bytes(), source=str(file))
            except OSError as exc:
                raise InputError(f"{file}: cannot read ({exc.strerror})") from None


def _lines(handle, name: str) -> Iterator[Message]:
    for number, line in enumerate(handle, start=1):
        line = line.strip()
        if line:
            yield Message(body=line, source=f"{name}:{number}")


# -- Event Hubs Capture (Avro) ------------------------------------------------------------------


def _check_avro(file: Path) -> None:
    with open(file, "rb") as handle:
        if handle.read(4) != _AVRO_MAGIC:
            raise InputError(f"{file}: not an Avro object container file (Event Hubs Capture)")


def read_capture(file: Path) -> Iterator[Message]:
    """Messages of an Event Hubs Capture file (schema `Microsoft.ServiceBus.Messaging.EventData`).

    A file that is damaged part-way (truncated, or garbage after its header) gives its readable
    records, then one message marked `damaged` standing for the rest: a note with the size and
    SHA-256 of the unread bytes and the offset they start at (the file itself keeps them), which the
    runner dead-letters as `damaged_input`. A file whose header cannot be read is refused as a whole.
    """
    import fastavro

    with open(file, "rb") as handle:
        try:
            blocks = fastavro.block_reader(handle)
        except Exception as exc:  # fastavro raises ValueError, EOFError, IndexError, ... for a bad header
            raise InputError(f"{file}: not a readable Avro object container file ({type(exc).__name__}): check that it is a whole Event Hubs Capture file") from None
        number = 0
        while True:
            block_start = handle.tell()
            try:
                block = next(blocks, None)
                if block is None:
                    return
                events = list(block)  # the whole block, or none of it
            except Exception as exc:  # a damaged block: EOFError, IndexError, ValueError, a codec's error
                yield _damaged_rest(file, block_start, number, exc)
                return
            for event in events:
                number += 1
                if not isinstance(event, dict) or "Body" not in event:
                    raise InputError(f"{file}: record {number} is not an Event Hubs Capture record (no Body)")
                body = event.get("Body")
                if isinstance(body, str):
                    body = body.encode()
                where = f"{file}:sequence={event.get('SequenceNumber')};offset={event.get('Offset')}"
                yield Message(body=body or b"", source=where, enqueued_time=parse_capture_time(event.get("EnqueuedTimeUtc")))


def _damaged_rest(file: Path, start: int, records_read: int, exc: BaseException) -> Message:
    """The unreadable end of a Capture file as one message the runner dead-letters (`damaged_input`)."""
    import hashlib

    import orjson

    with open(file, "rb") as handle:  # hashed in chunks: the unread end of a Capture file may be large
        handle.seek(start)
        sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
        unread = handle.tell() - start
    note = {"withheld": "damaged_input", "file": str(file), "from_byte": start, "bytes": unread, "sha256": sha256}
    why = f"Avro file damaged after {records_read} record(s) ({type(exc).__name__}); {unread} byte(s) from byte {start} unread"
    return Message(body=orjson.dumps(note), source=f"{file}:from_byte={start}", damaged=why)


_CAPTURE_TIME_FORMATS = ("%m/%d/%Y %I:%M:%S %p", "%m/%d/%Y %H:%M:%S", "%Y-%m-%dT%H:%M:%S.%f%z", "%Y-%m-%dT%H:%M:%S%z")


def parse_capture_time(value: object) -> datetime | None:
    """`EnqueuedTimeUtc` of a Capture record ("12/20/2017 5:52:40 PM", or ISO 8601), as an aware UTC time."""
    if not isinstance(value, str) or not value:
        return None
    text = value.strip().replace("Z", "+00:00")
    for fmt in _CAPTURE_TIME_FORMATS:
        try:
            parsed = datetime.strptime(text, fmt)
        except ValueError:
            continue
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


# -- Defender XDR Streaming API storage-account export (PT1H.json) ------------------------------


def is_storage_export(file: Path) -> bool:
    """A PT1H.json file, or a .json file whose first line alone is one streaming record."""
    if file.name.lower() == "pt1h.json":
        return True
    import orjson

    with open(file, "rb") as handle:
        first = handle.readline(1 << 20).strip()
    try:
        document = orjson.loads(first)
    except orjson.JSONDecodeError:
        return False
    return isinstance(document, dict) and "records" not in document and isinstance(document.get("category"), str) and "properties" in document


def read_storage_export(file: Path, per_message: int = EXPORT_RECORDS_PER_MESSAGE) -> Iterator[Message]:
    import orjson

    group: list[bytes] = []
    first_line = 0

    def envelope(last_line: int) -> Message:
        return Message(body=b'{"records":[' + b",".join(group) + b"]}", source=f"{file}:{first_line}-{last_line}")

    last = 0
    with open(file, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()  # CRLF
            if not line:
                continue
            try:
                orjson.loads(line)
            except orjson.JSONDecodeError:
                if group:
                    yield envelope(last)
                    group = []
                yield Message(body=line, source=f"{file}:{number}")  # the runner dead-letters it
                continue
            if not group:
                first_line = number
            group.append(line)
            last = number
            if len(group) >= per_message:
                yield envelope(last)
                group = []
    if group:
        yield envelope(last)
