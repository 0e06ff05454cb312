"""telemetry: generic HTTP JSON lookup, lookup tables, Log Analytics — against local servers."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from werkzeug import Response

from pipeline.errors import ConfigError
from pipeline.runner import Runner
from tests.support.alerts import StaticCredential, graph_alert, message
from tests.support.config import LAKE_SINK_TOML

LOCAL = 'allow_private_hosts = ["localhost", "127.0.0.1"]'


def config(sources: str, timeout: float = 5) -> str:
    return f"""
[assembly]
settle_seconds = 0
[[enrichers]]
name = "telemetry"
timeout_seconds = {timeout}
[enrichers.settings]
window_minutes = 30
{sources}
""" + LAKE_SINK_TOML


def okta(url: str, extra: str = "") -> str:
    return f"""
[[enrichers.settings.http]]
name = "okta"
url = "{url}/api/v1/logs"
params = {{ filter = 'actor.alternateId eq "{{upn}}"', since = "{{start}}", until = "{{end}}" }}
headers_from_env = {{ Authorization = "TEST_OKTA_AUTH" }}
allowed_hosts = ["localhost", "127.0.0.1"]
{LOCAL}
timeout_seconds = 0.5
max_retries = 1
fields = {{ last_event = "eventType", ip = "client.ipAddress", country = "client.geographicalContext.country", outcome = "outcome.result" }}
{extra}
"""


def lake(runner: Runner) -> dict[str, dict]:
    root = runner.loaded.data_path("lake")
    return {json.loads(line)["alert"]["alert_id"]: json.loads(line) for path in root.rglob("*.jsonl") for line in path.read_text().splitlines()}


async def run(loaded, *alerts):
    runner = Runner(loaded)
    runner.chain.slots[0].plugin.credential = StaticCredential()
    async with runner:
        report = await runner.process_batch([message(*alerts)])
        return report, lake(runner)


EVENTS = [
    {"eventType": "user.session.start", "client": {"ipAddress": "203.0.113.7", "geographicalContext": {"country": "France"}}, "outcome": {"result": "SUCCESS"}},
    {"eventType": "user.authentication.sso", "client": {"ipAddress": "203.0.113.8"}},
]


@pytest.fixture
def okta_auth(monkeypatch):
    monkeypatch.setenv("TEST_OKTA_AUTH", "SSWS test-api-token")


async def test_http_lookup_templates_the_request_and_maps_fields(httpserver, write_config, okta_auth):
    seen = []

    def handle(request):
        seen.append(request)
        return Response(json.dumps(EVENTS), content_type="application/json")

    httpserver.expect_request("/api/v1/logs", method="GET").respond_with_handler(handle)
    report, records = await run(write_config(config(okta(httpserver.url_for("").rstrip("/")))), graph_alert("a", upn="Megan.Bowen@contoso.com", created="2025-03-14T09:12:44Z"), graph_alert("b", upn="megan.bowen@contoso.com", created="2025-03-14T09:12:44Z"))
    okta_result = records["a"]["enrichments"]["telemetry"]["sources"]["okta"]
    assert okta_result == {"kind": "http", "found": True, "count": 2, "fields": {"last_event": "user.session.start", "ip": "203.0.113.7", "country": "France", "outcome": "SUCCESS"}}
    assert len(seen) == 1  # the second alert of the same user and time is served by the cache
    request = seen[0]
    assert request.headers["Authorization"] == "SSWS test-api-token"
    assert request.args["filter"] == 'actor.alternateId eq "megan.bowen@contoso.com"'
    assert (request.args["since"], request.args["until"]) == ("2025-03-14T08:42:44Z", "2025-03-14T09:42:44Z")


async def test_http_lookup_retries_429_after_retry_after_then_503_exhausts(httpserver, write_config, okta_auth):
    calls = []

    def handle(request):
        calls.append(time.monotonic())
        if len(calls) == 1:
            return Response("{}", status=429, headers={"Retry-After": "0.2"})
        return Response(json.dumps(EVENTS), content_type="application/json")

    httpserver.expect_request("/api/v1/logs").respond_with_handler(handle)
    _, records = await run(write_config(config(okta(httpserver.url_for("").rstrip("/")))), graph_alert("a", upn="x@contoso.com"))
    assert len(calls) == 2 and calls[1] - calls[0] >= 0.2
    assert records["a"]["enrichments"]["telemetry"]["sources"]["okta"]["found"] is True


async def test_source_down_fails_the_enricher_and_the_alert_is_delivered(httpserver, write_config, okta_auth):
    httpserver.expect_request("/api/v1/logs").respond_with_data("busy", status=503)
    report, records = await run(write_config(config(okta(httpserver.url_for("").rstrip("/")))), graph_alert("a", upn="x@contoso.com"))
    assert report.delivered["lake"] == 1
    status = records["a"]["enrichment_status"]["telemetry"]
    assert status["state"] == "failed" and "503" in status["error"] and "x@contoso.com" not in status["error"]


async def test_one_failed_source_among_several_is_reported_in_errors(httpserver, write_config, okta_auth, tmp_path):
    httpserver.expect_request("/api/v1/logs").respond_with_data("<html>not json</html>", content_type="application/json")
    (tmp_path / "hosts.csv").write_text("upn,vip,team\nx@contoso.com,yes,red\n")
    tables = '[[enrichers.settings.tables]]\nname = "watchlist"\npath = "hosts.csv"\nkey = "upn"\nkey_column = "upn"'
    _, records = await run(write_config(config(okta(httpserver.url_for("").rstrip("/")) + tables)), graph_alert("a", upn="x@contoso.com"))
    telemetry = records["a"]["enrichments"]["telemetry"]
    assert records["a"]["enrichment_status"]["telemetry"]["state"] == "ok"
    assert "malformed JSON" in telemetry["errors"]["okta"]
    assert telemetry["sources"]["watchlist"] == {"kind": "table", "found": True, "count": None, "fields": {"vip": "yes", "team": "red"}}


async def test_slow_source_is_cut_by_its_timeout(httpserver, write_config, okta_auth):
    import threading

    done = threading.Event()

    def slow(request):
        time.sleep(1.0)
        done.set()
        return Response("[]", content_type="application/json")

    httpserver.expect_request("/api/v1/logs").respond_with_handler(slow)
    started = time.monotonic()
    _, records = await run(write_config(config(okta(httpserver.url_for("").rstrip("/")).replace("max_retries = 1", "max_retries = 0"))), graph_alert("a", upn="x@contoso.com"))
    assert time.monotonic() - started < 0.9
    assert records["a"]["enrichment_status"]["telemetry"]["state"] == "timed_out"
    done.wait(2)  # the local server answers one request at a time: let it finish before the next test


async def test_one_slow_lookup_fails_only_the_alert_that_needs_it(write_config, okta_auth):
    """The batch's lookups run together; one that outlives the enricher's lookup budget (80 % of its
    timeout) fails its own alert only, and the batch call ends within the enricher's timeout."""
    from pytest_httpserver import HTTPServer

    server = HTTPServer(threaded=True)  # answers the slow and the fast request at the same time
    server.start()

    def handle(request):
        if "slow@" in request.args["filter"]:
            time.sleep(1.0)
        return Response(json.dumps(EVENTS), content_type="application/json")

    server.expect_request("/api/v1/logs").respond_with_handler(handle)
    try:
        source = okta(server.url_for("").rstrip("/")).replace("timeout_seconds = 0.5", "timeout_seconds = 3")
        started = time.monotonic()
        _, records = await run(write_config(config(source, timeout=0.5)), graph_alert("fast", upn="fast@contoso.com"), graph_alert("slow", upn="slow@contoso.com"))
        assert time.monotonic() - started < 0.9
    finally:
        time.sleep(0.7)  # let the slow handler finish before the server stops
        server.clear()
        server.stop()
    assert records["fast"]["enrichment_status"]["telemetry"]["state"] == "ok"
    assert records["fast"]["enrichments"]["telemetry"]["sources"]["okta"]["found"] is True
    slow = records["slow"]["enrichment_status"]["telemetry"]
    assert slow["state"] == "timed_out" and "okta: no answer in time" in slow["error"]


