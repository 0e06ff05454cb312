"""Where the lake's records are: local files, or the Blob lake of a config copied to a temporary folder.

A lake file is `*.jsonl` (the local lake), `*.jsonl.gz` or `*.parquet` (the Blob lake); files and
folders whose name starts with `_` or `.` (the local lake's delivered-id index) are not records.
A `date=YYYY-MM-DD` folder in a file's path (both lake sinks partition by it) lets `--since` skip the
file without reading it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

from pydantic import ValidationError

from pipeline.config import LoadedConfig, config_error_from_validation
from pipeline.errors import ConfigError, translate
from pipeline.observability.live_line import LiveLine

log = logging.getLogger("pipeline.lake_report")

LAKE_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
LAKE_SINK_KINDS = ("jsonl", "blob")


class LakeUnreadable(ConfigError):
    """The lake cannot be found or read; the message says where and what to do."""


@dataclass(frozen=True)
class LakeFile:
    path: Path
    size: int

    @property
    def is_parquet(self) -> bool:
        return self.path.name.endswith(".parquet")


def is_lake_file(name: str) -> bool:
    return name.endswith(LAKE_SUFFIXES) and not name.startswith(("_", "."))


def partition_date(parts: Iterable[str]) -> date | None:
    """The `date=YYYY-MM-DD` of a lake path, if it has one."""
    for part in parts:
        if part.startswith("date="):
            try:
                return date.fromisoformat(part[5:])
            except ValueError:
                return None
    return None


def before(parts: Iterable[str], since: date | None) -> bool:
    """True when the path's partition is wholly before `since` (its records cannot be in the report)."""
    if since is None:
        return False
    day = partition_date(parts)
    return day is not None and day < since


def local_files(root: Path, since: date | None = None) -> list[LakeFile]:
    """The lake files under `root` (or `root` itself when it is one), sorted by path."""
    if not root.exists():
        raise LakeUnreadable(f"{root}: no such file or folder; run the pipeline first (python -m pipeline run) or give --lake PATH")
    if root.is_file():
        if not is_lake_file(root.name):
            raise LakeUnreadable(f"{root}: not a lake file (expected {', '.join(LAKE_SUFFIXES)})")
        return [LakeFile(root, root.stat().st_size)]
    found = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).parts
        if any(part.startswith(("_", ".")) for part in relative[:-1]) or not path.is_file() or not is_lake_file(path.name):
            continue
        if before(relative, since):
            continue
        found.append(LakeFile(path, path.stat().st_size))
    return found


@dataclass(frozen=True)
class LakeLocation:
    """One lake sink of a config: a local folder, or the settings of a Blob lake."""

    sink: str
    folder: Path | None = None
    blob: Any = None  # BlobLakeSink.Settings

    def describe(self) -> str:
        if self.folder is not None:
            return str(self.folder)
        return f"blob container {self.blob.container}/{self.blob.prefix}".rstrip("/")


def lakes_of(loaded: LoadedConfig) -> list[LakeLocation]:
    """The enabled lake sinks (kinds jsonl and blob) of a config, their settings validated."""
    from pipeline.deliver.sinks.blob_lake import BlobLakeSink
    from pipeline.deliver.sinks.jsonl_lake import JsonlLakeSink

    found = []
    for index, entry in enumerate(loaded.config.sinks):
        if not entry.enabled or entry.kind not in LAKE_SINK_KINDS:
            continue
        settings_class = JsonlLakeSink.Settings if entry.kind == "jsonl" else BlobLakeSink.Settings
        try:
            settings: Any = settings_class(**entry.settings)
        except ValidationError as exc:
            raise config_error_from_validation(exc, file=loaded.display_name, prefix=("sinks", index, "settings"), model=settings_class) from None
        if entry.kind == "jsonl":
            found.append(LakeLocation(entry.name, folder=loaded.data_path(settings.path)))
        else:
            found.append(LakeLocation(entry.name, blob=settings))
    if not found:
        raise loaded.error("no lake sink (kind 'jsonl' or 'blob') is configured: give --lake PATH, or a --config with a lake sink", key="sinks")
    return found


