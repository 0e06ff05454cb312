"""`python -m pipeline doctor`: each check against the local servers (Graph, ServiceNow, Jira, Resource
Manager, the Defender and Sentinel incident APIs) and the suite's Azurite, one failure mode per test.
The doctor only reads: every test that talks to a ticket or incident server asserts that no POST,
PUT or PATCH reached it."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

import pytest
from azure.core.exceptions import ClientAuthenticationError
from werkzeug import Request, Response

from enrichers.user_context import GRAPH_USER_QUERY
from pipeline.deliver.sinks.sentinel_schema import STREAM
from pipeline.doctor import Check, DoctorReport, run_doctor
from pipeline.entrypoints.cli import main
from tests.support.alerts import StaticCredential
from tests.support.azurite import ACCOUNT, docker_available
from tests.support.config import enricher_entry, pipeline_toml, sink_entry
from tests.support.incident_servers import GraphSecurity, SentinelIncidents
from tests.support.itsm_servers import Failure, jira_entry, snow_entry
from tests.support.paths import ROOT

RULE = "dcr-0123456789abcdef0123456789abcdef"
DCR_ID = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/dlp/providers/Microsoft.Insights/dataCollectionRules/dlp-alerts"
WRITES = ("POST", "PUT", "PATCH", "DELETE")


async def doctor(write_config, *, credential=None, **sections) -> DoctorReport:
    loaded = write_config(pipeline_toml(**sections))
    return await run_doctor(loaded, credential_factory=lambda client_id: credential or StaticCredential())


def lines(report: DoctorReport, component: str) -> list[str]:
    return [result.line() for result in report.results if result.component == component]


def statuses(report: DoctorReport, component: str) -> dict[str, str]:
    return {result.check.name: result.check.status for result in report.results if result.component == component}


# -- the embedded default and the CLI ------------------------------------------------------------


def test_the_embedded_default_passes_with_exit_0(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pipeline", "doctor"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    checks = [line for line in done.stdout.splitlines() if line.split(" ", 1)[0] in ("ok", "failed", "skipped")]
    assert checks and all(line.startswith("ok") for line in checks)
    for component in ("state", "dead letters", "enricher user_context", "enricher telemetry", "sink lake"):
        assert any(f" {component}: " in line for line in checks), component
    assert "0 failed" in done.stdout.splitlines()[-1]
    assert not (tmp_path / "out").exists(), "the doctor created the data folder"


def test_a_sink_that_is_down_exits_1_naming_it_without_a_stack_trace(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TEST_SNOW_PASSWORD", "pw")
    config = tmp_path / "pipeline.toml"
    sink = sink_entry("tickets", "servicenow", {"instance_url": "http://127.0.0.1:9", "username": "svc", "password_env": "TEST_SNOW_PASSWORD", "timeout_seconds": 2})
    config.write_text(pipeline_toml(sinks=[sink]))
    assert main(["doctor", "--config", str(config)]) == 1
    out, err = capsys.readouterr()
    assert "failed   sink tickets: table incident: cannot reach http://127.0.0.1:9 (ConnectError); fix: check instance_url" in out
    assert out.splitlines()[-1].endswith("failing: sink tickets")
    assert "Traceback" not in out + err


# -- the check protocol: plugins supply their own checks ------------------------------------------


class PluginSink:
    """A third-party sink with its own check: what its settings say it finds."""

    class Settings(__import__("pydantic").BaseModel):
        model_config = {"extra": "forbid"}
        outcome: str = "ok"
        delay: float = 0.0

    def __init__(self, settings, services) -> None:
        raise AssertionError("the doctor never builds a plugin")

    @classmethod
    async def doctor(cls, settings, services):
        import asyncio

        await asyncio.sleep(settings.delay)
        if settings.outcome == "raise":
            raise RuntimeError("queue service answered 418")
        if settings.outcome == "failed":
            return [Check.failed("queue", "queue dlp-out does not exist", "create it")]
        return [Check.ok("queue", "dlp-out reachable")]

    async def publish(self, records):
        raise AssertionError("the doctor never publishes")


class PlainSink:
    """A sink without a check of its own."""

    def __init__(self, settings, services) -> None:
        raise AssertionError("the doctor never builds a plugin")

    async def publish(self, records):
        raise AssertionError("the doctor never publishes")


PLUGIN = "tests.entrypoints.test_doctor:PluginSink"


async def test_a_plugin_supplies_its_own_check_without_being_built(write_config):
    sinks = [sink_entry("good", PLUGIN), sink_entry("bad", PLUGIN, {"outcome": "failed"}), sink_entry("plain", "tests.entrypoints.test_doctor:PlainSink")]
    report = await doctor(write_config, sinks=sinks)
    assert lines(report, "sink good") == ["ok       sink good: queue: dlp-out reachable"]
    assert lines(report, "sink bad") == ["failed   sink bad: queue: queue dlp-out does not exist; fix: create it"]
    assert lines(report, "sink plain") == ["ok       sink plain: settings: valid (PlainSink names nothing else to check)"]
    assert report.summary().endswith("failing: sink bad")


async def test_a_check_that_raises_or_hangs_is_one_failed_line(write_config):
    sinks = [sink_entry("raises", PLUGIN, {"outcome": "raise"}), sink_entry("hangs", PLUGIN, {"delay": 5})]
    loaded = write_config(pipeline_toml(sinks=sinks))
    report = await run_doctor(loaded, credential_factory=lambda client_id: StaticCredential(), timeout=0.5)
    assert lines(report, "sink raises") == ["failed   sink raises: checks: the check raised RuntimeError: queue service answered 418; fix: run again with -vv for the details"]
    (hangs,) = lines(report, "sink hangs")
    assert hangs.startswith("failed   sink hangs: checks: no answer within 0.5 s")


async def test_bad_plugin_settings_an_unknown_plugin_and_an_unset_secret_are_failed_lines(httpserver, write_config, monkeypatch):
    monkeypatch.delenv("TEST_SNOW_PASSWORD", raising=False)
    sinks = [
        sink_entry("typo", PLUGIN, {"outcom": "ok"}),
        sink_entry("unknown", "no_such_sink"),
        sink_entry("snow", "servicenow", {"instance_url": httpserver.url_for("/").rstrip("/"), "username": "svc", "password_env": "TEST_SNOW_PASSWORD"}),
    ]
    report = await doctor(write_config, sinks=sinks)
    assert "key 'sinks[0].settings.outcom': unknown key" in lines(report, "sink typo")[0]
    assert "unknown plugin 'no_such_sink'" in lines(report, "sink unknown")[0]
    (snow,) = lines(report, "sink snow")
    assert snow.startswith("failed") and "TEST_SNOW_PASSWORD" in snow
    assert len(report.failed) == 3


async def test_no_sink_and_a_class_that_is_no_sink_fail(write_config):
    report = await doctor(write_config, sinks=[sink_entry("off", "jsonl", enabled=False)])
    assert lines(report, "sinks") == ['failed   sinks: configured: no enabled sink: every alert would be lost; fix: add a [[sinks]] entry (the local lake: kind = "jsonl")']
    report = await doctor(write_config, sinks=[sink_entry("odd", "tests.support.alerts:StaticCredential")])
    assert "is not a sink: it needs `async def publish(...)`" in lines(report, "sink odd")[0]


# -- files ---------------------------------------------------------------------------------------


async def test_an_hr_file_without_the_expected_column_fails_naming_it(tmp_path, write_config):
    (tmp_path / "users.json").write_text(json.dumps([{"id": "oid-1", "userPrincipalName": "a@contoso.com"}]))
    (tmp_path / "hr.csv").write_text("EmailAddress,ResignationDate,LastDay\na@contoso.com,2025-01-01,2025-02-01\n")
    enricher = enricher_entry("user_context", settings={"directory": "users.json", "hr": {"path": "hr.csv"}})
    report = await doctor(write_config, enrichers=[enricher])
    assert statuses(report, "enricher user_context") == {"users file": "ok", "HR file": "failed"}
    (line,) = [line for line in lines(report, "enricher user_context") if "HR file" in line]
    assert "no column 'LastWorkingDate' (hr.columns.last_working_date)" in line and "'LastDay'" in line and "fix:" in line


async def test_a_missing_users_file_and_a_lookup_table_without_its_key_column_fail(tmp_path, write_config):
    (tmp_path / "risk.csv").write_text("user,level\na@contoso.com,high\n")
    enrichers = [
        enricher_entry("user_context", settings={"directory": "no-such-users.json"}),
        enricher_entry("telemetry", settings={"tables": [{"name": "risk", "path": "risk.csv", "key": "upn", "key_column": "upn"}]}),
    ]
    report = await doctor(write_config, enrichers=enrichers)
    (users,) = lines(report, "enricher user_context")
    assert users.startswith("failed") and "cannot read" in users and "no-such-users.json" in users
    (table,) = lines(report, "enricher telemetry")
    assert table.startswith("failed") and "no row has the column 'upn'" in table


async def test_a_data_folder_that_is_a_file_fails(tmp_path, write_config):
    (tmp_path / "out").write_text("not a folder")
    report = await doctor(write_config)
    assert statuses(report, "state") == {"SQLite state": "failed"}
    assert "is not a folder" in lines(report, "state")[0]


# -- Microsoft Graph -----------------------------------------------------------------------------


class Graph:
    """`GET /users?$top=1&$select=id` and `GET /users/{id}?$select=...`, with the permissions granted."""

    def __init__(self, httpserver, *, granted=("User.Read.All", "User-LifeCycleInfo.Read.All")) -> None:
        self.granted = set(granted)
        self.requests: list[tuple[str, str, str]] = []
        httpserver.expect_request(r"/v1.0/users").respond_with_handler(self.list_users)
        httpserver.expect_request("/v1.0/users/oid-1").respond_with_handler(self.user)
        self.url = httpserver.url_for("/v1.0")

    def list_users(self, request: Request) -> Response:
        self.requests.append((request.method, request.path, request.query_string.decode()))
        if "User.Read.All" not in self.granted:
            return Response(json.dumps({"error": {"code": "Authorization_RequestDenied"}}), 403, content_type="application/json")
        return Response(json.dumps({"value": [{"id": "oid-1"}]}), content_type="application/json")

    def user(self, request: Request) -> Response:
        self.requests.append((request.method, request.path, request.query_string.decode()))
        if "employeeLeaveDateTime" in request.args.get("$select", "") and "User-LifeCycleInfo.Read.All" not in self.granted:
            return Response(json.dumps({"error": {"code": "Authorization_RequestDenied"}}), 403, content_type="application/json")
        return Response(json.dumps({"id": "oid-1", "userPrincipalName": "a@contoso.com"}), content_type="application/json")


def graph_enricher(graph: Graph) -> dict:
    return enricher_entry("user_context", settings={"graph": {"url": graph.url, "allow_private_hosts": ["localhost", "127.0.0.1"]}})


async def test_graph_token_and_one_user_with_the_enrichers_select(httpserver, write_config):
    graph = Graph(httpserver)
    credential = StaticCredential()
    report = await doctor(write_config, enrichers=[graph_enricher(graph)], credential=credential)
    assert statuses(report, "enricher user_context") == {"Graph token": "ok", "Graph user lookup": "ok"}
    assert ("https://graph.microsoft.com/.default",) in credential.scopes
    method, path, query = graph.requests[-1]
    assert (method, path) == ("GET", "/v1.0/users/oid-1")
    from urllib.parse import unquote

    assert unquote(query) == GRAPH_USER_QUERY  # exactly the enricher's $select and $expand
    assert all(method == "GET" for method, _, _ in graph.requests)


async def test_graph_without_user_read_all_says_so(httpserver, write_config):
    graph = Graph(httpserver, granted=())
    report = await doctor(write_config, enrichers=[graph_enricher(graph)])
    line = lines(report, "enricher user_context")[-1]
    assert line.startswith("failed") and "User.Read.All is missing" in line and "admin consent" in line


async def test_graph_without_lifecycle_info_permission_says_so(httpserver, write_config):
    graph = Graph(httpserver, granted=("User.Read.All",))
    report = await doctor(write_config, enrichers=[graph_enricher(graph)])
    line = lines(report, "enricher user_context")[-1]
    assert line.startswith("failed") and "User-LifeCycleInfo.Read.All is missing (employeeLeaveDateTime)" in line


class NoToken:
    async def get_token(self, *scopes, **kwargs):
        raise ClientAuthenticationError("DefaultAzureCredential failed to retrieve a token from the included credentials.")

    async def close(self):
        return None


async def test_graph_without_a_token_fails_and_skips_the_lookup(httpserver, write_config):
    graph = Graph(httpserver)
    report = await doctor(write_config, enrichers=[graph_enricher(graph)], credential=NoToken())
    assert statuses(report, "enricher user_context") == {"Graph token": "failed", "Graph user lookup": "skipped"}
    assert "az login" in lines(report, "enricher user_context")[0] and not graph.requests


# -- ServiceNow and Jira -------------------------------------------------------------------------




def no_ticket_writes(server) -> bool:
    return not [r for r in server.requests if r[0] in WRITES]


async def test_servicenow_sign_in_and_table_read(httpserver, snow, write_config):
    report = await doctor(write_config, sinks=[snow_entry(httpserver, "servicenow")])
    assert statuses(report, "sink servicenow") == {"sign-in": "ok", "table incident": "ok"}
    assert [r[0] for r in snow.requests] == ["GET"] and no_ticket_writes(snow)


async def test_servicenow_oauth_posts_only_for_its_token(httpserver, snow, write_config):
    entry = snow_entry(httpserver, "servicenow", auth="oauth", username=None, password_env=None, client_id="cid", client_secret_env="TEST_SNOW_SECRET")
    report = await doctor(write_config, sinks=[entry])
    assert statuses(report, "sink servicenow") == {"sign-in": "ok", "table incident": "ok"}
    assert snow.tokens_issued == 1 and no_ticket_writes(snow)  # snow.requests holds the table's requests only


async def test_servicenow_wrong_password_fails_sign_in(httpserver, snow, write_config, monkeypatch):
    monkeypatch.setenv("TEST_SNOW_PASSWORD", "wrong")
    report = await doctor(write_config, sinks=[snow_entry(httpserver, "servicenow")])
    (line,) = lines(report, "sink servicenow")
    assert line.startswith("failed") and "credentials refused (HTTP 401)" in line and "TEST_SNOW_PASSWORD" in line
    assert no_ticket_writes(snow)


async def test_servicenow_account_without_table_access_fails(httpserver, snow, write_config):
    snow.failures.append(Failure("GET", 403))
    report = await doctor(write_config, sinks=[snow_entry(httpserver, "servicenow")])
    assert statuses(report, "sink servicenow") == {"sign-in": "ok", "table incident": "failed"}
    assert "itil" in lines(report, "sink servicenow")[1] and no_ticket_writes(snow)




async def test_jira_sign_in_project_and_permissions(httpserver, jira, write_config):
    report = await doctor(write_config, sinks=[jira_entry(httpserver)])
    assert statuses(report, "sink jira") == {"sign-in": "ok", "project SEC": "ok", "permissions": "ok"}
    assert no_ticket_writes(jira) and not jira.issues


async def test_jira_bad_token_fails_sign_in(httpserver, jira, write_config, monkeypatch):
    monkeypatch.setenv("TEST_JIRA_TOKEN", "expired")
    report = await doctor(write_config, sinks=[jira_entry(httpserver)])
    (line,) = lines(report, "sink jira")
    assert line.startswith("failed") and "refused (HTTP 401)" in line and "TEST_JIRA_TOKEN" in line


async def test_jira_unknown_project_and_issue_type_and_missing_permission(httpserver, jira, write_config):
    report = await doctor(write_config, sinks=[jira_entry(httpserver, project_key="OPS")])
    assert statuses(report, "sink jira") == {"sign-in": "ok", "project OPS": "failed"}
    jira.issue_types = ["Bug"]
    jira.permissions["CREATE_ISSUES"] = False
    report = await doctor(write_config, sinks=[jira_entry(httpserver)])
    assert statuses(report, "sink jira") == {"sign-in": "ok", "project SEC": "failed", "permissions": "failed"}
    project, permissions = lines(report, "sink jira")[1:]
    assert "no issue type 'Task' (it has Bug)" in project and "missing in SEC: CREATE_ISSUES" in permissions
    assert no_ticket_writes(jira)


# -- Sentinel: the DCR read from Resource Manager ------------------------------------------------


WORKSPACE = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/dlp/providers/Microsoft.OperationalInsights/workspaces/sentinel"
TABLE_PATH = f"{WORKSPACE}/tables/DLPEnrichedAlerts_CL"


def shipped_dcr() -> dict:
    """deploy/sentinel/dcr.json as Resource Manager returns it once deployed."""
    dcr = json.loads((ROOT / "deploy" / "sentinel" / "dcr.json").read_text())
    dcr["id"] = DCR_ID
    dcr["properties"]["immutableId"] = RULE
    dcr["properties"]["destinations"]["logAnalytics"][0]["workspaceResourceId"] = WORKSPACE
    return dcr


def shipped_table() -> dict:
    """deploy/sentinel/table.json as Resource Manager returns it once created (plus the standard columns)."""
    table = json.loads((ROOT / "deploy" / "sentinel" / "table.json").read_text())
    table["properties"]["schema"]["standardColumns"] = [{"name": "TenantId", "type": "guid"}]
    return table


class Arm:
    """Resource Manager's GET of the DCR and of the workspace table; the ingestion path records any upload."""

    def __init__(self, httpserver, dcr: dict | None) -> None:
        self.dcr = dcr
        self.table: dict | None = shipped_table()
        self.status = 200
        self.requests: list[tuple[str, str]] = []
        httpserver.expect_request(DCR_ID).respond_with_handler(self.handle)
        httpserver.expect_request(TABLE_PATH).respond_with_handler(self.handle)
        httpserver.expect_request(f"/dataCollectionRules/{RULE}/streams/{STREAM}").respond_with_handler(self.handle)
        self.url = httpserver.url_for("/").rstrip("/")

    def handle(self, request: Request) -> Response:
        self.requests.append((request.method, request.path))
        if request.path == TABLE_PATH:
            assert request.args.get("api-version") == "2022-10-01"
            if self.table is None:
                return Response(json.dumps({"error": {"code": "ResourceNotFound"}}), 404, content_type="application/json")
            return Response(json.dumps(self.table), content_type="application/json")
        if request.path != DCR_ID:
            return Response(status=204)
        assert request.args.get("api-version") == "2023-03-11"
        if self.status != 200 or self.dcr is None:
            return Response(json.dumps({"error": {"code": "ResourceNotFound"}}), self.status if self.status != 200 else 404, content_type="application/json")
        return Response(json.dumps(self.dcr), content_type="application/json")


