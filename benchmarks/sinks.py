"""A sink for benchmarks: serialises every record as a real sink would, then drops it."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.deliver.sinks import Outcome
from pipeline.models import EnrichedRecord


class SerialiseSink:
    Settings = None

    def __init__(self, settings, services) -> None:
        self.bytes_out = 0

    async def publish(self, records: Sequence[EnrichedRecord]) -> list[Outcome]:
        for record in records:
            self.bytes_out += len(record.to_json())
        return [Outcome.delivered()] * len(records)

    async def aclose(self) -> None:
        return None


class CollectSink(SerialiseSink):
    """Keeps the records it is given (to feed a sink benchmark with real enriched records)."""

    def __init__(self, settings, services) -> None:
        super().__init__(settings, services)
        self.records: list[EnrichedRecord] = []

    async def publish(self, records: Sequence[EnrichedRecord]) -> list[Outcome]:
        self.records.extend(records)
        return [Outcome.delivered()] * len(records)