def download_blob_lake(settings: Any, destination: Path, *, since: date | None, progress: ReadProgress, credential: Any = None) -> list[LakeFile]:
    """Copy the Blob lake's record blobs (under its prefix, from `since` on) into `destination`.

    Reads only (list and get blob): the identity needs Storage Blob Data Reader on the container.
    """
    from azure.storage.blob import BlobServiceClient, ExponentialRetry

    # A read retries a little (a throttled or dropped call: after about 1 s, then 2 s), not the storage
    # library's default 15 s and more, so an unreachable account fails within seconds.
    options: dict[str, Any] = {
        "connection_timeout": min(settings.timeout_seconds, 10),
        "read_timeout": settings.timeout_seconds,
        "retry_policy": ExponentialRetry(initial_backoff=1, increment_base=1, retry_total=2, random_jitter_range=1),
    }
    if settings.connection_string_env is not None:
        service = BlobServiceClient.from_connection_string(settings.connection_string_env.resolve().get_secret_value(), **options)
    else:
        if credential is None:
            from azure.identity import DefaultAzureCredential

            credential = DefaultAzureCredential(managed_identity_client_id=settings.managed_identity_client_id)
        service = BlobServiceClient(settings.account_url, credential=credential, **options)
    prefix = settings.prefix.strip("/")
    where = f"blob container {settings.container}" + (f", prefix {prefix}/" if prefix else "")
    files: list[LakeFile] = []
    try:
        container = service.get_container_client(settings.container)
        names = [
            (blob.name, blob.size or 0)
            for blob in container.list_blobs(name_starts_with=f"{prefix}/" if prefix else None)
            if is_lake_file(PurePosixPath(blob.name).name) and not before(PurePosixPath(blob.name).parts, since)
        ]
        progress.start(len(names), sum(size for _, size in names), verb="downloading")
        for number, (name, size) in enumerate(names):
            target = destination / f"{number:08d}-{PurePosixPath(name).name}"
            with open(target, "wb") as handle:
                container.download_blob(name).readinto(handle)
            files.append(LakeFile(target, target.stat().st_size))
            progress.advance(size)
        progress.finish()
    except OSError:
        raise
    except Exception as exc:
        error = translate(exc, role="sink")
        log.debug("blob lake read failed", exc_info=exc)
        raise LakeUnreadable(
            f"{where}: cannot read the lake ({error}); check the account URL or connection string, that the container exists, "
            "and that the identity has Storage Blob Data Reader on it"
        ) from None
    finally:
        service.close()
    return files


class ReadProgress(LiveLine):
    """One line on standard error while lake files are downloaded or read: files and MB done, rate.

    Drawn in place (carriage return) when the stream is a terminal, at most every `interval` seconds;
    elsewhere nothing is written while reading, and `finish` writes one summary line when the read
    took longer than `quiet_seconds` (so a log of a long run shows it once).
    """

    def __init__(self, *, stream: TextIO | None = None, enabled: bool | None = None, interval: float = 0.2, quiet_seconds: float = 2.0, clock=time.monotonic) -> None:
        super().__init__(stream=stream, enabled=enabled, interval=interval, clock=clock)
        self.quiet_seconds = quiet_seconds
        self.verb = "reading"
        self.total_files = 0
        self.total_bytes = 0
        self.files = 0
        self.bytes = 0

    def start(self, total_files: int, total_bytes: int, *, verb: str = "reading") -> None:
        self.verb, self.total_files, self.total_bytes = verb, total_files, total_bytes
        self.files = self.bytes = 0
        self._started = self._clock()
        self._last = float("-inf")
        self.draw()

    def advance(self, size: int, files: int = 1) -> None:
        self.files += files
        self.bytes += size
        self.draw()

    def line(self) -> str:
        elapsed = max(self._clock() - self._started, 1e-9)
        megabytes = self.bytes / 1e6
        return f"{self.verb} lake: {self.files}/{self.total_files} files  {megabytes:.1f}/{self.total_bytes / 1e6:.1f} MB  {megabytes / elapsed:.1f} MB/s"

    def finish(self) -> None:
        if self.live:
            self.end()
        elif self._clock() - self._started >= self.quiet_seconds:
            self.stream.write(self.line() + "\n")
            self.stream.flush()


def chunks(files: list[LakeFile], max_bytes: int = 64_000_000, max_files: int = 200) -> Iterator[list[LakeFile]]:
    """Groups of files read in one DuckDB statement (bounded, so the progress line moves)."""
    group: list[LakeFile] = []
    size = 0
    for file in files:
        if group and (size + file.size > max_bytes or len(group) >= max_files):
            yield group
            group, size = [], 0
        group.append(file)
        size += file.size
    if group:
        yield group