def sentinel_entry(arm: Arm, **settings) -> dict:
    values = {"endpoint": arm.url, "rule_id": RULE, "dcr_resource_id": DCR_ID, "management_endpoint": arm.url, **settings}
    return sink_entry("sentinel", "sentinel", {k: v for k, v in values.items() if v is not None})


async def test_sentinel_the_shipped_dcr_matches_the_rows(httpserver, write_config):
    arm = Arm(httpserver, shipped_dcr())
    credential = StaticCredential()
    report = await doctor(write_config, sinks=[sentinel_entry(arm)], credential=credential)
    assert set(statuses(report, "sink sentinel").values()) == {"ok"}, lines(report, "sink sentinel")
    assert {"ingestion token", "Resource Manager token", "DCR immutable id", "DCR stream", "DCR data flow", "table DLPEnrichedAlerts_CL"} == set(statuses(report, "sink sentinel"))
    assert ("https://monitor.azure.com/.default",) in credential.scopes
    assert arm.requests == [("GET", DCR_ID), ("GET", TABLE_PATH)]  # the ingestion endpoint got no row


async def test_sentinel_a_missing_table_or_one_without_a_column_is_204_but_no_data(httpserver, write_config):
    arm = Arm(httpserver, shipped_dcr())
    arm.table = None
    report = await doctor(write_config, sinks=[sentinel_entry(arm)])
    line = lines(report, "sink sentinel")[-1]
    assert line.startswith("failed   sink sentinel: table DLPEnrichedAlerts_CL: not in the workspace: uploads are accepted (204) but no row is kept")
    table = shipped_table()
    table["properties"]["schema"]["columns"] = [c for c in table["properties"]["schema"]["columns"] if c["name"] != "Enrichments"]
    arm.table = table
    report = await doctor(write_config, sinks=[sentinel_entry(arm)])
    assert "lacks columns the stream sends (dropped): Enrichments" in lines(report, "sink sentinel")[-1]


