"""Durable local writes: what the local stores (dead letters, the JSONL lake) share."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def fsync_folder(folder: Path) -> None:
    """Make a folder's entries (files created or renamed in it) durable, as a file's fsync makes its
    bytes durable (POSIX). Windows cannot open a folder for this; NTFS journals its metadata itself."""
    if sys.platform == "win32":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
