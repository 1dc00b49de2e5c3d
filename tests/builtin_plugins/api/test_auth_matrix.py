"""Default deny over a real server: every private route, read from the live route
registry (so routes added later are covered too), refuses every kind of bad token."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import anyio
import httpx
import jwt
import pytest
import websockets
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close

from builtin_plugins.api import fanout
from builtin_plugins.auth.service import AuthService
from kernel import protocols
from kernel.testing import PATIENCE
from tests.builtin_plugins.conftest import WS_MODES, ApiServer

pytestmark = pytest.mark.anyio

#: The only routes anyone may call without a token. Adding one is a conscious decision.
PUBLIC = {("/api/login", "POST"), ("/api/health", "GET"), ("/ws", "WS")}
OTHER_KEY = "another-signing-key-of-at-least-32-bytes!!"
#: The reason a connection is closed with when its token stops holding.
REVOKED = "token expired or revoked"


def private_http_routes(api: ApiServer) -> list[tuple[str, str]]:
    """(path with parameters filled in, method) of every non-public HTTP route."""
    out = []
    for entry in api.kernel.routes:
        (path, method), route = entry.item
        if route.public or route.websocket:
            continue
        out.append((re.sub(r"{[^}]+}", "x", path), method))
    assert len(out) >= 20
    return sorted(out)


def secret(api: ApiServer) -> str:
    return (api.kernel.config.data_dir / "jwt_secret").read_text().strip()


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "nekobot", "iat": now, "exp": now + 600, "jti": "t" * 32, **changes}


async def bad_tokens(api: ApiServer) -> dict[str, str]:
    """Every kind of token that must be refused, by a name for the failure message."""
    key = secret(api)
    async with api.client() as c:
        r = await c.post("/api/login", json={"username": "nekobot", "password": "nekobot"})
        revoked = r.json()["access_token"]
        r = await c.post("/api/logout", headers={"Authorization": f"Bearer {revoked}"})
        assert r.status_code == 200
    header, payload, signature = api.token.split(".")
    return {
        "malformed": "not.a.jwt",
        "garbage": "x" * 40,
        "other key": jwt.encode(claims(), OTHER_KEY, algorithm="HS256"),
        "alg none": jwt.encode(claims(), None, algorithm="none"),
        "alg none, no signature": jwt.encode(claims(), None, algorithm="none").rstrip(".") + ".",
        "HS512 with the right key": jwt.encode(claims(), key, algorithm="HS512"),
        "expired": jwt.encode(claims(iat=1, exp=2), key, algorithm="HS256"),
        "no jti": jwt.encode({k: v for k, v in claims().items() if k != "jti"}, key, "HS256"),
        "no exp": jwt.encode({k: v for k, v in claims().items() if k != "exp"}, key, "HS256"),
        "tampered payload": f"{header}.{payload[:-2]}AA.{signature}",
        "revoked": revoked,
    }


def assert_unauthorized(r: httpx.Response, why: str) -> None:
    assert r.status_code == 401, (why, r.request.method, r.request.url, r.text)
    body = r.json()
    assert body["status"] == "error" and body["code"] == "unauthorized", body
    assert "Traceback" not in r.text


async def test_public_routes_are_exactly_the_known_ones(api: ApiServer) -> None:
    public = set()
    for entry in api.kernel.routes:
        (path, method), route = entry.item
        if route.public:
            public.add((path, method))
    assert public == PUBLIC


async def test_every_private_route_refuses_requests_without_a_valid_token(
    api: ApiServer,
) -> None:
    # Hundreds of requests: more than the default rate limit allows as routes are added.
    await api.kernel.update_settings(rate_limit_per_minute=1_000_000)
    routes = private_http_routes(api)
    tokens = await bad_tokens(api)
    headers: dict[str, dict[str, str]] = {
        "no header": {},
        "empty bearer": {"Authorization": "Bearer"},
        "basic auth": {"Authorization": "Basic bmVrb2JvdDpuZWtvYm90"},
        "token without scheme": {"Authorization": api.token},
        **{name: {"Authorization": f"Bearer {token}"} for name, token in tokens.items()},
    }
    async with api.client() as c:
        for path, method in routes:
            for why, h in headers.items():
                r = await c.request(method, path, headers=h, json={"name": "help"})
                assert_unauthorized(r, why)
            # A token in the query string is for WebSockets only.
            r = await c.request(method, path, params={"token": api.token})
            assert_unauthorized(r, "query token")
    # The valid token works on all of them (whatever they answer, it is not 401).
    async with api.authed() as c:
        for path, method in routes:
            if (path, method) in (("/api/logout", "POST"), ("/api/plugins/reload", "POST")):
                continue
            r = await c.request(method, path)
            assert r.status_code != 401, (method, path, r.text)
            assert r.status_code < 500, (method, path, r.text)


async def test_logout_revokes_only_that_token(api: ApiServer) -> None:
    async with api.client() as c:
        tokens = []
        for _ in range(2):
            r = await c.post("/api/login", json={"username": "nekobot", "password": "nekobot"})
            tokens.append(r.json()["access_token"])
        first, second = ({"Authorization": f"Bearer {t}"} for t in tokens)
        assert (await c.post("/api/logout", headers=first)).status_code == 200
        assert_unauthorized(await c.get("/api/account", headers=first), "revoked")
        assert_unauthorized(await c.post("/api/logout", headers=first), "revoked twice")
        assert (await c.get("/api/account", headers=second)).status_code == 200


async def test_public_routes_need_no_token(api: ApiServer) -> None:
    async with api.client() as c:
        assert (await c.get("/api/health")).status_code == 200
        assert (await c.head("/api/health")).status_code == 200
        r = await c.post("/api/login", json={"username": "nekobot", "password": "wrong"})
        assert r.status_code == 401 and r.json()["code"] == "invalid_credentials"


# -- WebSocket -------------------------------------------------------------------------


async def closed_by_server(
    ws: websockets.ClientConnection, *frames: str, timeout: float = PATIENCE
) -> Close | None:
    """Send `frames`, then read until the server closes `ws`; the close frame it sent.

    The server may close before a frame is sent (a grace period or a token's lifetime
    may run out first on a slow machine): the client library then raises from `send`
    rather than from `recv`, with the same close frame received, and that is the answer."""
    with anyio.fail_after(timeout):
        try:
            for frame in frames:
                await ws.send(frame)
            while True:
                await ws.recv()
        except ConnectionClosed as exc:
            return exc.rcvd


async def close_code(ws: websockets.ClientConnection, *frames: str) -> int | None:
    """`closed_by_server`'s close code."""
    close = await closed_by_server(ws, *frames)
    return close.code if close is not None else None


