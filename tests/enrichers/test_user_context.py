"""user_context against a local Graph server (JSON $batch contract), the HR CSV and the users file."""

from __future__ import annotations

import json
import math
import os
import re
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from werkzeug import Response

from pipeline.runner import Runner
from tests.support.alerts import StaticCredential, graph_alert, message
from tests.support.config import LAKE_SINK_TOML


class GraphServer:
    """A `$batch` handler that answers each inner `GET /users/{id}` on its own, per the documented contract."""

    def __init__(self, httpserver, users: dict[str, dict]):
        self.users = users
        self.batches: list[list[dict]] = []
        self.throttle_once: dict[str, float] = {}  # key -> Retry-After of one inner 429
        self.fail: dict[str, int] = {}  # key -> inner status
        self.outer: list[tuple[int, dict]] = []  # queued outer responses before the real one
        self.delay = 0.0
        self.malformed = False
        self.auth: list[str] = []
        self.answered = __import__("threading").Event()
        httpserver.expect_request("/v1.0/$batch", method="POST").respond_with_handler(self.handle)
        self.url = httpserver.url_for("/v1.0")

    def handle(self, request):
        self.auth.append(request.headers.get("Authorization", ""))
        if self.delay:
            time.sleep(self.delay)
            self.answered.set()
        if self.outer:
            status, headers = self.outer.pop(0)
            return Response(json.dumps({"error": {"code": "TooManyRequests"}}), status=status, headers=headers, content_type="application/json")
        if self.malformed:
            return Response("<html>gateway</html>", status=200, content_type="application/json")
        body = request.get_json()
        requests = body["requests"]
        assert len(requests) <= 20, "Graph rejects a $batch of more than 20 requests"
        self.batches.append(requests)
        responses = []
        for inner in requests:
            assert inner["method"] == "GET"
            path, _, query = inner["url"].partition("?")
            assert "$select=" in query and "employeeLeaveDateTime" in query and "$expand=manager" in query
            key = path.removeprefix("/users/").replace("%40", "@")
            if key in self.throttle_once:
                responses.append({"id": inner["id"], "status": 429, "headers": {"Retry-After": str(self.throttle_once.pop(key))}, "body": {"error": {"code": "TooManyRequests"}}})
            elif key in self.fail:
                responses.append({"id": inner["id"], "status": self.fail[key], "body": {"error": {"code": "x"}}})
            elif key in self.users:
                responses.append({"id": inner["id"], "status": 200, "headers": {"Content-Type": "application/json"}, "body": self.users[key]})
            else:
                responses.append({"id": inner["id"], "status": 404, "body": {"error": {"code": "Request_ResourceNotFound"}}})
        responses.reverse()  # Graph does not promise the order of responses
        return Response(json.dumps({"responses": responses}), status=200, content_type="application/json")


def graph_user(i: int, *, manager: bool = True) -> dict:
    user = {
        "id": f"oid-{i}",
        "userPrincipalName": f"user{i}@contoso.com",
        "displayName": f"User {i}",
        "department": "Finance",
        "jobTitle": "Analyst",
        "employeeType": "Employee",
        "employeeHireDate": "2020-01-06T00:00:00Z",
        "employeeLeaveDateTime": None,
        "accountEnabled": True,
        "officeLocation": "Paris",
        "companyName": "Contoso",
        "employeeOrgData": {"division": "Corporate", "costCenter": "CC-1"},
    }
    if manager:
        user["manager"] = {"@odata.type": "#microsoft.graph.user", "id": "oid-mgr", "displayName": "Boss", "userPrincipalName": "Boss@contoso.com"}
    return user


def config(url: str, *, hr: str | None = None, timeout: float = 3.0, extra: str = "") -> str:
    hr_block = f'\n[enrichers.settings.hr]\npath = "{hr}"\n' if hr else ""
    return f"""
[assembly]
settle_seconds = 0

[[enrichers]]
name = "user_context"
timeout_seconds = {timeout}
[enrichers.settings.graph]
url = "{url}"
allow_private_hosts = ["localhost", "127.0.0.1"]
max_retry_after_seconds = 1
request_timeout_seconds = 1
{extra}
{hr_block}
""" + LAKE_SINK_TOML


def lake(runner: Runner) -> dict[str, dict]:
    root = runner.loaded.data_path("lake")
    return {json.loads(line)["alert"]["alert_id"]: json.loads(line) for path in root.rglob("*.jsonl") for line in path.read_text().splitlines()}


async def run(loaded, alerts, credential=None):
    runner = Runner(loaded)
    runner.chain.slots[0].plugin.credential = credential or StaticCredential()
    async with runner:
        report = await runner.process_batch([message(*alerts)])
        return runner, report, lake(runner)


