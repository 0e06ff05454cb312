"""pipeline/enrich/http.py against a local server: retries, redirects, size limits, host rules; and the micro-batcher."""

from __future__ import annotations

import asyncio
import time

import pytest
from werkzeug import Response

from pipeline.enrich.batching import MicroBatcher
from pipeline.enrich.http import HttpClient
from pipeline.errors import EnricherTimeout, EnricherUnavailable

LOCAL = ["localhost", "127.0.0.1"]


async def test_same_host_redirect_is_followed(httpserver):
    httpserver.expect_request("/old").respond_with_data("", status=301, headers={"Location": "/new"})
    httpserver.expect_request("/new").respond_with_json({"ok": True})
    async with HttpClient(allow_private_hosts=LOCAL) as client:
        assert await client.json("GET", httpserver.url_for("/old")) == {"ok": True}


async def test_503_retried_then_given_up_with_bounded_requests(httpserver):
    httpserver.expect_request("/busy").respond_with_data("", status=503, headers={"Retry-After": "0.05"})
    async with HttpClient(allow_private_hosts=LOCAL, max_retries=2) as client:
        with pytest.raises(EnricherUnavailable, match="HTTP 503"):
            await client.request("GET", httpserver.url_for("/busy"))
        assert client.requests_sent == 3


async def test_oversized_answer_is_refused(httpserver):
    httpserver.expect_request("/big").respond_with_data(b"x" * 5000)
    async with HttpClient(allow_private_hosts=LOCAL, max_response_bytes=1000) as client:
        with pytest.raises(EnricherUnavailable, match="larger than"):
            await client.request("GET", httpserver.url_for("/big"))


async def test_allow_list_refuses_other_hosts_and_private_addresses():
    async with HttpClient(allowed_hosts=["*.okta.com"]) as client:
        with pytest.raises(EnricherUnavailable, match="not in the allow-list"):
            await client.request("GET", "https://example.com/x")
        with pytest.raises(EnricherUnavailable, match="only https"):
            await client.request("GET", "http://contoso.okta.com/x")
    async with HttpClient(allowed_hosts=["169.254.169.254", "localhost"]) as client:
        with pytest.raises(EnricherUnavailable, match="private or local"):
            await client.request("GET", "https://169.254.169.254/metadata")  # instance metadata endpoint
        with pytest.raises(EnricherUnavailable, match="private or local"):
            await client.request("GET", "https://localhost/x")


async def test_deadline_bounds_the_whole_call(httpserver):
    def slow(request):
        time.sleep(0.6)
        return Response("{}")

    httpserver.expect_request("/slow").respond_with_handler(slow)
    async with HttpClient(allow_private_hosts=LOCAL, timeout=5, total_seconds=0.2) as client:
        started = time.monotonic()
        with pytest.raises(EnricherTimeout):
            await client.request("GET", httpserver.url_for("/slow"))
        assert time.monotonic() - started < 0.5
    await asyncio.sleep(0.5)  # let the single-threaded server finish before the next test


async def test_micro_batcher_dedupes_and_chunks():
    calls: list[list[str]] = []

    async def fetch(keys):
        calls.append(keys)
        await asyncio.sleep(0.01)
        return {k: (RuntimeError("x") if k == "boom" else k.upper()) for k in keys if k != "missing"}

    batcher = MicroBatcher(fetch, max_size=20, window_seconds=0.01)
    keys = [f"k{i % 45}" for i in range(200)] + ["missing"]
    values = await asyncio.gather(*(batcher.load(k) for k in keys))
    assert values[:3] == ["K0", "K1", "K2"] and values[-1] is None
    assert sorted(len(c) for c in calls) == [6, 20, 20]  # 46 distinct keys: ceil(46/20) calls, none twice
    with pytest.raises(RuntimeError):
        await batcher.load("boom")
    await batcher.aclose()


async def test_micro_batcher_bounds_concurrent_fetches():
    running, peak = 0, 0

    async def fetch(keys):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1
        return {k: k for k in keys}

    batcher = MicroBatcher(fetch, max_size=20, window_seconds=0.001, max_concurrent=2)
    values = await asyncio.gather(*(batcher.load(f"k{i}") for i in range(200)))
    assert values[199] == "k199" and batcher.calls == 10 and peak == 2
