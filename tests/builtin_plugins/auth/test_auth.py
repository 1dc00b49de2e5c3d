"""The auth plugin through the kernel's ASGI app: login, default deny, logout, passwords."""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import anyio
import httpx
import jwt
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from builtin_plugins.auth.service import hash_password, verify_password
from kernel import Kernel
from kernel.protocols import AuthService
from kernel.testing import running_kernel
from tests.builtin_plugins.conftest import WS_MODES, ApiServer

pytestmark = pytest.mark.anyio
BUILTINS = ["api", "auth", "help"]


@pytest.fixture
async def kernel(tmp_path: Path) -> AsyncIterator[Kernel]:
    async with running_kernel(tmp_path / "data", builtin_plugins=BUILTINS) as k:
        yield k


@pytest.fixture
async def client(kernel: Kernel) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=kernel.asgi_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
        yield c


async def _login(client: httpx.AsyncClient, password: str = "nekobot") -> httpx.Response:
    return await client.post("/api/login", json={"username": "nekobot", "password": password})


async def test_login_returns_token_in_seed_shape_and_envelope(client: httpx.AsyncClient) -> None:
    r = await _login(client)
    assert r.status_code == 200
    body = r.json()
    assert body["token_type"] == "bearer"
    assert body["status"] == "success"
    assert body["data"]["access_token"] == body["access_token"]
    assert body["data"]["must_change_password"] is True
    assert body["data"]["expires_in"] == 86400


