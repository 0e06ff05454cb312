"""Input files that enrichers read once and reload when they change (HR CSV, directories, lookups)."""

from __future__ import annotations

import csv
import io
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

import orjson

log = logging.getLogger("pipeline.enrichers")

T = TypeVar("T")


class WatchedFile(Generic[T]):
    """`get()` returns `parse(bytes)` of the file, parsed again when its size or mtime changed.

    The file is looked at no more often than every `check_seconds`. When a changed file cannot be
    read or parsed, the previous content is kept (and the error logged without content); when the
    first read fails, `get()` raises OSError/ValueError.
    """

    def __init__(self, path: Path, parse: Callable[[bytes], T], *, check_seconds: float = 1.0) -> None:
        self.path = path
        self._parse = parse
        self.check_seconds = check_seconds
        self._stamp: tuple[int, int] | None = None
        self._value: T | None = None
        self._next_check = 0.0
        self.loads = 0

    def get(self) -> T:
        now = time.monotonic()
        if self._value is not None and now < self._next_check:
            return self._value
        self._next_check = now + self.check_seconds
        try:
            stat = os.stat(self.path)
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp != self._stamp or self._value is None:
                value = self._parse(self.path.read_bytes())
                self._value, self._stamp = value, stamp
                self.loads += 1
        except (OSError, ValueError) as exc:
            if self._value is None:
                raise
            log.warning("keeping the previous content of %s: %s", self.path.name, type(exc).__name__)
        return self._value


def read_csv(data: bytes) -> list[dict[str, str]]:
    text = data.decode("utf-8-sig")
    return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(io.StringIO(text))]


def read_json_records(data: bytes) -> list[dict[str, Any]]:
    """A JSON array, a `{"value": [...]}` page, or JSON lines."""
    text = data.strip()
    if not text:
        return []
    if text[:1] in (b"[", b"{"):
        try:
            doc = orjson.loads(text)
        except orjson.JSONDecodeError:
            doc = None
        if isinstance(doc, list):
            return [row for row in doc if isinstance(row, dict)]
        if isinstance(doc, dict):
            value = doc.get("value")
            return [row for row in value if isinstance(row, dict)] if isinstance(value, list) else [doc]
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"line {number} is not JSON") from exc
            if isinstance(row, dict):
                rows.append(row)
    return rows


def parse_datetime(value: Any) -> datetime | None:
    """ISO 8601 (any fraction length, with or without offset; date only) -> aware UTC datetime."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    text = str(value).strip()
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)
