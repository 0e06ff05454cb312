"""Split Streaming API alerts for assembly and decode tests: the parts of the shared batch, an envelope
that carries any of them as one Event Hub message would, and a DLP-dense benchmark body edited."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson

from benchmarks import streams
from pipeline.ingest.message import Message


def streaming_records(fixture_bytes) -> list[dict]:
    """The records of tests/fixtures/formats/streaming_dlp_batch.json: AlertInfo, then its evidence rows."""
    return json.loads(fixture_bytes("streaming_dlp_batch.json"))["records"]


def envelope(*records) -> Message:
    """One message holding `records` in the Streaming API's {"records": [...]} shape."""
    return Message(body=orjson.dumps({"records": list(records)}), source="test")


def dense_body_with(change: Callable[[list[dict[str, Any]]], None]) -> bytes:
    """The first DLP-dense body of the benchmark streams (25 split alerts, rows 0 AlertInfo, 1 user,
    2 file, 3 cloud app, then the next alert's) after `change` edited its rows in place."""
    document = orjson.loads(streams.dense_bodies(1)[0])
    change(document["records"])
    return orjson.dumps(document)
