"""Assembly of split Streaming API alerts through the runner: parts across batches are joined once
settled, a hold limit, arrival order, redelivered parts, late evidence."""

from __future__ import annotations

import asyncio

from pipeline.runner import Message, Runner
from tests.support.config import LAKE_ONLY, enricher_entry, pipeline_toml
from tests.support.records import lake_lines
from tests.support.streaming import envelope, streaming_records


class Clock:
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_split_alert_across_batches_is_emitted_once_settled_with_all_evidence(write_config, fixture_bytes):
    loaded = write_config(pipeline_toml(assembly={"settle_seconds": 30}))
    clock = Clock()
    info, user, file_, app, _mde = streaming_records(fixture_bytes)
    async with Runner(loaded, clock=clock) as runner:
        first = await runner.process_batch([envelope(info)])
        assert first.alerts == 0 and first.pending == 1
        clock.now += 10
        second = await runner.process_batch([envelope(user), envelope(file_, app)])
        assert second.alerts == 0 and second.pending == 1  # a part arrived 0 s ago: not settled yet
        clock.now += 31
        third = await runner.process_batch([])
        assert third.alerts == 1 and third.pending == 0
        (line,) = lake_lines(runner)
    alert = line["alert"]
    assert alert["title"].startswith("DLP policy (Finance PII")  # from AlertInfo
    assert alert["user"]["upn"] == "megan.bowen@contoso.com"  # from the user evidence
    assert alert["files"][0]["name"] == "Q1-payroll-export.xlsx"  # from the file evidence


async def test_max_hold_emits_an_alert_whose_parts_keep_coming(write_config, fixture_bytes):
    loaded = write_config(pipeline_toml(assembly={"settle_seconds": 30, "max_hold_seconds": 60}))
    clock = Clock()
    info, user, file_, app, _ = streaming_records(fixture_bytes)
    async with Runner(loaded, clock=clock) as runner:
        for part in (info, user, file_):
            assert (await runner.process_batch([envelope(part)])).alerts == 0
            clock.now += 25
        assert (await runner.process_batch([envelope(app)])).alerts == 1


async def test_arrival_order_does_not_change_the_record(write_config, fixture_bytes, tmp_path):
    info, user, file_, app, _ = streaming_records(fixture_bytes)
    ids = []
    for order in ([info, user, file_, app], [app, file_, user, info]):
        loaded = write_config(pipeline_toml(assembly={"settle_seconds": 30}), name=f"c{len(ids)}.toml")
        loaded.data_dir = tmp_path / f"out{len(ids)}"
        async with Runner(loaded) as runner:
            for part in order:
                await runner.process_batch([envelope(part)])
            report = await runner.flush()
            ids.append(report.record_ids)
    assert ids[0] == ids[1] and len(ids[0]) == 1


async def test_redelivered_streaming_parts_are_recognised(write_config, fixture_bytes):
    body = fixture_bytes("streaming_dlp_batch.json")
    async with Runner(write_config(LAKE_ONLY)) as runner:
        assert (await runner.process_batch([Message(body=body)])).alerts == 1
        again = await runner.process_batch([Message(body=body)])
        assert again.alerts == 0 and again.duplicate_parts == 4


async def test_late_evidence_produces_a_revised_record(write_config, fixture_bytes):
    info, user, file_, app, _ = streaming_records(fixture_bytes)
    async with Runner(write_config(LAKE_ONLY)) as runner:
        first = await runner.process_batch([envelope(info, user)])
        late = await runner.process_batch([envelope(file_)])
        assert first.alerts == late.alerts == 1 and first.record_ids != late.record_ids
        revised = lake_lines(runner)[-1]["alert"]
    assert revised["user"]["upn"] == "megan.bowen@contoso.com" and revised["files"][0]["name"] == "Q1-payroll-export.xlsx"


async def test_a_part_that_comes_while_its_alert_is_enriched_comes_out_in_a_revision(write_config, fixture_bytes):
    """Two batches at once on one runner (the consumer's partitions, or its flush beside a batch):
    a late part stored while the claimed alert is being enriched must not be lost behind that
    batch's mark. The alert stays pending and comes out again, with the late part."""
    from tests import plugins

    slow = enricher_entry("slow", "tests.plugins:Recorder", {"label": "slow", "delay": 0.3})
    loaded = write_config(pipeline_toml(assembly={"settle_seconds": 30}, enrichers=[slow]))
    clock = Clock()
    info, user, file_, _app, _ = streaming_records(fixture_bytes)
    plugins.CALLS.clear()
    async with Runner(loaded, clock=clock) as runner:
        assert (await runner.process_batch([envelope(info, user)])).pending == 1
        clock.now += 31
        enriching = asyncio.create_task(runner.process_batch([]))  # claims the settled alert, then waits in the enricher
        async with asyncio.timeout(10):
            while ("start", "slow") not in plugins.CALLS:
                await asyncio.sleep(0.005)
        clock.now += 1
        late = await runner.process_batch([envelope(file_)])  # meanwhile: the file evidence
        assert late.alerts == 0 and late.duplicate_parts == 0
        first = await enriching
        assert first.alerts == 1 and first.pending == 1  # emitted without the file, and still pending for it
        clock.now += 31
        revised = await runner.process_batch([])
        assert revised.alerts == 1 and revised.pending == 0
        lines = lake_lines(runner)
    assert "files" not in lines[0]["alert"] or not lines[0]["alert"]["files"]
    assert lines[-1]["alert"]["files"][0]["name"] == "Q1-payroll-export.xlsx"
