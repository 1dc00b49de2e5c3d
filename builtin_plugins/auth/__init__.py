"""The essential `auth` plugin: login, logout, password change, and the middleware that
vouches for requests carrying a valid bearer token (everything else is denied)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from builtin_plugins.api.openapi import BOOL, STR, json_body, obj, operation, returns
from builtin_plugins.api.web import ApiError, read_json, success
from builtin_plugins.auth.service import AuthService, load_secret
from kernel import MiddlewareSpec, PluginContext, RouteSpec, hookimpl, protocols
from kernel.asgi import PRINCIPAL

provides = (protocols.AuthService,)


def _service(scope: Scope) -> AuthService | None:
    kernel = scope.get("nekobot.kernel")
    service = kernel.services.current(protocols.AuthService) if kernel is not None else None
    return service if isinstance(service, AuthService) else None


def bearer_token(scope: Scope) -> str | None:
    """The token of a request: `Authorization: Bearer ...`, or `?token=` on a WebSocket."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            kind, _, token = value.decode("latin-1").partition(" ")
            if kind.lower() == "bearer" and token:
                return str(token).strip()
    if scope["type"] == "websocket":
        from urllib.parse import parse_qs

        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if query.get("token"):
            return str(query["token"][0])
    return None


class AuthMiddleware:
    """Sets `scope["nekobot.principal"]` for a request whose bearer token is valid."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope.pop(PRINCIPAL, None)  # never trust a principal set before us
            service = _service(scope)
            token = bearer_token(scope)
            if service is not None and token:
                claims = service.verify(token)
                if claims is not None:
                    scope[PRINCIPAL] = {"username": claims["sub"], "claims": claims}
        await self.app(scope, receive, send)


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _require_service(request: Request) -> AuthService:
    service = _service(request.scope)
    if service is None:
        raise ApiError(503, "authentication is not available", "unavailable")
    return service


async def login(request: Request) -> JSONResponse:
    """`POST /api/login {"username","password"}`."""
    service = _require_service(request)
    body = await read_json(
        request, {"username": str, "password": str}, required=("username", "password")
    )
    username = body["username"]
    keys = _attempt_keys(request, username)
    account = await _limited_check(service, keys, username, body["password"])
    if account is None:
        raise ApiError(401, "wrong username or password", "invalid_credentials")
    service.limiter.succeeded(*keys)
    data = _new_token(service, username, bool(account.get("must_change_password")))
    return JSONResponse(
        {
            "status": "success",
            "data": data,
            "access_token": data["access_token"],
            "token_type": "bearer",
        }
    )


def _attempt_keys(request: Request, username: str) -> tuple[str, str]:
    """What password attempts count against: the client address and the account."""
    return (f"ip:{_client(request)}", f"user:{username.casefold()}")


async def _limited_check(
    service: AuthService, keys: tuple[str, ...], username: str, password: str
) -> dict[str, Any] | None:
    """Check a password under the login limiter (429 when `keys` used up their tries).

    The attempt is counted before the scrypt call: that runs in a thread, and attempts
    waiting for it must already count against the limit (the caller refunds a success).
    """
    wait = service.limiter.reserve(*keys)
    if wait > 0:
        raise_limited(wait)
    return await service.check_password(username, password)


def _new_token(service: AuthService, username: str, must_change: bool) -> dict[str, Any]:
    """The token fields of the login answer, for a token issued now."""
    token, ttl = service.issue(username)
    return {
        "access_token": token,
        "token_type": "bearer",
        "expires_in": ttl,
        "must_change_password": must_change,
    }


def raise_limited(wait: float) -> None:
    """Raise the 429 of a rate-limited login."""
    seconds = max(1, int(wait + 0.999))
    raise ApiError(
        429,
        f"too many failed password attempts; retry in {seconds} s",
        "rate_limited",
        {"retry_after": seconds},
        headers={"Retry-After": str(seconds)},
    )


async def logout(request: Request) -> JSONResponse:
    """`POST /api/logout`: revoke the token of this request."""
    service = _require_service(request)
    principal: dict[str, Any] = request.scope[PRINCIPAL]
    await service.revoke(principal["claims"])
    return success({"revoked": True})


async def change_password(request: Request) -> JSONResponse:
    """`PUT /api/account/password {"old_password","new_password"}`."""
    service = _require_service(request)
    body = await read_json(
        request,
        {"old_password": str, "new_password": str},
        required=("old_password", "new_password"),
    )
    username = request.scope[PRINCIPAL]["username"]
    # A stolen token must not be a way around the login limiter to guess the password.
    keys = _attempt_keys(request, username)
    if await _limited_check(service, keys, username, body["old_password"]) is None:
        raise ApiError(400, "old_password is wrong", "invalid_field", {"field": "old_password"})
    service.limiter.succeeded(*keys)
    new = body["new_password"]
    if len(new) < 8 or new == body["old_password"]:
        raise ApiError(
            400,
            "new_password must have at least 8 characters and differ from the old one",
            "invalid_field",
            {"field": "new_password"},
        )
    await service.set_password(username, new, must_change=False)
    # The change voided the caller's token with the others: the answer carries its new one.
    return success({"changed": True, **_new_token(service, username, False)})


async def account(request: Request) -> JSONResponse:
    """`GET /api/account`: who the token belongs to."""
    service = _require_service(request)
    username = request.scope[PRINCIPAL]["username"]
    stored = await service.account(username) or {}
    return success(
        {"username": username, "must_change_password": bool(stored.get("must_change_password"))}
    )


@hookimpl
async def nekobot_plugin_start(ctx: PluginContext) -> None:
    import anyio.to_thread

    secret = await anyio.to_thread.run_sync(load_secret, ctx.kernel.config.data_dir)
    kernel = ctx.kernel
    service = AuthService(ctx.store, secret, lambda: kernel.settings)
    await service.start()
    ctx.provide(protocols.AuthService, service)


@hookimpl
def nekobot_http_middleware() -> Iterable[MiddlewareSpec]:
    return [MiddlewareSpec("auth", AuthMiddleware, order=0)]


#: The token fields of the login and password-change answers.
_TOKEN_FIELDS: dict[str, Any] = {
    "access_token": STR,
    "token_type": {"const": "bearer"},
    "expires_in": {"type": "integer"},
    "must_change_password": BOOL,
}
_TOKEN_REQUIRED = tuple(_TOKEN_FIELDS)


@hookimpl
def nekobot_routes() -> Iterable[RouteSpec]:
    return [
        RouteSpec(
            "/api/login",
            login,
            methods=("POST",),
            public=True,
            name="login",
            summary="Log in and get a bearer token",
            openapi=operation(
                json_body({"username": STR, "password": STR}, ("username", "password")),
                returns(obj(_TOKEN_FIELDS, _TOKEN_REQUIRED)),
            ),
        ),
        RouteSpec(
            "/api/logout",
            logout,
            methods=("POST",),
            name="logout",
            summary="Revoke the current token",
            openapi=returns(obj({"revoked": {"const": True}})),
        ),
        RouteSpec(
            "/api/account",
            account,
            methods=("GET",),
            name="account",
            summary="The current account",
            openapi=returns(
                obj(
                    {"username": STR, "must_change_password": BOOL},
                    ("username", "must_change_password"),
                )
            ),
        ),
        RouteSpec(
            "/api/account/password",
            change_password,
            methods=("PUT",),
            name="change_password",
            summary="Change the current account's password",
            openapi=operation(
                json_body(
                    {"old_password": STR, "new_password": {**STR, "minLength": 8}},
                    ("old_password", "new_password"),
                ),
                returns(
                    obj(
                        {"changed": {"const": True}, **_TOKEN_FIELDS}, ("changed", *_TOKEN_REQUIRED)
                    )
                ),
            ),
        ),
    ]
