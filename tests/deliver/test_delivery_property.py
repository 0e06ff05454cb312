"""Property: whatever the sink does (random transient failures, rejections, records it never takes,
a total outage) and whatever poison the batches carry, once the caller has re-run every batch that
raised (as the Functions host or `consume` does), every alert is in the lake exactly once and, for the
other sink, stored once or dead-lettered for it; every poison message is dead-lettered."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import load_config
from pipeline.errors import SinkOutage
from pipeline.runner import Message, Runner
from tests import faults
from tests.support.config import FAST_RETRIES, LAKE, pipeline_toml, sink_entry
from tests.support.paths import FIXTURES

GRAPH = json.loads((FIXTURES / "graph_alert_v2_dlp.json").read_text())

def config(*, fail_ratio: float, seed: int, retryable: list[str], rejected: list[str], breaker: int) -> str:
    """The lake and a scripted ITSM sink failing at random; retries without backoff, breakers without cool-down."""
    delivery = {**FAST_RETRIES, "backoff_initial_seconds": 0, "backoff_max_seconds": 0, "max_batch_redeliveries": 2, "breaker_threshold": breaker, "breaker_cooldown_seconds": 0}
    script = {"label": "prop", "fail_ratio": fail_ratio, "seed": seed, "retryable_alert_ids": retryable, "reject_alert_ids": rejected}
    return pipeline_toml(delivery=delivery, sinks=[LAKE, sink_entry("itsm", "tests.faults:ScriptedSink", script)])


@st.composite
def scenarios(draw):
    alerts = draw(st.integers(1, 25))
    ids = [f"p-{i}" for i in range(alerts)]
    return {
        "ids": ids,
        "poison_after": draw(st.sets(st.integers(0, alerts - 1), max_size=4)),
        "batch_size": draw(st.integers(1, 10)),
        "fail_ratio": draw(st.sampled_from([0.0, 0.2, 0.5, 0.9, 1.0])),
        "seed": draw(st.integers(0, 1000)),
        "retryable": draw(st.sets(st.sampled_from(ids), max_size=3)),
        "rejected": draw(st.sets(st.sampled_from(ids), max_size=3)),
        "breaker": draw(st.sampled_from([1, 3, 100])),
    }


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios())
async def test_every_alert_is_accounted_for_once(scenario):
    rejected = sorted(scenario["rejected"])
    retryable = sorted(scenario["retryable"] - scenario["rejected"])
    messages, poison = [], 0
    for i, alert_id in enumerate(scenario["ids"]):
        messages.append(Message(orjson.dumps(dict(GRAPH, id=alert_id)), source=f"m{i}"))
        if i in scenario["poison_after"]:
            messages.append(Message(b"{poison " + str(i).encode(), source=f"poison{i}"))
            poison += 1
    with tempfile.TemporaryDirectory() as temp:
        path = Path(temp) / "pipeline.toml"
        path.write_text(config(fail_ratio=scenario["fail_ratio"], seed=scenario["seed"], retryable=retryable, rejected=rejected, breaker=scenario["breaker"]))
        async with Runner(load_config(path, data_dir=Path(temp) / "out")) as runner:
            size = scenario["batch_size"]
            for start in range(0, len(messages), size):
                batch = messages[start : start + size]
                for _ in range(10):  # the host's retries; the runner's bound ends them after 2 redeliveries
                    try:
                        await runner.process_batch(batch)
                        break
                    except SinkOutage:
                        continue
                else:
                    raise AssertionError("a batch kept raising past max_batch_redeliveries")
            sink = faults.INSTANCES["prop"]
            lake = [json.loads(line) for p in (Path(temp) / "out" / "lake").rglob("*.jsonl") for line in p.read_text().splitlines()]
            entries = await runner.dead_letter.list()
    id_of = {line["record_id"]: line["alert"]["alert_id"] for line in lake}
    assert sorted(line["alert"]["alert_id"] for line in lake) == sorted(scenario["ids"])  # all there, each once
    dead_itsm = {e.record_id for e in entries if e.stage == "deliver" and e.sink == "itsm"}
    assert max(sink.stored.values(), default=1) == 1
    assert sorted(id_of[r] for r in set(sink.stored) | dead_itsm) == sorted(scenario["ids"])
    assert {id_of[r] for r in dead_itsm} >= set(rejected) | set(retryable)
    assert len([e for e in entries if e.stage == "decode"]) == poison