async def test_redirect_to_another_host_is_refused(httpserver, write_config, okta_auth):
    httpserver.expect_request("/api/v1/logs").respond_with_data("", status=302, headers={"Location": "https://attacker.example/steal"})
    _, records = await run(write_config(config(okta(httpserver.url_for("").rstrip("/")))), graph_alert("a", upn="x@contoso.com"))
    assert "redirect to another host refused" in records["a"]["enrichment_status"]["telemetry"]["error"]


async def test_private_addresses_are_refused_unless_allowed(write_config, okta_auth):
    sources = okta("https://localhost:9").replace(LOCAL, "")
    _, records = await run(write_config(config(sources)), graph_alert("a", upn="x@contoso.com"))
    assert "private or local address" in records["a"]["enrichment_status"]["telemetry"]["error"]


def test_url_host_outside_the_allow_list_and_missing_env_are_config_errors(write_config, monkeypatch):
    monkeypatch.setenv("TEST_OKTA_AUTH", "x")
    with pytest.raises(ConfigError, match="not in allowed_hosts"):
        Runner(write_config(config(okta("https://evil.example.com"))))
    monkeypatch.delenv("TEST_OKTA_AUTH")
    with pytest.raises(ConfigError, match="TEST_OKTA_AUTH"):
        Runner(write_config(config(okta("https://localhost"))))


