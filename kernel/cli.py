"""The `nekobot` command: serve the bot, or manage its plugins offline.

    nekobot [run] [--host H] [--port P] [--data-dir D] [--plugin-dir P ...]
    nekobot plugins list [--json]
    nekobot plugins enable|disable|reload NAME
    nekobot plugins install ZIP [--enable] [--overwrite] [--dry-run]
    nekobot plugins remove NAME [--keep-data]
    nekobot admin reset-password [--username NAME] [--password-stdin]

`plugins` commands work offline on the data directory: they start a kernel without
hot reload or watchdog and go through the same plugin operations as the API, so an
operation also proves that the plugin loads. A kernel holds its data directory's lock
while it runs (`kernel.datadir`), so they refuse while a bot runs on it and point at
its API instead, and a second `run` on it refuses at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

import anyio
import anyio.to_thread
import attrs

from kernel.config import KernelConfig
from kernel.datadir import DataDirBusyError, DataDirLock
from kernel.errors import NekoError
from kernel.logs import RepeatFilter
from kernel.models import CommandConflict, PluginInfo, PluginState
from kernel.protocols import AuthService
from kernel.version import __version__

if TYPE_CHECKING:
    from kernel.install import InstallResult

PROG = "nekobot"
DATA_DIR_ENV = "NEKOBOT_DATA_DIR"
DEFAULT_DATA_DIR = Path("data")
DEFAULT_PLUGIN_DIR = Path("user_plugins")
#: Set to print the traceback of an unexpected error.
DEBUG_ENV = "NEKOBOT_DEBUG"


class CLIError(Exception):
    """An error to report as `nekobot: error: <message>` (exit status 1)."""


# -- arguments -----------------------------------------------------------------------


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range (0-65535)")
    return port


class _Parser(argparse.ArgumentParser):
    """Wrong arguments are one line, `nekobot ...: error: ...`, and exit status 2 (the
    usage is one `--help` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `nekobot`."""
    # Options shared by several levels default to SUPPRESS, so that a subcommand's
    # defaults never overwrite what was given before it (`nekobot plugins --data-dir D list`).
    dirs = _Parser(add_help=False)
    dirs.add_argument(
        "--data-dir",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="DIR",
        help=f"data directory (default: ${DATA_DIR_ENV} or ./{DEFAULT_DATA_DIR})",
    )
    dirs.add_argument(
        "--plugin-dir",
        dest="plugin_dirs",
        type=Path,
        action="append",
        default=argparse.SUPPRESS,
        metavar="DIR",
        help=f"user plugin directory, repeatable; installs go to the first "
        f"(default: ./{DEFAULT_PLUGIN_DIR})",
    )
    serve = _Parser(add_help=False)
    serve.add_argument(
        "--host",
        default=argparse.SUPPRESS,
        help=f"address to serve on (default: {KernelConfig().host})",
    )
    serve.add_argument(
        "--port",
        type=_port,
        default=argparse.SUPPRESS,
        help=f"port to serve on (default: {KernelConfig().port})",
    )
    serve.add_argument(
        "--allowed-host",
        dest="allowed_hosts",
        action="append",
        default=argparse.SUPPRESS,
        metavar="NAME",
        help="a host name requests may be addressed to besides the loopback ones, "
        "repeatable ('*': any); see docs/security.md",
    )
    serve.add_argument(
        "--trusted-proxy",
        dest="trusted_proxies",
        action="append",
        default=argparse.SUPPRESS,
        metavar="ADDRESS",
        help="address or network of a reverse proxy whose X-Forwarded-For is believed, "
        "repeatable (default: none)",
    )

    parser = _Parser(
        prog=PROG,
        description="NekoBot, a plugin-first chat bot. Without a command: run.",
        parents=[dirs, serve],
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser(
        "run",
        parents=[dirs, serve],
        help="serve the bot and its API (the default)",
        description="Serve the bot, its API and dashboard until interrupted.",
    )
    plugins = commands.add_parser(
        "plugins",
        parents=[dirs],
        help="manage plugins offline",
        description="Manage plugins offline, on the data directory.",
    )
    actions = plugins.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", parents=[dirs], help="list plugins and their state")
    listing.add_argument("--json", action="store_true", help="print JSON")
    for action, text in (
        ("enable", "load a plugin and remember it as enabled"),
        ("disable", "stop a plugin and remember it as disabled"),
        ("reload", "load a plugin afresh and report its state"),
    ):
        p = actions.add_parser(action, parents=[dirs], help=text)
        p.add_argument("name", help="plugin name")
    install = actions.add_parser(
        "install", parents=[dirs], help="install a plugin from a zip archive"
    )
    install.add_argument("zip", type=Path, help="the plugin archive")
    install.add_argument("--enable", action="store_true", help="enable it after installing")
    install.add_argument(
        "--overwrite", action="store_true", help="replace an installed plugin of the same name"
    )
    install.add_argument(
        "--dry-run", action="store_true", help="check it and report conflicts; write nothing"
    )
    remove = actions.add_parser("remove", parents=[dirs], help="delete a user plugin")
    remove.add_argument("name", help="plugin name")
    remove.add_argument(
        "--keep-data", action="store_true", help="keep its configuration and stored data"
    )
    admin = commands.add_parser(
        "admin",
        parents=[dirs],
        help="account administration (offline)",
        description="Account administration, offline, on the data directory.",
    )
    admin_actions = admin.add_subparsers(dest="action", metavar="ACTION", required=True)
    reset = admin_actions.add_parser(
        "reset-password",
        parents=[dirs],
        help="set a new password for an account",
        description="Set a new password (asked twice on a terminal, or one line on stdin "
        "with --password-stdin).",
    )
    reset.add_argument("--username", default="nekobot", help="account (default: nekobot)")
    reset.add_argument(
        "--password-stdin", action="store_true", help="read the new password from standard input"
    )
    return parser


def config_from(args: argparse.Namespace, **options: Any) -> KernelConfig:
    """The kernel configuration that the arguments (and the environment) ask for."""
    data_dir = getattr(args, "data_dir", None) or Path(
        os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    )
    plugin_dirs = getattr(args, "plugin_dirs", None) or [DEFAULT_PLUGIN_DIR]
    for key in ("host", "port", "allowed_hosts", "trusted_proxies"):
        if hasattr(args, key):
            options[key] = getattr(args, key)
    return KernelConfig(data_dir=data_dir, plugin_dirs=plugin_dirs, **options)


# -- entry point -----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run `nekobot` with `argv` (default: the process arguments); return the exit status."""
    args = build_parser().parse_args(argv)
    command = args.command or "run"
    level = logging.INFO if command == "run" else logging.WARNING
    with _console_logging(level) as console:
        try:
            if command == "run":
                return _run(args, console)
            if command == "admin":
                return _admin(args)
            return _plugins(args)
        except (Exception, KeyboardInterrupt, BaseExceptionGroup) as exc:
            return _report(exc, command)


def _report(exc: BaseException, command: str) -> int:
    """Say in one line what went wrong; return the exit status."""
    if isinstance(exc, BaseExceptionGroup):
        # The kernel's task group wraps what its body raises.
        only = _single(exc)
        return _unexpected(exc) if only is None else _report(only, command)
    if isinstance(exc, KeyboardInterrupt):
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    if isinstance(exc, DataDirBusyError):
        return _error(_busy(exc, command))
    if isinstance(exc, NekoError | CLIError):
        return _error(exc.message if isinstance(exc, NekoError) else str(exc))
    if isinstance(exc, OSError) and exc.strerror:
        # A data or plugin directory that cannot be used: the user's to fix, not a bug.
        where = f"{str(exc.filename)!r}: " if exc.filename is not None else ""
        return _error(f"{where}{exc.strerror}")
    if isinstance(exc, Exception):
        return _unexpected(exc)
    raise exc


def _busy(exc: DataDirBusyError, command: str) -> str:
    """What to do about a data directory that a running kernel holds."""
    pid = exc.holder.pid
    who = f"(PID {pid})" if pid is not None else "(its PID is not known)"
    where = str(exc.data_dir)
    if command == "run":
        return (
            f"another nekobot {who} is already running on the data directory {where!r}; "
            "stop it first, or give this one another --data-dir"
        )
    # Changed offline, a running bot's data would contradict what the bot does.
    via = (
        f"use its API or dashboard at {exc.holder.address}, or stop it first"
        if exc.holder.address
        else "stop it first (or wait until it is done)"
    )
    return f"nekobot {who} is running on the data directory {where!r}: {via}"


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


def _unexpected(exc: BaseException) -> int:
    if os.environ.get(DEBUG_ENV):
        traceback.print_exception(exc)
    detail = f"{type(exc).__name__}: {exc}"
    print(
        f"{PROG}: error: unexpected {detail} (set {DEBUG_ENV}=1 for the traceback)",
        file=sys.stderr,
    )
    return 1


def _single(group: BaseExceptionGroup[Any]) -> BaseException | None:
    """The one leaf exception of a (nested) group, if it has exactly one."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    return leaves[0] if len(leaves) == 1 else None


class _OneLineFormatter(logging.Formatter):
    """One line per record on the console: a traceback (a plugin's failed import, say)
    goes to the log file, which the kernel writes in full, and the line says so."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            line = super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved
        return f"{line} (traceback in the log file)" if saved[0] else line


@contextmanager
def _console_logging(level: int) -> Iterator[logging.Handler]:
    """Log to stderr at `level` while the command runs (tests call `main` repeatedly)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(_OneLineFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    # The console gets asyncio's and uvicorn's records too: a flood of one is collapsed.
    handler.addFilter(RepeatFilter(report=handler.handle))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        handler.close()


# -- nekobot run -----------------------------------------------------------------------


class _Stopper:
    """SIGINT/SIGTERM ask the server to stop; the kernel then shuts down cleanly."""

    def __init__(self) -> None:
        self.server: Any = None
        self.requested = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.server is not None:
            # A second signal makes uvicorn drop open connections instead of waiting.
            self.server.force_exit = self.requested
            self.server.should_exit = True
        self.requested = True


@contextmanager
def _signals(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    """Install `handler` for SIGINT and SIGTERM (main thread only), restore after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # Installed before the event loop starts, so asyncio keeps its own SIGINT handling
    # out; uvicorn replaces it while serving and hands it back (and re-delivers the
    # signal) when it stops, which only asks again for what is already happening.
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _run(args: argparse.Namespace, console: logging.Handler) -> int:
    config = config_from(args)
    stopper = _Stopper()
    with _signals(stopper):
        return anyio.run(_serve, config, stopper, console)


async def _serve(config: KernelConfig, stopper: _Stopper, console: logging.Handler) -> int:
    import uvicorn

    from kernel.kernel import Kernel
    from kernel.server import uvicorn_config

    if not is_loopback(config.host):
        await _refuse_default_password(config, console)
    # The kernel is entered and left in this task, around the server it feeds.
    async with Kernel(config) as kernel:
        server = uvicorn.Server(uvicorn_config(kernel.asgi_app, config.host, config.port))
        stopper.server = server
        if stopper.requested:
            return 0
        await anyio.to_thread.run_sync(
            kernel.data_lock.announce, f"http://{_url_host(config.host)}:{config.port}"
        )
        try:
            await server.serve()
        except SystemExit as exc:  # uvicorn exits when it cannot bind, after logging why
            raise CLIError(f"could not serve on {config.host}:{config.port}") from exc
    return 0


def is_loopback(host: str) -> bool:
    """True if `host` names only this machine."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    """Where this machine reaches a server on `host`, as the host part of a URL."""
    if host in ("", "0.0.0.0"):  # every interface: loopback among them
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


async def _refuse_default_password(config: KernelConfig, console: logging.Handler) -> None:
    """Serving beyond this machine with the default password would hand the bot away.

    Asked before the bot starts, of a kernel with the auth plugin alone: no other plugin
    starts (and connects to a chat platform, say) only to be stopped again. Its log lines
    stay off the console, where they would read as the bot starting and stopping.
    """
    from kernel.kernel import Kernel

    probe = Kernel(
        attrs.evolve(
            config,
            builtin_plugins=("auth",),
            entry_points=False,
            plugin_dirs=(),
            hot_reload=False,
            watchdog=False,
        )
    )
    quiet = _OtherKernels(probe.id)
    console.addFilter(quiet)
    try:
        async with probe:
            await probe.stop_hot_reload()  # a stored setting may have turned it on
            auth = probe.services.current(AuthService)
            refuse = auth is not None and await auth.default_password_in_use()
    finally:
        console.removeFilter(quiet)
    if refuse:
        raise CLIError(
            f"refusing to listen on {config.host}: the account 'nekobot' still has the "
            f"default password; change it (PUT /api/account/password, or `{PROG} admin "
            "reset-password`) or serve on 127.0.0.1"
        )


class _OtherKernels(logging.Filter):
    """Drops the records of one kernel."""

    def __init__(self, kernel_id: str) -> None:
        super().__init__()
        self.kernel_id = kernel_id

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "nekobot_kernel", None) != self.kernel_id


# -- nekobot admin -----------------------------------------------------------------------


def _admin(args: argparse.Namespace) -> int:
    config = config_from(args, hot_reload=False, watchdog=False)
    DataDirLock(config.data_dir).check()  # before asking for a password it cannot set
    password = _read_new_password(args.password_stdin)
    anyio.run(_reset_password, config, args.username, password)
    print(f"password of {args.username!r} changed")
    return 0


def _read_new_password(from_stdin: bool) -> str:
    import getpass

    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        if not sys.stdin.isatty():
            raise CLIError("no terminal to ask for the password; use --password-stdin")
        password = getpass.getpass("New password: ")
        if getpass.getpass("Again: ") != password:
            raise CLIError("the passwords differ")
    if len(password) < 8:
        raise CLIError("the password must have at least 8 characters")
    return password


async def _reset_password(config: KernelConfig, username: str, password: str) -> None:
    from kernel.kernel import Kernel

    async with Kernel(config) as kernel:
        await kernel.stop_hot_reload()
        auth = kernel.services.current(AuthService)
        if auth is None:
            raise CLIError("the auth plugin is not active; cannot change passwords")
        # A mistyped name must not create a second account that can log in.
        if await auth.account(username) is None:
            raise CLIError(f"no account named {username!r}")
        await auth.set_password(username, password, must_change=False)


# -- nekobot plugins ---------------------------------------------------------------------


def _plugins(args: argparse.Namespace) -> int:
    config = config_from(args, hot_reload=False, watchdog=False)
    DataDirLock(config.data_dir).check()  # before complaining about anything else
    data: bytes | None = None
    if args.action == "install":
        try:
            data = args.zip.read_bytes()
        except OSError as exc:
            raise CLIError(f"cannot read {str(args.zip)!r}: {exc.strerror or exc}") from None
    anyio.run(_plugins_offline, config, args, data)
    return 0


async def _plugins_offline(
    config: KernelConfig, args: argparse.Namespace, data: bytes | None
) -> None:
    from kernel.install import install_archive
    from kernel.kernel import Kernel

    async with Kernel(config) as kernel:
        # A stored setting may have turned hot reload on; offline work needs no watcher.
        await kernel.stop_hot_reload()
        plugins = kernel.plugins
        action = args.action
        if action == "list":
            infos = plugins.infos()
            if args.json:
                _print(json.dumps([kernel.converter.unstructure(i) for i in infos], indent=2))
            else:
                _print(_table(infos))
        elif action == "enable":
            result = await plugins.enable(args.name)
            _print(f"enabled {args.name} ({_state(result.plugin)})")
            _print_conflicts(result.conflicts)
        elif action == "disable":
            result = await plugins.disable(args.name)
            _print(f"disabled {args.name}" + ("" if result.changed else " (already disabled)"))
        elif action == "reload":
            result = await plugins.reload(args.name)
            _print(f"reloaded {args.name} ({_state(result.plugin)})")
            _print_conflicts(result.conflicts)
        elif action == "install":
            assert data is not None
            done = await install_archive(
                kernel,
                data,
                enable=args.enable,
                overwrite=args.overwrite,
                dry_run=args.dry_run,
            )
            what = f"{done.name} {done.manifest.version}"
            if done.dry_run:
                verb = "would replace" if done.replaced else "would install"
                _print(f"{verb} {what} (dry run, nothing written)")
            else:
                verb = "replaced" if done.replaced else "installed"
                state = _state(done.plugin) if done.plugin else "installed"
                _print(f"{verb} {what} ({state})")
            _print_install_details(done)
        elif action == "remove":
            await plugins.delete(args.name, keep_data=args.keep_data)
            _print(f"removed {args.name}" + (" (data kept)" if args.keep_data else ""))


def _print(text: str) -> None:
    print(text, flush=True)


def _state(info: PluginInfo) -> str:
    if info.state is PluginState.ACTIVE:
        return "active" if info.enabled else "active, disabled"
    if not info.enabled:
        return "disabled"
    text = info.state.value
    return f"{text}: {info.error}" if info.error else text


def _print_install_details(done: InstallResult) -> None:
    """Dependencies and conflicts of an install or a dry run, one line each."""
    deps = done.dependencies
    if deps.installed:
        _print(f"dependencies installed: {', '.join(deps.installed)}")
    if deps.missing:
        _print(f"dependencies missing: {', '.join(deps.missing)}")
    if deps.would_install:
        _print(f"pip would install: {', '.join(deps.would_install)}")
    if deps.problem:
        _print(f"dependency problem: {deps.problem}")
    if done.conflicts_unknown:
        _print(f"conflicts unknown: {done.conflicts_unknown}")
    _print_conflicts(done.conflicts)
    for c in done.registry_conflicts:
        _print(f"conflict: {c.kind} {c.key} is held by {c.holder}")


def _print_conflicts(conflicts: Sequence[CommandConflict]) -> None:
    for c in conflicts:
        others = ", ".join(q for _, q in c.candidates)
        _print(f"conflict: command {c.key!r} is claimed by {others}; {c.holder} holds it")


def _table(infos: Sequence[PluginInfo]) -> str:
    rows = [("NAME", "VERSION", "SOURCE", "STATE")]
    rows.extend((i.name, i.version or "-", i.source.value, _state(i)) for i in infos)
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)) + "  " + row[3]
        for row in rows
    )