async def test_sentinel_stream_missing_a_column_or_with_another_type_fails(httpserver, write_config):
    dcr = shipped_dcr()
    columns = dcr["properties"]["streamDeclarations"][STREAM]["columns"]
    columns[:] = [c for c in columns if c["name"] != "TriageScore"]
    next(c for c in columns if c["name"] == "FileCount")["type"] = "string"
    arm = Arm(httpserver, dcr)
    report = await doctor(write_config, sinks=[sentinel_entry(arm)])
    (line,) = [line for line in lines(report, "sink sentinel") if "DCR stream" in line]
    assert line.startswith("failed") and "lacks (dropped silently): TriageScore" in line and "FileCount (string, rows send int)" in line
    assert "schema sentinel --dcr" in line


@pytest.mark.parametrize(
    ("change", "check", "says"),
    [
        (lambda p: p["streamDeclarations"].clear(), "DCR stream", "no stream Custom-DLPEnrichedAlerts in the DCR"),
        (lambda p: p.__setitem__("dataFlows", []), "DCR data flow", "uploads succeed (204) but no row reaches a table"),
        (lambda p: p.__setitem__("immutableId", "dcr-other"), "DCR immutable id", "the DCR's is dcr-other"),
    ],
    ids=["stream-missing", "no-data-flow", "other-rule"],
)
async def test_sentinel_dcr_mismatches_fail(httpserver, write_config, change, check, says):
    dcr = copy.deepcopy(shipped_dcr())
    change(dcr["properties"])
    arm = Arm(httpserver, dcr)
    report = await doctor(write_config, sinks=[sentinel_entry(arm)])
    assert statuses(report, "sink sentinel")[check] == "failed"
    assert any(says in line for line in lines(report, "sink sentinel"))


