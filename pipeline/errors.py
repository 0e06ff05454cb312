"""The pipeline's one error tree, and the one table that maps library errors onto it.

    PipelineError
    ├── ConfigError              bad configuration or command line: names the file and the key (or the path); the CLI exits 2
    │   ├── InputError               a path the user gave cannot be read (pipeline.ingest.inputs)
    │   ├── PathUnusable             a file or folder the pipeline must write (--out, a store) cannot be written
    │   ├── ScaffoldError            a plugin name or folder the scaffold refuses (pipeline.plugin_kit.scaffold)
    │   └── SecretNotSet             a `*_env` secret's variable is unset (pipeline.secrets; also a ValueError)
    ├── DecodeError              a message or record cannot become alerts: it is dead-lettered
    │   └── LimitExceeded            one input limit is exceeded (pipeline.ingest.limits)
    ├── EnricherError            one enricher could not add its fragment: the alert goes on without it
    │   ├── EnricherUnavailable      the backend refused, failed or answered nonsense
    │   └── EnricherTimeout          the backend did not answer in time
    ├── SinkError                a sink could not take a record
    │   ├── SinkUnavailable          transient (5xx, 408, 429, network): retried, then dead-lettered
    │   │   └── SinkOutage               a sink took none of a batch's records: the whole batch is run again
    │   ├── SinkRejected             permanent (other 4xx, too large): dead-lettered at once
    │   └── TicketError              an ITSM answer that is not success, with its Outcome (pipeline.deliver.sinks.itsm)
    ├── UnknownFormat            no decoder is registered under an input format's name (pipeline.ingest.formats.registry)
    ├── StoreUnavailable         the state or dead-letter store failed: the whole batch is retried
    │   ├── DataFolderBusy           another process holds the local data folder (pipeline/state/folder_lock.py)
    │   ├── StoreBusy                another process holds a lock on a store's SQLite file: retried, then the CLI exits 1
    │   └── DiskFull                 a local store's disk or quota is full
    └── StoreDamaged             a store's file is not a usable database: running again cannot help; the CLI exits 2

Store and file errors (sqlite3 errors by their result code, OS errors by their errno) are classified in
one place, `store_error`: busy/locked → StoreBusy; damaged → StoreDamaged; a path that cannot be
written or read (permissions, read-only file system, a file where a folder should be) → PathUnusable;
anything else (a full disk, an I/O error) → StoreUnavailable.

Messages of these errors never carry payload content, so they are safe to log and to store.

Library errors (httpx, aiohttp, the Azure SDKs, sqlite3, OS errors, pydantic, orjson) become pipeline
errors in one place, `translate`, by their type: `LIBRARY_ERRORS` says what each type means (a timeout,
a transient failure, a permanent one), a subclass takes the meaning of its nearest listed base, and
an error that carries an HTTP status is classified by that status. Nothing matches class names.
Code elsewhere catches a library type only where the answer is its own to give (a blob that already
exists was delivered; an Event Hub refusal is retried); tests/test_errors.py checks that every
library type the code catches, and every error those libraries export, has its entry.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any


class PipelineError(Exception):
    """Base of every error the pipeline raises on purpose."""


class ConfigError(PipelineError):
    """The configuration is unusable. `str()` names the file and the key."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        self.file = file
        self.key = key
        where = ", ".join(part for part in (file, f"key '{key}'" if key else None) if part)
        super().__init__(f"{where}: {message}" if where else message)


class DecodeError(PipelineError):
    """A message body or one record of it cannot be decoded. The reason is a short code plus detail."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class EnricherError(PipelineError):
    """An enricher failed for one alert."""


class EnricherUnavailable(EnricherError):
    """The enricher's backend refused, failed or answered something unusable."""


class EnricherTimeout(EnricherError):
    """The enricher did not finish within its timeout."""


class SinkError(PipelineError):
    """A sink failed to take a record."""


