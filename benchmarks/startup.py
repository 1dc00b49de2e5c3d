"""Server start-up: time from spawning `nekobot run` to the first `GET /api/health`
answer, and the process's resident memory once start-up has settled.

Each run spawns `nekobot run --host 127.0.0.1 --port <free> --data-dir <tmp>/data` (the
venv's `nekobot` script next to `sys.executable`, else `python -m kernel`) in a fresh
temporary working directory, polls `/api/health` with raw sockets every ~5 ms, notes
the CPU time the server used until then, waits ~1 s, reads VmRSS from
/proc/<pid>/status and stops the server with SIGINT. Then it starts the server again
on the same data directory (a restart: no first-run setup) and times that too.

Bytecode is cached in a temporary PYTHONPYCACHEPREFIX (as an installed package would
have .pyc files) unless `--no-bytecode-cache`; an untimed first start fills the cache.
With `--importtime` it also prints the costliest imports of `kernel.cli`.

Run: `python -m benchmarks.startup [--runs N] [--quick] [--importtime] [--command CMD]`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import attrs

from benchmarks import machine_note, median, verdict
from kernel.testing import free_port

TARGET_START_S = 0.5
TARGET_RSS_MIB = 60.0
#: A server that has not answered by then counts as failed to start.
START_TIMEOUT_S = 30.0


def server_command() -> list[str]:
    """How to start the server: the venv's `nekobot` script, else `python -m kernel`."""
    script = Path(sys.executable).with_name("nekobot")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "kernel"]


_REQUEST = b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