async def test_lookup_tables_by_upn_and_device_are_reloaded_when_changed(write_config, tmp_path, fixture_bytes):
    (tmp_path / "users.csv").write_text("EmailAddress,risk_level\nmegan.bowen@contoso.com,high\n")
    (tmp_path / "devices.jsonl").write_text(json.dumps({"host": "contoso-lt-0042", "edr": "CrowdStrike", "last_seen": "2025-03-14"}) + "\n")
    sources = """
[[enrichers.settings.tables]]
name = "hr_risk"
path = "users.csv"
key = "upn"
key_column = "EmailAddress"
check_seconds = 0
[[enrichers.settings.tables]]
name = "edr"
path = "devices.jsonl"
key = "device"
key_column = "host"
columns = ["edr"]
"""
    from pipeline.runner import Message

    runner = Runner(write_config(config(sources)))
    async with runner:
        await runner.process_batch([Message(fixture_bytes("mgmt_api_dlp_rule_match_endpoint_variant.json"))])
        (record,) = lake(runner).values()
        telemetry = record["enrichments"]["telemetry"]["sources"]
        assert telemetry["hr_risk"]["fields"] == {"risk_level": "high"}
        assert telemetry["edr"] == {"kind": "table", "found": True, "count": None, "fields": {"edr": "CrowdStrike"}}  # FQDN matched by host name
        (tmp_path / "users.csv").write_text("EmailAddress,risk_level\nmegan.bowen@contoso.com,low\n")
        os.utime(tmp_path / "users.csv", ns=(time.time_ns() + 10**9,) * 2)
        await runner.process_batch([message(graph_alert("g", upn="megan.bowen@contoso.com"), graph_alert("u", upn="nobody@contoso.com"))])
        records = lake(runner)
    assert records["g"]["enrichments"]["telemetry"]["sources"]["hr_risk"]["fields"] == {"risk_level": "low"}
    assert records["u"]["enrichments"]["telemetry"]["sources"]["hr_risk"] == {"kind": "table", "found": False, "count": None, "fields": {}}
    assert "edr" not in records["u"]["enrichments"]["telemetry"]["sources"]  # no device: not applicable


class LogAnalyticsServer:
    """`POST /v1/workspaces/{id}/query` per the Log Analytics query API: tables of columns and rows."""

    def __init__(self, httpserver, workspace="ws-1"):
        self.bodies: list[dict] = []
        self.mode = "ok"
        self.answered = threading.Event()
        httpserver.expect_request(f"/v1/workspaces/{workspace}/query", method="POST").respond_with_handler(self.handle)
        self.endpoint = httpserver.url_for("/v1")

    def handle(self, request):
        self.bodies.append(request.get_json())
        if self.mode == "slow":
            time.sleep(0.8)
            self.answered.set()
        if self.mode == "throttled":
            return Response(json.dumps({"error": {"code": "ThrottledError"}}), status=429, headers={"Retry-After": "0"}, content_type="application/json")
        tables = [
            {
                "name": "PrimaryResult",
                "columns": [{"name": "TimeGenerated", "type": "datetime"}, {"name": "DeviceVendor", "type": "string"}, {"name": "Activity", "type": "string"}, {"name": "Count", "type": "long"}],
                "rows": [["2025-03-14T09:10:00Z", "Zscaler", "upload blocked", 3], ["2025-03-14T09:05:00Z", "Zscaler", "allowed", 1]],
            }
        ]
        body = {"tables": tables}
        if self.mode == "partial":
            body["error"] = {"code": "PartialError", "message": "some shards failed", "details": []}
        return Response(json.dumps(body), content_type="application/json")


