"""Guarantees of docs/delivery.md that nothing else pins, each against the shipped files or the real
component: break the code or the file and a test here fails.

- the shipped `delivery.max_batch_redeliveries` never exceeds the Functions retry policy's
  `max_retry_count` (else the host checkpoints past a batch neither delivered nor dead-lettered);
- a dead-letter file is written to a temp file in its folder, fsynced, renamed over its name, and
  the folder fsynced: never written in place;
- the outage rule needs *every* record of a sink to have failed transiently (`all`, not `any`);
- a state store that fails to store split-alert parts fails the batch (never swallowed).
"""

from __future__ import annotations

import os
import sqlite3
import sys
import tomllib

import pytest

from pipeline.config import DeliverySettings
from pipeline.deadletter import DeadLetter, LocalDeadLetterStore
from pipeline.errors import StoreUnavailable
from pipeline.runner import Runner
from tests import faults
from tests.deliver.test_delivery import config, graph_alerts, lake_ids, split_alert
from tests.support.paths import ROOT

# Every config the project ships for the Functions app: the deployed one and the embedded defaults
# the app falls back on when DLP_PIPELINE_CONFIG is unset.
SHIPPED_CONFIGS = ("deploy/function.toml", "pipeline/samples/pipeline.toml", "pipeline/samples/azure.toml")


def shipped_max_batch_redeliveries(relative: str) -> int:
    """The value a shipped file gives, or the model's default when the file leaves it out."""
    document = tomllib.loads((ROOT / relative).read_text())
    default = DeliverySettings.model_fields["max_batch_redeliveries"].default
    return int(document.get("delivery", {}).get("max_batch_redeliveries", default))


def shipped_max_retry_count() -> int:
    from tests.entrypoints.test_functions import FUNCTIONS  # function_app.py as the host loads it

    return int(FUNCTIONS["dlp_alerts"].get_setting("retry_policy").get_dict_repr()["max_retry_count"])


@pytest.mark.parametrize("relative", SHIPPED_CONFIGS)
def test_shipped_redelivery_bound_does_not_exceed_the_functions_retry_count(relative):
    bound, retries = shipped_max_batch_redeliveries(relative), shipped_max_retry_count()
    assert 0 < bound <= retries, f"{relative}: max_batch_redeliveries = {bound} > max_retry_count = {retries} of function_app.py"


async def test_a_dead_letter_file_is_written_to_a_temp_file_fsynced_renamed_and_its_folder_fsynced(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    recording = [False]

    def audit(event: str, args: tuple) -> None:
        if not recording[0]:
            return
        if event == "open" and isinstance(args[0], str | bytes | os.PathLike) and str(args[0]).startswith(str(tmp_path)):
            mode, flags = args[1], args[2]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR))
            events.append(("open-write" if writes else "open-read", os.fspath(args[0])))
        elif event == "os.rename":
            events.append(("rename", f"{os.fspath(args[0])} -> {os.fspath(args[1])}"))

    sys.addaudithook(audit)  # hooks cannot be removed: this one records only while `recording` is set
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if recording[0]:
            events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    root = tmp_path / "dead-letter"
    store = LocalDeadLetterStore(root)
    entry = DeadLetter(stage="decode", reason="invalid_json", detail="", body=b"{bad", source="f:1")
    final = str(root / f"{entry.entry_id}.json")
    for _ in range(2):  # a new entry, then an update of it (attempts + 1)
        events.clear()
        recording[0] = True
        try:
            await store.put([entry])
        finally:
            recording[0] = False
        writes = [path for kind, path in events if kind == "open-write"]
        assert final not in writes, f"{final} written in place: {events}"
        (temp,) = writes
        assert os.path.dirname(temp) == str(root) and os.path.basename(temp).startswith(".tmp-")
        order = [(kind, path) for kind, path in events if kind != "open-read"]
        assert order == [("open-write", temp), ("fsync", temp), ("rename", f"{temp} -> {final}"), ("fsync", str(root))], order
    assert (await store.list())[0].attempts >= 2 and not [p for p in os.listdir(root) if p.startswith(".tmp-")]


async def test_the_outage_rule_needs_every_record_to_have_failed_transiently(write_config, fixture_bytes):
    """One record rejected and the others still failing: the sink is up (it answered), so the batch
    is not an outage: nothing raises, each record is dead-lettered with its own reason."""
    loaded = write_config(config({"label": "half", "reject_alert_ids": ["alert-0"], "retryable_alert_ids": ["alert-1", "alert-2"]}))
    async with Runner(loaded) as runner:
        report = await runner.process_batch(graph_alerts(fixture_bytes, 3))
        entries = await runner.dead_letter.list()
    assert report.dead_lettered == {"deliver": 3} and report.delivered == {"lake": 3}
    assert sorted((e.alert_id, e.reason) for e in entries) == [("alert-0", "sink_rejected"), ("alert-1", "retries_exhausted"), ("alert-2", "retries_exhausted")]


async def test_a_state_store_that_cannot_store_parts_fails_the_batch(write_config, fixture_bytes):
    """The SQLite state file refuses to store parts (a trigger aborts every insert into alert_parts;
    claims and everything else still work) while a batch with a split alert runs: the batch raises
    (the caller runs it again) with nothing delivered; once it stores parts again, the re-run
    delivers everything."""
    loaded = write_config(config({"label": "parts"}))
    batch = graph_alerts(fixture_bytes, 2) + [split_alert(fixture_bytes)]
    async with Runner(loaded) as runner:
        admin = sqlite3.connect(runner.state.path, isolation_level=None)
        admin.execute("CREATE TRIGGER refuse_parts BEFORE INSERT ON alert_parts BEGIN SELECT RAISE(ABORT, 'no room for parts'); END")
        try:
            with pytest.raises(StoreUnavailable) as raised:
                await runner.process_batch(batch)
        finally:
            admin.execute("DROP TRIGGER refuse_parts")
            admin.close()
        assert str(runner.state.path) in str(raised.value)
        assert lake_ids(runner) == [] and not faults.INSTANCES["parts"].stored and await runner.dead_letter.list() == []
        report = await runner.process_batch(batch)
    assert report.delivered == {"lake": 3, "itsm": 3} and report.pending == 0
