"""`python -m pipeline doctor`: check every configured component with its cheapest harmless call.

The check protocol. A plugin class (enricher or sink, built-in or third-party) may define

    @classmethod
    async def doctor(cls, settings, services) -> Sequence[Check]: ...

`settings` is its validated Settings model, `services` the runner's `Services` (input paths, the
shared Azure credential). It returns one `Check` per thing it depends on: a file, a token, an API
it reads. Guarantees a check must give: it reads, it never writes (no alert sent, no ticket, no
blob, no row); it builds its own clients and closes them; it says in `fix` what the user can do.
A plugin without `doctor` is reported ok once its settings validate (it names nothing to check).

`run_doctor` checks the core components too (state store, dead-letter store, the consumer), runs
every component's checks under a time limit, and turns anything a check raises into a failed line
(the error's type and first line, never a stack trace, never a secret or payload content).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from pipeline.config import LoadedConfig, config_error_from_validation
from pipeline.errors import PipelineError, first_line

log = logging.getLogger("pipeline.doctor")

Status = Literal["ok", "failed", "skipped"]
#: Seconds one component's checks may take before they are reported failed.
COMPONENT_TIMEOUT = 30.0
#: Role assignments and admin consent take a while to apply: say so whenever one is missing.
ROLE_DELAY = "a new role assignment can take up to 30 minutes to apply"
STORAGE_SCOPE = "https://storage.azure.com/.default"
EVENTHUBS_SCOPE = "https://eventhubs.azure.net/.default"


@dataclass(frozen=True)
class Check:
    """One line of the doctor's answer: what was checked, how it went, why, and what to do."""

    name: str
    status: Status
    detail: str = ""
    fix: str = ""

    @classmethod
    def ok(cls, name: str, detail: str = "") -> Check:
        return cls(name, "ok", detail)

    @classmethod
    def failed(cls, name: str, why: str, fix: str) -> Check:
        return cls(name, "failed", why, fix)

    @classmethod
    def skipped(cls, name: str, why: str) -> Check:
        return cls(name, "skipped", why)


@dataclass(frozen=True)
class Result:
    """A check of one component (`state`, `dead letters`, `enricher user_context`, `sink lake`, ...)."""

    component: str
    check: Check

    def line(self) -> str:
        check = self.check
        text = f"{check.status:<7}  {self.component}: {check.name}"
        if check.detail:
            text += f": {check.detail}"
        if check.status == "failed" and check.fix:
            text += f"; fix: {check.fix}"
        return text


@dataclass
class DoctorReport:
    results: list[Result]

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results if r.check.status == "failed"]

    def summary(self) -> str:
        counts = {status: sum(1 for r in self.results if r.check.status == status) for status in ("ok", "failed", "skipped")}
        failing = sorted({r.component for r in self.failed})
        tail = f"; failing: {', '.join(failing)}" if failing else ""
        return f"{len(self.results)} checks: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped{tail}"


# -- running ---------------------------------------------------------------------------------------


async def run_doctor(loaded: LoadedConfig, *, credential_factory: Any = None, timeout: float = COMPONENT_TIMEOUT) -> DoctorReport:
    """Check every enabled component of `loaded`, one after another; never raises for a component."""
    from pipeline.plugins import ENRICHER_GROUP, SINK_GROUP, Services, azure_identity_credential
    from pipeline.secrets import install_log_redaction

    install_log_redaction(loaded.secret_env_names)
    services = Services(state=None, config=loaded, clock=time.time, credential_factory=credential_factory or azure_identity_credential)
    results: list[Result] = []
    config = loaded.config
    try:
        results += await _component("state", state_checks(loaded, services), timeout)
        results += await _component("dead letters", dead_letter_checks(loaded, services), timeout)
        if config.consumer is not None:
            results += await _component("consumer", consumer_checks(loaded, services), timeout)
        for index, enricher in enumerate(config.enrichers):
            if enricher.enabled:
                key = f"enrichers[{index}]"
                reference = enricher.use or enricher.name
                results += await _component(f"enricher {enricher.name}", plugin_checks(reference, ENRICHER_GROUP, enricher.settings, services, key), timeout)
        if not any(sink.enabled for sink in config.sinks):
            results.append(Result("sinks", Check.failed("configured", "no enabled sink: every alert would be lost", "add a [[sinks]] entry (the local lake: kind = \"jsonl\")")))
        for index, sink in enumerate(config.sinks):
            if sink.enabled:
                key = f"sinks[{index}]"
                results += await _component(f"sink {sink.name}", plugin_checks(sink.kind, SINK_GROUP, sink.settings, services, key), timeout)
    finally:
        await services.aclose()
    return DoctorReport(results)


