"""Adapters so the runner can drive the Sentinel sink against the local TLS endpoint from a config
file: a sink kind that supplies a static bearer token (the real sink, only the credential differs),
and an enricher that makes chosen alerts large."""

from __future__ import annotations

import time

from azure.core.credentials import AccessToken
from pydantic import BaseModel

from pipeline.deliver.sinks.sentinel import SentinelSink
from pipeline.enrich.contract import BaseEnricher


class StaticToken:
    async def get_token(self, *scopes, **kwargs):
        return AccessToken("test-token", int(time.time()) + 3600)

    async def close(self):
        return None


class LocalSentinelSink(SentinelSink):
    Settings = SentinelSink.Settings

    def __init__(self, settings, services) -> None:
        super().__init__(settings, services, credential=StaticToken())


class Blob(BaseModel):
    data: str


class Padding(BaseEnricher):
    """Adds `size` bytes to alerts whose id is listed (to make a record too large for one request)."""

    name = "padding"

    class Settings(BaseEnricher.Settings):
        alert_ids: list[str] = []
        size: int = 0

    async def enrich(self, alert, ctx):
        return Blob(data="x" * self.settings.size) if alert.alert_id in self.settings.alert_ids else None