async def test_sentinel_dcr_not_readable_or_not_there(httpserver, write_config):
    arm = Arm(httpserver, shipped_dcr())
    arm.status = 403
    report = await doctor(write_config, sinks=[sentinel_entry(arm)])
    assert "Reader on the DCR" in lines(report, "sink sentinel")[-1]
    arm.status = 404
    report = await doctor(write_config, sinks=[sentinel_entry(arm)])
    assert "no DCR at dcr_resource_id (HTTP 404)" in lines(report, "sink sentinel")[-1]


async def test_sentinel_without_dcr_resource_id_skips_the_stream_check(httpserver, write_config):
    arm = Arm(httpserver, shipped_dcr())
    report = await doctor(write_config, sinks=[sentinel_entry(arm, dcr_resource_id=None)])
    assert statuses(report, "sink sentinel") == {"ingestion token": "ok", "DCR stream": "skipped"}
    assert not arm.requests


# -- incident write-back: Defender XDR through Graph, Sentinel through Resource Manager -----------

INCIDENT_WORKSPACE = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-sec/providers/Microsoft.OperationalInsights/workspaces/law-sec"
GRANT_DOCS = 'docs/deploy.md, "Incident write-back permissions"'


@pytest.fixture
def graph_security(httpserver):
    server = GraphSecurity()
    server.install(httpserver)
    server.add_incident("48213", alert_ids=("da637", "da638"))
    server.add_incident("48214")
    return server