async def test_private_route_denied_without_or_with_bad_token(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    assert (await client.get("/api/account")).status_code == 401
    token = (await _login(client)).json()["access_token"]
    bad = [
        "garbage",
        jwt.encode(
            {"sub": "nekobot", "iat": 1, "exp": 2**31, "jti": "x"},
            "another-key-of-at-least-32-bytes!!",
            algorithm="HS256",
        ),
        jwt.encode({"sub": "nekobot", "iat": 1, "exp": 2**31, "jti": "x"}, None, algorithm="none"),
        token[:-2] + ("AA" if not token.endswith("AA") else "BB"),
    ]
    for value in bad:
        r = await client.get("/api/account", headers={"Authorization": f"Bearer {value}"})
        assert r.status_code == 401, value
        assert r.json()["code"] == "unauthorized"
    ok = await client.get("/api/account", headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200
    assert ok.json()["data"]["username"] == "nekobot"


async def test_expired_token_rejected(kernel: Kernel, client: httpx.AsyncClient) -> None:
    secret = (kernel.config.data_dir / "jwt_secret").read_text()
    expired = jwt.encode(
        {"sub": "nekobot", "iat": 1, "exp": 2, "jti": "old"}, secret, algorithm="HS256"
    )
    r = await client.get("/api/account", headers={"Authorization": f"Bearer {expired}"})
    assert r.status_code == 401


async def test_wrong_password_and_bad_bodies(client: httpx.AsyncClient) -> None:
    r = await _login(client, "wrong")
    assert r.status_code == 401
    assert r.json()["code"] == "invalid_credentials"
    r = await client.post(
        "/api/login", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400
    r = await client.post("/api/login", json={"username": "nekobot"})
    assert r.status_code == 400
    assert r.json()["details"]["field"] == "password"
    r = await client.post("/api/login", json={"username": 1, "password": "x"})
    assert r.status_code == 400
    assert r.json()["details"]["field"] == "username"
    r = await client.post("/api/login", json=["nekobot"])
    assert r.status_code == 400


async def test_login_is_rate_limited_per_user(client: httpx.AsyncClient) -> None:
    for _ in range(5):
        assert (await _login(client, "wrong")).status_code == 401
    r = await _login(client)  # even the right password waits now
    assert r.status_code == 429
    assert int(r.headers["Retry-After"]) > 0


async def test_old_password_guesses_count_against_the_login_limit(
    client: httpx.AsyncClient,
) -> None:
    """A stolen token is no way around the login limiter to guess the password."""
    token = (await _login(client)).json()["access_token"]

    async def change(old: str) -> httpx.Response:
        return await client.put(
            "/api/account/password",
            headers={"Authorization": f"Bearer {token}"},
            json={"old_password": old, "new_password": "long-enough-1"},
        )

    for _ in range(5):
        assert (await change("guess")).status_code == 400
    r = await change("nekobot")  # even the right one waits now
    assert r.status_code == 429
    assert "too many failed password attempts" in r.json()["message"]
    assert (await _login(client)).status_code == 429  # the same account's budget


async def test_logout_revokes_and_survives_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with running_kernel(data, builtin_plugins=BUILTINS) as k:
        transport = httpx.ASGITransport(app=k.asgi_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            token = (await _login(c)).json()["access_token"]
            auth = {"Authorization": f"Bearer {token}"}
            assert (await c.post("/api/logout", headers=auth)).status_code == 200
            assert (await c.get("/api/account", headers=auth)).status_code == 401
    async with running_kernel(data, builtin_plugins=BUILTINS) as k:
        transport = httpx.ASGITransport(app=k.asgi_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            assert (await c.get("/api/account", headers=auth)).status_code == 401


async def test_password_change(client: httpx.AsyncClient) -> None:
    token = (await _login(client)).json()["access_token"]

    async def change(old: str, new: str) -> httpx.Response:
        return await client.put(
            "/api/account/password",
            headers={"Authorization": f"Bearer {token}"},
            json={"old_password": old, "new_password": new},
        )

    for old_password, new_password, field in (
        ("nope", "long-enough-1", "old_password"),
        ("nekobot", "short", "new_password"),
    ):
        r = await change(old_password, new_password)
        assert r.status_code == 400
        assert r.json()["details"]["field"] == field
    assert (await change("nekobot", "long-enough-1")).status_code == 200
    assert (await _login(client)).status_code == 401
    r = await _login(client, "long-enough-1")
    assert r.status_code == 200
    assert r.json()["data"]["must_change_password"] is False


async def test_jwt_secret_file_is_private(kernel: Kernel) -> None:
    path = kernel.config.data_dir / "jwt_secret"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_password_hash_round_trip() -> None:
    stored = hash_password("s3cret")
    assert stored.startswith("scrypt$")
    assert "s3cret" not in stored
    assert verify_password("s3cret", stored)
    assert not verify_password("other", stored)
    assert not verify_password("s3cret", "garbage")


def test_login_limiter_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from builtin_plugins.auth import service

    monkeypatch.setattr(service, "MAX_TRACKED_KEYS", 100)
    limiter = service.LoginLimiter(max_failures=3, window=300)
    for i in range(1000):  # a spray of usernames
        limiter.failed(f"user:{i}")
    assert len(limiter._failures) <= 100
    for _ in range(10):
        limiter.failed("ip:1")
    assert len(limiter._failures["ip:1"]) == 3
    assert limiter.retry_after("ip:1") > 0


async def test_revocations_of_expired_tokens_are_purged(kernel: Kernel) -> None:
    import time

    auth = kernel.services.current(AuthService)
    await auth.revoke({"jti": "old", "exp": time.time() - 10})
    await auth.revoke({"jti": "new", "exp": time.time() + 1000})
    assert set(auth.revoked) == {"new"}
    rows = await auth.store.fetchall("SELECT jti FROM {t:revoked}")
    assert [r[0] for r in rows] == ["new"]


async def test_trailing_slash_is_a_404_envelope_not_a_redirect(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/health/")
    assert r.status_code == 404
    assert r.json()["code"] == "not_found"


async def test_verified_claims_are_the_callers_own(kernel: Kernel) -> None:
    auth = kernel.services.current(AuthService)
    token, _ = auth.issue("nekobot")
    claims = auth.verify(token)
    assert claims is not None
    claims["sub"] = "mallory"  # a route that changes the principal it was given
    del claims["jti"]
    again = auth.verify(token)  # the signature check is cached: the cache must not change
    assert again is not None
    assert again["sub"] == "nekobot" and "jti" in again


async def test_parallel_wrong_logins_get_exactly_the_limit_of_401s(
    client: httpx.AsyncClient,
) -> None:
    # The attempt is counted before the scrypt call (which yields to the event loop), so
    # logins in flight at once cannot all pass the check before any failure is recorded.
    statuses: list[int] = []

    async def wrong() -> None:
        statuses.append((await _login(client, "wrong")).status_code)

    async with anyio.create_task_group() as tg:
        for _ in range(100):
            tg.start_soon(wrong)
    assert sorted(statuses) == [401] * 5 + [429] * 95


@pytest.fixture
def one_second(monkeypatch: pytest.MonkeyPatch) -> float:
    """The auth service's clock stopped inside one second: what happens within one second
    (log in, change the password, ...) is then certain to, not a matter of timing."""
    from builtin_plugins.auth import service

    frozen = int(time.time()) + 0.25
    clock = SimpleNamespace(time=lambda: frozen, monotonic=time.monotonic)
    monkeypatch.setattr(service, "time", clock)
    return frozen


async def test_password_change_voids_tokens_of_the_same_second_and_answers_a_new_one(
    client: httpx.AsyncClient, one_second: float
) -> None:
    first = (await _login(client)).json()["access_token"]
    second = (await _login(client)).json()["access_token"]
    r = await client.put(
        "/api/account/password",
        headers={"Authorization": f"Bearer {first}"},
        json={"old_password": "nekobot", "new_password": "long-enough-1"},
    )
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert data["changed"] is True
    assert data["token_type"] == "bearer" and data["expires_in"] == 86400
    assert data["must_change_password"] is False
    for old in (first, second):
        r = await client.get("/api/account", headers={"Authorization": f"Bearer {old}"})
        assert r.status_code == 401, "a token from before the change still works"
    r = await client.get(
        "/api/account", headers={"Authorization": f"Bearer {data['access_token']}"}
    )
    assert r.status_code == 200
    assert r.json()["data"] == {"username": "nekobot", "must_change_password": False}


async def test_tokens_from_before_token_versions_keep_working(tmp_path: Path) -> None:
    # Accounts and tokens written before token versions: no `token_version`, no `ver`
    # claim; the old whole-second rule still voids what came before their last change.
    data = tmp_path / "data"
    async with running_kernel(data, builtin_plugins=BUILTINS) as k:
        changed_at = int(time.time()) - 100
        await k.services.current(AuthService).store.kv_set(
            "account:nekobot",
            {"password_hash": hash_password("long-enough-1"), "tokens_after": changed_at},
        )
    async with running_kernel(data, builtin_plugins=BUILTINS) as k:
        secret = (data / "jwt_secret").read_text()

        def legacy(iat: int) -> str:
            claims = {"sub": "nekobot", "iat": iat, "exp": iat + 1000, "jti": f"j{iat}"}
            return jwt.encode(claims, secret, algorithm="HS256")

        transport = httpx.ASGITransport(app=k.asgi_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:

            async def status(token: str) -> int:
                r = await c.get("/api/account", headers={"Authorization": f"Bearer {token}"})
                return r.status_code

            after, before = legacy(changed_at + 10), legacy(changed_at - 10)
            assert await status(after) == 200
            assert await status(before) == 401
            r = await c.put(
                "/api/account/password",
                headers={"Authorization": f"Bearer {after}"},
                json={"old_password": "long-enough-1", "new_password": "long-enough-2"},
            )
            assert r.status_code == 200, r.text
            assert await status(after) == 401
            assert await status(r.json()["data"]["access_token"]) == 200


@pytest.mark.parametrize("api", WS_MODES, indirect=True)
async def test_ws_closes_4401_on_a_password_change_of_the_same_second(
    api: ApiServer, monkeypatch: pytest.MonkeyPatch, one_second: float
) -> None:
    from builtin_plugins.api import fanout

    monkeypatch.setattr(fanout, "TOKEN_CHECK_SECONDS", 0.05)
    token, _ = api.kernel.services.current(AuthService).issue("nekobot")
    async with websockets.connect(api.ws_url(f"?token={token}")) as ws:
        await ws.send(json.dumps({"action": "ping"}))
        with anyio.fail_after(5):
            assert json.loads(await ws.recv()) == {"type": "pong"}
        async with api.authed() as c:
            body = {"old_password": "nekobot", "new_password": "a-much-better-one"}
            assert (await c.put("/api/account/password", json=body)).status_code == 200
        with anyio.fail_after(10):
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