class SinkUnavailable(SinkError):
    """Transient: worth retrying later (5xx, 408, 429, network errors, timeouts)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class SinkOutage(SinkUnavailable):
    """A sink took none of the records a batch offered it within the delivery budget: it is down.

    Raised by the runner (not by sinks) so that the caller runs the whole batch again before it
    checkpoints; see docs/delivery.md for the rule and its bound.
    """

    def __init__(self, message: str, *, sinks: tuple[str, ...] = (), retry_after: float | None = None) -> None:
        self.sinks = sinks
        super().__init__(message, retry_after=retry_after)


class SinkRejected(SinkError):
    """Permanent: the same request will fail again (4xx other than 408/429, oversized record)."""


class StoreUnavailable(PipelineError):
    """The state store or the dead-letter store failed; nothing can be accounted for safely."""


class DataFolderBusy(StoreUnavailable):
    """Another process holds the lock of a local data folder; its stores are not ours to write now.

    The CLI refuses with this one line and exit 2; a Functions invocation raises it (after a bounded
    wait) so the host runs the batch again. `pid` is the holder's, when its lock file records it.
    """

    def __init__(self, folder: str, pid: int | None, *, advice: str = "wait for it to finish or give this run its own --out") -> None:
        self.folder = folder
        self.pid = pid
        holder = f"another dlp-pipeline process (pid {pid})" if pid is not None else "another dlp-pipeline process"
        super().__init__(f"{holder} is using {folder}; {advice}")


class PathUnusable(ConfigError):
    """A file or folder the pipeline must write or read (the data dir, a store's file) refuses it:
    permissions, a read-only file system, or a file where a folder should be. Running again cannot
    help until the path is fixed, so the CLI exits 2, naming it."""


# How long a local SQLite store (state, history, lake index) waits for another process's lock before
# the wait becomes StoreBusy (pipeline/state/sqlite.py sets it as the connection's busy timeout).
BUSY_WAIT_SECONDS = 5.0


class StoreBusy(StoreUnavailable):
    """Another process holds a lock on a store's SQLite file (SQLITE_BUSY / SQLITE_LOCKED) for longer
    than the store's busy wait: transient. The batch is retried (consume, Functions); the CLI exits 1."""

    advice = "nothing is lost: run again once that process has finished"

    def __init__(self, path: str, *, operation: str) -> None:
        self.path = path
        super().__init__(f"{path} is busy: another process holds a lock on it (waited {BUSY_WAIT_SECONDS:g} s to {operation})")


class DiskFull(StoreUnavailable):
    """The disk (or quota) of a local store is full: transient once space is freed."""

    advice = "nothing is lost: free space, then run again"


class StoreDamaged(PipelineError):
    """A store's file is not a usable database (corrupted, truncated, or not SQLite at all).

    Running again reads the same file: the message names it and says what to do instead."""

    def __init__(self, path: str, *, what: str, advice: str) -> None:
        self.path = path
        super().__init__(f"{path} is damaged ({what}): {advice}")


# SQLite primary result codes (https://sqlite.org/rescode.html); an extended code's low byte is its primary.
_SQLITE_PERM, _SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 3, 5, 6, 8
_SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_NOTADB = 11, 13, 14, 26
# errno names of a path that refuses us, and of a full disk
_PATH_REFUSED = frozenset({"EACCES", "EPERM", "EROFS", "ENOTDIR", "EISDIR", "EEXIST", "ENAMETOOLONG", "ELOOP"})
_DISK_FULL = frozenset({"ENOSPC", "EDQUOT", "EFBIG"})

DAMAGED_ADVICE = "move it aside (keep it for diagnosis) and run again: a new, empty one is created"


def store_error(exc: BaseException, *, path: object, operation: str, advice: str = DAMAGED_ADVICE) -> PipelineError:
    """The one classification of an error of a local store's file (a sqlite3 error or an OSError).

    `path` names the file (or folder), `operation` says what was being done ("open", "write", ...),
    `advice` what to do with a damaged file. Busy or locked → StoreBusy (transient); corrupted or
    not a database → StoreDamaged; a path refused by the file system → PathUnusable; a full disk
    and anything else → StoreUnavailable. Messages name the path and never hold stored content.
    """
    import errno
    import sqlite3

    where = str(path)
    if isinstance(exc, PipelineError):
        return exc
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        text = str(exc)
        if primary in (_SQLITE_BUSY, _SQLITE_LOCKED) or (primary is None and "locked" in text):
            return StoreBusy(where, operation=operation)
        if primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB) or (primary is None and ("malformed" in text or "not a database" in text)):
            return StoreDamaged(where, what=text, advice=advice)
        if primary in (_SQLITE_PERM, _SQLITE_READONLY, _SQLITE_CANTOPEN):
            return PathUnusable(f"cannot {operation} ({text}): check that the folder exists and this user may write it", file=where)
        if primary == _SQLITE_FULL:
            return DiskFull(f"{where}: disk full (could not {operation})")
        return StoreUnavailable(f"{where}: {operation} failed ({type(exc).__name__}: {first_line(exc)})")
    if isinstance(exc, OSError):
        name = errno.errorcode.get(exc.errno or 0, "")
        reason = exc.strerror or type(exc).__name__
        target = exc.filename if exc.filename is not None else where
        if name in _PATH_REFUSED:
            return PathUnusable(f"cannot {operation} ({reason}): check that the path is a folder this user may write", file=str(target))
        if name in _DISK_FULL:
            return DiskFull(f"{target}: disk full (could not {operation})")
        return StoreUnavailable(f"{target}: {operation} failed ({reason})")
    return StoreUnavailable(f"{where}: {operation} failed ({type(exc).__name__}: {first_line(exc)})")


_RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def is_retryable_status(status: int) -> bool:
    """True for the HTTP statuses a client should retry (408, 429 and the usual 5xx)."""
    return status in _RETRYABLE_STATUS or status >= 500


@dataclass(frozen=True)
class Meaning:
    """What a library error means, as the error each role raises for it."""

    sink: type[SinkUnavailable] | type[SinkRejected]
    enricher: type[EnricherUnavailable] | type[EnricherTimeout]


TIMEOUT = Meaning(sink=SinkUnavailable, enricher=EnricherTimeout)
TRANSIENT = Meaning(sink=SinkUnavailable, enricher=EnricherUnavailable)  # the network, the server, a lock: worth retrying
PERMANENT = Meaning(sink=SinkRejected, enricher=EnricherUnavailable)  # the same call would fail again
_UNKNOWN = PERMANENT  # a type outside the table (and without an HTTP status)

# "module:Class" -> meaning. A type not listed takes the meaning of its nearest listed base (MRO
# order), so the more specific entries matter only where a subclass means something else. An error
# with an HTTP status (httpx.HTTPStatusError, azure-core's HttpResponseError and its subclasses,
# aiohttp.ClientResponseError) is classified by the status first; its entry applies without one.
LIBRARY_ERRORS: Mapping[str, Meaning] = MappingProxyType({
    # Python: asyncio.TimeoutError and socket.timeout are TimeoutError; OSError covers ConnectionError,
    # DNS (socket.gaierror), TLS (ssl.SSLError) and files.
    "builtins:TimeoutError": TIMEOUT,
    "builtins:OSError": TRANSIENT,
    "sqlite3:OperationalError": TRANSIENT,  # locked, busy, disk I/O
    "sqlite3:Error": PERMANENT,
    "sqlite3:Warning": PERMANENT,
    "tomllib:TOMLDecodeError": PERMANENT,
    # httpx
    "httpx:HTTPStatusError": PERMANENT,  # by its status
    "httpx:TimeoutException": TIMEOUT,
    "httpx:TransportError": TRANSIENT,  # network, protocol and proxy errors (UnsupportedProtocol too, as before)
    "httpx:HTTPError": PERMANENT,  # decoding errors, too many redirects
    "httpx:InvalidURL": PERMANENT,
    "httpx:CookieConflict": PERMANENT,
    "httpx:StreamError": PERMANENT,
    # aiohttp (the Azure SDKs' async transport)
    "aiohttp:ClientResponseError": PERMANENT,  # by its status
    "aiohttp:ServerTimeoutError": TIMEOUT,  # before its base ServerConnectionError in the MRO
    "aiohttp:ClientConnectionError": TRANSIENT,
    "aiohttp:ClientError": PERMANENT,  # payload, URL and redirect errors
    # azure-core: what every Azure SDK raises
    "azure.core.exceptions:HttpResponseError": PERMANENT,  # by its status (ClientAuthenticationError, ResourceNotFoundError, ...)
    "azure.core.exceptions:ServiceRequestTimeoutError": TIMEOUT,
    "azure.core.exceptions:ServiceResponseTimeoutError": TIMEOUT,
    "azure.core.exceptions:ServiceRequestError": TRANSIENT,  # the request did not reach the service
    "azure.core.exceptions:ServiceResponseError": TRANSIENT,  # the answer did not come back whole
    "azure.core.exceptions:AzureError": PERMANENT,
    "azure.core.exceptions:SerializationError": PERMANENT,  # ValueErrors, outside AzureError
    "azure.core.exceptions:DeserializationError": PERMANENT,
    # azure-eventhub (its own tree, not azure-core's)
    "azure.eventhub.exceptions:OperationTimeoutError": TIMEOUT,
    "azure.eventhub.exceptions:ConnectError": TRANSIENT,  # AuthenticationError too (the Event Hub sink handles that one first)
    "azure.eventhub.exceptions:ConnectionLostError": TRANSIENT,
    "azure.eventhub.exceptions:EventHubError": PERMANENT,
    "azure.eventhub.exceptions:OwnershipLostError": PERMANENT,
    # answers that are not what was promised
    "orjson:JSONDecodeError": PERMANENT,
    "pydantic_core:ValidationError": PERMANENT,  # pydantic.ValidationError
})

