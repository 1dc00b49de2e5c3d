"""The checks the kernel's ASGI app makes before any plugin code runs, and the error
envelope of its own answers.

- **Hosts.** A request must be addressed (`Host`) to a name the bot serves: a loopback
  name, `KernelConfig.host` or one of `KernelConfig.allowed_hosts`; others get 421. This
  stops DNS rebinding: a web page whose name resolves to 127.0.0.1 reaching the bot from
  a browser.
- **Bodies.** The body an endpoint reads is capped by its route's `body_limit` (the
  `request_max_bytes` setting by default): refused before reading when `Content-Length`
  is over it, and as soon as the bytes read pass it otherwise, so that no request makes
  the process buffer more than that.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, MutableMapping
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from kernel.errors import RequestTooLargeError


def error_response(
    status: int, message: str, code: str, headers: dict[str, str] | None = None
) -> Response:
    """A JSON error in the API's envelope."""
    body = json.dumps({"status": "error", "message": message, "code": code})
    return Response(body, status_code=status, media_type="application/json", headers=headers)


#: A refused body at most this much over its limit is read to its end (and thrown away)
#: after the 413, as clients that send the whole body before reading the answer (most)
#: would otherwise see the connection reset instead of the 413.
_DRAINED = 1024 * 1024


def too_large_response(limit: int, declared: int | None) -> Response:
    """413 for a body over `limit` (`declared` by `Content-Length`, or not). Unless the
    rest is small, the connection is closed after it: not worth reading to keep it."""
    exc = RequestTooLargeError(limit)
    drain = declared is not None and declared - limit <= _DRAINED
    return error_response(413, exc.message, exc.code, None if drain else {"Connection": "close"})


def content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class CappedReceive:
    """A `receive` that counts the body bytes it passes on and raises
    `RequestTooLargeError` as soon as they exceed `limit`."""

    __slots__ = ("limit", "receive", "size")

    def __init__(self, receive: Receive, limit: int) -> None:
        self.receive = receive
        self.limit = limit
        self.size = 0

    async def __call__(self) -> MutableMapping[str, Any]:
        message = await self.receive()
        if message["type"] == "http.request":
            self.size += len(message.get("body", b""))
            if self.size > self.limit:
                raise RequestTooLargeError(self.limit)
        return message


def only_too_large(exc: BaseException) -> RequestTooLargeError | None:
    """`exc` if it is a RequestTooLargeError (alone in however many groups)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, RequestTooLargeError) else None


#: Names of this machine; any 127.0.0.0/8 or ::1 address literal counts as well.
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
#: `KernelConfig.host` values that name no one host (every interface).
_ANY_ADDRESS = frozenset({"", "0.0.0.0", "::"})


class AllowedHosts:
    """The names a request's `Host` may give: loopback ones, the address served on (when
    it is one address) and the configured names; `"*"` among them allows any."""

    def __init__(self, served: str, configured: Iterable[str]) -> None:
        names = {host_name(n) for n in configured}
        if served not in _ANY_ADDRESS:
            names.add(host_name(served))
        self.any = "*" in names
        self.names = frozenset(names | _LOOPBACK_NAMES)

    def allows(self, name: str) -> bool:
        """Whether `name` (a host without its port) is served."""
        if self.any or name in self.names:
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False

    def refused(self, scope: Scope) -> str | None:
        """The host a request is addressed to, if it is not served; else None. A request
        without a `Host` (HTTP/1.0) is served: browsers always send one."""
        if self.any:
            return None
        for key, value in scope.get("headers", ()):
            if key == b"host":
                name = host_name(value.decode("latin-1"))
                return None if self.allows(name) else name
        return None


def host_name(value: str) -> str:
    """The host of a `Host` header value (or a configured name): no port, no brackets
    around an IPv6 address, no final dot, lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    name, colon, port = value.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        value = name
    return value.rstrip(".")


async def misdirected(host: str, scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    message = (
        f"host {host[:100]!r} is not served here; serve it with the allowed_hosts "
        "setting of the kernel configuration (nekobot run --allowed-host)"
    )
    await error_response(421, message, "host_not_allowed")(scope, receive, send)
