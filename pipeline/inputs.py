"""Where the CLI reads message bodies from: files, folders and standard input.

- a `.json` file is one message body;
- a `.jsonl` file holds one body per line (blank lines are ignored);
- a folder is read recursively in sorted path order (other file types are skipped);
- `-` reads JSON lines from standard input.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable, Iterator

from pipeline.runner import Message

SUFFIXES = (".json", ".jsonl")


class InputError(Exception):
    """A path that cannot be read; the message names it."""


def _files(path: Path) -> Iterator[Path]:
    if path.is_dir():
        for child in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES):
            yield child
    elif path.is_file():
        yield path
    else:
        raise InputError(f"{path}: no such file or folder")


def check_paths(paths: Iterable[str]) -> None:
    """Fail early, before any message is processed, on a path that does not exist or cannot be read."""
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


def read_messages(paths: Iterable[str]) -> Iterator[Message]:
    for raw in paths:
        if raw == "-":
            yield from _lines(sys.stdin.buffer, "stdin")
            continue
        for file in _files(Path(raw)):
            try:
                if file.suffix.lower() == ".jsonl":
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
