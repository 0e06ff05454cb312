"""Done-when of the write-back: a run over the bundled samples with both write-back sinks pointed at
the local Graph and Sentinel servers tags and comments each incident, and a second run (a new
process with fresh state, so every record reaches the sinks again) adds nothing."""

from __future__ import annotations

import shutil
from collections import defaultdict
from importlib.resources import files
from pathlib import Path

from pipeline.config import load_config
from pipeline.errors import DecodeError
from pipeline.ingest.decode import decode_message
from pipeline.ingest.inputs import read_messages
from pipeline.runner import Runner
from tests.support.alerts import StaticCredential
from tests.support.incident_servers import GraphSecurity, SentinelIncidents
from tests.support.records import lake_lines

SAMPLES = Path(str(files("pipeline").joinpath("samples")))
WORKSPACE = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-sec/providers/Microsoft.OperationalInsights/workspaces/law-sec"

# module:Class, not the entry-point names: an environment installed before these sinks existed has
# the older entry points (and then the built-in table does not stand in for them).
SINKS = """
[[sinks]]
name = "defender"
kind = "pipeline.deliver.sinks.defender_incident:DefenderIncidentSink"
[sinks.settings]
graph_url = "{graph}"

[[sinks]]
name = "sentinel_incidents"
kind = "pipeline.deliver.sinks.sentinel_incident:SentinelIncidentSink"
[sinks.settings]
workspace_resource_id = "{workspace}"
arm_url = "{arm}"
graph_url = "{graph}"
"""


def seed(graph: GraphSecurity, sentinel: SentinelIncidents) -> None:
    """Every incident the bundled alerts belong to, in Defender and mirrored in Sentinel; Streaming
    rows (no incident id) are found through alerts_v2."""
    incidents: set[str] = set()
    for message in read_messages([str(SAMPLES / "messages")]):
        try:
            alerts = decode_message(message.body)
        except DecodeError:
            continue
        # a part carries its alert's incident id when its source has one (a Management Activity event)
        known = [(alert.alert_id, alert.incident_id) for alert in alerts.alerts] + [(part.alert_id, part.data.get("incident_id")) for part in alerts.parts]
        for alert_id, incident_id in known:
            if incident_id:
                incidents.add(incident_id)
            else:  # a Streaming API row: Graph knows its incident
                entry = graph.alerts.setdefault(alert_id, {"id": alert_id, "incidentId": f"9{len(graph.alerts):04d}"})
                incidents.add(entry["incidentId"])
    for incident in sorted(incidents):
        graph.add_incident(incident, tags=["Analyst:triaged"])
        sentinel.add_incident(incident, labels=["Analyst:triaged"])


async def run(tmp_path: Path, out: str, graph_url: str, arm_url: str):
    folder = tmp_path / "config"
    if not folder.exists():
        shutil.copytree(SAMPLES, folder, ignore=shutil.ignore_patterns("messages", "azure.toml"))
        text = (folder / "pipeline.toml").read_text() + SINKS.format(graph=graph_url, arm=arm_url, workspace=WORKSPACE)
        (folder / "pipeline.toml").write_text(text)
    loaded = load_config(str(folder / "pipeline.toml"), data_dir=str(tmp_path / out))
    async with Runner(loaded, credential_factory=lambda _: StaticCredential()) as runner:
        report = await runner.process_batch(list(read_messages([str(SAMPLES / "messages")])))
        report.merge(await runner.flush())
        return report, lake_lines(runner)


async def test_bundled_samples_tag_and_comment_each_incident_and_a_second_run_adds_nothing(tmp_path, httpserver):
    graph, sentinel = GraphSecurity(), SentinelIncidents(WORKSPACE)
    graph.install(httpserver)
    sentinel.install(httpserver)
    seed(graph, sentinel)
    report, records = await run(tmp_path, "out-1", httpserver.url_for("/v1.0"), httpserver.url_for("/").rstrip("/"))
    assert report.delivered.get("defender") == report.delivered.get("lake") == report.delivered.get("sentinel_incidents") == len(records) > 0, report

    by_incident: dict[str, set[str]] = defaultdict(set)
    for record in records:
        incident = record["alert"]["incident_id"] or graph.alerts[record["alert"]["alert_id"]]["incidentId"]
        by_incident[incident].add(record["record_id"])
    for incident, record_ids in by_incident.items():
        tags = graph.incidents[incident]["customTags"]
        assert tags[0] == "Analyst:triaged" and any(t.startswith("DLP:triage-") for t in tags) and len(tags) == len(set(tags)), tags
        markers = [c["comment"].rsplit("\n", 1)[-1] for c in graph.incidents[incident]["comments"]]
        assert sorted(markers) == sorted(f"[dlp-pipeline record {r}]" for r in record_ids)  # one comment per record, none twice
        mirrored = sentinel.by_provider_id(incident)
        assert [label["labelName"] for label in mirrored["properties"]["labels"]] == tags
        assert len(sentinel.comments[mirrored["name"]]) == len(record_ids)
    departing = [r for r in records if (r["enrichments"]["user_context"] or {}).get("departing")]
    assert departing and all("DLP:departing-user" in graph.incidents[r["alert"]["incident_id"] or graph.alerts[r["alert"]["alert_id"]]["incidentId"]]["customTags"] for r in departing)

    graph_writes, sentinel_writes = len(graph.writes), len(sentinel.writes)
    report, again = await run(tmp_path, "out-2", httpserver.url_for("/v1.0"), httpserver.url_for("/").rstrip("/"))
    assert {r["record_id"] for r in again} == {r["record_id"] for r in records}
    assert report.delivered.get("defender") == len(again)
    assert (len(graph.writes), len(sentinel.writes)) == (graph_writes, sentinel_writes)
