"""One writer per local data folder: an exclusive lock held by the process that writes its stores.

The SQLite state, the JSONL lake and its delivered-index, and the dead-letter folder under a data
folder (`--out`) are written by one process at a time. Two writers at once lose records: one lake
writer's crash recovery cuts the other's lines off while the index marks them delivered.

The lock is `<folder>/.dlp-pipeline.lock`, locked with `flock(LOCK_EX | LOCK_NB)` (`msvcrt.locking`
on Windows). Guarantees:

- While one process holds it, no other process gets it: `held` refuses at once with
  `DataFolderBusy` (the CLI prints its one line and exits 2); `held_waiting` retries until its
  bounded wait runs out, then raises `DataFolderBusy` (the Functions adapter: the batch is retried).
- The operating system releases it when the holder ends, however it ends (SIGKILL included): a lock
  file left behind never blocks anyone, only a live holder does.
- The file records the holder's pid, only for the message; it is never used to decide.

The lock is as good as the file system's: local disks, yes; network shares (NFS, SMB) may not honour
it. Folders that are not local (Blob lake, Blob dead letters) need no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import DataFolderBusy

if TYPE_CHECKING:
    from pipeline.config import LoadedConfig

LOCK_FILE = ".dlp-pipeline.lock"
# Sink kinds that write a JSONL lake (and its index) under a local folder.
JSONL_LAKE_KINDS = frozenset({"jsonl", "pipeline.deliver.sinks.jsonl_lake:JsonlLakeSink"})

if sys.platform == "win32":
    import msvcrt

    # One byte far past the pid, so that the locked region never hides the pid from a reader.
    _LOCKED_BYTE = 1 << 20

    def _try_lock(fd: int) -> bool:
        os.lseek(fd, _LOCKED_BYTE, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(fd: int) -> None:
        os.lseek(fd, _LOCKED_BYTE, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


class FolderLock:
    """The lock of one folder. Not re-entrant: a second FolderLock on the same folder, even in the
    same process, is refused while the first is held."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if no other holder has it; True when this object now holds it."""
        if self._fd is not None:
            return True
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not _try_lock(fd):
                os.close(fd)
                return False
        except OSError as exc:  # the file system cannot lock at all
            os.close(fd)
            raise OSError(exc.errno, f"cannot lock ({exc.strerror or exc}); use a local folder", str(self.path)) from None
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def acquire(self) -> None:
        """Take the lock now or raise DataFolderBusy naming the folder and its holder."""
        if not self.try_acquire():
            raise self.busy()

    def release(self) -> None:
        """Give the lock back (the file stays, emptied: a stale pid would only mislead a message)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
            _unlock(fd)
        finally:
            os.close(fd)

    def holder_pid(self) -> int | None:
        """The pid the current holder wrote, if it has written one yet."""
        try:
            text = self.path.read_text(encoding="ascii", errors="replace").strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def busy(self, *, advice: str | None = None) -> DataFolderBusy:
        extra = {"advice": advice} if advice else {}
        return DataFolderBusy(str(self.folder), self.holder_pid(), **extra)


def local_folders(loaded: LoadedConfig) -> list[Path]:
    """The local folders a runner built from `loaded` writes: the data dir when a local store lives in
    it, and the folder of each local store configured outside it. Sorted, so every process takes
    them in the same order."""
    config = loaded.config
    stores: list[Path] = []
    if config.state.kind == "sqlite":
        stores.append(loaded.data_path(config.state.path).parent)
    if config.dead_letter.kind == "local":
        stores.append(loaded.data_path(config.dead_letter.path))
    for sink in config.sinks:
        if sink.enabled and sink.kind in JSONL_LAKE_KINDS:
            path = sink.settings.get("path", "lake")
            stores.append(loaded.data_path(path if isinstance(path, str) else "lake"))
    data_dir = loaded.data_dir.resolve()
    folders = {data_dir if store.resolve().is_relative_to(data_dir) else store.resolve() for store in stores}
    return sorted(folders)


def _acquire_all(folders: Iterable[Path]) -> tuple[list[FolderLock], FolderLock | None]:
    """Take every folder's lock, or none: (the locks taken, None) or ([], the lock that was busy)."""
    taken: list[FolderLock] = []
    for folder in folders:
        lock = FolderLock(folder)
        if not lock.try_acquire():
            _release_all(taken)
            return [], lock
        taken.append(lock)
    return taken, None


def _release_all(locks: list[FolderLock]) -> None:
    for lock in reversed(locks):
        lock.release()


@contextlib.contextmanager
def held(folders: Iterable[Path]) -> Iterator[None]:
    """Hold the locks of `folders` for the block; refuse at once with DataFolderBusy if one is held."""
    taken, busy = _acquire_all(sorted(folders))
    if busy is not None:
        raise busy.busy()
    try:
        yield
    finally:
        _release_all(taken)


@contextlib.asynccontextmanager
async def held_waiting(folders: Iterable[Path], *, wait_seconds: float, advice: str | None = None, poll_seconds: float = 0.05) -> AsyncIterator[None]:
    """Hold the locks of `folders` for the block, waiting up to `wait_seconds` for their holder to let
    go (without blocking the event loop); then raise DataFolderBusy."""
    ordered = sorted(folders)
    deadline = time.monotonic() + wait_seconds
    while True:
        taken, busy = _acquire_all(ordered)
        if busy is None:
            break
        if time.monotonic() >= deadline:
            raise busy.busy(advice=advice)
        await asyncio.sleep(poll_seconds)
    try:
        yield
    finally:
        _release_all(taken)
