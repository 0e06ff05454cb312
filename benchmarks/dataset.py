"""Synthetic message bodies in all four formats, built from the bundled samples (no network, deterministic)."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import orjson

SAMPLES = Path(__file__).resolve().parent.parent / "pipeline" / "samples" / "messages"


def _load(name: str):
    return json.loads((SAMPLES / name).read_text())


def make_bodies(alerts: int, *, users: int = 200, seed: int = 7) -> list[bytes]:
    """`alerts` message bodies, one DLP alert each, spread over `users` distinct users.

    Mix: 40 % Defender streaming envelopes (AlertInfo + 3 AlertEvidence rows), 20 % Graph alerts,
    20 % Management Activity records, 20 % Sentinel SecurityAlert rows.
    """
    rng = random.Random(seed)
    streaming = _load("01-defender-streaming-batch.json")
    streaming["records"] = streaming["records"][:4]
    graph = _load("03-graph-alert.json")
    mgmt = _load("05-management-activity.json")[0]
    sentinel = _load("06-sentinel-securityalert.json")[0]
    bodies: list[bytes] = []
    for index in range(alerts):
        user = f"user{rng.randrange(users):04d}"
        upn = f"{user}@contoso.com"
        alert_id = f"dl{seed:04d}{index:08d}-bench"
        kind = index % 5
        if kind in (0, 1):
            doc = copy.deepcopy(streaming)
            for record in doc["records"]:
                record["properties"]["AlertId"] = alert_id
            evidence = doc["records"][1]["properties"]
            evidence["AccountUpn"], evidence["AccountName"] = upn, user
        elif kind == 2:
            doc = copy.deepcopy(graph)
            doc["id"] = alert_id
            doc["evidence"][0]["userAccount"]["userPrincipalName"] = upn
        elif kind == 3:
            doc = copy.deepcopy(mgmt)
            doc["Id"], doc["UserId"] = alert_id, upn
            # a document of its own: every generated record is a match of its own (the events of one
            # document are revisions of one alert, pipeline/ingest/formats/management_activity.py)
            doc["SharePointMetaData"]["UniqueID"] = doc["SharePointMetaData"]["FileID"] = alert_id
        else:
            doc = copy.deepcopy(sentinel)
            doc["VendorOriginalId"] = alert_id
            entities = json.loads(doc["Entities"])
            entities[0]["Name"] = user
            doc["Entities"] = json.dumps(entities)
        bodies.append(orjson.dumps(doc))
    return bodies
