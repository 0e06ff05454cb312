"""Outbound HTTP for enrichers: one small helper on httpx with the safety rules built in.

Guarantees of `HttpClient`:
- TLS is verified; plain `http://` is refused unless the host is explicitly allowed as private
  (`allow_private_hosts`, e.g. "127.0.0.1" for a local test server);
- every call has a timeout (connect, read, write, pool), and the whole call including retries a
  deadline (`total_seconds`), well within the enricher's own timeout;
- 429 and 503 are retried at most `max_retries` times, honouring Retry-After (seconds or an HTTP
  date); a Retry-After that does not fit in the remaining time fails the call at once instead of
  sleeping past the enricher's timeout;
- redirects are followed only to the same scheme, host and port (at most 3); a redirect elsewhere
  fails the call;
- with an allow-list (`allowed_hosts`: exact names or "*.example.com"), any other host is refused,
  and so is a host that is or resolves to a private, loopback, link-local or reserved address,
  unless it is listed in `allow_private_hosts`;
- every failure is an `EnricherUnavailable` (or `EnricherTimeout`) raised `from` the library error,
  whose message names the host and the status only: never the path, query or body, which may
  carry a user name.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Mapping
from typing import Any

import httpx
import orjson

from pipeline.errors import EnricherTimeout, EnricherUnavailable, translate
from pipeline.resilience.retry import parse_retry_after

RETRY_STATUSES = frozenset({429, 503})
_MAX_REDIRECTS = 3


def _is_private(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    return ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast or ip.is_unspecified


def host_matches(host: str, patterns: list[str] | tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    for pattern in patterns:
        pattern = pattern.lower().rstrip(".")
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and host != pattern[2:]:
                return True
        elif host == pattern:
            return True
    return False


def check_base_url(url: str, allow_private_hosts: list[str] | tuple[str, ...] = ()) -> str:
    """For settings validators: an https URL, or http only to a host allowed as private (tests)."""
    parsed = httpx.URL(url)
    if not parsed.host:
        raise ValueError("the URL has no host")
    if parsed.scheme != "https" and not (parsed.scheme == "http" and host_matches(parsed.host, allow_private_hosts)):
        raise ValueError(f"{parsed.scheme}://{parsed.host}: only https is allowed")
    return url


POOL_CONNECTIONS = 16  # requests in flight per client (per source): more wait in an asyncio queue


class HttpClient:
    """An async HTTP client for one enricher. Build it in `start()`, close it in `aclose()`."""

    def __init__(
        self,
        *,
        timeout: float = 5.0,
        total_seconds: float | None = None,
        max_retries: int = 2,
        max_retry_after: float = 5.0,
        allowed_hosts: list[str] | tuple[str, ...] | None = None,
        allow_private_hosts: list[str] | tuple[str, ...] = (),
        headers: Mapping[str, str] | None = None,
        max_response_bytes: int = 4 * 1024 * 1024,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.timeout = timeout
        self.total_seconds = total_seconds if total_seconds is not None else timeout * (max_retries + 1)
        self.max_retries = max_retries
        self.max_retry_after = max_retry_after
        self.allowed_hosts = tuple(allowed_hosts) if allowed_hosts is not None else None
        self.allow_private_hosts = tuple(allow_private_hosts)
        self.max_response_bytes = max_response_bytes
        self.requests_sent = 0  # every request on the wire, retries included
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            # Few connections, all kept alive, and requests queued here rather than in httpcore's pool,
            # whose bookkeeping grows with (connections x queued requests) on every answer.
            limits=httpx.Limits(max_connections=POOL_CONNECTIONS, max_keepalive_connections=POOL_CONNECTIONS),
            verify=True,
            follow_redirects=False,
            headers=dict(headers or {}),
            transport=transport,
            trust_env=False,
        )
        self._checked: dict[str, float] = {}
        self._in_flight = asyncio.Semaphore(POOL_CONNECTIONS)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- host rules ----------------------------------------------------------------------------

    async def check_url(self, url: httpx.URL) -> None:
        host = (url.host or "").lower()
        if not host:
            raise EnricherUnavailable("URL without a host refused")
        private_ok = host_matches(host, self.allow_private_hosts)
        if url.scheme != "https" and not (url.scheme == "http" and private_ok):
            raise EnricherUnavailable(f"{url.scheme}://{host}: only https is allowed")
        if self.allowed_hosts is None:
            return
        if not host_matches(host, self.allowed_hosts):
            raise EnricherUnavailable(f"host {host} is not in the allow-list")
        if private_ok:
            return
        if host in self._checked and self._checked[host] > time.monotonic():
            return
        if _is_private(host):
            raise EnricherUnavailable(f"host {host} is a private or local address")
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, url.port or 443, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise EnricherUnavailable(f"host {host} does not resolve") from exc
        # An IP socket address starts with its address text; anything else is refused, not trusted.
        if any(not isinstance(address := info[4][0], str) or _is_private(address) for info in infos):
            raise EnricherUnavailable(f"host {host} resolves to a private or local address")
        self._checked[host] = time.monotonic() + 300

    # -- requests ------------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        ok_statuses: tuple[int, ...] | None = None,
    ) -> httpx.Response:
        """Send with retries; return the response when its status is 2xx or in `ok_statuses`."""
        deadline = time.monotonic() + self.total_seconds
        target = httpx.URL(url, params=params) if params else httpx.URL(url)
        body = orjson.dumps(json) if json is not None else content
        send_headers = dict(headers or {})
        if json is not None:
            send_headers.setdefault("Content-Type", "application/json")
        attempt = 0
        redirects = 0
        while True:
            await self.check_url(target)
            response = await self._send(method, target, body, send_headers, deadline)
            status = response.status_code
            if 300 <= status < 400 and "location" in response.headers:
                location = target.join(response.headers["location"])
                if (location.scheme, location.host, location.port) != (target.scheme, target.host, target.port):
                    raise EnricherUnavailable(f"{target.host}: redirect to another host refused")
                redirects += 1
                if redirects > _MAX_REDIRECTS:
                    raise EnricherUnavailable(f"{target.host}: too many redirects")
                target = location
                continue
            if status in RETRY_STATUSES and attempt < self.max_retries:
                wait = parse_retry_after(response.headers.get("retry-after"))
                wait = min(0.5 * 2**attempt, 4.0) if wait is None else wait
                if wait > self.max_retry_after or time.monotonic() + wait >= deadline:
                    raise EnricherUnavailable(f"{target.host}: HTTP {status}, retry after {wait:g}s does not fit the time left")
                attempt += 1
                await asyncio.sleep(wait)
                continue
            if 200 <= status < 300 or (ok_statuses and status in ok_statuses):
                return response
            raise EnricherUnavailable(f"{target.host}: HTTP {status}")

    async def _send(self, method: str, url: httpx.URL, body: bytes | None, headers: dict[str, str], deadline: float) -> httpx.Response:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise EnricherTimeout(f"{url.host}: no answer within {self.total_seconds:g}s")
        self.requests_sent += 1
        try:
            async with asyncio.timeout(remaining), self._in_flight:
                async with self._client.stream(method, url, content=body, headers=headers) as response:
                    declared = response.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > self.max_response_bytes:
                        raise EnricherUnavailable(f"{url.host}: response larger than {self.max_response_bytes} bytes")
                    chunks, size = [], 0
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > self.max_response_bytes:
                            raise EnricherUnavailable(f"{url.host}: response larger than {self.max_response_bytes} bytes")
                        chunks.append(chunk)
                    response._content = b"".join(chunks)  # read once, bounded
                    return response
        except (EnricherUnavailable, EnricherTimeout):
            raise
        except TimeoutError as exc:
            raise EnricherTimeout(f"{url.host}: no answer within {self.total_seconds:g}s") from exc
        except httpx.TimeoutException as exc:
            raise EnricherTimeout(f"{url.host}: timed out ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            error = translate(exc, role="enricher")
            raise type(error)(f"{url.host}: {type(exc).__name__}") from exc

    async def json(self, method: str, url: str, **kwargs: Any) -> Any:
        """`request`, then the body parsed as JSON (a malformed body is EnricherUnavailable)."""
        response = await self.request(method, url, **kwargs)
        return parse_json(response)


def parse_json(response: httpx.Response) -> Any:
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError as exc:
        raise EnricherUnavailable(f"{response.request.url.host}: malformed JSON body (HTTP {response.status_code})") from exc


class BearerToken:
    """Authorization headers from an azure-core async credential (`get_token(scope)`), refreshed early.
    The credential belongs to whoever made it (`Services.credential`): this never closes it."""

    def __init__(self, credential: Any, scope: str) -> None:
        self.credential = credential
        self.scope = scope
        self._token: str | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()

    async def headers(self) -> dict[str, str]:
        if self._token is None or self._expires - 300 <= time.time():
            async with self._lock:
                if self._token is None or self._expires - 300 <= time.time():
                    try:
                        token = await self.credential.get_token(self.scope)
                    except Exception as exc:
                        raise EnricherUnavailable(f"no token for {self.scope}: {type(exc).__name__}") from exc
                    self._token, self._expires = token.token, float(token.expires_on)
        return {"Authorization": f"Bearer {self._token}"}
