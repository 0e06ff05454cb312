"""Metrics through OpenTelemetry (read with the SDK's InMemoryMetricReader) and structured logs."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from pipeline import observability
from pipeline.runner import Message, Runner
from tests.support.config import LAKE, enricher_entry, pipeline_toml, sink_entry
from tests.support.paths import ROOT, SAMPLES


@pytest.fixture
def metrics():
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    observability.use_meter_provider(provider)
    try:
        yield reader
    finally:
        observability.use_meter_provider(None)
        provider.shutdown()


def collected(reader: InMemoryMetricReader) -> dict[str, list]:
    """metric name -> data points"""
    out: dict[str, list] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                out.setdefault(metric.name, []).extend(metric.data.data_points)
    return out


def total(points, **attributes) -> float:
    return sum(p.value for p in points if all(p.attributes.get(k) == v for k, v in attributes.items()))


def config(*, reject: str = "none", picky_enabled: bool = True) -> str:
    """sensitive_info and an enricher that raises; the lake and a sink that rejects the alert `reject`."""
    picky = sink_entry("picky", "tests.plugins:FlakySink", {"reject_alert_ids": [reject]}, **({} if picky_enabled else {"enabled": False}))
    return pipeline_toml(enrichers=[enricher_entry("sensitive_info"), enricher_entry("explodes", "tests.plugins:Explodes")], sinks=[LAKE, picky])


async def test_runner_reports_every_metric(metrics, write_config, fixture_bytes):
    graph = json.loads(fixture_bytes("graph_alert_v2_dlp.json"))
    loaded = write_config(config(reject=graph["id"]))
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    messages = [
        Message(body=orjson.dumps(graph), source="a", enqueued_time=now - timedelta(seconds=42)),
        Message(body=fixture_bytes("sentinel_securityalert_dlp.json"), source="b", enqueued_time=now - timedelta(seconds=2)),
        Message(body=b"not json", source="c"),
        Message(body=orjson.dumps({"records": [{"time": "x", "category": "AdvancedHunting-DeviceEvents", "properties": {}}]}), source="d"),
    ]
    async with Runner(loaded, clock=lambda: now.timestamp()) as runner:
        report = await runner.process_batch(messages, flush=True)
    assert report.alerts == 2
    points = collected(metrics)
    assert total(points["dlp.messages.in"]) == 4
    assert total(points["dlp.alerts.in"]) == report.records == 3
    assert total(points["dlp.records.skipped"]) == 1
    assert total(points["dlp.alerts.enriched"]) == 2
    durations = points["dlp.enricher.duration"]
    # sensitive_info works on the whole batch: one call (one duration) gave both alerts their outcome
    assert sum(p.count for p in durations if p.attributes == {"enricher": "sensitive_info", "state": "ok"}) == 1
    assert sum(p.count for p in durations if p.attributes == {"enricher": "explodes", "state": "failed"}) == 2
    assert total(points["dlp.enricher.failures"], enricher="explodes", state="failed") == 2
    assert "sensitive_info" not in {p.attributes["enricher"] for p in points["dlp.enricher.failures"]}
    assert total(points["dlp.sink.delivered"], sink="lake") == 2
    # both fixtures describe the same alert (one id): the picky sink rejects both records
    assert total(points["dlp.sink.delivered"], sink="picky") == 0
    assert total(points["dlp.sink.failed"], sink="picky", reason="sink_rejected") == 2
    assert total(points["dlp.sink.failed"], sink="lake") == 0
    assert total(points["dlp.dead_lettered"], stage="decode", reason="invalid_json") == 1
    assert total(points["dlp.dead_lettered"], stage="deliver", reason="sink_rejected") == 2
    (lag,) = points["dlp.lag"]
    assert lag.count == 2 and lag.sum == pytest.approx(44) and lag.max == pytest.approx(42)
    assert tuple(lag.explicit_bounds) == observability.LAG_BUCKETS  # seconds, not the SDK's millisecond defaults
    assert lag.bucket_counts[observability.LAG_BUCKETS.index(1.0) + 1] == 1  # 2 s: in (1, 5]
    assert tuple(durations[0].explicit_bounds) == observability.DURATION_BUCKETS


async def test_without_a_configured_provider_the_hooks_are_no_ops(write_config, fixture_bytes):
    observability.use_meter_provider(None)
    loaded = write_config(config())
    async with Runner(loaded) as runner:
        report = await runner.process_batch([Message(body=fixture_bytes("graph_alert_v2_dlp.json"), enqueued_time=datetime.now(UTC))])
    assert report.alerts == 1


def test_configure_from_env_does_nothing_without_a_connection_string():
    assert observability.configure_from_env({}) is False


async def test_log_records_of_an_alert_carry_its_ids(write_config, fixture_bytes, caplog):
    loaded = write_config(config())
    caplog.handler.addFilter(observability.AlertContextFilter())
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        async with Runner(loaded) as runner:
            report = await runner.process_batch([Message(body=fixture_bytes("graph_alert_v2_dlp.json"))])
    warnings = [r for r in caplog.records if "explodes failed" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].alert_id == json.loads(fixture_bytes("graph_alert_v2_dlp.json"))["id"]
    assert warnings[0].record_id == report.record_ids[0]


def test_cli_json_logs_carry_alert_and_record_ids_and_no_payload(tmp_path):
    path = tmp_path / "pipeline.toml"
    path.write_text(config(picky_enabled=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(observability.CONNECTION_STRING_SETTING, None)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "--log-format", "json", "run", str(SAMPLES / "03-graph-alert.json"), "--config", str(path), "--out", "out"],
        cwd=tmp_path, env=env, capture_output=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr.decode()
    lines = [json.loads(line) for line in result.stderr.decode().splitlines() if line.strip()]
    failures = [line for line in lines if "explodes failed" in line["message"]]
    assert failures and failures[0]["level"] == "WARNING" and failures[0]["logger"] == "pipeline"
    lake = [json.loads(x) for p in (tmp_path / "out" / "lake").rglob("*.jsonl") for x in p.read_text().splitlines()]
    assert failures[0]["alert_id"] == lake[0]["alert"]["alert_id"]
    assert failures[0]["record_id"] == lake[0]["record_id"]
    assert b"megan.bowen@contoso.com" not in result.stderr  # the exception text is not logged above DEBUG


def test_azure_monitor_is_imported_only_when_its_connection_string_is_set(tmp_path):
    code = """
import sys, time
started = time.perf_counter()
import function_app
elapsed = time.perf_counter() - started
assert "azure.monitor.opentelemetry" not in sys.modules and "opentelemetry" not in sys.modules, "imported at start-up"
from pipeline import observability
assert observability.configure_from_env() is True
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
assert isinstance(metrics.get_meter_provider(), MeterProvider)
print(round(elapsed, 3))
"""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        observability.CONNECTION_STRING_SETTING: "InstrumentationKey=00000000-0000-0000-0000-000000000000;IngestionEndpoint=http://127.0.0.1:9/",
        "APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL": "true",
    }
    pytest.importorskip("azure.monitor.opentelemetry")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    assert float(result.stdout.decode()) < 1.5  # importing function_app stays fast


async def test_broken_optional_fields_are_counted(metrics, write_config, fixture_bytes):
    graph = json.loads(fixture_bytes("graph_alert_v2_dlp.json"))
    graph["createdDateTime"] = "2025-07-03T12:16:01+053088Z"
    async with Runner(write_config(pipeline_toml())) as runner:
        report = await runner.process_batch([Message(orjson.dumps(graph))])
    assert report.field_warnings == 1 and report.alerts == 1
    assert total(collected(metrics)["dlp.fields.nulled"]) == 1
