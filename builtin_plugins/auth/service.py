"""The auth service: password hashes, JWTs, revocation and the login limiter."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import jwt

from kernel.private_files import tighten
from kernel.settings import Settings
from kernel.storage import PluginStore

DEFAULT_USER = "nekobot"
DEFAULT_PASSWORD = "nekobot"
_CHECKED_TOKENS = 1024
#: Client addresses and usernames whose failed logins are remembered at most.
MAX_TRACKED_KEYS = 10_000
#: Stored instead of a hash while the default account has the documented default password.
DEFAULT_MARK = "default$"
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
#: How often a running bot re-reads the accounts' token versions: `nekobot admin
#: reset-password` is another process writing the same database.
VERSION_POLL_SECONDS = 5.0


def hash_password(password: str) -> str:
    """A salted scrypt hash (memory-hard), as `scrypt$n$r$p$salt$hash`."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    return "scrypt${n}${r}${p}${salt}${hash}".format(**_SCRYPT, salt=salt.hex(), hash=digest.hex())


def verify_password(password: str, stored: str) -> bool:
    """True if `password` matches the `hash_password` result `stored`."""
    try:
        kind, n, r, p, salt, expected = stored.split("$")
        if kind != "scrypt":
            return False
        digest = hashlib.scrypt(
            password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), dklen=32
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest.hex(), expected)


def load_secret(data_dir: Path) -> str:
    """`NEKOBOT_JWT_SECRET`, or the secret in the data directory (created 0600 once)."""
    from_env = os.environ.get("NEKOBOT_JWT_SECRET")
    if from_env:
        return from_env
    path = data_dir / "jwt_secret"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        tighten(path)  # one written by hand, or copied in, may be readable by others
        return path.read_text(encoding="utf-8").strip()
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        secret = secrets.token_urlsafe(48)
        f.write(secret)
    return secret


class LoginLimiter:
    """Failed logins per key in a sliding window."""

    def __init__(self, max_failures: int, window: float) -> None:
        self.max_failures = max_failures
        self.window = window
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, *keys: str) -> float:
        """Seconds until `keys` may try again (0 if they may now)."""
        now = time.monotonic()
        wait = 0.0
        for key in keys:
            times = self._failures.get(key)
            if not times:
                continue
            while times and now - times[0] > self.window:
                times.popleft()
            if not times:
                del self._failures[key]
            elif len(times) >= self.max_failures:
                wait = max(wait, self.window - (now - times[0]))
        return wait

    def reserve(self, *keys: str) -> float:
        """Count one attempt against each key now, if all may try; else the seconds to
        wait (nothing counted). Check and count are one step without an await between
        them, so logins in flight at once cannot all pass before any is counted; a
        success refunds the attempt (`succeeded`)."""
        wait = self.retry_after(*keys)
        if wait <= 0:
            self.failed(*keys)
        return wait

    def failed(self, *keys: str) -> None:
        """Count one failure against each key (the table stays bounded)."""
        now = time.monotonic()
        if len(self._failures) >= MAX_TRACKED_KEYS:
            self._prune(now)
        for key in keys:
            times = self._failures.setdefault(key, deque())
            times.append(now)
            while len(times) > self.max_failures:  # more are never needed to refuse
                times.popleft()

    def _prune(self, now: float) -> None:
        # Forget keys whose failures all left the window; if a spray of fresh keys still
        # fills the table, forget the oldest (dicts keep insertion order).
        for key in [k for k, t in self._failures.items() if not t or now - t[-1] > self.window]:
            del self._failures[key]
        while len(self._failures) >= MAX_TRACKED_KEYS:
            del self._failures[next(iter(self._failures))]

    def succeeded(self, *keys: str) -> None:
        """Forget a key's failures."""
        for key in keys:
            self._failures.pop(key, None)


