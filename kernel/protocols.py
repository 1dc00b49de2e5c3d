"""The service protocols that cross a plugin boundary, for the kernel and plugins alike.

Both sides import them from here, never from each other: `auth` provides `AuthService`
(used by the CLI and the API's WebSocket hub), `api` provides `WsHub` (used by
`ctx.publish`). Each is runtime-checkable, so `ctx.provide` refuses a value that lacks
one of its members.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class AuthService(Protocol):
    """Accounts and API tokens (the `auth` plugin)."""

    def issue(self, username: str) -> tuple[str, int]:
        """A signed token for `username` and its lifetime in seconds."""

    def verify(self, token: str) -> dict[str, Any] | None:
        """The token's claims if it is valid, unexpired and not revoked."""

    def still_valid(self, claims: Mapping[str, Any]) -> bool:
        """Whether verified claims still hold (not expired, revoked or voided)."""

    async def account(self, username: str) -> dict[str, Any] | None:
        """The stored account, or None."""

    async def set_password(self, username: str, password: str, *, must_change: bool) -> None:
        """Store a new password for `username`; its earlier tokens become void."""

    async def default_password_in_use(self) -> bool:
        """True while the default account still has its default password."""


@runtime_checkable
class WsHub(Protocol):
    """The `/ws` hub (the `api` plugin): what a plugin publishes on its channels."""

    def publish(self, channel: str, data: Any) -> None:
        """Publish `data` on `channel` to its subscribers; never blocks."""
