"""The one Retry-After parser (pipeline.resilience.retry.parse_retry_after), and the paths that use it.

Each path is driven with its real client against a local server answering 429/503 with an HTTP-date
(which only the shared parser reads as a delay) and with a negative value (which it ignores, so the
path falls back to its own backoff). The Sentinel sink's case lives in tests/test_sink_sentinel.py
(it needs that file's TLS endpoint), the Graph `$batch` case in tests/test_user_context.py.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, formatdate

import pytest

from pipeline.deliver.sinks.blob_lake import BlobLakeSink
from pipeline.deliver.sinks.servicenow import ServiceNowSink
from pipeline.enrich.http import HttpClient
from pipeline.errors import EnricherUnavailable
from pipeline.resilience.retry import parse_retry_after
from tests.support.itsm_servers import Failure
from tests.support.records import make_record

LOCAL = ["localhost", "127.0.0.1"]
# Sun, 06 Nov 1994 08:49:37 GMT, RFC 9110's example, and 30 seconds before it
EXAMPLE_DATE = 784111777.0
BEFORE = EXAMPLE_DATE - 30


def http_date(seconds_from_now: float) -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=seconds_from_now), usegmt=True)


# -- the parser ----------------------------------------------------------------------------------


def test_retry_after_seconds_and_http_date():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert 8 <= parse_retry_after(formatdate(time.time() + 10, usegmt=True)) <= 10


@pytest.mark.parametrize("value,seconds", [("0", 0.0), ("120", 120.0), (" 7 ", 7.0), ("0.05", 0.05), ("86400", 86400.0)])
def test_delta_seconds(value, seconds):
    assert parse_retry_after(value) == seconds


@pytest.mark.parametrize(
    "value",
    [
        "Sun, 06 Nov 1994 08:49:37 GMT",  # IMF-fixdate
        "Sunday, 06-Nov-94 08:49:37 GMT",  # obsolete RFC 850 form
        "Sun Nov  6 08:49:37 1994",  # obsolete asctime form: no zone, GMT by definition
    ],
)
def test_http_date_in_each_form_rfc_9110_allows(value):
    assert parse_retry_after(value, now=BEFORE) == 30.0


def test_an_http_date_without_a_zone_is_gmt_whatever_the_local_zone(monkeypatch):
    monkeypatch.setenv("TZ", "EST+05")
    time.tzset()
    try:
        assert parse_retry_after("Sun Nov  6 08:49:37 1994", now=BEFORE) == 30.0
    finally:
        monkeypatch.undo()
        time.tzset()


def test_a_date_already_past_means_now():
    assert parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now=EXAMPLE_DATE + 3600) == 0.0


@pytest.mark.parametrize("value", ["", "  ", "soon", "-5", "-0.5", "+5", "1e3", "inf", "nan", "5 seconds", "Sun, 31 Feb 1994 08:49:37 GMT", "06 Nov 1994"])
def test_negative_or_unparseable_is_none(value):
    assert parse_retry_after(value) is None


# -- the paths -----------------------------------------------------------------------------------


async def test_enricher_http_client_reads_an_http_date(httpserver):
    httpserver.expect_request("/busy").respond_with_data("", status=429, headers={"Retry-After": http_date(120)})
    async with HttpClient(allow_private_hosts=LOCAL, max_retries=2, max_retry_after=5) as client:
        with pytest.raises(EnricherUnavailable, match=r"HTTP 429, retry after 1[12]\d(\.\d+)?s does not fit"):
            await client.request("GET", httpserver.url_for("/busy"))
        assert client.requests_sent == 1  # did not sleep through two minutes, did not retry at once


async def test_enricher_http_client_ignores_a_negative_retry_after(httpserver):
    httpserver.expect_request("/busy").respond_with_data("", status=429, headers={"Retry-After": "-5"})
    async with HttpClient(allow_private_hosts=LOCAL, max_retries=2, max_retry_after=0.2) as client:
        # Its own first backoff (0.5 s) applies, which does not fit: not an immediate retry.
        with pytest.raises(EnricherUnavailable, match=r"retry after 0\.5s does not fit"):
            await client.request("GET", httpserver.url_for("/busy"))
        assert client.requests_sent == 1


async def snow_publish(httpserver, record):
    sink = ServiceNowSink(ServiceNowSink.Settings(instance_url=httpserver.url_for("/"), username="svc-dlp", password_env="TEST_SNOW_PASSWORD", timeout_seconds=5), None)
    try:
        (outcome,) = await sink.publish([record])
    finally:
        await sink.aclose()
    return outcome


async def test_itsm_sinks_read_an_http_date_and_ignore_a_negative_value(httpserver, snow):
    snow.failures.append(Failure("GET", 429, {"Retry-After": http_date(30)}))
    outcome = await snow_publish(httpserver, make_record("a-1"))
    assert outcome.status == "retryable" and 25 <= outcome.retry_after <= 31
    snow.failures.append(Failure("GET", 429, {"Retry-After": "-5"}))
    outcome = await snow_publish(httpserver, make_record("a-1"))
    # ignored: no pause is asked for, so the sink sends the lookup again within the call
    assert outcome.status == "delivered" and [m for m, _, _ in snow.requests].count("GET") == 3


@pytest.fixture
def storage(httpserver, monkeypatch):
    """A storage endpoint that answers every request with the queued (status, headers)."""
    monkeypatch.setenv("TEST_LAKE_CONNECTION", f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;BlobEndpoint={httpserver.url_for('/devstoreaccount1')};")
    answers: list[tuple[int, dict[str, str]]] = []

    def answer(request):
        from werkzeug import Response

        status, headers = answers.pop(0)
        return Response(b"", status=status, headers=headers)

    httpserver.expect_request(re.compile("^/devstoreaccount1/")).respond_with_handler(answer)
    return answers


async def lake_publish(record):
    sink = BlobLakeSink(BlobLakeSink.Settings(connection_string_env="TEST_LAKE_CONNECTION", timeout_seconds=5), None)
    try:
        (outcome,) = await sink.publish([record])
    finally:
        await sink.aclose()
    return outcome


async def test_sinks_on_azure_sdks_read_an_http_date_and_ignore_a_negative_value(storage):
    """The blob lake (azure-storage-blob): a 503's Retry-After reaches the router through pipeline.errors.translate."""
    storage.append((503, {"Retry-After": http_date(30)}))
    outcome = await lake_publish(make_record("a-1"))
    assert outcome.status == "retryable" and "HTTP 503" in outcome.reason and 25 <= outcome.retry_after <= 31
    storage.append((503, {"Retry-After": "-5"}))
    outcome = await lake_publish(make_record("a-2"))
    assert outcome.status == "retryable" and outcome.retry_after is None