@pytest.mark.parametrize("n_alerts, n_users", [(1, 1), (20, 20), (50, 21), (130, 45)])
async def test_n_alerts_of_m_users_cost_ceil_m_over_20_batches(httpserver, write_config, n_alerts, n_users):
    graph = GraphServer(httpserver, {f"oid-{i}": graph_user(i) for i in range(n_users)})
    loaded = write_config(config(graph.url))
    alerts = [graph_alert(f"a{i}", upn=f"user{i % n_users}@contoso.com", object_id=f"oid-{i % n_users}") for i in range(n_alerts)]
    runner, report, records = await run(loaded, alerts)
    assert len(graph.batches) == math.ceil(n_users / 20)
    assert sorted(r["url"].split("?")[0] for b in graph.batches for r in b) == sorted(f"/users/oid-{i}" for i in range(n_users))
    assert report.enrichment[("user_context", "ok")] == n_alerts
    some = records["a0"]["enrichments"]["user_context"]
    assert some["found"] and some["department"] == "Finance" and some["manager"]["upn"] == "boss@contoso.com"
    assert some["division"] == "Corporate" and some["sources"] == ["graph"]
    assert set(graph.auth) == {"Bearer test-token"}
    assert runner.chain.slots[0].plugin.credential.scopes[0] == ("https://graph.microsoft.com/.default",)


async def test_second_batch_of_the_same_users_costs_nothing(httpserver, write_config):
    graph = GraphServer(httpserver, {"oid-1": graph_user(1)})
    runner = Runner(write_config(config(graph.url)))
    runner.chain.slots[0].plugin.credential = StaticCredential()
    async with runner:
        await runner.process_batch([message(*[graph_alert(f"a{i}", upn="user1@contoso.com", object_id="oid-1") for i in range(5)])])
        await runner.process_batch([message(graph_alert("b", upn="user1@contoso.com", object_id="oid-1"))])
    assert [len(batch) for batch in graph.batches] == [1]  # six alerts of one user, two batches: one inner request


async def test_unknown_user_and_user_without_manager(httpserver, write_config):
    graph = GraphServer(httpserver, {"oid-1": graph_user(1, manager=False)})
    loaded = write_config(config(graph.url))
    _, report, records = await run(loaded, [graph_alert("known", upn="user1@contoso.com", object_id="oid-1"), graph_alert("ghost", upn="ghost@contoso.com")])
    assert records["known"]["enrichments"]["user_context"]["manager"] is None
    assert records["known"]["enrichments"]["user_context"]["found"] is True
    ghost = records["ghost"]
    assert ghost["enrichment_status"]["user_context"]["state"] == "ok"
    assert ghost["enrichments"]["user_context"]["found"] is False and ghost["enrichments"]["user_context"]["sources"] == []


async def test_inner_429_is_retried_per_request_after_retry_after(httpserver, write_config):
    graph = GraphServer(httpserver, {f"oid-{i}": graph_user(i) for i in range(3)})
    graph.throttle_once["oid-1"] = 0.3
    loaded = write_config(config(graph.url))
    started = time.monotonic()
    _, report, records = await run(loaded, [graph_alert(f"a{i}", object_id=f"oid-{i}", upn=f"user{i}@contoso.com") for i in range(3)])
    assert time.monotonic() - started >= 0.3
    assert [len(b) for b in graph.batches] == [3, 1]  # only the throttled request is sent again
    assert graph.batches[1][0]["url"].startswith("/users/oid-1?")
    assert all(records[f"a{i}"]["enrichments"]["user_context"]["found"] for i in range(3))


async def test_inner_retry_after_as_an_http_date_goes_through_the_one_parser(httpserver, write_config):
    """An inner 429's HTTP-date is read by pipeline.resilience.retry.parse_retry_after (tests/test_retry_after.py):
    two minutes away, it does not fit, and the lookup fails at once instead of retrying or sleeping."""
    graph = GraphServer(httpserver, {"oid-1": graph_user(1)})
    graph.throttle_once["oid-1"] = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    started = time.monotonic()
    _, report, records = await run(write_config(config(graph.url)), [graph_alert("a", object_id="oid-1", upn="user1@contoso.com")])
    assert time.monotonic() - started < 1.0 and len(graph.batches) == 1
    status = records["a"]["enrichment_status"]["user_context"]
    assert status["state"] == "failed" and re.search(r"retry after 1[12]\d(\.\d+)?s does not fit", status["error"])


async def test_a_negative_inner_retry_after_is_ignored_and_the_own_backoff_applies(httpserver, write_config):
    graph = GraphServer(httpserver, {"oid-1": graph_user(1)})
    graph.throttle_once["oid-1"] = -5
    started = time.monotonic()
    _, report, records = await run(write_config(config(graph.url)), [graph_alert("a", object_id="oid-1", upn="user1@contoso.com")])
    assert time.monotonic() - started >= 0.45  # the first backoff step (0.5 s), not an immediate retry
    assert len(graph.batches) == 2 and records["a"]["enrichments"]["user_context"]["found"] is True