@pytest.fixture
def sentinel_incidents(httpserver):
    server = SentinelIncidents(INCIDENT_WORKSPACE)
    server.install(httpserver)
    server.add_incident("48213")
    server.add_incident("48214")
    return server


def defender_incident_entry(httpserver, **settings) -> dict:
    return sink_entry("defender", "defender_incident", {"graph_url": httpserver.url_for("/v1.0"), "timeout_seconds": 5, **settings})


def sentinel_incident_entry(httpserver, **settings) -> dict:
    values = {"workspace_resource_id": INCIDENT_WORKSPACE, "arm_url": httpserver.url_for("/").rstrip("/"), "graph_url": httpserver.url_for("/v1.0"), "timeout_seconds": 5, **settings}
    return sink_entry("incidents", "sentinel_incident", values)


def only_reads(*servers) -> bool:
    return all(not server.writes and all(method == "GET" for method, _, _ in server.requests) for server in servers)


def check_line(report: DoctorReport, component: str, name: str) -> str:
    (line,) = [line for line in lines(report, component) if line.split(": ", 2)[1] == name]
    return line


async def test_defender_incident_token_one_incident_and_one_alert_read(httpserver, graph_security, write_config):
    credential = StaticCredential()
    report = await doctor(write_config, sinks=[defender_incident_entry(httpserver)], credential=credential)
    assert statuses(report, "sink defender") == {"Graph token": "ok", "incident read": "ok", "alert lookup": "ok"}, lines(report, "sink defender")
    assert ("https://graph.microsoft.com/.default",) in credential.scopes
    read = check_line(report, "sink defender", "incident read")
    assert "SecurityIncident.ReadWrite.All" in read and "a read cannot prove" in read  # the read proves read access only
    assert [path for _, path, _ in graph_security.requests] == ["/v1.0/security/incidents", "/v1.0/security/alerts_v2"]
    assert [query.get("$top") for query in graph_security.queries] == ["1", "1"]  # one item each
    assert only_reads(graph_security)


async def test_defender_incident_without_the_incident_permission_names_it(httpserver, graph_security, write_config):
    graph_security.granted = False
    report = await doctor(write_config, sinks=[defender_incident_entry(httpserver)])
    line = check_line(report, "sink defender", "incident read")
    assert line.startswith("failed") and "HTTP 403" in line
    assert "SecurityIncident.ReadWrite.All" in line and "SecurityIncident.Read.All" in line
    assert GRANT_DOCS in line and "up to 30 minutes" in line
    assert only_reads(graph_security)


async def test_defender_incident_read_only_permission_passes_the_read_but_says_it_is_not_enough(httpserver, graph_security, write_config):
    graph_security.read_only = True  # SecurityIncident.Read.All: the list answers, a write would not
    report = await doctor(write_config, sinks=[defender_incident_entry(httpserver)])
    line = check_line(report, "sink defender", "incident read")
    assert line.startswith("ok") and "needs SecurityIncident.ReadWrite.All" in line
    assert only_reads(graph_security)


async def test_defender_incident_without_the_alert_permission_says_streaming_rows_cannot_be_placed(httpserver, graph_security, write_config):
    graph_security.alerts_granted = False
    report = await doctor(write_config, sinks=[defender_incident_entry(httpserver)])
    assert statuses(report, "sink defender") == {"Graph token": "ok", "incident read": "ok", "alert lookup": "failed"}
    line = check_line(report, "sink defender", "alert lookup")
    assert "HTTP 403" in line and "SecurityAlert.Read.All" in line and "Streaming API" in line and GRANT_DOCS in line


async def test_defender_incident_token_refused_by_graph(httpserver, graph_security, write_config):
    graph_security.token = "another-token"  # the server wants another tenant's or audience's token
    report = await doctor(write_config, sinks=[defender_incident_entry(httpserver)])
    line = check_line(report, "sink defender", "incident read")
    assert line.startswith("failed") and "token refused (HTTP 401" in line and "scope" in line


