"""What the benchmark streams and the bundled samples decode to, pinned byte for byte.

The fast-skip tests compare the shortcuts with the full path, which shares the decoders: this pins
the decoders' own output (parts, their digests, alerts, skipped and rejected records, dead letters),
so that a change made for speed cannot change a byte unnoticed. A change meant to alter decoding
updates the digest here and says why.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from benchmarks import streams
from pipeline.errors import DecodeError
from pipeline.ingest.decode import decode_message
from pipeline.ingest.limits import Limits
from pipeline.ingest.message import Message
from pipeline.ingest.stage import ingest
from tests.support.paths import FIXTURES, SAMPLES
from tests.support.streaming import dense_body_with


def _bodies() -> list[bytes]:
    bodies = streams.dense_bodies(2) + streams.mixed_bodies(12, 0.02, seed=5)
    for path in sorted(SAMPLES.iterdir()) + sorted(FIXTURES.glob("*.json")):
        data = path.read_bytes()
        bodies += [line for line in data.splitlines() if line.strip()] if path.suffix == ".jsonl" else [data]
    return bodies + [_variant(change) for change in _VARIANTS]


# Edits of the first split alert of a dense body (rows 0 AlertInfo, 1 user, 2 file, 3 cloud app),
# reaching the decoders' other branches: other entities, odd types, values dropped or nulled.
_VARIANTS: list[dict[int, dict[str, object]]] = [
    {0: {"Severity": None, "Title": "unknown", "Category": 5}, 1: {"Severity": " HIGH ", "AccountUpn": None}},
    {1: {"EntityType": "Mailbox", "AccountUpn": "nope", "AccountObjectId": None, "AdditionalFields": '{"Name": "n", "UPNSuffix": "s.com"}'}},
    {1: {"EntityType": None}, 3: {"EntityType": 5, "Categories": "[]"}},
    {2: {"FileSize": "123", "FileName": "  a%20b  ", "FolderPath": "%zz%41", "SHA256": " ab ", "Categories": ["X", "Y"]}},
    {2: {"FileSize": 12.0, "AdditionalFields": '{"SensitiveInfoTypes": "Credit Card Number (12); SSN (3)\nfoo", "DlpRuleName": 5}'}},
    {2: {"FileSize": True, "AdditionalFields": "{not json"}, 3: {"AdditionalFields": "[1, 2]"}},
    {3: {"EntityType": "Machine", "DeviceName": " d1 ", "DeviceId": 7}},
    {3: {"EntityType": "device", "Title": "DLP policy ( x ) matched in Teams", "Categories": "[5]"}},
    {0: {"AlertId": ""}, 1: {"AlertId": 123}, 2: {"ServiceSource": "microsoft DATA LOSS prevention", "DetectionSource": None}},
    {1: {"AdditionalFields": '{"Name": "n", "UPNSuffix": "s.com", "Justification": "my card 4111"}', "Subject": "4111"}},
]


def _variant(change: dict[int, dict[str, object]]) -> bytes:
    def edit(rows: list[dict[str, Any]]) -> None:
        for index, fields in change.items():
            rows[index]["properties"].update(fields)

    return dense_body_with(edit)


def _text(value: object) -> object:
    return value.decode() if isinstance(value, bytes) else value


def _outcome(body: bytes, keep: bool) -> object:
    try:
        decoded = decode_message(body, keep_user_justification=keep)
    except DecodeError as exc:
        return ["error", exc.reason, exc.detail]
    return [
        decoded.format, decoded.records, decoded.skipped, decoded.warnings,
        [_text(alert.to_json()) for alert in decoded.alerts],
        [[part.alert_id, part.rank, orjson.dumps(part.data).decode(), part.digest] for part in decoded.parts],
        [[r.index, r.reason, r.detail, r.record.decode()] for r in decoded.rejected],
    ]


def test_the_streams_and_samples_decode_to_the_pinned_bytes():
    bodies = _bodies()
    outcomes = [_outcome(body, keep) for body in bodies for keep in (False, True)]
    dead = ingest([Message(body) for body in bodies], limits=Limits(), now=0.0).dead
    outcomes.append([[d.stage, d.reason, d.detail, d.body.decode(), d.record_index, d.message_index] for d in dead])
    digest = hashlib.sha256(orjson.dumps(outcomes)).hexdigest()
    assert digest == PINNED, digest


PINNED = "91264d6697e20b8ed287bd753882efe5dbb618e7ff24c7e24aa9829da3635a62"