async def test_outer_429_and_503_are_retried_honouring_retry_after(httpserver, write_config):
    graph = GraphServer(httpserver, {"oid-1": graph_user(1)})
    graph.outer = [(429, {"Retry-After": "0.2"}), (503, {"Retry-After": "0.1"})]
    started = time.monotonic()
    _, report, records = await run(write_config(config(graph.url)), [graph_alert("a", object_id="oid-1", upn="user1@contoso.com")])
    assert time.monotonic() - started >= 0.3
    assert records["a"]["enrichments"]["user_context"]["found"] is True


async def test_retry_after_longer_than_allowed_fails_without_waiting(httpserver, write_config):
    graph = GraphServer(httpserver, {"oid-1": graph_user(1)})
    graph.outer = [(429, {"Retry-After": "120"})] * 5
    started = time.monotonic()
    _, report, records = await run(write_config(config(graph.url)), [graph_alert("a", object_id="oid-1", upn="user1@contoso.com")])
    assert time.monotonic() - started < 1.0
    status = records["a"]["enrichment_status"]["user_context"]
    assert status["state"] == "failed" and "429" in status["error"] and "user1" not in status["error"]


async def test_partial_batch_failure_fails_only_that_alert(httpserver, write_config):
    graph = GraphServer(httpserver, {f"oid-{i}": graph_user(i) for i in range(3)})
    graph.fail["oid-2"] = 403
    _, report, records = await run(write_config(config(graph.url)), [graph_alert(f"a{i}", object_id=f"oid-{i}", upn=f"user{i}@contoso.com") for i in range(3)])
    assert report.delivered["lake"] == 3
    assert records["a2"]["enrichment_status"]["user_context"] == {"state": "failed", "error": "Graph user lookup: HTTP 403", "duration_ms": records["a2"]["enrichment_status"]["user_context"]["duration_ms"]}
    assert records["a0"]["enrichment_status"]["user_context"]["state"] == "ok"


async def test_malformed_body_fails_the_enricher_and_the_alert_is_delivered(httpserver, write_config):
    graph = GraphServer(httpserver, {"oid-1": graph_user(1)})
    graph.malformed = True
    _, report, records = await run(write_config(config(graph.url)), [graph_alert("a", object_id="oid-1", upn="user1@contoso.com")])
    assert report.delivered["lake"] == 1
    assert records["a"]["enrichment_status"]["user_context"]["state"] == "failed"
    assert "malformed" in records["a"]["enrichment_status"]["user_context"]["error"]


async def test_slow_graph_times_out_and_the_alert_is_delivered(httpserver, write_config):
    graph = GraphServer(httpserver, {"oid-1": graph_user(1)})
    graph.delay = 1.0
    _, report, records = await run(write_config(config(graph.url, timeout=0.3)), [graph_alert("a", object_id="oid-1", upn="user1@contoso.com")])
    assert report.delivered["lake"] == 1
    assert records["a"]["enrichment_status"]["user_context"]["state"] == "timed_out"
    graph.answered.wait(3)  # the local server answers one request at a time: let it finish


async def test_graph_down_fails_the_enricher_and_the_alert_is_delivered(write_config, tmp_path):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _, report, records = await run(write_config(config(f"http://127.0.0.1:{port}/v1.0")), [graph_alert("a", object_id="oid-1", upn="user1@contoso.com")])
    assert report.delivered["lake"] == 1
    assert records["a"]["enrichment_status"]["user_context"]["state"] == "failed"


def test_plain_http_to_a_host_not_allowed_is_a_config_error(write_config):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="only https"):
        Runner(write_config(config("http://graph.example.test/v1.0").replace('allow_private_hosts = ["localhost", "127.0.0.1"]', "")))


HR_CSV = """EmailAddress,ResignationDate,LastWorkingDate
user1@contoso.com,2025-03-01T15:18:02.4675041+05:30,2025-03-28T15:18:02.4675041+05:30
Leaver@Contoso.com,2025-01-10T09:15:49Z,2025-02-01T00:00:00Z
notice@contoso.com,2025-03-10T09:15:49Z,
"""