class AuthService:
    """Accounts and tokens of one kernel (provided to other plugins as `auth`)."""

    def __init__(self, store: PluginStore, secret: str, settings: Callable[[], Settings]) -> None:
        self.store = store
        self.secret = secret
        self._settings = settings
        self._limiter = LoginLimiter(5, 300)
        self.revoked: dict[str, float] = {}
        #: Tokens whose signature was verified, oldest first (bounded).
        self._checked: dict[str, dict[str, Any]] = {}
        #: username -> its token version: a token carrying another (`ver`) is void. Each
        #: password change bumps it, so tokens of the same second die too.
        self.versions: dict[str, int] = {}
        #: username -> epoch second before which its tokens are void: the whole-second
        #: rule of accounts whose password was last changed before token versions.
        self.not_before: dict[str, int] = {}
        self._password_lock = anyio.Lock()
        self._dummy_hash: str | None = None

    @property
    def limiter(self) -> LoginLimiter:
        """The login limiter, following the live settings."""
        s = self._settings()
        self._limiter.max_failures = s.login_max_failures
        self._limiter.window = float(s.login_window_seconds)
        return self._limiter

    async def start(self) -> None:
        """Create the schema and the default account; load revocations."""
        await self.store.migrate(
            [
                "CREATE TABLE {t:revoked} (jti TEXT PRIMARY KEY, exp REAL NOT NULL)",
            ]
        )
        await self.store.execute("DELETE FROM {t:revoked} WHERE exp < ?", (time.time(),))
        rows = await self.store.fetchall("SELECT jti, exp FROM {t:revoked}")
        self.revoked = {jti: exp for jti, exp in rows}
        await self.load_versions()
        if (
            await self.store.kv_get(f"account:{DEFAULT_USER}") is None
            and not await self.store.kv_keys()
        ):
            # No scrypt on the start-up path: the documented default is marked, not hashed.
            await self.store.kv_set(
                f"account:{DEFAULT_USER}",
                {"password_hash": DEFAULT_MARK, "must_change_password": True},
            )

    async def load_versions(self) -> None:
        """Read the accounts' token versions from the store (at start, and every
        `VERSION_POLL_SECONDS` to see a password another process changed)."""
        for key, value in (await self.store.kv_items()).items():
            if not key.startswith("account:") or not isinstance(value, dict):
                continue
            username = key.removeprefix("account:")
            stored = value.get("token_version")
            if isinstance(stored, int) and stored > self.versions.get(username, 0):
                self.versions[username] = stored  # a version only ever goes up
                self.not_before.pop(username, None)
            elif isinstance(value.get("tokens_after"), int) and username not in self.versions:
                self.not_before[username] = value["tokens_after"]

    async def follow_versions(self, log: logging.LoggerAdapter[logging.Logger]) -> None:
        """Re-read the token versions every `VERSION_POLL_SECONDS`, for good."""
        while True:
            await anyio.sleep(VERSION_POLL_SECONDS)
            try:
                await self.load_versions()
            except Exception:  # a busy or failing database must not end the watch
                log.warning("could not re-read the token versions", exc_info=True)

    async def set_password(self, username: str, password: str, *, must_change: bool) -> None:
        """Store a new password hash for `username`; every token issued before is void at
        once, even one of the same second (a leaked token must not outlive the password
        change meant to stop it): the account's token version goes up."""
        hashed = await anyio.to_thread.run_sync(hash_password, password)
        # Serialized: two changes at once must not both take the same next version.
        async with self._password_lock:
            stored = await self.account(username) or {}
            previous = stored.get("token_version")
            version = max(
                previous if isinstance(previous, int) else 0, self.versions.get(username, 0)
            )
            await self.store.kv_set(
                f"account:{username}",
                {
                    "password_hash": hashed,
                    "must_change_password": must_change,
                    "token_version": version + 1,
                },
            )
            self.versions[username] = version + 1
            # Tokens before versions carry none (version 0): void now without the old rule.
            self.not_before.pop(username, None)

    async def account(self, username: str) -> dict[str, Any] | None:
        """The stored account, or None."""
        value = await self.store.kv_get(f"account:{username}")
        return value if isinstance(value, dict) else None

    async def check_password(self, username: str, password: str) -> dict[str, Any] | None:
        """The account if the password is right (constant work for unknown users)."""
        account = await self.account(username)
        stored = account["password_hash"] if account else None
        if stored is None or stored == DEFAULT_MARK:
            # Verify against a dummy hash (made once, off the event loop): an unknown
            # username, or the default password, costs the same one scrypt as a real one.
            if self._dummy_hash is None:
                self._dummy_hash = await anyio.to_thread.run_sync(
                    hash_password, secrets.token_urlsafe(16)
                )
            await anyio.to_thread.run_sync(verify_password, password, self._dummy_hash)
            ok = stored == DEFAULT_MARK and hmac.compare_digest(
                password.encode(), DEFAULT_PASSWORD.encode()
            )
        else:
            ok = await anyio.to_thread.run_sync(verify_password, password, stored)
        return account if ok and account else None

    async def default_password_in_use(self) -> bool:
        """True while the default account still has its default password."""
        account = await self.account(DEFAULT_USER)
        return bool(account and account.get("must_change_password"))

    def issue(self, username: str) -> tuple[str, int]:
        """A signed token for `username` and its lifetime in seconds."""
        now = int(time.time())
        ttl = self._settings().token_ttl_seconds
        claims = {
            "sub": username,
            "iat": now,
            "exp": now + ttl,
            "jti": secrets.token_hex(16),
            "ver": self.versions.get(username, 0),
        }
        return jwt.encode(claims, self.secret, algorithm="HS256"), ttl

    def verify(self, token: str) -> dict[str, Any] | None:
        """The token's claims if it is valid, unexpired and not revoked."""
        claims = self._checked.get(token)
        if claims is not None:
            # Its signature was checked already (the secret never changes while running);
            # expiry, revocation and password changes are checked on every use.
            if float(claims["exp"]) <= time.time():
                del self._checked[token]
                return None
        else:
            try:
                claims = jwt.decode(
                    token,
                    self.secret,
                    algorithms=["HS256"],
                    options={"require": ["exp", "iat", "jti", "sub"]},
                )
            except jwt.PyJWTError:
                return None
            if len(self._checked) >= _CHECKED_TOKENS:
                self._checked.pop(next(iter(self._checked)))
            self._checked[token] = claims
        # A copy: the cached claims must not change with what a caller does to its own.
        return dict(claims) if self.still_valid(claims) else None

    def still_valid(self, claims: Mapping[str, Any]) -> bool:
        """False once verified claims expired, were revoked (logout) or were issued before
        their account's last password change; an open WebSocket is checked by this too."""
        try:
            expires, issued = float(claims["exp"]), float(claims["iat"])
        except (KeyError, TypeError, ValueError):
            return False
        username = str(claims.get("sub"))
        # A token from before token versions has no `ver`: version 0, as its account has
        # until its next password change.
        version = claims.get("ver", 0)
        return (
            expires > time.time()
            and claims.get("jti") not in self.revoked
            and type(version) is int
            and version == self.versions.get(username, 0)
            and issued >= self.not_before.get(username, 0)
        )

    async def revoke(self, claims: Mapping[str, Any]) -> None:
        """Revoke a token until it expires (persisted)."""
        jti, exp = str(claims["jti"]), float(claims["exp"])
        now = time.time()
        # Tokens that expired anyway need no revocation entry any more.
        for old in [j for j, e in self.revoked.items() if e < now]:
            del self.revoked[old]
        self.revoked[jti] = exp
        await self.store.execute(
            "INSERT INTO {t:revoked} (jti, exp) VALUES (?, ?) "
            "ON CONFLICT (jti) DO UPDATE SET exp = excluded.exp",
            (jti, exp),
        )
        await self.store.execute("DELETE FROM {t:revoked} WHERE exp < ?", (now,))