async def _component(component: str, checks: Awaitable[Sequence[Check]], timeout: float) -> list[Result]:
    try:
        found = await asyncio.wait_for(checks, timeout)
    except TimeoutError:
        found = [Check.failed("checks", f"no answer within {timeout:g} s", "check the network path to the service (DNS, firewall, private endpoint)")]
    except PipelineError as exc:  # a setting the plugin rejects, an unset secret variable
        found = [Check.failed("settings", str(exc), "correct the setting named, or set the environment variable")]
    except Exception as exc:  # a plugin's own check that raised: one line, no stack trace
        log.debug("doctor: checks of %s raised", component, exc_info=exc)
        found = [Check.failed("checks", f"the check raised {type(exc).__name__}: {first_line(exc)}", "run again with -vv for the details")]
    return [Result(component, check) for check in found]


async def plugin_checks(reference: str, group: str, raw_settings: dict[str, Any], services: Any, key: str) -> Sequence[Check]:
    """Load the plugin class, validate its settings, and run its `doctor` hook (if it has one)."""
    from pipeline.plugins import SINK_GROUP, load_plugin_class

    loaded = services.config
    cls = load_plugin_class(reference, group=group, config=loaded, key=key)  # ConfigError: one failed line
    model = getattr(cls, "Settings", None)
    settings: Any = raw_settings
    if isinstance(model, type) and issubclass(model, BaseModel):
        try:
            settings = model.model_validate(raw_settings)
        except ValidationError as exc:
            raise config_error_from_validation(exc, file=loaded.display_name, prefix=(*_split_key(key), "settings"), model=model) from None
    method = "publish" if group == SINK_GROUP else "enrich"
    if not inspect.iscoroutinefunction(getattr(cls, method, None)):
        raise loaded.error(f"{cls.__module__}.{cls.__qualname__} is not a{' sink' if method == 'publish' else 'n enricher'}: it needs `async def {method}(...)`", key)
    hook = getattr(cls, "doctor", None)
    if hook is None or not inspect.iscoroutinefunction(hook):
        return [Check.ok("settings", f"valid ({cls.__name__} names nothing else to check)")]
    return list(await hook(settings, services))


def _split_key(key: str) -> tuple[Any, ...]:
    name, _, index = key.partition("[")
    return (name, int(index.rstrip("]"))) if index else (name,)




def shown(path: Path) -> str:
    """A path as the user would type it: relative to the current folder when it is under it."""
    try:
        relative = path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return str(path)
    return str(relative) if relative.parts else "./"


# -- shared checks ---------------------------------------------------------------------------------


