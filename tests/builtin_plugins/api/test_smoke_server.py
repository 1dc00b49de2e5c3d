"""The API server fixture itself works over real TCP."""

from __future__ import annotations

import pytest

from tests.builtin_plugins.conftest import ApiServer

pytestmark = pytest.mark.anyio


async def test_health_and_auth_over_real_server(api: ApiServer) -> None:
    async with api.client() as c:
        r = await c.get("/api/health")
        assert r.status_code == 200
        assert (await c.get("/api/plugins")).status_code == 401
    async with api.authed() as c:
        r = await c.get("/api/plugins")
        assert r.status_code == 200
        assert r.headers["X-RateLimit-Limit"] == "600"
