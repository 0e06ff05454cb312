"""The dead-letter store in Azure Blob storage: one JSON blob per entry, same document as the local store.

`[dead_letter] kind = "blob"` with `container` and either `account_url` (signed in with the runner's
shared default credential, `Services.credential()`: give the identity "Storage Blob Data
Contributor" on the container) or
`connection_string_env` (the name of an environment variable holding a connection string).
Blob names are `<path>/<entry_id>.json`.

A repeat failure of the same entry updates its blob (attempts + 1, first failure kept) under an
ETag condition, and a first failure creates it only if it does not exist yet, so two writers never
lose each other's count. Any storage error raises StoreUnavailable: the batch is then retried.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import orjson
from azure.core import MatchConditions
from azure.core.exceptions import AzureError, ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.storage.blob.aio import ContainerClient

from pipeline.deadletter import DeadLetter
from pipeline.errors import StoreUnavailable

_CONFLICT_RETRIES = 8


class BlobDeadLetterStore:
    def __init__(self, container: ContainerClient, *, prefix: str = "") -> None:
        self.container = container
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.where = f"blob container '{container.container_name}'" + (f" under '{self.prefix}'" if self.prefix else "")
        self._ready = False

    @classmethod
    def from_settings(cls, settings: Any, *, credential: Any = None) -> BlobDeadLetterStore:
        """From `[dead_letter]`: its connection string, or `account_url` with `credential` (not closed here)."""
        if settings.connection_string_env:
            connection_string = os.environ.get(settings.connection_string_env)
            if not connection_string:
                raise StoreUnavailable(f"environment variable {settings.connection_string_env} (dead-letter connection string) is not set")
            return cls(ContainerClient.from_connection_string(connection_string, settings.container), prefix=settings.path)
        if credential is None:
            raise ValueError("a Blob dead-letter store with account_url needs a credential")
        return cls(ContainerClient(settings.account_url, settings.container, credential=credential), prefix=settings.path)

    def blob_name(self, entry_id: str) -> str:
        return f"{self.prefix}{entry_id}.json"

    async def _ensure_container(self) -> None:
        if self._ready:
            return
        try:
            await self.container.create_container()
        except ResourceExistsError:
            pass
        self._ready = True

    async def put(self, entries: Sequence[DeadLetter]) -> None:
        try:
            await self._ensure_container()
            for entry in entries:
                await self._put_one(entry)
        except AzureError as exc:
            raise StoreUnavailable(f"dead-letter write failed in container {self.container.container_name}: {type(exc).__name__}") from exc

    async def _put_one(self, entry: DeadLetter) -> None:
        blob = self.container.get_blob_client(self.blob_name(entry.entry_id))
        attempts, first, replays = entry.attempts, entry.first_failure_at, list(entry.replay_attempts)
        for _ in range(_CONFLICT_RETRIES):
            try:
                downloader = await blob.download_blob()
                previous = orjson.loads(await downloader.readall())
                etag = downloader.properties.etag
            except ResourceNotFoundError:
                previous, etag = None, None
            entry.attempts, entry.first_failure_at, entry.replay_attempts = attempts, first, list(replays)
            if previous is not None:
                entry.merged_with(previous)
            data = orjson.dumps(entry.to_document(), option=orjson.OPT_INDENT_2)
            try:
                if etag is None:
                    await blob.upload_blob(data, overwrite=False)  # create only if absent
                else:
                    await blob.upload_blob(data, overwrite=True, etag=etag, match_condition=MatchConditions.IfNotModified)
                return
            except (ResourceExistsError, ResourceModifiedError):
                continue  # another writer got there first: read again and merge
        raise StoreUnavailable(f"dead-letter entry {entry.entry_id}: too many concurrent updates")

    async def list(self) -> list[DeadLetter]:
        try:
            await self._ensure_container()
            entries = []
            async for properties in self.container.list_blobs(name_starts_with=self.prefix or None):
                if not properties.name.endswith(".json"):
                    continue
                try:
                    downloader = await self.container.download_blob(properties.name)
                except ResourceNotFoundError:
                    continue  # removed meanwhile
                entries.append(DeadLetter.from_document(orjson.loads(await downloader.readall())))
            return entries
        except AzureError as exc:
            raise StoreUnavailable(f"dead-letter read failed in container {self.container.container_name}: {type(exc).__name__}") from exc

    async def remove(self, entry_ids: Sequence[str]) -> None:
        try:
            for entry_id in entry_ids:
                try:
                    await self.container.delete_blob(self.blob_name(entry_id))
                except ResourceNotFoundError:
                    pass
        except AzureError as exc:
            raise StoreUnavailable(f"dead-letter delete failed in container {self.container.container_name}: {type(exc).__name__}") from exc

    async def aclose(self) -> None:
        await self.container.close()