@pytest.mark.parametrize("api", WS_MODES, indirect=True)
async def test_ws_without_a_token_is_closed_after_the_grace_period(
    api: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fanout, "AUTH_GRACE_SECONDS", 0.3)
    async with websockets.connect(api.ws_url()) as ws:
        assert await close_code(ws) in (4401, 1008)
    # A bad token in the header or the query string does not authenticate either.
    tokens = await bad_tokens(api)
    for why in ("other key", "alg none", "expired", "revoked"):
        header = {"Authorization": f"Bearer {tokens[why]}"}
        async with websockets.connect(api.ws_url(), additional_headers=header) as ws:
            subscribe = json.dumps({"action": "subscribe", "channels": ["events"]})
            assert await close_code(ws, subscribe) in (4401, 1008), why
        async with websockets.connect(api.ws_url(f"?token={tokens[why]}")) as ws:
            assert await close_code(ws) in (4401, 1008), why


@pytest.mark.parametrize("api", WS_MODES, indirect=True)
async def test_ws_with_a_bad_first_frame_is_closed_at_once(
    api: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No grace period runs out meanwhile: a close can only be the answer to the frame.
    monkeypatch.setattr(fanout, "AUTH_GRACE_SECONDS", 3600.0)
    tokens = await bad_tokens(api)
    frames = [
        "not json",
        json.dumps({"action": "subscribe", "channels": ["logs"]}),
        json.dumps({"action": "auth"}),
        json.dumps({"action": "auth", "token": 42}),
        *(json.dumps({"action": "auth", "token": t}) for t in tokens.values()),
    ]
    for frame in frames:
        async with websockets.connect(api.ws_url()) as ws:
            assert await close_code(ws, frame) in (4401, 1008), frame


@pytest.mark.parametrize("api", WS_MODES, indirect=True)
async def test_ws_authenticates_by_header_query_or_first_frame(api: ApiServer) -> None:
    async def works(ws: websockets.ClientConnection) -> None:
        await ws.send(json.dumps({"action": "ping"}))
        with anyio.fail_after(PATIENCE):
            while True:
                message = json.loads(await ws.recv())
                if message["type"] == "pong":
                    return

    async with websockets.connect(api.ws_url(), additional_headers=api.headers) as ws:
        await works(ws)
    async with websockets.connect(api.ws_url(f"?token={api.token}")) as ws:
        await works(ws)
    async with websockets.connect(api.ws_url()) as ws:
        await ws.send(json.dumps({"action": "auth", "token": api.token}))
        with anyio.fail_after(PATIENCE):
            assert json.loads(await ws.recv()) == {"type": "authenticated"}
        await works(ws)


@pytest.mark.parametrize("api", WS_MODES, indirect=True)
async def test_ws_is_closed_when_its_token_is_revoked_or_expires(
    api: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fanout, "TOKEN_CHECK_SECONDS", 0.05)
    async with api.client() as c:
        r = await c.post("/api/login", json={"username": "nekobot", "password": "nekobot"})
        token = r.json()["access_token"]
    header = {"Authorization": f"Bearer {token}"}
    async with (
        websockets.connect(api.ws_url(), additional_headers=header) as by_header,
        websockets.connect(api.ws_url()) as by_frame,
        websockets.connect(api.ws_url(), additional_headers=api.headers) as other,
    ):
        await by_frame.send(json.dumps({"action": "auth", "token": token}))
        with anyio.fail_after(PATIENCE):
            assert json.loads(await by_frame.recv()) == {"type": "authenticated"}
        async with api.client() as c:
            assert (await c.post("/api/logout", headers=header)).status_code == 200
        for ws in (by_header, by_frame):
            close = await closed_by_server(ws)
            assert close is not None and (close.code, close.reason) == (4401, REVOKED)
        # Another token's connection is not affected.
        await other.send(json.dumps({"action": "ping"}))
        with anyio.fail_after(PATIENCE):
            while json.loads(await other.recv())["type"] != "pong":
                pass
    # A token that expires while its socket is open. It must outlive the connection's
    # set-up, which a loaded machine can make slow: one that expired before its
    # connection was answered proves nothing, and is tried again with a longer life.
    lifetime = 2
    while True:
        soon = jwt.encode(claims(exp=int(time.time()) + lifetime), secret(api), algorithm="HS256")
        async with websockets.connect(api.ws_url(f"?token={soon}")) as ws:
            try:
                await ws.send(json.dumps({"action": "ping"}))
                with anyio.fail_after(PATIENCE):
                    answered = json.loads(await ws.recv()) == {"type": "pong"}
            except ConnectionClosed:
                answered = False  # refused (expired already), or closed before the pong
            close = await closed_by_server(ws, timeout=lifetime + PATIENCE)
        assert close is not None and close.code == 4401
        if answered:
            break
        assert lifetime < 60, "every token expired before its connection was answered"
        lifetime *= 2
    assert close.reason == REVOKED


@pytest.mark.parametrize("api", WS_MODES, indirect=True)
async def test_ws_is_closed_when_a_password_change_voids_its_token(
    api: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fanout, "TOKEN_CHECK_SECONDS", 0.05)
    leaked = jwt.encode(claims(iat=int(time.time()) - 5), secret(api), algorithm="HS256")
    async with websockets.connect(
        api.ws_url(), additional_headers={"Authorization": f"Bearer {leaked}"}
    ) as ws:
        await ws.send(json.dumps({"action": "ping"}))
        with anyio.fail_after(PATIENCE):
            assert json.loads(await ws.recv()) == {"type": "pong"}
        async with api.authed() as c:
            body = {"old_password": "nekobot", "new_password": "a-much-better-one"}
            assert (await c.put("/api/account/password", json=body)).status_code == 200
        close = await closed_by_server(ws)
        assert close is not None and (close.code, close.reason) == (4401, REVOKED)


async def test_account_and_password_change_over_the_server(api: ApiServer) -> None:
    # A token issued a while ago (say, one that leaked).
    earlier = int(time.time()) - 5
    leaked = jwt.encode(claims(iat=earlier, jti="l" * 32), secret(api), algorithm="HS256")
    leaked_header = {"Authorization": f"Bearer {leaked}"}
    async with api.authed() as c:
        r = await c.get("/api/account", headers=leaked_header)
        assert r.json()["data"] == {"username": "nekobot", "must_change_password": True}
        body = {"old_password": "nekobot", "new_password": "a-much-better-one"}
        r = await c.put("/api/account/password", json=body)
        assert r.status_code == 200, r.text
    async with api.client() as c:
        # Changing the password voids the tokens issued before.
        assert_unauthorized(await c.get("/api/account", headers=leaked_header), "old token")
        r = await c.post("/api/login", json={"username": "nekobot", "password": "nekobot"})
        assert r.status_code == 401
        r = await c.post(
            "/api/login", json={"username": "nekobot", "password": "a-much-better-one"}
        )
        assert r.status_code == 200
        assert r.json()["data"]["must_change_password"] is False
        fresh = {"Authorization": f"Bearer {r.json()['access_token']}"}
        r = await c.get("/api/account", headers=fresh)
        assert r.json()["data"] == {"username": "nekobot", "must_change_password": False}
    # Still so after a restart: a new service on the same store reads it back.
    service = api.kernel.services.current(protocols.AuthService)
    assert isinstance(service, AuthService)
    again = AuthService(service.store, service.secret, lambda: api.kernel.settings)
    await again.start()
    assert again.verify(leaked) is None