async def test_defender_incident_without_a_token_skips_the_reads(httpserver, graph_security, write_config):
    report = await doctor(write_config, sinks=[defender_incident_entry(httpserver)], credential=NoToken())
    assert statuses(report, "sink defender") == {"Graph token": "failed", "incident read": "skipped", "alert lookup": "skipped"}
    assert "az login" in lines(report, "sink defender")[0] and not graph_security.requests


async def test_defender_incident_unreachable_graph(write_config):
    report = await doctor(write_config, sinks=[sink_entry("defender", "defender_incident", {"graph_url": "http://127.0.0.1:9/v1.0", "timeout_seconds": 2})])
    line = check_line(report, "sink defender", "incident read")
    assert line.startswith("failed") and "cannot reach http://127.0.0.1:9/v1.0 (ConnectError)" in line and "fix: check graph_url" in line


async def test_defender_incident_graph_url_that_is_not_https_is_a_settings_line(write_config):
    report = await doctor(write_config, sinks=[sink_entry("defender", "defender_incident", {"graph_url": "http://graph.contoso.example/v1.0"})])
    (line,) = lines(report, "sink defender")
    assert line.startswith("failed   sink defender: settings: graph_url must be an https:// URL") and "Traceback" not in line


async def test_sentinel_incident_arm_token_one_incident_and_the_alert_lookup(httpserver, sentinel_incidents, graph_security, write_config):
    credential = StaticCredential()
    report = await doctor(write_config, sinks=[sentinel_incident_entry(httpserver)], credential=credential)
    assert statuses(report, "sink incidents") == {"Resource Manager token": "ok", "incident read": "ok", "Graph token": "ok", "alert lookup": "ok"}, lines(report, "sink incidents")
    assert [path for _, path, _ in sentinel_incidents.requests] == [sentinel_incidents.prefix]
    assert sentinel_incidents.queries == [{"api-version": "2025-09-01", "$top": "1"}]
    read = check_line(report, "sink incidents", "incident read")
    assert "law-sec" in read and "Microsoft Sentinel Responder" in read and "a read cannot prove" in read
    assert {("https://management.azure.com/.default",), ("https://graph.microsoft.com/.default",)} <= set(credential.scopes)
    assert only_reads(sentinel_incidents, graph_security)


async def test_sentinel_incident_without_a_role_names_sentinel_responder(httpserver, sentinel_incidents, graph_security, write_config):
    sentinel_incidents.granted = False
    report = await doctor(write_config, sinks=[sentinel_incident_entry(httpserver)])
    line = check_line(report, "sink incidents", "incident read")
    assert line.startswith("failed") and "HTTP 403 AuthorizationFailed" in line
    assert "Microsoft Sentinel Responder" in line and "on the workspace" in line and "up to 30 minutes" in line and GRANT_DOCS in line
    assert only_reads(sentinel_incidents, graph_security)


async def test_sentinel_incident_reader_role_passes_the_read_but_says_responder_is_needed(httpserver, sentinel_incidents, graph_security, write_config):
    sentinel_incidents.read_only = True  # Microsoft Sentinel Reader
    report = await doctor(write_config, sinks=[sentinel_incident_entry(httpserver)])
    line = check_line(report, "sink incidents", "incident read")
    assert line.startswith("ok") and "needs the Microsoft Sentinel Responder role on the workspace" in line
    assert only_reads(sentinel_incidents, graph_security)


async def test_sentinel_incident_workspace_not_found_or_not_onboarded(httpserver, sentinel_incidents, graph_security, write_config):
    sentinel_incidents.exists = False
    report = await doctor(write_config, sinks=[sentinel_incident_entry(httpserver)])
    line = check_line(report, "sink incidents", "incident read")
    assert line.startswith("failed") and "HTTP 404 ResourceNotFound" in line
    assert "no workspace at workspace_resource_id, or Microsoft Sentinel is not onboarded on it" in line and "fix: check the subscription" in line


async def test_sentinel_incident_other_api_version_rejected(httpserver, sentinel_incidents, graph_security, write_config):
    report = await doctor(write_config, sinks=[sentinel_incident_entry(httpserver, api_version="2019-01-01-preview")])
    line = check_line(report, "sink incidents", "incident read")
    assert line.startswith("failed") and "HTTP 400 InvalidApiVersionParameter" in line and "api_version" in line


async def test_sentinel_incident_token_refused_by_resource_manager(httpserver, sentinel_incidents, graph_security, write_config):
    sentinel_incidents.token = "another-token"
    report = await doctor(write_config, sinks=[sentinel_incident_entry(httpserver)])
    line = check_line(report, "sink incidents", "incident read")
    assert line.startswith("failed") and "token refused (HTTP 401" in line


async def test_sentinel_incident_without_the_alert_permission_fails_the_lookup(httpserver, sentinel_incidents, graph_security, write_config):
    graph_security.alerts_granted = False
    report = await doctor(write_config, sinks=[sentinel_incident_entry(httpserver)])
    assert statuses(report, "sink incidents")["alert lookup"] == "failed"
    assert "SecurityAlert.Read.All" in check_line(report, "sink incidents", "alert lookup")


async def test_sentinel_incident_without_a_token_skips_the_reads(httpserver, sentinel_incidents, graph_security, write_config):
    report = await doctor(write_config, sinks=[sentinel_incident_entry(httpserver)], credential=NoToken())
    assert statuses(report, "sink incidents") == {"Resource Manager token": "failed", "incident read": "skipped", "Graph token": "failed", "alert lookup": "skipped"}
    assert not sentinel_incidents.requests and not graph_security.requests


