"""Rate limiting over a real server: the `X-RateLimit-*` headers on every API response,
429 with `Retry-After` past the (live) limit, and the stricter login limits."""

from __future__ import annotations

import re
import secrets
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.builtin_plugins.conftest import ApiServer, api_server

pytestmark = pytest.mark.anyio

HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")


def _can_bind(address: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((address, 0))
    except OSError:
        return False
    return True


#: Linux routes all of 127/8 to loopback; elsewhere (macOS) only 127.0.0.1 may exist.
needs_loopback_aliases = pytest.mark.skipif(
    not _can_bind("127.0.0.2"), reason="no 127.0.0.x addresses besides 127.0.0.1"
)


def from_address(api: ApiServer, address: str, **kwargs: object) -> httpx.AsyncClient:
    """A client whose requests come from `address` (any 127.x.y.z is loopback)."""
    transport = httpx.AsyncHTTPTransport(local_address=address)
    return api.client(transport=transport, **kwargs)


def check_headers(r: httpx.Response, limit: int) -> tuple[int, int]:
    """The response's (remaining, reset), after checking the headers are sane."""
    for name in HEADERS:
        assert name in r.headers, (r.request.method, r.request.url, r.status_code)
    assert r.headers["X-RateLimit-Limit"] == str(limit)
    remaining = int(r.headers["X-RateLimit-Remaining"])
    reset = int(r.headers["X-RateLimit-Reset"])
    assert 0 <= remaining < limit
    assert time.time() - 1 <= reset <= time.time() + 61
    return remaining, reset


async def test_every_api_response_carries_the_headers(api: ApiServer) -> None:
    paths = []
    for entry in api.kernel.routes:
        (path, method), route = entry.item
        if not route.websocket and path.startswith("/api"):
            paths.append((re.sub(r"{[^}]+}", "x", path), method))
    assert ("/api/plugins", "GET") in paths
    last: tuple[int, int] | None = None
    async with api.authed() as c:
        responses = [await c.request(m, p) for p, m in sorted(paths) if p != "/api/logout"]
        responses.append(await c.get("/api/no/such/route"))  # 404
        responses.append(await c.delete("/api/health"))  # 405
    async with api.client() as c:
        responses.append(await c.get("/api/plugins"))  # 401
        responses.append(await c.post("/api/login", json={"username": "nekobot"}))  # 400
    for r in responses:
        remaining, reset = check_headers(r, 600)
        if last is not None and last[1] == reset:
            # One client, one window: each request counts once.
            assert remaining == last[0] - 1
        last = (remaining, reset)


@needs_loopback_aliases
async def test_past_the_limit_is_429_with_retry_after(api: ApiServer) -> None:
    async with api.authed() as c:
        r = await c.put("/api/settings", json={"rate_limit_per_minute": 5})
        assert r.status_code == 200
        limited = None
        # Five per minute; a new minute may begin once in between, hence the margin.
        for _ in range(15):
            r = await c.get("/api/plugins")
            if r.status_code == 429:
                limited = r
                break
            assert r.status_code == 200
            check_headers(r, 5)
        assert limited is not None, "never rate limited"
        body = limited.json()
        assert body["status"] == "error" and body["code"] == "rate_limited"
        assert "Traceback" not in limited.text
        retry = int(limited.headers["Retry-After"])
        assert 1 <= retry <= 60
        remaining, reset = check_headers(limited, 5)
        assert remaining == 0
        assert reset - int(time.time()) <= retry + 1
        # Everything under /api is limited, public routes and bad requests included.
        assert (await c.get("/api/health")).status_code == 429
        assert (await c.put("/api/settings", json={"bogus": 1})).status_code == 429
    # Per client: another address is not limited.
    async with from_address(api, "127.0.0.2", headers=api.headers) as other:
        r = await other.get("/api/plugins")
        assert r.status_code == 200
        check_headers(r, 5)
        # Raising the limit applies at once.
        assert (await other.put("/api/settings", json={"rate_limit_per_minute": 1000})).is_success
    async with api.authed() as c:
        r = await c.get("/api/plugins")
        assert r.status_code == 200
        check_headers(r, 1000)


async def _login(c: httpx.AsyncClient, username: str, password: str) -> httpx.Response:
    return await c.post("/api/login", json={"username": username, "password": password})


@needs_loopback_aliases
async def test_login_is_limited_per_address(api: ApiServer) -> None:
    async with api.authed() as c:
        assert (await c.put("/api/settings", json={"login_max_failures": 3})).is_success
    async with from_address(api, "127.0.0.2") as c:
        for i in range(3):
            r = await _login(c, f"guess{i}", "wrong")
            assert r.status_code == 401
        # From this address even the right password is refused for a while.
        r = await _login(c, "nekobot", "nekobot")
        assert r.status_code == 429, r.text
        assert r.json()["code"] == "rate_limited"
        assert 1 <= int(r.headers["Retry-After"]) <= 300
        assert (await _login(c, "guess9", "x")).status_code == 429
    # Another address, same account: fine.
    async with from_address(api, "127.0.0.3") as c:
        assert (await _login(c, "nekobot", "nekobot")).status_code == 200


@needs_loopback_aliases
async def test_login_is_limited_per_username(api: ApiServer) -> None:
    async with api.authed() as c:
        assert (await c.put("/api/settings", json={"login_max_failures": 3})).is_success
    # A guess each from many addresses: the account is protected all the same.
    for i in range(3):
        async with from_address(api, f"127.0.0.{10 + i}") as c:
            assert (await _login(c, "nekobot", f"guess{i}")).status_code == 401
    async with from_address(api, "127.0.0.20") as c:
        r = await _login(c, "nekobot", "nekobot")
        assert r.status_code == 429, r.text
        assert "Retry-After" in r.headers
        # The username is compared case-insensitively.
        assert (await _login(c, "NekoBot", "nekobot")).status_code == 429
        # Other accounts from that address are not affected.
        assert (await _login(c, "someone", "x")).status_code == 401
    # Tokens issued before keep working.
    async with api.authed() as c:
        assert (await c.get("/api/account")).status_code == 200


async def same_window_pair(api: ApiServer) -> tuple[httpx.Response, httpx.Response]:
    """Two requests, each claiming another forwarded address, in the same window."""
    async with api.client() as c:
        while True:
            first, second = [
                await c.get(
                    "/api/health", headers={"X-Forwarded-For": f"10.0.0.{secrets.randbelow(250)}"}
                )
                for _ in range(2)
            ]
            if first.headers["X-RateLimit-Reset"] == second.headers["X-RateLimit-Reset"]:
                return first, second


async def test_forwarded_for_does_not_choose_the_rate_limit_bucket(api: ApiServer) -> None:
    first, second = await same_window_pair(api)
    # One bucket, the TCP peer's: the header is nobody's word.
    remaining = int(first.headers["X-RateLimit-Remaining"])
    assert int(second.headers["X-RateLimit-Remaining"]) == remaining - 1


async def test_forwarded_for_from_a_trusted_proxy_is_the_client(tmp_path: Path) -> None:
    async with api_server(tmp_path, trusted_proxies=("127.0.0.1",)) as api:
        limit = api.kernel.settings.rate_limit_per_minute
        first, second = await same_window_pair(api)
        assert int(first.headers["X-RateLimit-Remaining"]) == limit - 1
        assert int(second.headers["X-RateLimit-Remaining"]) == limit - 1
