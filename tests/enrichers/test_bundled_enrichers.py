"""`make run` on the bundled samples: every built-in enricher fills its fragment for every record."""

from __future__ import annotations

import json

from tests.entrypoints.test_cli import run_cli, summary

ENRICHERS = {"user_context", "sensitive_info", "prior_incidents", "telemetry", "triage"}


def test_bundled_run_fills_every_enrichment(tmp_path):
    result = run_cli("run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    lines = [json.loads(line) for path in (tmp_path / "out" / "lake").rglob("*.jsonl") for line in path.read_text().splitlines()]
    assert lines
    for line in lines:
        assert set(line["enrichments"]) == ENRICHERS, line["alert"]["alert_id"]
        assert {name: status["state"] for name, status in line["enrichment_status"].items()} == {name: "ok" for name in ENRICHERS}
    counts = summary(result.stdout)
    assert counts["enrichment failures"].startswith("0 ")
    by_id = {}
    for line in lines:
        by_id.setdefault(line["alert"]["alert_id"], []).append(line)
    # a departing user (HR connector CSV) and a repeat user (an earlier alert in 08-graph-alerts-history.json)
    (adele,) = [line for line in lines if line["alert"]["alert_id"].startswith("dl9a8b7c6d")]
    assert adele["enrichments"]["user_context"]["departing"] is True and adele["enrichments"]["user_context"]["days_until_departure"] == 13
    assert adele["enrichments"]["prior_incidents"]["last_30_days"] == 1
    assert "departing_user" in {r["code"] for r in adele["enrichments"]["triage"]["reasons"]}
    megan = [line for line in lines if line["alert"]["alert_id"].startswith("dl0c6f1e2a")]
    assert len(megan) == 3  # the same alert from three sources: one alert in the history, never its own prior
    for line in megan:
        prior = line["enrichments"]["prior_incidents"]
        assert [p["alert_id"] for p in prior["recent"]] == ["dl5e4d3c2b-1a09-4f8e-8d7c-6b5a49382716"]
        assert line["enrichments"]["sensitive_info"]["total_count"] == 15
    sentinel = next(line for line in megan if line["alert"]["source_format"] == "sentinel_alert")
    assert sentinel["enrichments"]["sensitive_info"]["source"] == "correlated"
