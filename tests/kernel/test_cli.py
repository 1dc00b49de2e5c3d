"""Tests of kernel.cli: arguments, the offline `plugins` commands, and `nekobot run` in a
real process."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kernel.cli import build_parser, config_from, main
from kernel.testing import PATIENCE, free_port
from kernel.version import __version__
from tests.kernel.test_archive import make_zip
from tests.kernel.test_install import archive, code
from tests.plugin_factory import purge_modules, write_plugin

PREFIX = "zz_cli_"


@pytest.fixture(autouse=True)
def _forget_plugin_modules() -> Iterator[None]:
    yield
    for module in [m for m in sys.modules if m.startswith(PREFIX)]:
        purge_modules(module)


@pytest.fixture
def dirs(tmp_path: Path) -> list[str]:
    return ["--data-dir", str(tmp_path / "data"), "--plugin-dir", str(tmp_path / "plugins")]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`nekobot argv...` in-process: (exit status, stdout, stderr)."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def plugin_states(capsys: pytest.CaptureFixture[str], dirs: list[str]) -> dict[str, dict]:  # type: ignore[type-arg]
    code, out, _ = run_cli(capsys, "plugins", "list", "--json", *dirs)
    assert code == 0
    return {p["name"]: p for p in json.loads(out)}


# ------------------------------------------------------------------ arguments


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0
    assert out == f"nekobot {__version__}\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["bogus"],
        ["plugins"],
        ["plugins", "frobnicate"],
        ["plugins", "enable"],
        ["plugins", "install"],
        ["plugins", "list", "--nope"],
        ["run", "--port", "http"],
        ["--port", "70000"],
        ["plugins", "remove", "a", "b"],
    ],
)
def test_wrong_arguments_exit_2_with_a_usage_error(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert out == ""
    # One line, as the README promises; the usage is one `--help` away.
    (line,) = err.splitlines()
    assert line.startswith("nekobot") and ": error: " in line and "--help" in line


def test_options_make_the_kernel_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NEKOBOT_DATA_DIR", raising=False)
    parser = build_parser()
    default = config_from(parser.parse_args([]))
    assert parser.parse_args([]).command is None  # no command: run
    assert default.data_dir == Path("data") and default.plugin_dirs == (Path("user_plugins"),)
    assert (default.host, default.port) == ("127.0.0.1", 6285)
    config = config_from(
        parser.parse_args(
            ["run", "--host", "0.0.0.0", "--port", "8000", "--plugin-dir", "a", "--plugin-dir", "b"]
        )
    )
    assert (config.host, config.port) == ("0.0.0.0", 8000)
    assert config.plugin_dirs == (Path("a"), Path("b"))
    # Options given before a subcommand are not reset by its defaults.
    args = parser.parse_args(["plugins", "--data-dir", "d1", "list"])
    assert config_from(args).data_dir == Path("d1")
    monkeypatch.setenv("NEKOBOT_DATA_DIR", "from-env")
    assert config_from(parser.parse_args(["--port", "1"])).data_dir == Path("from-env")


def test_allowed_hosts_and_trusted_proxies_are_options() -> None:
    parser = build_parser()
    default = config_from(parser.parse_args([]))
    assert (default.allowed_hosts, default.trusted_proxies) == ((), ())
    args = ["run", "--allowed-host", "bot.example.com", "--allowed-host", "b.example"]
    args += ["--trusted-proxy", "10.0.0.0/8"]
    config = config_from(parser.parse_args(args))
    assert config.allowed_hosts == ("bot.example.com", "b.example")
    assert config.trusted_proxies == ("10.0.0.0/8",)


# ------------------------------------------------------------------ plugins, offline


def test_offline_plugin_round_trip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dirs: list[str]
) -> None:
    name = f"{PREFIX}echo"
    zip_path = tmp_path / "echo.zip"
    zip_path.write_bytes(archive(name, code("zzcliecho", "meow")))

    assert run_cli(capsys, "plugins", "install", str(zip_path), *dirs) == (
        0,
        f"installed {name} 1.0 (disabled)\n",
        "",
    )
    assert (tmp_path / "plugins" / name / "plugin.toml").is_file()

    code_, out, _ = run_cli(capsys, "plugins", "list", *dirs)
    assert code_ == 0
    assert out.splitlines()[0].split() == ["NAME", "VERSION", "SOURCE", "STATE"]
    row = next(line for line in out.splitlines() if line.startswith(name))
    assert row.split() == [name, "1.0", "user", "disabled"]

    assert run_cli(capsys, "plugins", *dirs, "enable", name) == (
        0,
        f"enabled {name} (active)\n",
        "",
    )
    info = plugin_states(capsys, dirs)[name]
    assert info["enabled"] and info["state"] == "active"
    assert info["commands"] == [f"{name}:zzcliecho"]

    assert run_cli(capsys, "plugins", "reload", name, *dirs)[:2] == (
        0,
        f"reloaded {name} (active)\n",
    )
    assert run_cli(capsys, "plugins", "disable", name, *dirs)[:2] == (0, f"disabled {name}\n")
    assert plugin_states(capsys, dirs)[name]["enabled"] is False

    zip_path.write_bytes(archive(name, code("zzcliecho", "purr"), manifest={"version": "2.0"}))
    code_, out, _ = run_cli(capsys, "plugins", "install", str(zip_path), "--dry-run", *dirs)
    assert code_ == 1  # exists and no --overwrite
    code_, out, _ = run_cli(
        capsys, "plugins", "install", str(zip_path), "--dry-run", "--overwrite", *dirs
    )
    assert (code_, out) == (0, f"would replace {name} 2.0 (dry run, nothing written)\n")
    assert plugin_states(capsys, dirs)[name]["version"] == "1.0"

    code_, out, _ = run_cli(
        capsys, "plugins", "install", str(zip_path), "--overwrite", "--enable", *dirs
    )
    assert (code_, out) == (0, f"replaced {name} 2.0 (active)\n")
    assert plugin_states(capsys, dirs)[name]["state"] == "active"

    assert run_cli(capsys, "plugins", "remove", name, *dirs)[:2] == (0, f"removed {name}\n")
    assert not (tmp_path / "plugins" / name).exists()
    assert name not in plugin_states(capsys, dirs)

    code_, out, err = run_cli(capsys, "plugins", "enable", name, *dirs)
    assert (code_, out) == (1, "")
    assert err == f"nekobot: error: no plugin named {name!r}\n"


def test_install_reports_conflicts_and_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dirs: list[str]
) -> None:
    write_plugin(tmp_path / "plugins", f"{PREFIX}first", code("zzcliping", "first"))
    second = tmp_path / "second.zip"
    second.write_bytes(archive(f"{PREFIX}second", code("zzcliping", "second")))
    code_, out, _ = run_cli(capsys, "plugins", "install", str(second), "--dry-run", *dirs)
    assert code_ == 0
    lines = out.splitlines()
    assert lines[0] == f"would install {PREFIX}second 1.0 (dry run, nothing written)"
    assert lines[1].startswith("conflict: command 'zzcliping' is claimed by")
    assert lines[1].endswith(f"{PREFIX}first holds it")
    assert sorted(p.name for p in (tmp_path / "plugins").iterdir()) == [f"{PREFIX}first"]

    evil = tmp_path / "evil.zip"
    evil.write_bytes(make_zip([("../evil.py", b"x"), ("pkg/__init__.py", b"")]))
    code_, out, err = run_cli(capsys, "plugins", "install", str(evil), *dirs)
    assert (code_, out) == (1, "")
    assert err.startswith("nekobot: error: archive entry '../evil.py' escapes")

    not_zip = tmp_path / "notes.txt"
    not_zip.write_text("hello")
    code_, _, err = run_cli(capsys, "plugins", "install", str(not_zip), *dirs)
    assert code_ == 1 and err.startswith("nekobot: error: file is not a zip archive")

    code_, _, err = run_cli(capsys, "plugins", "install", str(tmp_path / "missing.zip"), *dirs)
    assert code_ == 1 and err.startswith("nekobot: error: cannot read")
    assert sorted(p.name for p in (tmp_path / "plugins").iterdir()) == [f"{PREFIX}first"]


def test_broken_plugin_and_essential_plugin_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dirs: list[str]
) -> None:
    write_plugin(tmp_path / "plugins", f"{PREFIX}broken", "1 / 0\n")
    meta_path = list(sys.meta_path)
    handlers = (list(logging.getLogger().handlers), list(logging.getLogger("nekobot").handlers))
    for action in ("enable", "reload"):
        code_, out, err = run_cli(capsys, "plugins", action, f"{PREFIX}broken", *dirs)
        assert (code_, out) == (1, "")
        assert err.splitlines()[-1].startswith("nekobot: error: ")
        assert "ZeroDivisionError" in err.splitlines()[-1]
    info = plugin_states(capsys, dirs)[f"{PREFIX}broken"]
    assert info["state"] == "failed" and "ZeroDivisionError" in info["error"]

    code_, _, err = run_cli(capsys, "plugins", "disable", "api", *dirs)
    assert code_ == 1
    assert (
        err.splitlines()[-1] == "nekobot: error: plugin 'api' is essential and cannot be disabled"
    )
    code_, _, err = run_cli(capsys, "plugins", "remove", "api", *dirs)
    assert code_ == 1 and "only user plugins can be deleted" in err
    # A failed command leaves no import finder or log handler behind in the process.
    assert sys.meta_path == meta_path
    assert handlers == (
        list(logging.getLogger().handlers),
        list(logging.getLogger("nekobot").handlers),
    )


def test_unusable_data_directory_or_database_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plugins = ["--plugin-dir", str(tmp_path / "plugins")]
    (tmp_path / "a-file").write_text("")
    code_, out, err = run_cli(
        capsys, "plugins", "list", "--data-dir", str(tmp_path / "a-file"), *plugins
    )
    assert (code_, out) == (1, "")
    assert err.splitlines()[-1] == f"nekobot: error: {str(tmp_path / 'a-file')!r}: File exists"
    # An error raised inside the kernel's task group names the error, not the group.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "nekobot.db").write_text("not a database, not even close" * 10)
    code_, out, err = run_cli(
        capsys, "plugins", "list", "--data-dir", str(tmp_path / "data"), *plugins
    )
    assert (code_, out) == (1, "")
    assert err.splitlines()[-1].startswith("nekobot: error: unexpected DatabaseError: ")


def test_default_directories_and_the_data_dir_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NEKOBOT_DATA_DIR", raising=False)
    write_plugin(tmp_path / "user_plugins", f"{PREFIX}local", code("zzclilocal", "hi"))
    assert plugin_states(capsys, [])[f"{PREFIX}local"]["state"] == "active"
    assert (tmp_path / "data" / "nekobot.db").is_file()

    monkeypatch.setenv("NEKOBOT_DATA_DIR", str(tmp_path / "elsewhere"))
    assert run_cli(capsys, "plugins", "disable", f"{PREFIX}local")[0] == 0
    assert (tmp_path / "elsewhere" / "nekobot.db").is_file()
    # The setting went to the directory the variable names, not to ./data.
    assert plugin_states(capsys, [])[f"{PREFIX}local"]["enabled"] is False
    monkeypatch.delenv("NEKOBOT_DATA_DIR")
    assert plugin_states(capsys, [])[f"{PREFIX}local"]["enabled"] is True
    # --data-dir wins over the variable.
    monkeypatch.setenv("NEKOBOT_DATA_DIR", str(tmp_path / "elsewhere"))
    states = plugin_states(capsys, ["--data-dir", str(tmp_path / "data")])
    assert states[f"{PREFIX}local"]["enabled"] is True


# ------------------------------------------------------------------ nekobot run


def test_run_serves_until_interrupted(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "NEKOBOT_DATA_DIR": str(tmp_path / "data")}
    proc = start_bot(tmp_path, port, "--host", "127.0.0.1", env=env)
    try:
        with httpx.Client(trust_env=False, timeout=2) as client:
            response = client.get(f"http://127.0.0.1:{port}/api/health")
        assert response.json()["data"]["status"] == "ok"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=PATIENCE)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        assert "kernel" in err and "stopped" in err
        assert (tmp_path / "data" / "nekobot.db").is_file()
        assert (tmp_path / "user_plugins").is_dir()  # the default plugin directory, in cwd
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


ROUTE_PLUGIN = """
from starlette.responses import PlainTextResponse
from kernel import RouteSpec, hookimpl

