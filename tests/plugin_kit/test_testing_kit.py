"""pipeline.plugin_kit.testing and its pytest fixtures, as a plugin author uses them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipeline.enrich.cache import CachePolicy
from pipeline.errors import ConfigError
from pipeline.plugin_kit.testing import DEFAULT_NOW, FakeClock, make_alert, make_alerts, make_context, run_enricher, sample_bytes
from tests import plugins


@pytest.mark.parametrize("fmt", ["defender_streaming", "graph_alert", "management_activity", "sentinel_alert"])
def test_make_alert_decodes_every_bundled_format(fmt):
    alert = make_alert(fmt)
    assert alert.source_format == fmt
    assert alert.user is not None and alert.user.upn == "megan.bowen@contoso.com"


def test_streaming_parts_are_joined_by_the_assembler():
    alerts = make_alerts("defender_streaming")
    (alert,) = [a for a in alerts if a.kind == "alert"]
    assert alert.files[0].name == "Q1-payroll-export.xlsx" and alert.title.startswith("DLP policy")
    assert len(alerts) == 1  # the unrelated MDE AlertInfo row is not DLP


def test_overrides_are_validated():
    alert = make_alert("graph_alert", severity="high", user={"upn": "Adele.Vance@contoso.com"}, files=[])
    assert alert.severity == "high" and alert.user.upn == "adele.vance@contoso.com" and alert.files == []
    with pytest.raises(TypeError, match="no field"):
        make_alert("graph_alert", sevrity="high")
    with pytest.raises(ValidationError):
        make_alert("graph_alert", severity="catastrophic")


def test_make_alert_takes_your_own_body():
    import json

    document = json.loads(sample_bytes("sentinel_alert"))
    document["AlertSeverity"] = "High"
    assert make_alert(document).severity == "high"
    with pytest.raises(ValueError, match="no DLP alert"):
        make_alert({"records": [{"time": "t", "category": "AdvancedHunting-DeviceEvents", "properties": {}}]})


async def test_run_enricher_uses_the_runners_outcomes():
    alert = make_alert()
    fragment, status = await run_enricher("sensitive_info", alert)  # resolved like a config's `use`
    assert status.state == "ok" and fragment.total_count > 0 and status.duration_ms >= 0
    fragment, status = await run_enricher(plugins.Hangs, alert)
    assert fragment is None and status.state == "timed_out" and status.error == "no result within 0.05s"
    fragment, status = await run_enricher(plugins.Explodes, alert)
    assert status.state == "failed" and status.error == "RuntimeError"  # never the exception's text
    _, status = await run_enricher(plugins.ReturnsDict, alert)
    assert status.state == "failed" and "expected a pydantic model" in status.error
    _, status = await run_enricher(plugins.CachedLookup, make_alert(user=None))
    assert status.state == "skipped"


async def test_run_enricher_takes_a_batch_enricher_through_its_batch_call():
    plugins.PerBatch.calls = []
    alert = make_alert()
    fragment, status = await run_enricher(plugins.PerBatch, alert, upstream={"first": plugins.Value(value="1")})
    assert plugins.PerBatch.calls == [1]  # enrich_batch with a batch of one, as the runner would call it
    assert status.state == "ok" and fragment.value == alert.alert_id and fragment.seen_upstream == ["first"]
    _, status = await run_enricher(plugins.PerBatch, alert, settings={"mode": "raise"})
    assert status.state == "failed" and status.error == "RuntimeError"


async def test_run_enricher_validates_settings_and_passes_upstream_fragments():
    fragment, status = await run_enricher(plugins.NeedsA, settings={"label": "x", "upstream": ["a"]}, upstream={"a": plugins.Value(value="1")})
    assert status.state == "ok" and fragment.value == "x" and fragment.seen_upstream == ["a"]
    with pytest.raises(ConfigError, match="enrichers\\[0\\].settings.lable"):
        await run_enricher(plugins.Recorder, settings={"lable": "x"})
    with pytest.raises(TypeError, match="pydantic model"):
        await run_enricher(plugins.NeedsA, upstream={"a": {"value": "1"}})


async def test_make_context_has_a_fake_clock_and_a_cache():
    clock = FakeClock()
    ctx = make_context(make_alert(), now=clock, cache_policy=CachePolicy(ttl_seconds=60))
    assert ctx.now() == DEFAULT_NOW
    calls = []

    async def load():
        calls.append(1)
        return len(calls)

    assert await ctx.cached("k", load) == 1 and await ctx.cached("k", load) == 1
    clock.advance(61)
    assert await ctx.cached("k", load) == 2 and ctx.now().timestamp() == DEFAULT_NOW.timestamp() + 61


# -- the pytest fixtures (pipeline/plugin_kit/pytest_plugin.py) ---------------------------------------------------


def test_fixture_dlp_alert_any_format(dlp_alert_any_format):
    assert dlp_alert_any_format.alert_id


async def test_fixture_run_enricher_and_context(dlp_alert, run_enricher, enrichment_context, fake_clock, tmp_path):
    fragment, status = await run_enricher(plugins.CachedLookup, dlp_alert)
    assert fragment.value == "MEGAN.BOWEN@CONTOSO.COM" and status.state == "ok"
    assert enrichment_context.alert is dlp_alert and enrichment_context.now() == fake_clock.datetime


def test_fixture_dlp_alert_factory(dlp_alert_factory):
    assert dlp_alert_factory("management_activity", workload="Exchange").workload == "Exchange"