async def test_hr_file_marks_departing_users_and_is_reloaded_when_it_changes(httpserver, write_config, tmp_path):
    graph = GraphServer(httpserver, {f"oid-{i}": graph_user(i) for i in range(3)})
    (tmp_path / "hr.csv").write_text(HR_CSV)
    loaded = write_config(config(graph.url, hr="hr.csv").replace('path = "hr.csv"', 'path = "hr.csv"\ncheck_seconds = 0'))
    runner = Runner(loaded)
    runner.chain.slots[0].plugin.credential = StaticCredential()
    async with runner:
        await runner.process_batch(
            [message(graph_alert("a1", upn="user1@contoso.com", object_id="oid-1", created="2025-03-14T09:00:00Z"), graph_alert("a2", upn="user2@contoso.com", object_id="oid-2"), graph_alert("a3", upn="leaver@contoso.com", created="2025-03-14T09:00:00Z"))]
        )
        records = lake(runner)
        first = records["a1"]["enrichments"]["user_context"]
        assert first["departing"] is True and first["days_until_departure"] == 14 and first["sources"] == ["graph", "hr"]
        assert records["a2"]["enrichments"]["user_context"]["departing"] is False
        gone = records["a3"]["enrichments"]["user_context"]
        assert gone["found"] is True and gone["sources"] == ["hr"] and gone["departed"] is True and gone["days_until_departure"] == -41
        await runner.process_batch([message(graph_alert("a5", upn="notice@contoso.com", created="2025-03-14T09:00:00Z"))])
        notice = lake(runner)["a5"]["enrichments"]["user_context"]
        assert notice["departing"] is True and notice["departed"] is False and notice["days_until_departure"] is None
        (tmp_path / "hr.csv").write_text(HR_CSV + "user2@contoso.com,2025-03-10,2025-03-20\n")
        os.utime(tmp_path / "hr.csv", ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
        await runner.process_batch([message(graph_alert("a4", upn="user2@contoso.com", object_id="oid-2", created="2025-03-14T09:00:00Z"))])
        assert lake(runner)["a4"]["enrichments"]["user_context"]["days_until_departure"] == 6


async def test_local_directory_file_is_the_embedded_default(write_config, tmp_path):
    users = [graph_user(1), graph_user(2, manager=False)]
    (tmp_path / "users.json").write_text(json.dumps({"value": users}))
    loaded = write_config(
        """
[assembly]
settle_seconds = 0
[[enrichers]]
name = "user_context"
[enrichers.settings]
directory = "users.json"
[[sinks]]
name = "lake"
kind = "jsonl"
"""
    )
    async with Runner(loaded) as runner:
        await runner.process_batch([message(graph_alert("a1", upn="USER1@contoso.com"), graph_alert("a2", object_id="oid-2"), graph_alert("a3", upn="nobody@contoso.com"))])
        records = lake(runner)
    assert records["a1"]["enrichments"]["user_context"]["job_title"] == "Analyst"
    assert records["a1"]["enrichments"]["user_context"]["sources"] == ["directory"]
    assert records["a2"]["enrichments"]["user_context"]["display_name"] == "User 2"
    assert records["a3"]["enrichments"]["user_context"]["found"] is False


def test_missing_hr_file_is_a_config_error(write_config):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="user_context|UserContext"):
        Runner(write_config(config("https://graph.microsoft.com/v1.0", hr="missing.csv")))


async def test_concurrent_enrich_calls_of_one_alert_each_are_still_batched(httpserver, tmp_path):
    """The micro-batching loader alone (no runner): 30 concurrent alerts of 25 users -> 2 $batch calls."""
    import asyncio

    from enrichers.user_context import UserContextEnricher
    from pipeline.enrich.cache import TTLCache
    from pipeline.enrich.contract import EnrichmentContext
    from pipeline.ingest.decode import decode_message

    graph = GraphServer(httpserver, {f"oid-{i}": graph_user(i) for i in range(25)})
    enricher = UserContextEnricher(UserContextEnricher.Settings.model_validate({"graph": {"url": graph.url, "allow_private_hosts": ["localhost", "127.0.0.1"]}}))
    enricher.credential = StaticCredential()
    await enricher.start()
    cache = TTLCache(enricher.cache_policy)
    alerts = decode_message(message(*[graph_alert(f"a{i}", object_id=f"oid-{i % 25}") for i in range(30)]).body).alerts
    try:
        fragments = await asyncio.gather(*(enricher.enrich(a, EnrichmentContext(a, fragments={}, statuses={}, cache=cache, clock=time.time)) for a in alerts))
    finally:
        await enricher.aclose()
    assert all(f.found for f in fragments) and len(graph.batches) == 2


async def test_failures_never_log_user_names_above_debug(httpserver, write_config, caplog):
    import logging

    graph = GraphServer(httpserver, {})
    graph.fail["oid-1"] = 500
    caplog.set_level(logging.DEBUG)
    await run(write_config(config(graph.url)), [graph_alert("a", object_id="oid-1", upn="secret.person@contoso.com")])
    loud = [r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG and r.name.startswith("pipeline")]
    assert loud and not any("secret.person" in m or "oid-1" in m for m in loud)