async def page(request):
    return PlainTextResponse("hi")

@hookimpl
def nekobot_routes():
    return [RouteSpec("/zzcli/page", page)]
"""


def test_install_dry_run_reports_dependencies_and_route_conflicts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dirs: list[str]
) -> None:
    write_plugin(tmp_path / "plugins", f"{PREFIX}routes", ROUTE_PLUGIN)
    rival = tmp_path / "rival.zip"
    rival.write_bytes(archive(f"{PREFIX}rival", ROUTE_PLUGIN))
    code_, out, _ = run_cli(capsys, "plugins", "install", str(rival), "--dry-run", *dirs)
    assert code_ == 0, out
    assert f"conflict: route GET /zzcli/page is held by {PREFIX}routes" in out.splitlines()

    needy = tmp_path / "needy.zip"
    needy.write_bytes(
        archive(
            f"{PREFIX}needy",
            "import zz_not_installed_anywhere\n",
            manifest={"dependencies": ["zz-not-installed-anywhere>=1"]},
        )
    )
    code_, out, _ = run_cli(capsys, "plugins", "install", str(needy), "--dry-run", *dirs)
    lines = out.splitlines()
    assert code_ == 0, out
    assert lines[0] == f"would install {PREFIX}needy 1.0 (dry run, nothing written)"
    assert "dependencies missing: zz-not-installed-anywhere>=1" in lines
    assert any(line.startswith("dependency problem: ") for line in lines)
    assert any(line.startswith("conflicts unknown: ") for line in lines)
    assert sorted(p.name for p in (tmp_path / "plugins").iterdir()) == [f"{PREFIX}routes"]


# ------------------------------------------------------------------ what a new admin tripped on


def _options(parser: argparse.ArgumentParser) -> set[str]:
    """Every long option of `parser` and of its subcommands, --help aside."""
    found: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _options(sub)
        found.update(o for o in action.option_strings if o.startswith("--"))
    return found - {"--help"}


def test_the_readme_lists_every_option() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Command line", 1)[1].split("\n## ", 1)[0]
    missing = sorted(o for o in _options(build_parser()) if o not in section)
    assert not missing, f"README's command-line section does not mention {missing}"


PID_PLUGIN = """
import os
import anyio
from kernel import hookimpl