def log_analytics(endpoint: str) -> str:
    return f"""
[[enrichers.settings.log_analytics]]
name = "proxy"
workspace_id = "ws-1"
endpoint = "{endpoint}"
query = "CommonSecurityLog | where SourceUserName =~ {{upn}} and TimeGenerated between ({{start}} .. {{end}}) | summarize Count = count() by DeviceVendor, Activity"
window_minutes = 15
max_retries = 1
timeout_seconds = 2
allow_private_hosts = ["localhost", "127.0.0.1"]
"""


async def test_log_analytics_query_around_the_alert(httpserver, write_config):
    server = LogAnalyticsServer(httpserver)
    _, records = await run(write_config(config(log_analytics(server.endpoint))), graph_alert("a", upn="megan.bowen@contoso.com", created="2025-03-14T09:12:44Z"))
    proxy = records["a"]["enrichments"]["telemetry"]["sources"]["proxy"]
    assert proxy["kind"] == "log_analytics" and proxy["count"] == 2
    assert proxy["fields"]["DeviceVendor"] == "Zscaler" and proxy["fields"]["Count"] == 3
    body = server.bodies[0]
    assert 'SourceUserName =~ "megan.bowen@contoso.com"' in body["query"] and "datetime(2025-03-14T08:42:44Z)" in body["query"]
    assert body["timespan"].startswith("2025-03-14T08:57:44")


async def test_log_analytics_partial_result_is_used_and_throttling_fails(httpserver, write_config):
    server = LogAnalyticsServer(httpserver)
    server.mode = "partial"
    _, records = await run(write_config(config(log_analytics(server.endpoint))), graph_alert("a", upn="x@contoso.com"))
    assert records["a"]["enrichments"]["telemetry"]["sources"]["proxy"]["count"] == 2
    server.mode = "throttled"
    report, records = await run(write_config(config(log_analytics(server.endpoint)), name="b.toml"), graph_alert("b", upn="x@contoso.com"))
    assert report.delivered["lake"] >= 1
    assert records["b"]["enrichment_status"]["telemetry"]["state"] == "failed"
    assert "429" in records["b"]["enrichment_status"]["telemetry"]["error"]


async def test_a_log_analytics_read_timeout_is_a_timeout_by_its_type(httpserver, write_config):
    """The SDK's own read timeout (shorter than the enricher's) raises an azure-core timeout error,
    which pipeline.errors.LIBRARY_ERRORS maps to EnricherTimeout."""
    server = LogAnalyticsServer(httpserver)
    server.mode = "slow"
    source = log_analytics(server.endpoint).replace("timeout_seconds = 2", "timeout_seconds = 0.3").replace("max_retries = 1", "max_retries = 0")
    _, records = await run(write_config(config(source)), graph_alert("a", upn="x@contoso.com"))
    status = records["a"]["enrichment_status"]["telemetry"]
    assert status["state"] == "timed_out" and "proxy: Log Analytics timed out" in status["error"]
    server.answered.wait(2)  # the local server answers one request at a time: let it finish before the next test


async def test_values_that_could_change_a_query_are_refused(httpserver, write_config):
    server = LogAnalyticsServer(httpserver)
    _, records = await run(write_config(config(log_analytics(server.endpoint))), graph_alert("a", upn='x"or 1==1@contoso.com'))
    assert server.bodies == []
    assert records["a"]["enrichment_status"]["telemetry"]["state"] == "failed"


def test_log_analytics_over_plain_http_is_a_config_error(write_config):
    with pytest.raises(ConfigError, match="only https"):
        Runner(write_config(config(log_analytics("http://logs.example.com/v1").replace('allow_private_hosts = ["localhost", "127.0.0.1"]', ""))))
