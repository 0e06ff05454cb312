"""The data lake on Azure Blob Storage or ADLS Gen2 (through its blob endpoint), azure.storage.blob.aio.

One blob per batch and partition:

    <container>/<prefix>/tenant=<tenant id>/date=<YYYY-MM-DD>/hour=<HH>/<batch key>.jsonl.gz

- the partition is the alert's `created_at` (else its first activity time, else processed_at), UTC;
- `<batch key>` is a SHA-256 of the sorted record_ids of the records in that partition, so the same
  batch (or the same retried part of it) always gets the same blob name;
- the blob is created with `If-None-Match: *` (`overwrite=False`): a retried batch that was written
  before finds the blob there and reports its records delivered without writing anything;
- JSON lines, gzip with a zero mtime (the same records give the same bytes);
  `format = "parquet"` writes `<batch key>.parquet` instead (one row per record, the Sentinel columns
  plus `record_json`), when pyarrow is installed.
A record delivered again later in a *different* batch lands in a second blob; lake readers deduplicate
by `record_id` (every line has it).

Authentication: `account_url` with the runner's shared credential (`Services.credential`: managed
identity in Azure, `managed_identity_client_id` for a user-assigned one), or a connection string read from the environment variable named by `connection_string_env` (Azurite, development).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from pydantic import Field, model_validator

from pipeline.config import StrictModel
from pipeline.deliver.minimise import get_path, record_document
from pipeline.deliver.sinks import Outcome
from pipeline.errors import SinkUnavailable, translate
from pipeline.plugins import shared_credential
from pipeline.secrets import SecretEnv

log = logging.getLogger("pipeline.deliver.sinks.blob_lake")


DELIVERED_MEMORY = 200_000  # record ids remembered per process (about 20 MB at most)


class BlobLakeSink:
    class Settings(StrictModel):
        account_url: str | None = Field(None, description="https://<account>.blob.core.windows.net (ADLS Gen2: the blob endpoint too)")
        connection_string_env: SecretEnv | None = Field(None, description="environment variable holding a connection string (Azurite, dev)")
        managed_identity_client_id: str | None = None
        container: str = Field("dlp-alerts", min_length=3, max_length=63)
        prefix: str = Field("enriched", description="folder inside the container; '' for none")
        format: Literal["jsonl", "parquet"] = "jsonl"
        create_container: bool = Field(False, description="create the container at start if it is missing (dev)")
        timeout_seconds: float = Field(30.0, gt=0)

        @model_validator(mode="after")
        def _one_connection(self) -> BlobLakeSink.Settings:
            if (self.account_url is None) == (self.connection_string_env is None):
                raise ValueError("give exactly one of account_url and connection_string_env")
            return self

    @classmethod
    async def doctor(cls, settings: BlobLakeSink.Settings, services: Any) -> list[Any]:
        """The container's properties with the sink's own sign-in (a read; nothing is written)."""
        from pipeline.doctor import Check, blob_container_check

        checks = []
        if settings.format == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                checks.append(Check.failed("parquet", "pyarrow is not installed", "pip install pyarrow, or set format = 'jsonl'"))
        credential = None if settings.connection_string_env is not None else shared_credential(services, settings.managed_identity_client_id)
        checks.append(await blob_container_check("container", account_url=settings.account_url, connection_string_env=settings.connection_string_env,
                                                 container=settings.container, credential=credential, created_if_missing=settings.create_container))
        return checks

    def __init__(self, settings: BlobLakeSink.Settings, services: Any, *, credential: Any = None) -> None:
        """`credential`: one to use instead of the services' shared one (tests); never closed here."""
        from azure.storage.blob.aio import BlobServiceClient

        self.settings = settings
        # Record ids this process wrote: a redelivered batch whose record set differs (its split
        # alerts were already assembled) must not put the same records into a second blob.
        self._delivered: OrderedDict[str, None] = OrderedDict()
        if settings.format == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise ValueError("format = 'parquet' needs pyarrow (pip install pyarrow)") from None
        self.credential: Any = None
        options: dict[str, Any] = {"retry_total": 0, "connection_timeout": min(settings.timeout_seconds, 10), "read_timeout": settings.timeout_seconds}
        if settings.connection_string_env is not None:
            value = settings.connection_string_env.resolve().get_secret_value()
            self.service = BlobServiceClient.from_connection_string(value, **options)
        else:
            self.credential = credential if credential is not None else shared_credential(services, settings.managed_identity_client_id)
            assert settings.account_url is not None  # Settings._one_connection
            self.service = BlobServiceClient(settings.account_url, credential=self.credential, **options)
        self.container = self.service.get_container_client(settings.container)
        self._container_ready = not settings.create_container
        self.blobs_written = 0  # for measurements and tests

    # -- naming --------------------------------------------------------------------------------

    @staticmethod
    def partition_time(document: dict[str, Any]) -> datetime:
        for path in ("alert.created_at", "alert.first_activity_at", "processed_at"):
            value = get_path(document, path)
            if isinstance(value, str):
                try:
                    return datetime.fromisoformat(value.replace("Z", "+00:00"))
                except ValueError:
                    continue
        return datetime(1970, 1, 1)

    def partition_of(self, document: dict[str, Any]) -> str:
        tenant = get_path(document, "alert.tenant_id") or "unknown"
        when = self.partition_time(document)
        when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
        parts = [self.settings.prefix.strip("/")] if self.settings.prefix.strip("/") else []
        parts += [f"tenant={_safe(str(tenant))}", f"date={when:%Y-%m-%d}", f"hour={when:%H}"]
        return "/".join(parts)

    def blob_name(self, partition: str, record_ids: Sequence[str]) -> str:
        digest = hashlib.sha256("\n".join(sorted(record_ids)).encode()).hexdigest()[:40]
        extension = "parquet" if self.settings.format == "parquet" else "jsonl.gz"
        return f"{partition}/{digest}.{extension}"

    # -- publishing ----------------------------------------------------------------------------

    async def publish(self, records: Sequence[Any]) -> list[Outcome]:
        if not self._container_ready:
            await self._ensure_container()
        groups: dict[str, list[int]] = defaultdict(list)
        documents = [record_document(record) for record in records]
        seen: set[str] = set()
        for index, (record, document) in enumerate(zip(records, documents)):
            if record.record_id in seen or record.record_id in self._delivered:
                continue  # the same record twice in one call, or already written by this process: written once
            seen.add(record.record_id)
            groups[self.partition_of(document)].append(index)
        outcomes: list[Outcome] = [Outcome.delivered()] * len(records)
        for partition, members in groups.items():
            name = self.blob_name(partition, [records[i].record_id for i in members])
            outcome = await self._write(name, [documents[i] for i in members])
            for index in members:
                outcomes[index] = outcome
            if outcome.status == "delivered":
                self._remember(records[i].record_id for i in members)
        # Duplicates inside the call share the outcome of their first occurrence.
        first: dict[str, int] = {}
        for index, record in enumerate(records):
            first.setdefault(record.record_id, index)
        return [outcomes[first[record.record_id]] for record in records]

    def _remember(self, record_ids: Any) -> None:
        for record_id in record_ids:
            self._delivered[record_id] = None
        while len(self._delivered) > DELIVERED_MEMORY:
            self._delivered.popitem(last=False)

    def encode(self, documents: list[dict[str, Any]]) -> bytes:
        if self.settings.format == "parquet":
            return _parquet(documents)
        lines = b"".join(orjson.dumps(document) + b"\n" for document in documents)
        return gzip.compress(lines, compresslevel=6, mtime=0)

    async def _write(self, name: str, documents: list[dict[str, Any]]) -> Outcome:
        from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
        from azure.storage.blob import ContentSettings

        data = self.encode(documents)
        content = ContentSettings(content_type="application/vnd.apache.parquet" if self.settings.format == "parquet" else "application/gzip")
        try:
            await self.container.upload_blob(name, data, overwrite=False, content_settings=content, metadata={"records": str(len(documents))})
        except ResourceExistsError:
            log.info("blob lake: %s already exists (a retried batch): nothing written", name)
            return Outcome.delivered()
        except ResourceNotFoundError:
            # The container is missing: being created (another sink or instance), or not deployed yet.
            # Retryable, so a race heals; a container that never appears ends in the dead letters.
            log.warning("blob lake: container %s not found", self.settings.container)
            return Outcome.retryable(f"container {self.settings.container} not found")
        except Exception as exc:
            error = translate(exc, role="sink")
            log.warning("blob lake: writing %d record(s) failed: %s", len(documents), error)
            log.debug("blob lake failure", exc_info=exc)
            if isinstance(error, SinkUnavailable):
                return Outcome.retryable(str(error), error.retry_after)
            return Outcome.rejected(str(error))
        self.blobs_written += 1
        return Outcome.delivered()

    async def _ensure_container(self) -> None:
        from azure.core.exceptions import ResourceExistsError

        try:
            await self.container.create_container()
        except ResourceExistsError:
            pass
        self._container_ready = True

    async def aclose(self) -> None:
        await self.service.close()


def _safe(value: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in value)[:100] or "unknown"


def _parquet(documents: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.deliver.sinks.sentinel_schema import COLUMNS, to_row

    types = {"string": pa.string(), "datetime": pa.string(), "boolean": pa.bool_(), "int": pa.int64(), "real": pa.float64(), "dynamic": pa.string()}
    fields = [pa.field(name, types[kind]) for name, kind, _ in COLUMNS] + [pa.field("record_json", pa.string())]
    columns: dict[str, list[Any]] = {field.name: [] for field in fields}
    dynamic = {name for name, kind, _ in COLUMNS if kind == "dynamic"}
    for document in documents:
        row = to_row(document)
        for name, kind, _ in COLUMNS:
            value = row.get(name)
            if name in dynamic and value is not None:
                value = orjson.dumps(value).decode()
            elif kind == "real" and value is not None:
                value = float(value)
            elif kind == "int" and value is not None:
                value = int(value)
            columns[name].append(value)
        columns["record_json"].append(orjson.dumps(document).decode())
    table = pa.table(columns, schema=pa.schema(fields))
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="snappy")
    return sink.getvalue()