@hookimpl
async def nekobot_plugin_start(ctx):
    # Which process started plugins: the test expects only the bot it ran.
    async with await anyio.open_file({marker!r}, "a") as f:
        await f.write(f"{{os.getpid()}}\\n")
"""


def pid_plugin(plugin_dir: Path, marker: Path) -> None:
    write_plugin(plugin_dir, f"{PREFIX}pid", PID_PLUGIN.format(marker=str(marker)))


def test_run_off_loopback_with_the_default_password_refuses_before_starting(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, dirs: list[str]
) -> None:
    marker = tmp_path / "started"
    pid_plugin(tmp_path / "plugins", marker)
    code, _, err = run_cli(capsys, "run", "--host", "0.0.0.0", "--port", str(free_port()), *dirs)
    assert code == 1
    (line,) = err.splitlines()  # no kernel start and stop was logged either
    assert "refusing to listen on 0.0.0.0" in line and "default password" in line
    assert not marker.exists(), "a plugin was started before the refusal"


def start_bot(
    tmp_path: Path, port: int, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """`nekobot run --port port args...` in tmp_path, once it answers /api/health."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kernel", "run", "--port", str(port), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + PATIENCE
    with httpx.Client(trust_env=False, timeout=2) as client:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"nekobot run exited early: {proc.communicate()}")
            try:
                if client.get(f"http://127.0.0.1:{port}/api/health").status_code == 200:
                    return proc
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"nekobot run did not answer within {PATIENCE} s: {proc.communicate()}")
            # Polling: a process that starts has no event to wait on.
            time.sleep(0.1)