async def test_sentinel_incident_unreachable_resource_manager(write_config):
    entry = sink_entry("incidents", "sentinel_incident", {"workspace_resource_id": INCIDENT_WORKSPACE, "arm_url": "http://127.0.0.1:9", "graph_url": "http://127.0.0.1:9/v1.0", "timeout_seconds": 2})
    report = await doctor(write_config, sinks=[entry])
    line = check_line(report, "sink incidents", "incident read")
    assert line.startswith("failed") and "cannot reach http://127.0.0.1:9 (ConnectError)" in line and "fix: check arm_url" in line
    assert "fix: check graph_url" in check_line(report, "sink incidents", "alert lookup")


# -- Blob and Table on Azurite -------------------------------------------------------------------


def wrong_key(connection_string: str) -> str:
    return connection_string.replace("AccountKey=", "AccountKey=AAAA", 1)


async def test_blob_lake_container_present_missing_or_refused(azurite, write_config, monkeypatch):
    from azure.core.exceptions import ResourceExistsError
    from azure.storage.blob.aio import BlobServiceClient

    async with BlobServiceClient.from_connection_string(azurite.connection_string) as service:
        try:
            await service.create_container("doctor-lake")
        except ResourceExistsError:  # made by an earlier run on this Azurite
            pass
    monkeypatch.setenv("TEST_LAKE_CONNECTION", azurite.connection_string)
    present = sink_entry("lake", "blob", {"connection_string_env": "TEST_LAKE_CONNECTION", "container": "doctor-lake"})
    missing = sink_entry("lake2", "blob", {"connection_string_env": "TEST_LAKE_CONNECTION", "container": "doctor-none"})
    created = sink_entry("lake3", "blob", {"connection_string_env": "TEST_LAKE_CONNECTION", "container": "doctor-none", "create_container": True})
    report = await doctor(write_config, sinks=[present, missing, created])
    assert statuses(report, "sink lake") == {"container": "ok"}
    assert statuses(report, "sink lake2") == {"container": "failed"} and "does not exist" in lines(report, "sink lake2")[0]
    assert statuses(report, "sink lake3") == {"container": "ok"} and "created on first use" in lines(report, "sink lake3")[0]
    async with BlobServiceClient.from_connection_string(azurite.connection_string) as service:
        assert [c.name async for c in service.list_containers(name_starts_with="doctor-none")] == []  # nothing was created

    monkeypatch.setenv("TEST_LAKE_CONNECTION", wrong_key(azurite.connection_string))
    report = await doctor(write_config, sinks=[present])
    (line,) = lines(report, "sink lake")
    assert line.startswith("failed") and "sign-in refused (HTTP 403" in line and "account key" in line


async def test_storage_through_an_identity_without_a_token_fails_before_any_request(write_config):
    state = {"kind": "azure_table", "account_url": "https://contosodlp.table.core.windows.net"}
    lake = sink_entry("lake", "blob", {"account_url": "https://contosodlp.blob.core.windows.net", "container": "dlp-alerts"})
    report = await doctor(write_config, state=state, sinks=[lake], credential=NoToken())
    for component in ("state", "sink lake"):
        (line,) = lines(report, component)
        assert line.startswith("failed") and "no token for https://storage.azure.com/.default" in line and "az login" in line


PERMISSION_MISMATCH = "This request is not authorized to perform this operation using this permission."


