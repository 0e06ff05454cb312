"""The error tree and the one table that maps library errors to it (pipeline/errors.py)."""

from __future__ import annotations

import ast
import asyncio
import builtins
import importlib
import inspect
import pkgutil
import sqlite3
from pathlib import Path

import httpx
import orjson
import pydantic
import pytest

import enrichers
import pipeline
from pipeline.errors import (
    LIBRARY_ERRORS,
    PERMANENT,
    TIMEOUT,
    TRANSIENT,
    ConfigError,
    DecodeError,
    EnricherTimeout,
    EnricherUnavailable,
    PipelineError,
    SinkError,
    SinkRejected,
    SinkUnavailable,
    meaning_of,
    translate,
)

ROOT = Path(__file__).resolve().parent.parent


def project_modules() -> list[str]:
    """Every module of pipeline/ and enrichers/ (`__main__` is skipped: importing it runs the CLI)."""
    names = []
    for package in (pipeline, enrichers):
        names.append(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):
            if not info.name.endswith(".__main__"):
                names.append(info.name)
    return names


def project_exception_classes() -> dict[str, type[BaseException]]:
    found = {}
    for name in project_modules():
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == name:
                found[f"{name}.{attr}"] = value
    return found


def test_every_exception_the_project_defines_is_a_pipeline_error():
    classes = project_exception_classes()
    assert len(classes) >= 15  # the walk found the tree itself and the errors around it
    outside = sorted(name for name, cls in classes.items() if not issubclass(cls, PipelineError))
    assert outside == []


def test_each_error_sits_on_the_branch_its_callers_handle():
    from pipeline.deliver.sinks.itsm import TicketError
    from pipeline.ingest.inputs import InputError
    from pipeline.ingest.limits import LimitExceeded
    from pipeline.plugin_kit.scaffold import ScaffoldError
    from pipeline.secrets import SecretNotSet

    assert issubclass(InputError, ConfigError) and issubclass(ScaffoldError, ConfigError)  # the CLI: exit 2, "error: ..."
    assert issubclass(SecretNotSet, ConfigError) and issubclass(SecretNotSet, ValueError)  # a ValueError for plugin loaders and validators
    assert issubclass(LimitExceeded, DecodeError)
    assert issubclass(TicketError, SinkError)
    limit = LimitExceeded("body_too_large", "9 bytes, limit 8")
    assert (limit.reason, limit.detail, str(limit)) == ("body_too_large", "9 bytes, limit 8", "body_too_large: 9 bytes, limit 8")



# -- library errors, by type ---------------------------------------------------------------------

# The libraries whose errors reach translate (or are caught by the code): each exported exception class
# must find an entry of LIBRARY_ERRORS through its MRO.
LIBRARY_MODULES = ("httpx", "aiohttp", "azure.core.exceptions", "azure.eventhub.exceptions", "azure.identity", "sqlite3", "orjson", "tomllib")
# Builtins the code catches where they are raised, as programming or parsing errors; never translated.
HANDLED_WHERE_RAISED = {Exception, BaseException, ValueError, KeyError, TypeError, IndexError, AttributeError, ImportError, UnicodeDecodeError, OverflowError, KeyboardInterrupt, asyncio.CancelledError,
                        StopIteration, GeneratorExit}  # the last two: the coroutine protocol (pipeline/enrich/engine.py drives a started call), not errors


def exported_exceptions(module_name: str) -> dict[str, type[BaseException]]:
    module = importlib.import_module(module_name)
    base: type[BaseException] = Exception
    if module_name == "aiohttp":  # the client's errors (the server and websocket parts do not reach us)
        module, base = importlib.import_module("aiohttp.client_exceptions"), module.ClientError
    names = getattr(module, "__all__", None) or [name for name in dir(module) if not name.startswith("_")]
    found = {}
    for name in names:
        value = getattr(module, name)
        if inspect.isclass(value) and issubclass(value, base) and value.__module__ != "builtins" and not issubclass(value, Warning):
            found[f"{module_name}.{name}"] = value
    return found


def test_every_entry_of_the_table_names_an_exception_type():
    for name in LIBRARY_MODULES:
        importlib.import_module(name)
    unresolved = []
    for path in LIBRARY_ERRORS:
        module_name, _, attr = path.partition(":")
        value = getattr(importlib.import_module(module_name), attr, None)
        if not (inspect.isclass(value) and issubclass(value, BaseException)):
            unresolved.append(path)
    assert unresolved == []
    assert set(LIBRARY_ERRORS.values()) == {TIMEOUT, TRANSIENT, PERMANENT}