def folder_check(name: str, folder: Path) -> Check:
    """A local output folder the pipeline writes: it, or the nearest folder that exists above it, is
    a writable directory. Creates nothing."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return Check.failed(name, f"{shown(existing)} is not a folder", f"remove it or point the setting at a folder ({shown(folder)})")
    if not os.access(existing, os.W_OK | os.X_OK):
        return Check.failed(name, f"{shown(existing)} is not writable by this user", f"give this user write access to {shown(existing)}, or choose another --out")
    return Check.ok(name, f"{shown(folder)} writable" if existing == folder else f"{shown(folder)} (created on first run; {shown(existing)} writable)")


def input_file_check(name: str, path: Path, read: Callable[[bytes], str]) -> Check:
    """An input file: readable, and `read(bytes)` (which raises ValueError naming what is wrong) accepts it."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return Check.failed(name, f"cannot read {shown(path)} ({exc.strerror or type(exc).__name__})", "check the path (relative to the config file's folder) and its permissions")
    try:
        return Check.ok(name, f"{shown(path)}: {read(data)}")
    except (ValueError, UnicodeDecodeError) as exc:
        return Check.failed(name, f"{shown(path)}: {first_line(exc)}", "fix the file, or the column names in the settings")


def csv_columns_check(name: str, path: Path, expected: dict[str, str], *, what: str = "rows") -> Check:
    """A CSV whose header must hold the `expected` columns (setting -> column name)."""

    def read(data: bytes) -> str:
        header = _csv_header(data)
        rows = max(0, sum(1 for line in data.decode("utf-8-sig").splitlines() if line.strip()) - 1)
        missing = {setting: column for setting, column in expected.items() if column not in header}
        if missing:
            names = ", ".join(f"{column!r} ({setting})" for setting, column in missing.items())
            raise ValueError(f"no column {names}; the header has {', '.join(repr(h) for h in header) or 'nothing'}")
        return f"{rows} {what}, columns {', '.join(expected.values())} present"

    return input_file_check(name, path, read)


def _csv_header(data: bytes) -> list[str]:
    import csv
    import io

    reader = csv.reader(io.StringIO(data.decode("utf-8-sig")))
    return [cell.strip() for cell in next(reader, [])]


async def token_check(name: str, credential: Any, scope: str) -> Check:
    """A token for `scope` from the credential (managed identity, or a developer sign-in)."""
    try:
        await credential.get_token(scope)
    except Exception as exc:
        return Check.failed(
            name,
            f"no token for {scope} ({type(exc).__name__}: {first_line(exc, 160)})",
            "in Azure, turn on the app's managed identity (a user-assigned one: set managed_identity_client_id); locally, sign in with `az login`",
        )
    return Check.ok(name, f"token for {scope}")


def azure_failure(name: str, exc: BaseException, *, what: str, role: str) -> Check:
    """An Azure SDK error as a failed check naming the cause: refused sign-in, missing role, unreachable."""
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ServiceRequestError, ServiceResponseError

    code = getattr(exc, "error_code", None) or ""
    status = getattr(exc, "status_code", None)
    if status == 403 and "Permission" in str(code):
        return Check.failed(name, f"{what}: the identity has no data role (HTTP 403 {code})", f"give it '{role}' on {what}; {ROLE_DELAY}")
    if isinstance(exc, ClientAuthenticationError) or status in (401, 403):
        detail = f"HTTP {status} {code}".strip() if status else type(exc).__name__
        return Check.failed(
            name,
            f"{what}: sign-in refused ({detail})",
            f"check the connection string's account key or SAS, or (account_url) that the identity can get a token and has '{role}'; {ROLE_DELAY}",
        )
    if isinstance(exc, (ServiceRequestError, ServiceResponseError)):
        return Check.failed(name, f"{what}: cannot reach the service ({type(exc).__name__})", "check the account URL or connection string endpoint, DNS and firewall rules")
    if isinstance(exc, HttpResponseError):
        return Check.failed(name, f"{what}: HTTP {status} {code}".strip(), "see the service's error code above")
    return Check.failed(name, f"{what}: {type(exc).__name__}: {first_line(exc, 160)}", "check the endpoint and the credentials")


async def blob_container_check(name: str, *, account_url: str | None, connection_string_env: Any, container: str, credential: Any, created_if_missing: bool, role: str = "Storage Blob Data Contributor") -> Check:
    """The container's properties (a read): reachable, signed in, the container there (or created by the pipeline)."""
    from azure.core.exceptions import AzureError, ResourceNotFoundError
    from azure.storage.blob.aio import ContainerClient

    options: dict[str, Any] = {"retry_total": 0, "connection_timeout": 5, "read_timeout": 10}
    if connection_string_env is None and (token := await token_check(name, credential, STORAGE_SCOPE)).status != "ok":
        return token
    if connection_string_env is not None:
        client = ContainerClient.from_connection_string(connection_string_env.resolve().get_secret_value(), container, **options)
    else:
        client = ContainerClient(str(account_url), container, credential=credential, **options)
    async with client:
        try:
            await client.get_container_properties()
        except ResourceNotFoundError:
            if created_if_missing:
                return Check.ok(name, f"container {container} does not exist yet: created on first use (needs '{role}')")
            return Check.failed(name, f"container {container} does not exist", "create it (deploy/infra), or set create_container = true")
        except AzureError as exc:
            return azure_failure(name, exc, what=f"container {container}", role=role)
    return Check.ok(name, f"container {container} reachable (the pipeline writes to it: needs '{role}')")


async def table_check(name: str, *, account_url: str | None, connection_string_env: Any, table: str, credential: Any) -> Check:
    """One page of at most one entity of the table (a read): reachable, signed in, the table there or creatable."""
    from azure.core.exceptions import AzureError, ResourceNotFoundError
    from azure.data.tables.aio import TableClient

    role = "Storage Table Data Contributor"
    options: dict[str, Any] = {"retry_total": 0, "connection_timeout": 5, "read_timeout": 10}
    if connection_string_env is None and (token := await token_check(name, credential, STORAGE_SCOPE)).status != "ok":
        return token
    if connection_string_env is not None:
        client = TableClient.from_connection_string(connection_string_env.resolve().get_secret_value(), table_name=table, **options)
    else:
        client = TableClient(endpoint=str(account_url), table_name=table, credential=credential, **options)
    async with client:
        try:
            async for _ in client.query_entities("PartitionKey eq 'doctor'", results_per_page=1, select=["PartitionKey"]):
                break
        except ResourceNotFoundError:
            return Check.ok(name, f"table {table} does not exist yet: created on first use (needs '{role}')")
        except AzureError as exc:
            return azure_failure(name, exc, what=f"table {table}", role=role)
    return Check.ok(name, f"table {table} reachable (the pipeline writes to it: needs '{role}')")


async def history_store_checks(name: str, settings: Any, services: Any) -> list[Check]:
    """The history store of an enricher (pipeline/state/history.py's HistorySettings)."""
    if settings.kind == "sqlite":
        path = services.data_path(settings.path) if settings.path else loaded_state_path(services.config)
        return [folder_check(name, path.parent)]
    credential = services.credential(settings.managed_identity_client_id) if settings.account_url and not settings.connection_string_env else None
    return [await table_check(name, account_url=settings.account_url, connection_string_env=settings.connection_string_env, table=settings.table_name, credential=credential)]


def loaded_state_path(loaded: LoadedConfig) -> Path:
    """Where a SQLite history without a path of its own lives: beside the SQLite state, else the data dir."""
    state = loaded.config.state
    return loaded.data_path(state.path) if state.kind == "sqlite" else loaded.data_path("history.sqlite")


# -- core components -------------------------------------------------------------------------------


async def state_checks(loaded: LoadedConfig, services: Any) -> list[Check]:
    settings = loaded.config.state
    if settings.kind == "sqlite":
        return [folder_check("SQLite state", loaded.data_path(settings.path).parent)]
    credential = services.credential(settings.managed_identity_client_id) if settings.account_url else None
    return [await table_check("Table state", account_url=settings.account_url, connection_string_env=settings.connection_string_env, table=settings.table, credential=credential)]


async def dead_letter_checks(loaded: LoadedConfig, services: Any) -> list[Check]:
    settings = loaded.config.dead_letter
    if settings.kind == "local":
        return [folder_check("local folder", loaded.data_path(settings.path))]
    connection = settings.connection_string_env
    credential = services.credential() if settings.account_url and not connection else None
    return [await blob_container_check("Blob container", account_url=settings.account_url, connection_string_env=connection, container=settings.container, credential=credential, created_if_missing=True)]


async def consumer_checks(loaded: LoadedConfig, services: Any) -> list[Check]:
    settings = loaded.config.consumer
    assert settings is not None
    checks = [await eventhub_check("Event Hub", fully_qualified_namespace=settings.fully_qualified_namespace, connection_string_env=settings.connection_string_env,
                                   eventhub_name=settings.eventhub_name, consumer_group=settings.consumer_group, credential=None if settings.connection_string_env else services.credential(),
                                   role="Azure Event Hubs Data Receiver")]
    credential = services.credential() if settings.checkpoint_account_url and not settings.checkpoint_connection_string_env else None
    checks.append(await blob_container_check("checkpoint container", account_url=settings.checkpoint_account_url, connection_string_env=settings.checkpoint_connection_string_env,
                                             container=settings.checkpoint_container, credential=credential, created_if_missing=True))
    return checks


async def eventhub_check(name: str, *, fully_qualified_namespace: str | None, connection_string_env: Any, eventhub_name: str | None, credential: Any,
                         consumer_group: str | None = None, role: str, timeout: float = 10.0) -> Check:
    """The hub's properties over AMQP (a management read): namespace reachable, signed in, hub there.

    With `consumer_group`, a consumer client of that group asks, then opens one receiver on one
    partition to prove the group exists (`_consumer_group_check`)."""
    from azure.eventhub.aio import EventHubConsumerClient, EventHubProducerClient

    options: dict[str, Any] = {"retry_total": 0}
    if connection_string_env is None and (token := await token_check(name, credential, EVENTHUBS_SCOPE)).status != "ok":
        return token
    if eventhub_name:
        options["eventhub_name"] = eventhub_name
    client: Any
    if connection_string_env is not None:
        value = connection_string_env.resolve().get_secret_value()
        if consumer_group is not None:
            client = EventHubConsumerClient.from_connection_string(value, consumer_group=consumer_group, **options)
        else:
            client = EventHubProducerClient.from_connection_string(value, **options)
    elif consumer_group is not None:
        client = EventHubConsumerClient(str(fully_qualified_namespace), consumer_group=consumer_group, credential=credential, **options)
    else:
        client = EventHubProducerClient(str(fully_qualified_namespace), credential=credential, **options)
    where = f"hub {eventhub_name}" if eventhub_name else "the hub of the connection string"
    unreachable = "check the namespace name, DNS and that AMQP (5671) or AMQP over WebSockets (443) is allowed"
    try:
        properties = await asyncio.wait_for(client.get_eventhub_properties(), timeout)
        partitions = list(properties.get("partition_ids") or [])
        group = await _consumer_group_check(client, consumer_group, partitions[0], timeout) if consumer_group is not None and partitions else ""
    except TimeoutError:
        return Check.failed(name, f"{where}: no answer within {timeout:g} s", unreachable)
    except Exception as exc:
        from azure.eventhub.exceptions import AuthenticationError, ConnectError

        if isinstance(exc, _ConsumerGroupMissing):
            return Check.failed(name, f"{where} reachable, but it has no consumer group {consumer_group}", "create the consumer group on the hub (deploy/infra), or set consumer_group")
        if isinstance(exc, AuthenticationError):
            return Check.failed(name, f"{where}: the namespace refused our credential", f"check the connection string's key, or give the identity '{role}'; {ROLE_DELAY}")
        if isinstance(exc, ConnectError):
            return Check.failed(name, f"{where}: cannot reach the namespace ({type(exc).__name__})", unreachable)
        return Check.failed(name, f"{where}: {type(exc).__name__}: {first_line(exc, 160)}", f"check the hub's name and that the identity has '{role}'")
    finally:
        try:
            await client.close()
        except Exception:  # closing a client that never connected
            pass
    return Check.ok(name, f"hub {properties.get('eventhub_name')} reachable, {len(partitions)} partitions{group}")


class _ConsumerGroupMissing(PipelineError):
    """The hub answered, but has no consumer group of that name (caught in the check above)."""


async def _consumer_group_check(client: Any, consumer_group: str, partition_id: str, timeout: float) -> str:
    """Open one non-exclusive receiver of the group at the end of one partition, without a checkpoint
    store, until it answers (an empty wait) or fails; events that arrive meanwhile are dropped
    unread, nothing is checkpointed. A running consumer that holds the partition exclusively (owner
    level) refuses us: that also proves the group exists. Not exercised without the emulator."""
    answer: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    async def on_event(context: Any, event: Any) -> None:
        if not answer.done():
            answer.set_result(None)

    async def on_error(context: Any, error: Exception) -> None:
        if not answer.done():
            answer.set_result(error)

    receiving = asyncio.create_task(client.receive(on_event, partition_id=partition_id, starting_position="@latest", max_wait_time=1, prefetch=1, on_error=on_error))
    try:
        error = await asyncio.wait_for(asyncio.shield(answer), timeout)
    finally:
        await client.close()
        receiving.cancel()
        await asyncio.gather(receiving, return_exceptions=True)
    if error is None:
        return f", consumer group {consumer_group} opens"
    text = str(error).lower()
    if "epoch" in text or "owner level" in text or "owner_level" in text:
        return f", consumer group {consumer_group} exists (partition {partition_id} is held by a running consumer)"
    if "not-found" in text or "not found" in text or "could not be found" in text:
        raise _ConsumerGroupMissing(consumer_group)
    raise error
