"""The few error types the runner treats differently, and the one place library errors map to them.

    PipelineError
    ├── ConfigError              bad configuration: raised at start-up, names the file and the key
    ├── DecodeError              a message or record cannot become alerts: it is dead-lettered
    ├── EnricherError            one enricher could not add its fragment: the alert goes on without it
    │   ├── EnricherUnavailable      the backend refused, failed or answered nonsense
    │   └── EnricherTimeout          the backend did not answer in time
    ├── SinkError                a sink could not take a record
    │   ├── SinkUnavailable          transient (5xx, 408, 429, network): retried, then dead-lettered
    │   │   └── SinkOutage               a sink took none of a batch's records: the whole batch is run again
    │   └── SinkRejected             permanent (other 4xx, too large): dead-lettered at once
    └── StoreUnavailable         the state or dead-letter store failed: the whole batch is retried

Messages of these errors never carry payload content, so they are safe to log and to store.
`translate` is the only function that looks at third-party exception types.
"""

from __future__ import annotations

import asyncio
import sqlite3


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


_RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def is_retryable_status(status: int) -> bool:
    """True for the HTTP statuses a client should retry (408, 429 and the usual 5xx)."""
    return status in _RETRYABLE_STATUS or status >= 500


def _retry_after(headers: object) -> float | None:
    from pipeline.resilience.retry import parse_retry_after  # not at the top: that module imports this one

    try:
        value = headers.get("Retry-After")  # type: ignore[attr-defined]
    except AttributeError:
        return None
    return parse_retry_after(value)


def translate(exc: BaseException, *, role: str = "sink") -> PipelineError:
    """Map any exception raised by a library to one of the pipeline's errors.

    `role` says who raised it: "sink" gives SinkUnavailable/SinkRejected, "enricher" gives
    EnricherUnavailable/EnricherTimeout. (Stores raise StoreUnavailable and decoders DecodeError
    themselves.)
    Pipeline errors pass through unchanged. Callers `raise translate(exc) from exc`.
    """
    if isinstance(exc, PipelineError):
        return exc
    name = type(exc).__name__
    status: int | None = None
    headers: object = None
    response = getattr(exc, "response", None)
    if response is not None:
        status = getattr(response, "status_code", None) or getattr(response, "status", None)
        headers = getattr(response, "headers", None)
    if status is None:
        status = getattr(exc, "status_code", None)
    timed_out = isinstance(exc, (TimeoutError, asyncio.TimeoutError)) or "Timeout" in name

    if role == "enricher":
        if timed_out:
            return EnricherTimeout(f"timed out ({name})")
        if isinstance(status, int):
            return EnricherUnavailable(f"HTTP {status}")
        return EnricherUnavailable(f"{name}: {_first_line(exc)}")
    # role == "sink"
    if isinstance(status, int):
        if is_retryable_status(status):
            return SinkUnavailable(f"HTTP {status}", retry_after=_retry_after(headers))
        return SinkRejected(f"HTTP {status}")
    if timed_out or isinstance(exc, (ConnectionError, OSError, sqlite3.OperationalError)):
        return SinkUnavailable(f"{name}: {_first_line(exc)}")
    lineage = " ".join(cls.__name__ for cls in type(exc).__mro__)  # httpx.RemoteProtocolError is a TransportError
    if any(word in lineage for word in ("Connect", "Network", "Transport", "ServiceRequest", "ServiceResponse", "Disconnect")):
        return SinkUnavailable(f"{name}: {_first_line(exc)}")
    return SinkRejected(f"{name}: {_first_line(exc)}")


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:limit] if text else ""
