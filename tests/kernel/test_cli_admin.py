"""`nekobot admin reset-password` and the refusal to serve off loopback with the default
password."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from kernel.cli import is_loopback, main
from kernel.protocols import AuthService
from kernel.testing import running_kernel

BUILTINS = ["api", "auth"]


def test_is_loopback() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.org", ""):
        assert not is_loopback(host), host


def test_reset_password_from_stdin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("brand-new-secret\n"))
    assert main(["admin", "reset-password", "--password-stdin", "--data-dir", str(data)]) == 0
    assert "password of 'nekobot' changed" in capsys.readouterr().out

    import anyio

    async def logins() -> tuple[int, int, bool]:
        async with running_kernel(data, builtin_plugins=BUILTINS) as kernel:
            transport = httpx.ASGITransport(app=kernel.asgi_app)
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
                old = await c.post(
                    "/api/login", json={"username": "nekobot", "password": "nekobot"}
                )
                new = await c.post(
                    "/api/login", json={"username": "nekobot", "password": "brand-new-secret"}
                )
                return old.status_code, new.status_code, new.json()["data"]["must_change_password"]

    assert anyio.run(logins) == (401, 200, False)


def test_reset_password_rejects_short_and_missing_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("short\n"))
    assert main(["admin", "reset-password", "--password-stdin"]) == 1
    assert "at least 8 characters" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["admin", "reset-password"]) == 1
    assert "--password-stdin" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # nothing was started or written


def test_reset_password_of_an_unknown_account_creates_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("brand-new-secret\n"))
    argv = ["admin", "reset-password", "--password-stdin", "--username", "nekobto"]
    assert main([*argv, "--data-dir", str(data)]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == "nekobot: error: no account named 'nekobto'"

    import anyio

    async def login() -> int:
        async with running_kernel(data, builtin_plugins=BUILTINS) as kernel:
            transport = httpx.ASGITransport(app=kernel.asgi_app)
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
                body = {"username": "nekobto", "password": "brand-new-secret"}
                return (await c.post("/api/login", json=body)).status_code

    assert anyio.run(login) == 401


def test_run_refuses_non_loopback_with_default_password(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("nekobot")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "kernel"]
    env = {**os.environ, "NEKOBOT_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.run(
        [*cmd, "run", "--host", "0.0.0.0", "--port", "0"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert "refusing to listen on 0.0.0.0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_reset_password_voids_tokens_of_the_same_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time
    from types import SimpleNamespace

    import anyio

    from builtin_plugins.auth import service

    # The auth service's clock stopped inside one second: the token and the reset share it.
    frozen = int(time.time()) + 0.25
    monkeypatch.setattr(
        service, "time", SimpleNamespace(time=lambda: frozen, monotonic=time.monotonic)
    )
    data = tmp_path / "data"
    monkeypatch.chdir(tmp_path)

    async def issue() -> str:
        async with running_kernel(data, builtin_plugins=BUILTINS) as kernel:
            return str(kernel.services.current(AuthService).issue("nekobot")[0])

    async def valid(token: str) -> bool:
        async with running_kernel(data, builtin_plugins=BUILTINS) as kernel:
            return kernel.services.current(AuthService).verify(token) is not None

    token = anyio.run(issue)
    assert anyio.run(valid, token)
    for password in ("brand-new-secret", "another-new-secret"):  # the second bumps again
        monkeypatch.setattr(sys, "stdin", io.StringIO(f"{password}\n"))
        assert main(["admin", "reset-password", "--password-stdin", "--data-dir", str(data)]) == 0
        assert not anyio.run(valid, token)
        token = anyio.run(issue)
        assert anyio.run(valid, token)
