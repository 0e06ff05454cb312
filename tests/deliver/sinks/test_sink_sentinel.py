"""Sentinel sink: the real azure-monitor-ingestion SDK against a local TLS endpoint (verified with a
trustme CA) that decompresses every gzip request, checks its size and rows, and answers as told."""

from __future__ import annotations

import gzip
import json
import math
import ssl
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
import trustme
from azure.core.credentials import AccessToken
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from pipeline.deliver.sinks.sentinel import SentinelSink
from pipeline.deliver.sinks.sentinel_schema import COLUMNS, RESERVED, TABLE, table_schema
from tests.support.config import enricher_entry, pipeline_toml, sink_entry
from tests.support.paths import ROOT
from tests.support.records import make_record

RULE = "dcr-00000000000000000000000000000000"
STREAM = "Custom-DLPEnrichedAlerts"
PATH = f"/dataCollectionRules/{RULE}/streams/{STREAM}"


class StaticToken:
    """A credential for the local endpoint (the SDK insists on TLS for bearer tokens)."""

    async def get_token(self, *scopes, **kwargs):
        assert scopes == ("https://monitor.azure.com//.default",) or scopes == ("https://monitor.azure.com/.default",)
        return AccessToken("test-token", int(time.time()) + 3600)

    async def close(self):
        return None


