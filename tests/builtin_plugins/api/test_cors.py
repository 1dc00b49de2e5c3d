"""CORS follows the live `cors_origins` setting; other origins get no CORS headers."""

from __future__ import annotations

import pytest

from tests.builtin_plugins.conftest import ApiServer

pytestmark = pytest.mark.anyio
ORIGIN = "http://dashboard.test:5173"


async def test_cors_only_for_allowed_origins(api: ApiServer) -> None:
    async with api.authed() as c:
        r = await c.get("/api/plugins", headers={"Origin": ORIGIN})
        assert "access-control-allow-origin" not in r.headers
        r = await c.put("/api/settings", json={"cors_origins": [ORIGIN]})
        assert r.status_code == 200
        r = await c.get("/api/plugins", headers={"Origin": ORIGIN})
        assert r.headers["access-control-allow-origin"] == ORIGIN
        assert "X-RateLimit-Remaining" in r.headers["access-control-expose-headers"]
        r = await c.get("/api/plugins", headers={"Origin": "http://evil.test"})
        assert "access-control-allow-origin" not in r.headers
        r = await c.put("/api/settings", json={"cors_origins": ["not a url"]})
        assert r.status_code == 400
        assert r.json()["details"]["field"] == "cors_origins.0"


async def test_preflight_needs_no_token(api: ApiServer) -> None:
    async with api.authed() as c:
        await c.put("/api/settings", json={"cors_origins": [ORIGIN]})
    async with api.client() as c:
        r = await c.options(
            "/api/plugins/enable",
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type, x-evil",
            },
        )
        assert r.status_code == 204
        assert r.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in r.headers["access-control-allow-methods"]
        assert r.headers["access-control-allow-headers"] == "authorization, content-type"
        r = await c.options(
            "/api/plugins/enable",
            headers={"Origin": "http://evil.test", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in r.headers


async def test_error_answers_carry_cors_headers_too(api: ApiServer) -> None:
    """A dashboard on an allowed origin must be able to read why a request failed."""
    async with api.authed() as c:
        await c.put("/api/settings", json={"cors_origins": [ORIGIN]})
        for method, path, body in (
            ("PUT", "/api/settings", {"no_such_setting": 1}),  # raised by the route
            ("POST", "/api/plugins/enable", {"name": "zz_no_such_plugin"}),  # by the kernel
            ("GET", "/api/no/such/route", None),  # by the router
        ):
            r = await c.request(method, path, json=body, headers={"Origin": ORIGIN})
            assert r.status_code >= 400, (path, r.status_code)
            assert r.headers.get("access-control-allow-origin") == ORIGIN, (path, r.headers)
            assert "X-RateLimit-Remaining" in r.headers["access-control-expose-headers"]