def health_ok(port: int) -> bool:
    """True if GET /api/health on `port` answers with a 2xx status."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(_REQUEST)
            head = sock.recv(64)
    except OSError:
        return False
    return head.startswith((b"HTTP/1.1 2", b"HTTP/1.0 2"))


def rss_mib(pid: int) -> float:
    """The resident set size of process `pid` in MiB (nan where /proc is missing)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return float("nan")
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server gently (SIGINT, as Ctrl-C), then firmly."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def child_env(pycache: Path | None) -> dict[str, str]:
    """The server's environment: with `pycache`, bytecode is cached there (as after an install)."""
    env = dict(os.environ)
    if pycache is not None:
        # A deployed install has .pyc files; without them every start recompiles the kernel.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def cpu_seconds(pid: int) -> float:
    """User + system CPU time process `pid` has used, all threads (nan without /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = stat.rpartition(")")[2].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@attrs.frozen
class Start:
    """What one server start measured."""

    seconds: float  #: Popen -> first 2xx from /api/health
    cpu: float  #: CPU seconds the server had used by then
    rss_mib: float  #: VmRSS after settling (nan if not read)
    stop_seconds: float  #: SIGINT -> exit


def one_run(
    cwd: Path, command: Sequence[str], env: dict[str, str], settle_s: float | None
) -> Start:
    """Start one server in `cwd` (data in `cwd/data`), time it, read its RSS, stop it."""
    port = free_port()
    cmd = [*command, "run", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--data-dir", str(cwd / "data")]
    log_path = cwd / "server.log"
    with log_path.open("ab") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            while not health_ok(port):
                if proc.poll() is not None:
                    output = log_path.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{output}")
                if time.perf_counter() - start > START_TIMEOUT_S:
                    raise RuntimeError(f"no /api/health answer within {START_TIMEOUT_S}s")
                time.sleep(0.005)
            started = time.perf_counter() - start
            cpu = cpu_seconds(proc.pid)
            rss = float("nan")
            if settle_s is not None:
                time.sleep(settle_s)
                rss = rss_mib(proc.pid)
            stop_start = time.perf_counter()
            stop(proc)
            stopped = time.perf_counter() - stop_start
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return Start(started, cpu, rss, stopped)


def import_costs(
    module: str = "kernel.cli", top: int = 15, env: dict[str, str] | None = None
) -> list[tuple[int, int, str]]:
    """The `top` costliest imports of `module`: (cumulative µs, self µs, name)."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    ).stderr
    rows = []
    for line in out.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        own, cumulative, name = (part.strip() for part in line[len("import time:") :].split("|"))
        rows.append((int(cumulative), int(own), name))
    rows.sort(reverse=True)
    return rows[:top]


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Measure and print server start-up time and memory; returns the figures."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="server starts to time")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds before reading RSS")
    parser.add_argument("--quick", action="store_true", help="a tiny run (smoke test)")
    parser.add_argument("--importtime", action="store_true", help="print the costliest imports")
    parser.add_argument(
        "--no-bytecode-cache",
        action="store_true",
        help="keep the environment as is (PYTHONDONTWRITEBYTECODE, if set, then applies)",
    )
    parser.add_argument(
        "--command", help="server command instead of `nekobot` (shell words; `run ...` is added)"
    )
    opts = parser.parse_args(argv)
    if opts.quick:
        # No warm-up run, so a fresh bytecode cache would mean compiling everything.
        opts.runs, opts.settle, opts.no_bytecode_cache = 1, 0.2, True

    command = shlex.split(opts.command) if opts.command else server_command()
    firsts: list[Start] = []
    restarts: list[Start] = []
    with tempfile.TemporaryDirectory(prefix="nekobot-pycache-") as pycache:
        env = child_env(None if opts.no_bytecode_cache else Path(pycache))
        warmups = 0 if opts.quick else 1
        for _ in range(warmups):  # untimed: fills the bytecode cache and the OS file cache
            with tempfile.TemporaryDirectory(prefix="nekobot-bench-") as tmp:
                one_run(Path(tmp), command, env, None)
        for _ in range(opts.runs):
            with tempfile.TemporaryDirectory(prefix="nekobot-bench-") as tmp:
                firsts.append(one_run(Path(tmp), command, env, opts.settle))
                restarts.append(one_run(Path(tmp), command, env, None))
        costs = import_costs(env=env) if opts.importtime else []

    if not opts.no_bytecode_cache:
        bytecode = "cached in a temporary PYTHONPYCACHEPREFIX (as after an install)"
    elif os.environ.get("PYTHONDONTWRITEBYTECODE"):
        bytecode = "not cached (PYTHONDONTWRITEBYTECODE is set)"
    else:
        bytecode = "as the environment says"

    def ms(values: Sequence[float]) -> str:
        return ", ".join(f"{v * 1000:.0f}" for v in values)

    figures = {
        "start_median_s": median([r.seconds for r in firsts]),
        "start_min_s": min(r.seconds for r in firsts),
        "start_cpu_median_s": median([r.cpu for r in firsts]),
        "restart_median_s": median([r.seconds for r in restarts]),
        "restart_min_s": min(r.seconds for r in restarts),
        "rss_median_mib": median([r.rss_mib for r in firsts]),
        "stop_median_s": median([r.stop_seconds for r in firsts + restarts]),
    }
    start_s, rss = figures["start_median_s"], figures["rss_median_mib"]
    lines = [
        "== startup: `nekobot run` -> first GET /api/health, resident memory ==",
        f"{machine_note()}; command: {' '.join(command)} run ...",
        f"{opts.runs} first starts (fresh data dir), each followed by a restart (same data dir),",
        f"after {warmups} untimed start; /api/health polled every ~5 ms",
        f"bytecode: {bytecode}",
        f"  first start -> health : median {start_s * 1000:5.0f} ms  min"
        f" {figures['start_min_s'] * 1000:5.0f} ms  all: {ms([r.seconds for r in firsts])}",
        f"    CPU used by then    : median {figures['start_cpu_median_s'] * 1000:5.0f} ms"
        f"  (less sensitive to a busy machine)",
        f"  restart -> health     : median {figures['restart_median_s'] * 1000:5.0f} ms  min"
        f" {figures['restart_min_s'] * 1000:5.0f} ms  all: {ms([r.seconds for r in restarts])}",
        f"  VmRSS after {opts.settle:.1f} s     : median {rss:5.1f} MiB  all: "
        + ", ".join(f"{r.rss_mib:.1f}" for r in firsts),
        f"  stop (SIGINT)         : median {figures['stop_median_s'] * 1000:5.0f} ms",
        f"targets: start < {TARGET_START_S} s ->"
        f" {verdict(start_s, TARGET_START_S, lower_is_better=True)};"
        f" RSS < {TARGET_RSS_MIB:.0f} MiB -> {verdict(rss, TARGET_RSS_MIB, lower_is_better=True)}",
    ]
    if opts.importtime:
        lines.append("costliest imports of kernel.cli (cumulative ms, self ms):")
        lines += [f"  {c / 1000:8.1f} {s / 1000:8.1f}  {n}" for c, s, n in costs]
    print("\n".join(lines))
    return figures


if __name__ == "__main__":
    main()