@pytest.mark.parametrize("module_name", LIBRARY_MODULES)
def test_every_exception_a_library_exports_maps_to_a_meaning(module_name):
    classes = exported_exceptions(module_name)
    assert classes
    unmapped = sorted(name for name, cls in classes.items() if meaning_of(cls) is None)
    assert unmapped == []
    assert meaning_of(TimeoutError) is TIMEOUT and meaning_of(OSError) is TRANSIENT and meaning_of(ConnectionResetError) is TRANSIENT
    assert meaning_of(pydantic.ValidationError) is PERMANENT


def caught_types() -> dict[str, type[BaseException]]:
    """Every exception type named in an `except` clause in pipeline/ and enrichers/, by where it is caught."""
    found: dict[str, type[BaseException]] = {}
    for path in sorted([*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "enrichers").rglob("*.py")]):
        module_name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    imported[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    imported[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        for node in ast.walk(tree):
            if not isinstance(node, ast.ExceptHandler) or node.type is None:
                continue
            for expr in node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]:
                head, _, rest = ast.unparse(expr).partition(".")
                if head in imported:
                    dotted = imported[head] + (f".{rest}" if rest else "")
                elif hasattr(builtins, head):
                    dotted = f"builtins.{head}" + (f".{rest}" if rest else "")
                else:
                    dotted = f"{module_name}.{head}"
                found[f"{path.relative_to(ROOT)}:{node.lineno} {dotted}"] = resolve(dotted)
    return found


def resolve(dotted: str) -> type[BaseException]:
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            value: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            value = getattr(value, attr)
        assert inspect.isclass(value) and issubclass(value, BaseException), dotted
        return value
    raise AssertionError(f"cannot resolve {dotted}")


def test_every_library_exception_the_code_catches_is_in_the_table():
    caught = caught_types()
    library = {where: cls for where, cls in caught.items() if not cls.__module__.startswith(("pipeline", "enrichers")) and cls not in HANDLED_WHERE_RAISED}
    names = {cls.__name__ for cls in library.values()}
    assert {"HTTPError", "JSONDecodeError", "ValidationError", "AzureError", "OSError"} <= names  # the walk sees the code
    unmapped = sorted(where for where, cls in library.items() if meaning_of(cls) is None)
    assert unmapped == []


def http_status_error(status: int, headers: dict[str, str] | None = None) -> httpx.HTTPStatusError:
    request = httpx.Request("GET", "https://api.example.com/x")
    response = httpx.Response(status, headers=headers or {}, request=request)
    return httpx.HTTPStatusError(f"HTTP {status}", request=request, response=response)


def aiohttp_response_error(status: int, headers: dict[str, str] | None = None) -> BaseException:
    import aiohttp
    from multidict import CIMultiDict, CIMultiDictProxy
    from yarl import URL

    info = aiohttp.RequestInfo(URL("https://api.example.com/x"), "GET", CIMultiDictProxy(CIMultiDict()), URL("https://api.example.com/x"))
    return aiohttp.ClientResponseError(info, (), status=status, message="Service Unavailable", headers=CIMultiDict(headers or {}))


def validation_error() -> BaseException:
    class Answer(pydantic.BaseModel):
        count: int

    try:
        Answer.model_validate({"count": "many"})
    except pydantic.ValidationError as exc:
        return exc
    raise AssertionError("validated")


def json_error() -> BaseException:
    try:
        orjson.loads(b"<html>")
    except orjson.JSONDecodeError as exc:
        return exc
    raise AssertionError("parsed")


def azure_errors() -> dict[str, BaseException]:
    from azure.core import exceptions as core
    from azure.eventhub import exceptions as eventhub

    return {
        "ServiceRequestError": core.ServiceRequestError("connection refused"),
        "ServiceResponseTimeoutError": core.ServiceResponseTimeoutError("read timed out"),
        "ClientAuthenticationError": core.ClientAuthenticationError("no token"),
        "OperationTimeoutError": eventhub.OperationTimeoutError("send timed out"),
        "ConnectionLostError": eventhub.ConnectionLostError("link detached"),
    }


class ConnectTimeout(Exception):
    """A class outside the table whose name old code matched by substring."""


class WithStatus(Exception):
    """A library outside the table that carries a response (as requests' HTTPError does)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.response = type("Response", (), {"status_code": status, "headers": {"Retry-After": "4"}})()


SINK_CASES = [
    (lambda: httpx.ConnectError("connection refused"), SinkUnavailable, "ConnectError: connection refused", None),
    (lambda: httpx.ReadTimeout("read timed out"), SinkUnavailable, "ReadTimeout: read timed out", None),
    (lambda: httpx.RemoteProtocolError("peer closed"), SinkUnavailable, "RemoteProtocolError: peer closed", None),
    (lambda: httpx.TooManyRedirects("too many"), SinkRejected, "TooManyRedirects: too many", None),
    (lambda: http_status_error(503, {"Retry-After": "Sun, 06 Nov 2094 08:49:37 GMT"}), SinkUnavailable, "HTTP 503", "dated"),
    (lambda: http_status_error(429, {"Retry-After": "7"}), SinkUnavailable, "HTTP 429", 7.0),
    (lambda: http_status_error(404), SinkRejected, "HTTP 404", None),
    (lambda: aiohttp_response_error(503, {"Retry-After": "7"}), SinkUnavailable, "HTTP 503", 7.0),  # old code: rejected, no status read
    (lambda: aiohttp_response_error(400), SinkRejected, "HTTP 400", None),
    (lambda: ConnectionRefusedError(111, "Connection refused"), SinkUnavailable, "ConnectionRefusedError: [Errno 111] Connection refused", None),
    (lambda: TimeoutError(), SinkUnavailable, "TimeoutError: ", None),
    (lambda: sqlite3.OperationalError("database is locked"), SinkUnavailable, "OperationalError: database is locked", None),
    (lambda: sqlite3.IntegrityError("UNIQUE constraint failed"), SinkRejected, "IntegrityError: UNIQUE constraint failed", None),
    (json_error, SinkRejected, "JSONDecodeError: unexpected character", None),
    (validation_error, SinkRejected, "ValidationError: 1 validation error for Answer", None),
    (lambda: azure_errors()["ServiceRequestError"], SinkUnavailable, "ServiceRequestError: connection refused", None),
    (lambda: azure_errors()["ServiceResponseTimeoutError"], SinkUnavailable, "ServiceResponseTimeoutError: read timed out", None),
    (lambda: azure_errors()["ClientAuthenticationError"], SinkRejected, "ClientAuthenticationError: no token", None),
    (lambda: azure_errors()["ConnectionLostError"], SinkUnavailable, "ConnectionLostError: link detached", None),
    (lambda: ConnectTimeout("x"), SinkRejected, "ConnectTimeout: x", None),  # not matched by its name any more
    (lambda: RuntimeError("unexpected"), SinkRejected, "RuntimeError: unexpected", None),
    (lambda: WithStatus(502), SinkUnavailable, "HTTP 502", 4.0),
]


@pytest.mark.parametrize("make,cls,message,retry_after", SINK_CASES)
def test_translate_for_a_sink(make, cls, message, retry_after):
    error = translate(make(), role="sink")
    assert type(error) is cls and (str(error) == message or (message.startswith("JSONDecodeError") and str(error).startswith(message)))
    if isinstance(error, SinkUnavailable):
        if retry_after == "dated":
            assert error.retry_after is not None and error.retry_after > 365 * 24 * 3600
        else:
            assert error.retry_after == retry_after


ENRICHER_CASES = [
    (lambda: httpx.ReadTimeout("read timed out"), EnricherTimeout, "timed out (ReadTimeout)"),
    (lambda: httpx.ConnectError("connection refused"), EnricherUnavailable, "ConnectError: connection refused"),
    (lambda: http_status_error(503), EnricherUnavailable, "HTTP 503"),
    (lambda: aiohttp_response_error(503), EnricherUnavailable, "HTTP 503"),
    (lambda: TimeoutError(), EnricherTimeout, "timed out (TimeoutError)"),
    (lambda: azure_errors()["ServiceResponseTimeoutError"], EnricherTimeout, "timed out (ServiceResponseTimeoutError)"),
    (lambda: azure_errors()["OperationTimeoutError"], EnricherTimeout, "timed out (OperationTimeoutError)"),
    (validation_error, EnricherUnavailable, "ValidationError: 1 validation error for Answer"),
    (lambda: ConnectTimeout("x"), EnricherUnavailable, "ConnectTimeout: x"),  # not a timeout because of its name
    (lambda: KeyError("user"), EnricherUnavailable, "KeyError: 'user'"),
]


@pytest.mark.parametrize("make,cls,message", ENRICHER_CASES)
def test_translate_for_an_enricher(make, cls, message):
    error = translate(make(), role="enricher")
    assert type(error) is cls and str(error) == message


def test_aiohttp_timeouts_are_timeouts_not_connection_errors():
    import aiohttp

    assert meaning_of(aiohttp.ServerTimeoutError) is TIMEOUT and meaning_of(aiohttp.ConnectionTimeoutError) is TIMEOUT
    assert meaning_of(aiohttp.ServerDisconnectedError) is TRANSIENT and meaning_of(aiohttp.ClientPayloadError) is PERMANENT


def test_pipeline_errors_pass_through_unchanged():
    error = SinkRejected("too large")
    assert translate(error) is error and translate(error, role="enricher") is error
