"""Split Streaming API alerts for assembly tests: the parts of the shared batch, and an envelope that
carries any of them as one Event Hub message would."""

from __future__ import annotations

import json

import orjson

from pipeline.ingest.message import Message


def streaming_records(fixture_bytes) -> list[dict]:
    """The records of tests/fixtures/formats/streaming_dlp_batch.json: AlertInfo, then its evidence rows."""
    return json.loads(fixture_bytes("streaming_dlp_batch.json"))["records"]


def envelope(*records) -> Message:
    """One message holding `records` in the Streaming API's {"records": [...]} shape."""
    return Message(body=orjson.dumps({"records": list(records)}), source="test")