def test_a_running_bot_holds_its_data_directory(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    dirs: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    marker = tmp_path / "started"
    pid_plugin(tmp_path / "plugins", marker)
    port = free_port()
    proc = start_bot(tmp_path, port, *dirs)
    try:
        # A second server refuses at once, naming the first; none of its plugins start
        # (on the same port: without the lock, it would fail there, after starting them).
        code, _, err = run_cli(capsys, "run", "--port", str(port), *dirs)
        assert code == 1
        (line,) = err.splitlines()
        assert f"another nekobot (PID {proc.pid}) is already running" in line
        assert marker.read_text() == f"{proc.pid}\n"
        # Offline commands say what to do instead of changing the bot's data behind it.
        for argv in (
            ["plugins", "list"],
            ["plugins", "disable", f"{PREFIX}pid"],
            ["plugins", "install", str(tmp_path / "missing.zip")],
        ):
            code, out, err = run_cli(capsys, *argv, *dirs)
            assert (code, out) == (1, ""), argv
            (line,) = err.splitlines()
            assert f"nekobot (PID {proc.pid}) is running on the data directory" in line, argv
            assert f"use its API or dashboard at http://127.0.0.1:{port}" in line, argv
        # Refused before it asks for the password.
        monkeypatch.setattr("sys.stdin", io.StringIO("a-new-password\n"))
        code, _, err = run_cli(capsys, "admin", "reset-password", "--password-stdin", *dirs)
        assert code == 1 and f"(PID {proc.pid}) is running" in err
        assert sys.stdin.read() == "a-new-password\n"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    # Once it stopped, the offline commands work (the plugin was not disabled meanwhile).
    states = plugin_states(capsys, dirs)
    assert states[f"{PREFIX}pid"]["enabled"] is True


@pytest.mark.parametrize(
    ("host", "url_host"),
    [
        ("0.0.0.0", "127.0.0.1"),
        ("", "127.0.0.1"),
        ("::", "[::1]"),
        ("::1", "[::1]"),
        ("192.168.1.10", "192.168.1.10"),
        ("localhost", "localhost"),
    ],
)
def test_the_announced_address_is_one_this_machine_reaches(host: str, url_host: str) -> None:
    from kernel.cli import _url_host

    assert _url_host(host) == url_host