# The table by type, filled per library once it is imported: an error of a library never imported
# cannot occur, and importing them all here would cost every start-up a quarter of a second.
def _by_module(table: Mapping[str, Meaning]) -> dict[str, dict[str, Meaning]]:
    pending: dict[str, dict[str, Meaning]] = {}
    for path, meaning in table.items():
        module, _, name = path.partition(":")
        pending.setdefault(module, {})[name] = meaning
    return pending


_pending = _by_module(LIBRARY_ERRORS)  # module -> {class name: meaning}, until that module is imported
_by_type: dict[type[BaseException], Meaning] = {}


def _library_types() -> dict[type[BaseException], Meaning]:
    for module_name in [name for name in _pending if name in sys.modules]:
        module, names = sys.modules[module_name], _pending[module_name]
        for name in list(names):
            cls = getattr(module, name, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                _by_type[cls] = names.pop(name)
        if not names:
            _pending.pop(module_name, None)
    return _by_type


def meaning_of(error_type: type[BaseException]) -> Meaning | None:
    """What LIBRARY_ERRORS says of `error_type`: its own entry or its nearest listed base's; None outside the table."""
    known = _library_types()
    for cls in error_type.__mro__:
        meaning = known.get(cls)
        if meaning is not None:
            return meaning
    return None


def _http_answer(exc: BaseException) -> tuple[int | None, Any]:
    """The HTTP status and headers an error carries: httpx and azure-core keep the response on the
    error (`response.status_code`), aiohttp keeps `status` and `headers` on the error itself."""
    for holder in (getattr(exc, "response", None), exc):
        if holder is None:
            continue
        status = getattr(holder, "status_code", None) or getattr(holder, "status", None)
        if isinstance(status, int) and 100 <= status <= 599:
            return status, getattr(holder, "headers", None)
    return None, None


def _retry_after(headers: Any) -> float | None:
    from pipeline.resilience.retry import parse_retry_after  # not at the top: that module imports this one

    try:
        value = headers.get("Retry-After")
    except AttributeError:
        return None
    return parse_retry_after(value)


def translate(exc: BaseException, *, role: str = "sink") -> PipelineError:
    """The pipeline error for any exception a library raised; pipeline errors pass through unchanged.

    `role` says who raised it: "sink" gives SinkUnavailable or SinkRejected, "enricher" gives
    EnricherUnavailable or EnricherTimeout. (Stores raise StoreUnavailable and decoders DecodeError
    themselves.) An HTTP status decides when the error carries one (for a sink: retryable on 408,
    429 and 5xx, with the answer's Retry-After); otherwise the type does, through LIBRARY_ERRORS;
    a type outside the table is permanent. The message names the type and the first line of the
    error's text, or the status: never a URL or a body. Callers `raise translate(exc) from exc`.
    """
    if isinstance(exc, PipelineError):
        return exc
    name = type(exc).__name__
    meaning = meaning_of(type(exc)) or _UNKNOWN
    status, headers = _http_answer(exc)
    if role == "enricher":
        if meaning.enricher is EnricherTimeout:
            return EnricherTimeout(f"timed out ({name})")
        if status is not None:
            return EnricherUnavailable(f"HTTP {status}")
        return EnricherUnavailable(f"{name}: {first_line(exc)}")
    if status is not None:
        if is_retryable_status(status):
            return SinkUnavailable(f"HTTP {status}", retry_after=_retry_after(headers))
        return SinkRejected(f"HTTP {status}")
    return meaning.sink(f"{name}: {first_line(exc)}")


def first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:limit] if text else ""