@pytest.mark.parametrize("service", ["blob", "table"])
async def test_storage_without_the_data_role_names_the_role(httpserver, write_config, monkeypatch, service):
    """Azurite has no roles: a local server answers as Storage does to an identity without a data role."""

    def refuse(request: Request) -> Response:
        headers = {"x-ms-error-code": "AuthorizationPermissionMismatch"}
        if service == "table":
            body = json.dumps({"odata.error": {"code": "AuthorizationPermissionMismatch", "message": {"lang": "en-US", "value": PERMISSION_MISMATCH}}})
            return Response(body, 403, headers=headers, content_type="application/json;odata=minimalmetadata")
        return Response(b"" if request.method == "HEAD" else f"<?xml version=\"1.0\"?><Error><Code>AuthorizationPermissionMismatch</Code><Message>{PERMISSION_MISMATCH}</Message></Error>", 403, headers=headers, content_type="application/xml")

    httpserver.expect_request(re.compile(f"^/{ACCOUNT}.*")).respond_with_handler(refuse)
    endpoint = httpserver.url_for(f"/{ACCOUNT}")
    endpoint_key = "TableEndpoint" if service == "table" else "BlobEndpoint"
    monkeypatch.setenv("TEST_STORAGE", f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey=eA==;{endpoint_key}={endpoint};")
    if service == "table":
        report = await doctor(write_config, state={"kind": "azure_table", "connection_string_env": "TEST_STORAGE", "table": "dlpstate"})
        (line,) = lines(report, "state")
        role = "Storage Table Data Contributor"
    else:
        report = await doctor(write_config, sinks=[sink_entry("lake", "blob", {"connection_string_env": "TEST_STORAGE", "container": "dlp-alerts"})])
        (line,) = lines(report, "sink lake")
        role = "Storage Blob Data Contributor"
    assert line.startswith("failed") and "no data role (HTTP 403 AuthorizationPermissionMismatch)" in line
    assert f"give it '{role}'" in line and "up to 30 minutes" in line


async def test_blob_unreachable_account_fails(write_config, monkeypatch):
    monkeypatch.setenv("TEST_LAKE_CONNECTION", f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey=eA==;BlobEndpoint=http://127.0.0.1:9/{ACCOUNT};")
    report = await doctor(write_config, sinks=[sink_entry("lake", "blob", {"connection_string_env": "TEST_LAKE_CONNECTION", "container": "x-lake"})])
    (line,) = lines(report, "sink lake")
    assert line.startswith("failed") and "cannot reach the service" in line


async def test_table_state_and_blob_dead_letters(azurite, write_config, monkeypatch):
    monkeypatch.setenv("TEST_STORAGE", azurite.connection_string)
    state = {"kind": "azure_table", "connection_string_env": "TEST_STORAGE", "table": "doctorstate"}
    dead = {"kind": "blob", "connection_string_env": "TEST_STORAGE", "container": "doctor-dead"}
    report = await doctor(write_config, state=state, dead_letter=dead)
    assert statuses(report, "state") == {"Table state": "ok"} and "created on first use" in lines(report, "state")[0]
    assert statuses(report, "dead letters") == {"Blob container": "ok"}
    monkeypatch.setenv("TEST_STORAGE", wrong_key(azurite.connection_string))
    report = await doctor(write_config, state=state, dead_letter=dead)
    assert statuses(report, "state") == {"Table state": "failed"} and statuses(report, "dead letters") == {"Blob container": "failed"}
    assert "sign-in refused" in lines(report, "state")[0]


# -- Event Hub -----------------------------------------------------------------------------------

UNREACHABLE_HUB = "Endpoint=sb://127.0.0.1:9;SharedAccessKeyName=k;SharedAccessKey=v;EntityPath=hub;UseDevelopmentEmulator=true"


async def test_eventhub_unreachable_namespace_fails(write_config, monkeypatch):
    monkeypatch.setenv("TEST_EH_CONNECTION", UNREACHABLE_HUB)
    report = await doctor(write_config, sinks=[sink_entry("fanout", "eventhub", {"connection_string_env": "TEST_EH_CONNECTION"})])
    (line,) = lines(report, "sink fanout")
    assert line.startswith("failed") and ("cannot reach the namespace" in line or "no answer within" in line)


async def test_consumer_hub_unreachable_and_checkpoint_container_checked(azurite, write_config, monkeypatch):
    monkeypatch.setenv("HUB_CONN", UNREACHABLE_HUB)
    monkeypatch.setenv("STORAGE_CONN", azurite.connection_string)
    consumer = {"connection_string_env": "HUB_CONN", "checkpoint_connection_string_env": "STORAGE_CONN", "eventhub_name": "hub", "checkpoint_container": "doctor-cp"}
    report = await doctor(write_config, consumer=consumer)
    assert statuses(report, "consumer") == {"Event Hub": "failed", "checkpoint container": "ok"}


EMULATOR_CONFIG = {
    "UserConfig": {
        "NamespaceConfig": [{"Type": "EventHub", "Name": "emulatorNs1", "Entities": [{"Name": "dlp", "PartitionCount": "2", "ConsumerGroups": [{"Name": "pipeline"}]}]}],
        "LoggingConfig": {"Type": "File"},
    }
}


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(not docker_available(), reason="a reachable hub and its consumer group need the Event Hubs emulator, which runs only as a Docker container (no Docker engine answers)")
def test_eventhub_reachable_hub_and_its_consumer_group_on_the_emulator(tmp_path, write_config, monkeypatch):
    import asyncio

    from testcontainers.core.container import DockerContainer
    from testcontainers.core.network import Network
    from testcontainers.core.waiting_utils import wait_for_logs

    from tests.support.azurite import KEY

    (tmp_path / "Config.json").write_text(json.dumps(EMULATOR_CONFIG))
    with Network() as network:
        storage = DockerContainer("mcr.microsoft.com/azure-storage/azurite").with_network(network).with_network_aliases("azurite").with_exposed_ports(10000, 10001, 10002)
        with storage:
            emulator = (
                DockerContainer("mcr.microsoft.com/azure-messaging/eventhubs-emulator:latest")
                .with_network(network)
                .with_env("BLOB_SERVER", "azurite")
                .with_env("METADATA_SERVER", "azurite")
                .with_env("ACCEPT_EULA", "Y")
                .with_volume_mapping(str(tmp_path / "Config.json"), "/Eventhubs_Emulator/ConfigFiles/Config.json")
                .with_exposed_ports(5672)
            )
            with emulator:
                wait_for_logs(emulator, "Emulator Service is Successfully Up", timeout=180)
                host, port = emulator.get_container_host_ip(), emulator.get_exposed_port(5672)
                monkeypatch.setenv("HUB_CONN", f"Endpoint=sb://{host}:{port};SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;")
                blob = f"http://{storage.get_container_host_ip()}:{storage.get_exposed_port(10000)}/{ACCOUNT}"
                monkeypatch.setenv("STORAGE_CONN", f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint={blob};")
                reports = {}
                for group in ("pipeline", "nosuch"):
                    consumer = {"connection_string_env": "HUB_CONN", "checkpoint_connection_string_env": "STORAGE_CONN", "eventhub_name": "dlp", "consumer_group": group}
                    fanout = sink_entry("fanout", "eventhub", {"connection_string_env": "HUB_CONN", "eventhub_name": "dlp"})
                    reports[group] = asyncio.run(doctor(write_config, consumer=consumer, sinks=[fanout]))
    assert statuses(reports["pipeline"], "consumer") == {"Event Hub": "ok", "checkpoint container": "ok"}
    assert "consumer group pipeline opens" in lines(reports["pipeline"], "consumer")[0]
    assert statuses(reports["pipeline"], "sink fanout") == {"hub": "ok"}
    (missing,) = [line for line in lines(reports["nosuch"], "consumer") if "Event Hub" in line]
    assert missing.startswith("failed") and "no consumer group nosuch" in missing