class Ingestion:
    """The endpoint: records each request's decompressed rows; answers from a script, then 204."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.script: deque[tuple[int, dict]] = deque()
        self.max_body: int | None = None  # answer 413 to a larger (decompressed) body, as a stricter gateway would

    def __call__(self, request: Request) -> Response:
        raw = request.get_data()
        body = gzip.decompress(raw) if request.headers.get("Content-Encoding") == "gzip" else raw
        rows = json.loads(body)
        self.requests.append(
            {"encoding": request.headers.get("Content-Encoding"), "auth": request.headers.get("Authorization"), "size": len(body), "rows": rows}
        )
        if self.max_body is not None and len(body) > self.max_body:
            status, headers = 413, {}
        else:
            status, headers = self.script.popleft() if self.script else (204, {})
        return Response(b"" if status == 204 else b'{"error":{"code":"x","message":"y"}}', status=status, headers=headers, content_type="application/json")


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    ca_path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    server = HTTPServer(host="localhost", port=0, ssl_context=context)
    server.start()
    yield server, str(ca_path)
    server.clear()
    if server.is_running():
        server.stop()


@pytest.fixture
def endpoint(tls):
    server, ca_path = tls
    server.clear()
    ingestion = Ingestion()
    server.expect_request(PATH, method="POST").respond_with_handler(ingestion)
    return server, ca_path, ingestion


def make_sink(endpoint, **settings) -> SentinelSink:
    server, ca_path, _ = endpoint
    values = {"endpoint": server.url_for("/").rstrip("/"), "rule_id": RULE, "ca_bundle": ca_path, "timeout_seconds": 5, **settings}
    return SentinelSink(SentinelSink.Settings(**values), None, credential=StaticToken())


async def test_rows_arrive_gzipped_with_the_table_columns(endpoint):
    sink = make_sink(endpoint)
    records = [make_record(f"a-{i}") for i in range(3)]
    try:
        outcomes = await sink.publish(records)
    finally:
        await sink.aclose()
    ingestion = endpoint[2]
    assert [o.status for o in outcomes] == ["delivered"] * 3
    (request,) = ingestion.requests
    assert request["encoding"] == "gzip" and request["auth"] == "Bearer test-token"
    assert [row["RecordId"] for row in request["rows"]] == [r.record_id for r in records]
    row = request["rows"][0]
    columns = {name for name, _, _ in COLUMNS}
    assert set(row) <= columns and not (set(row) & RESERVED)
    assert row["AlertId"] == "a-0" and row["AlertTenantId"] == "11111111-2222-3333-4444-555555555555"
    assert row["TimeGenerated"] == "2025-03-14T09:11:02Z" and row["ProcessedTime"] == "2025-03-14T09:30:00Z" and row["TriageScore"] == 72.5
    assert row["SensitiveInfo"][0]["name"] == "Credit Card Number" and row["SensitiveInfoCount"] == 15


async def test_requests_stay_under_one_megabyte_with_near_minimal_count(endpoint):
    sink = make_sink(endpoint)
    # 40 records of ~180 kB: 7.2 MB in all, so at least 8 requests of <= 1,000,000 bytes.
    records = [make_record(f"big-{i}", padding=180_000 + 997 * i) for i in range(40)]
    try:
        outcomes = await sink.publish(records)
    finally:
        await sink.aclose()
    requests = endpoint[2].requests
    assert all(o.status == "delivered" for o in outcomes)
    assert max(r["size"] for r in requests) == sink.largest_request_bytes <= 1_000_000 and sink.requests == len(requests)
    total = sum(r["size"] for r in requests)
    assert len(requests) <= math.ceil(total / 1_000_000) + 1
    assert sorted(row["RecordId"] for r in requests for row in r["rows"]) == sorted(r.record_id for r in records)


async def test_a_record_above_the_limit_is_rejected_without_a_request(endpoint):
    sink = make_sink(endpoint)
    records = [make_record("small"), make_record("huge", padding=1_000_100)]
    try:
        outcomes = await sink.publish(records)
    finally:
        await sink.aclose()
    assert outcomes[0].status == "delivered"
    assert outcomes[1].status == "rejected" and "exceeds the Logs Ingestion limit" in outcomes[1].reason
    assert [row["AlertId"] for r in endpoint[2].requests for row in r["rows"]] == ["small"]


@pytest.mark.parametrize(
    "status,headers,expected,retry_after",
    [
        (429, {"Retry-After": "7"}, "retryable", 7.0),
        (503, {}, "retryable", None),
        (500, {}, "retryable", None),
        (400, {}, "rejected", None),
    ],
)
async def test_a_failed_request_fails_exactly_its_records(endpoint, status, headers, expected, retry_after):
    sink = make_sink(endpoint)
    ingestion = endpoint[2]
    # Five records of ~450 kB and two small ones: three requests (2+2 small, 2, 1).
    records = [make_record(f"r-{i}", padding=450_000) for i in range(5)] + [make_record(f"s-{i}", padding=10) for i in range(2)]
    ingestion.script.extend([(204, {}), (status, headers)])
    try:
        outcomes = await sink.publish(records)
    finally:
        await sink.aclose()
    by_request = [[row["RecordId"] for row in r["rows"]] for r in ingestion.requests]
    status_of = {record.record_id: outcome for record, outcome in zip(records, outcomes)}
    assert all(status_of[i].status == "delivered" for i in by_request[0])
    failed = by_request[1]
    assert all(status_of[i].status == expected for i in failed) and f"HTTP {status}" in status_of[failed[0]].reason
    if expected == "retryable":
        assert status_of[failed[0]].retry_after == retry_after
        assert len(ingestion.requests) == 2  # the rest is not sent into a throttled endpoint
        rest = set(status_of) - set(by_request[0]) - set(failed)
        assert rest and all(status_of[i].status == "retryable" and status_of[i].retry_after == retry_after for i in rest)
    else:
        assert len(ingestion.requests) == 3 and all(status_of[i].status == "delivered" for i in by_request[2])
    assert len(ingestion.requests[1]["rows"]) == len(failed) > 0


async def test_a_413_splits_the_request_and_sends_the_halves(endpoint):
    sink = make_sink(endpoint)
    ingestion = endpoint[2]
    records = [make_record(f"r-{i}") for i in range(200)]
    ingestion.script.append((413, {}))  # the whole batch refused once as too large
    try:
        outcomes = await sink.publish(records)
    finally:
        await sink.aclose()
    assert [o.status for o in outcomes] == ["delivered"] * 200
    first, *halves = ingestion.requests
    assert len(first["rows"]) == 200 and len(halves) == 2 and all(90 <= len(r["rows"]) <= 110 for r in halves)
    assert [row["RecordId"] for r in halves for row in r["rows"]] == [r.record_id for r in records]


async def test_after_413s_only_a_row_refused_alone_is_rejected(endpoint):
    """The endpoint refuses bodies above 60 kB: requests are halved until they pass; the one row of
    80 kB, refused alone, is the only record rejected."""
    sink = make_sink(endpoint)
    ingestion = endpoint[2]
    ingestion.max_body = 60_000
    records = [make_record(f"s-{i}", padding=2_000) for i in range(40)]
    records.insert(17, make_record("big", padding=80_000))
    try:
        outcomes = await sink.publish(records)
    finally:
        await sink.aclose()
    status = {record.alert.alert_id: outcome for record, outcome in zip(records, outcomes)}
    assert status["big"].status == "rejected" and "refused alone" in status["big"].reason and "413" in status["big"].reason
    assert all(o.status == "delivered" for name, o in status.items() if name != "big")
    accepted = [row["AlertId"] for r in ingestion.requests if r["size"] <= 60_000 for row in r["rows"]]
    assert sorted(accepted) == sorted(name for name in status if name != "big")  # each delivered once


async def test_each_row_is_serialised_once(endpoint, monkeypatch):
    import json as json_module

    records = [make_record(f"r-{i}") for i in range(50)]
    calls = []
    real_dumps = json_module.dumps

    def counting_dumps(value, *args, **kwargs):
        calls.append(type(value).__name__)
        return real_dumps(value, *args, **kwargs)

    monkeypatch.setattr(json_module, "dumps", counting_dumps)
    sink = make_sink(endpoint)
    try:
        outcomes = await sink.publish(records)
    finally:
        await sink.aclose()
    assert all(o.status == "delivered" for o in outcomes)
    assert calls.count("dict") == 50 and "list" not in calls


async def test_429_is_reported_promptly_not_retried_inside_the_sdk(endpoint):
    sink = make_sink(endpoint)
    endpoint[2].script.append((429, {"Retry-After": "30"}))
    started = time.monotonic()
    try:
        (outcome,) = await sink.publish([make_record("x")])
    finally:
        await sink.aclose()
    assert outcome.status == "retryable" and outcome.retry_after == 30.0
    assert len(endpoint[2].requests) == 1 and time.monotonic() - started < 5


async def test_retry_after_as_an_http_date_or_negative_goes_through_the_one_parser(endpoint):
    """The SDK's HttpResponseError reaches pipeline.errors.translate, which reads Retry-After with
    pipeline.resilience.retry.parse_retry_after (tests/test_retry_after.py)."""
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    endpoint[2].script.extend([(429, {"Retry-After": when}), (429, {"Retry-After": "-5"})])
    sink = make_sink(endpoint)
    try:
        (dated,) = await sink.publish([make_record("x")])
        (negative,) = await sink.publish([make_record("y")])
    finally:
        await sink.aclose()
    assert dated.status == "retryable" and 25 <= dated.retry_after <= 31
    assert negative.status == "retryable" and negative.retry_after is None


class NoToken:
    """A credential whose token endpoint is down (azure-identity raises a ClientAuthenticationError subclass)."""

    async def get_token(self, *scopes, **kwargs):
        from azure.identity import CredentialUnavailableError

        raise CredentialUnavailableError("ManagedIdentityCredential: the endpoint did not answer")

    async def close(self):
        return None


async def test_authentication_failures_are_retryable_by_type(endpoint):
    """A 401 from the endpoint and a credential that cannot get a token (any ClientAuthenticationError,
    subclasses included) are worth retrying: a role assignment takes minutes to apply."""
    endpoint[2].script.append((401, {}))
    sink = make_sink(endpoint)
    server, ca_path, _ = endpoint
    tokenless = SentinelSink(SentinelSink.Settings(endpoint=server.url_for("/").rstrip("/"), rule_id=RULE, ca_bundle=ca_path, timeout_seconds=5), None, credential=NoToken())
    try:
        (refused,) = await sink.publish([make_record("x")])
        (no_token,) = await tokenless.publish([make_record("y")])
    finally:
        await sink.aclose()
        await tokenless.aclose()
    assert refused.status == "retryable" and refused.reason == "authentication failed: ClientAuthenticationError"
    assert no_token.status == "retryable" and no_token.reason == "authentication failed: CredentialUnavailableError"


async def test_an_untrusted_certificate_is_refused(endpoint, tmp_path):
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    sink = make_sink(endpoint, ca_bundle=str(other))
    try:
        (outcome,) = await sink.publish([make_record("x")])
    finally:
        await sink.aclose()
    assert outcome.status == "retryable" and endpoint[2].requests == []


def test_shipped_table_and_dcr_match_the_code():
    deploy = ROOT / "deploy" / "sentinel"
    table = json.loads((deploy / "table.json").read_text())
    assert table == table_schema()
    dcr = json.loads((deploy / "dcr.json").read_text())
    stream = dcr["properties"]["streamDeclarations"][STREAM]["columns"]
    assert [(c["name"], c["type"]) for c in stream] == [(n, t) for n, t, _ in COLUMNS]
    assert dcr["properties"]["dataFlows"][0]["outputStream"] == f"Custom-{TABLE}"
    kql = (deploy / "DLPEnrichedAlerts.kql").read_text()
    assert TABLE in kql and "RecordId" in kql


def test_schema_command_prints_columns_and_a_sample_row(tmp_path):
    from tests.entrypoints.test_cli import run_cli

    result = run_cli("schema", "sentinel", cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    text = result.stdout.decode()
    assert "DLPEnrichedAlerts_CL" in text and "RecordId" in text
    row = json.loads(text.split("sample row:", 1)[1])
    assert set(row) <= {name for name, _, _ in COLUMNS} and row["RecordId"] and row["TimeGenerated"]
    table = json.loads(run_cli("schema", "sentinel", "--table", cwd=tmp_path).stdout)
    assert table == table_schema()


async def test_through_the_runner_a_too_large_record_is_dead_lettered_and_a_429_retried(endpoint, write_config, fixture_bytes):
    import orjson

    from pipeline.runner import Message, Runner

    server, ca_path, ingestion = endpoint
    config = pipeline_toml(
        delivery={"max_attempts": 3, "backoff_initial_seconds": 0.01, "budget_seconds": 5},
        enrichers=[enricher_entry("padding", "tests.support.sentinel_local:Padding", {"alert_ids": ["too-large"], "size": 1000500})],
        sinks=[sink_entry("sentinel", "tests.support.sentinel_local:LocalSentinelSink", {"endpoint": server.url_for("/").rstrip("/"), "rule_id": RULE, "ca_bundle": str(ca_path)})],
    )
    graph = json.loads(fixture_bytes("graph_alert_v2_dlp.json"))
    body = orjson.dumps([dict(graph, id="fits"), dict(graph, id="too-large"), dict(graph, id="also-fits")])
    ingestion.script.append((429, {"Retry-After": "1"}))
    async with Runner(write_config(config)) as runner:
        started = time.monotonic()
        report = await runner.process_batch([Message(body)])
        elapsed = time.monotonic() - started
        (entry,) = await runner.dead_letter.list()
    assert report.delivered == {"sentinel": 2} and report.dead_lettered == {"deliver": 1}
    assert entry.alert_id == "too-large" and entry.reason == "sink_rejected" and "exceeds the Logs Ingestion limit" in entry.detail
    assert elapsed >= 1.0  # Retry-After honoured by the router
    assert len(ingestion.requests) == 2 and all(r["size"] <= 1_000_000 for r in ingestion.requests)
    assert sorted(row["AlertId"] for row in ingestion.requests[1]["rows"]) == ["also-fits", "fits"]


def test_time_generated_is_the_alerts_time_and_the_processing_time_has_its_own_column():
    from pipeline.deliver.sinks.sentinel_schema import to_row

    record = make_record("t-1")  # first activity 09:11:02, created 09:12:44, processed 09:30:00
    row = to_row(record.to_dict())
    assert row["TimeGenerated"] == "2025-03-14T09:11:02Z" and row["ProcessedTime"] == "2025-03-14T09:30:00Z"
    untimed = make_record("t-2", first_activity_at=None, created_at=None, last_activity_at=None)
    assert to_row(untimed.to_dict())["TimeGenerated"] == "2025-03-14T09:30:00Z"  # no alert time: when it was processed
    assert "ProcessedTime" in {name for name, _, _ in COLUMNS} and json.loads((ROOT / "deploy" / "sentinel" / "table.json").read_text()) == table_schema()


def test_a_sensitive_type_known_only_by_id_reaches_the_row_named_by_the_enrichment():
    """Why (issue 17): a built-in type id (50842eb7-…, Credit Card Number) reached the Sentinel row with `name: null`."""
    from pipeline.deliver.sinks.sentinel_schema import to_row

    card, unknown = "50842eb7-edc8-4019-85dd-5a5c1f2bb085", "d7c6b5a4-9382-4716-a5b4-c3d2e1f0a9b8"
    document = make_record("n-1").to_dict()
    document["alert"]["sensitive_info"] = [{"name": None, "type_id": card.upper(), "count": 12}, {"name": None, "type_id": unknown, "count": 1}, {"name": "IBAN", "type_id": None, "count": 2}]
    document["enrichments"]["sensitive_info"] = {"types": [{"name": "Credit Card Number", "type_id": card, "count": 12}, {"name": None, "type_id": unknown}]}
    row = to_row(document)
    assert [(i["name"], i["count"]) for i in row["SensitiveInfo"]] == [("Credit Card Number", 12), (None, 1), ("IBAN", 2)]
    del document["enrichments"]["sensitive_info"]  # projected away, or the enricher is not configured: the alert's own
    assert to_row(document)["SensitiveInfo"] == document["alert"]["sensitive_info"]
