"""Admin API throughput: `GET /api/plugins` through uvicorn against a bare Starlette endpoint.

Two server subprocesses run with the same uvicorn settings (loop "asyncio", the `http`
implementation `nekobot run` gets — "auto", i.e. httptools if installed, else h11 —
log level warning, no access log):

* kernel: a real Kernel with every builtin plugin on a temporary data directory (as
  `nekobot run` starts it); the benchmark logs in for a token and raises the rate limit
  to the schema's maximum (1,000,000/min) so the limiter still runs but never answers 429;
* bare: a Starlette app with one JSON route answering the very body the kernel's
  `/api/plugins` answered (same size, same JSON encoding work).

The load generator runs in this process: asyncio raw sockets, HTTP/1.1 keep-alive, N
connections each sending one request after the other (with the same Authorization
header to both servers), for a fixed time, counting complete responses by status
(bodies are read by Content-Length). Runs alternate bare, kernel, bare, kernel after an
untimed warm-up of each. Where the platform allows, the servers are pinned to one CPU
and the load generator to another.

Figures are given by the wall clock and per CPU-second the server process used (the
latter stays meaningful when other processes share the servers' core). With `--profile`
the kernel server runs under cProfile for one more timed run and the costliest
functions are printed.

Run: `python -m benchmarks.api_http [--seconds S] [--connections N] [--quick] [--profile]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from benchmarks import machine_note, verdict
from benchmarks.startup import cpu_seconds
from kernel.testing import free_port

TARGET_RATIO = 0.70
PATH = "/api/plugins"
#: The settings schema's maximum: far above any rate this benchmark reaches.
RATE_LIMIT = 1_000_000
PROFILE_ENV = "NEKOBOT_BENCH_PROFILE"
START_TIMEOUT_S = 30.0
#: Server subprocesses run here, so that `benchmarks` is importable.
REPO = Path(__file__).resolve().parents[1]


# -- the servers (run in subprocesses: `python -m benchmarks.api_http --serve ...`) -------


def uvicorn_config(app: object, port: int) -> object:
    """The uvicorn settings both servers share."""

    from kernel.server import uvicorn_config as kernel_config

    # What `nekobot run` uses (httptools if installed, else h11), quieter.
    return kernel_config(app, "127.0.0.1", port, log_level="warning", access_log=False)


async def _serve_kernel(port: int, data_dir: Path) -> None:
    import uvicorn

    from kernel import Kernel, KernelConfig

    plugin_dir = data_dir.parent / "plugins"
    plugin_dir.mkdir(parents=True, exist_ok=True)
    config = KernelConfig(data_dir=data_dir, plugin_dirs=(plugin_dir,), port=port)
    async with Kernel(config) as kernel:
        await uvicorn.Server(uvicorn_config(kernel.asgi_app, port)).serve()  # type: ignore[arg-type]


async def _serve_bare(port: int, payload: object) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def endpoint(request: Request) -> JSONResponse:
        return JSONResponse(payload)

    app = Starlette(routes=[Route(PATH, endpoint)])
    await uvicorn.Server(uvicorn_config(app, port)).serve()  # type: ignore[arg-type]


def serve(kind: str, port: int, path: Path) -> None:
    """Run one server until SIGINT; under cProfile if $NEKOBOT_BENCH_PROFILE names a file."""
    import anyio

    profile_to = os.environ.get(PROFILE_ENV)
    profiler = None
    if profile_to:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        # uvicorn re-delivers the SIGINT it handled once it has stopped.
        with contextlib.suppress(KeyboardInterrupt):
            if kind == "kernel":
                anyio.run(_serve_kernel, port, path)
            else:
                anyio.run(_serve_bare, port, json.loads(path.read_text()))
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile_to)


# -- the benchmark process --------------------------------------------------------------


class Server:
    """One server subprocess on a free loopback port."""

    def __init__(self, kind: str, path: Path, log: Path, env: dict[str, str] | None = None):
        self.kind = kind
        self.port = free_port()
        cmd = [sys.executable, "-m", "benchmarks.api_http", "--serve", kind]
        cmd += ["--port", str(self.port), "--path", str(path)]
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env
            )

    def wait_ready(self, path: str) -> None:
        """Poll until `path` answers (any status)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(
                    f"{self.kind} server exited with {self.proc.returncode}:\n{tail}"
                )
            try:
                request("GET", self.port, path)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.kind} server did not answer in time") from None
                time.sleep(0.02)

    def stop(self) -> None:
        """SIGINT (uvicorn shuts down gracefully, a profile gets written), then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def request(
    method: str, port: int, path: str, body: object = None, token: str | None = None
) -> tuple[int, bytes]:
    """One blocking HTTP/1.1 request to 127.0.0.1:`port` (Connection: close)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def prepare_kernel(port: int) -> tuple[str, bytes]:
    """Log in, lift the rate limit; returns (token, the body of GET /api/plugins)."""
    status, raw = request(
        "POST", port, "/api/login", {"username": "nekobot", "password": "nekobot"}
    )
    if status != 200:
        raise RuntimeError(f"login answered {status}: {raw[:200]!r}")
    token: str = json.loads(raw)["data"]["access_token"]
    status, raw = request(
        "PUT", port, "/api/settings", {"rate_limit_per_minute": RATE_LIMIT}, token
    )
    if status != 200:
        raise RuntimeError(f"PUT /api/settings answered {status}: {raw[:200]!r}")
    status, body = request("GET", port, PATH, token=token)
    if status != 200:
        raise RuntimeError(f"GET {PATH} answered {status}: {body[:200]!r}")
    return token, body


async def _connection(port: int, raw_request: bytes, stop_at: float, counts: Counter[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < stop_at:
            writer.write(raw_request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
                    break
            await reader.readexactly(length)
            counts[status] += 1
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def load(port: int, token: str, seconds: float, connections: int) -> tuple[float, Counter[int]]:
    """Drive `GET /api/plugins` for `seconds`; (200 responses per second, status counts)."""
    raw_request = (
        f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {token}\r\nAccept: application/json\r\n\r\n"
    ).encode()

    async def run() -> tuple[float, Counter[int]]:
        counts: Counter[int] = Counter()
        start = time.perf_counter()
        stop_at = start + seconds
        await asyncio.gather(
            *(_connection(port, raw_request, stop_at, counts) for _ in range(connections))
        )
        # Requests in flight at stop_at finish a little later: count by the real span.
        return counts[200] / (time.perf_counter() - start), counts

    return asyncio.run(run())


@contextlib.contextmanager
def pinning(servers: Sequence[Server]) -> Iterator[str]:
    """Servers on one CPU, this process on another (restored afterwards)."""
    if not hasattr(os, "sched_setaffinity"):
        yield "not pinned (no os.sched_setaffinity)"
        return
    before = os.sched_getaffinity(0)
    if len(before) < 2:
        yield f"not pinned (only {len(before)} CPU available)"
        return
    server_cpu, client_cpu = sorted(before)[-2:]
    try:
        for server in servers:
            os.sched_setaffinity(server.proc.pid, {server_cpu})
        os.sched_setaffinity(0, {client_cpu})
    except OSError as exc:
        os.sched_setaffinity(0, before)
        yield f"not pinned ({exc})"
        return
    try:
        yield f"servers pinned to CPU {server_cpu}, load generator to CPU {client_cpu}"
    finally:
        os.sched_setaffinity(0, before)


def top_functions(profile: Path, count: int = 25) -> str:
    """The `count` costliest functions of a cProfile dump, by own time and cumulatively."""
    import io
    import pstats

    out = io.StringIO()
    stats = pstats.Stats(str(profile), stream=out)
    stats.strip_dirs().sort_stats("tottime").print_stats(count)
    stats.sort_stats("cumulative").print_stats(count)
    return out.getvalue()


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Measure and print kernel vs bare requests per second; returns the figures."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.api_http", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each timed run")
    parser.add_argument("--connections", type=int, default=16, help="keep-alive connections")
    parser.add_argument("--rounds", type=int, default=2, help="bare/kernel alternations")
    parser.add_argument("--quick", action="store_true", help="a tiny run (smoke test)")
    parser.add_argument("--profile", action="store_true", help="profile the kernel server")
    parser.add_argument("--serve", choices=("kernel", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.serve:
        serve(opts.serve, opts.port, opts.path)
        return {}
    if opts.quick:
        opts.seconds, opts.rounds, opts.connections = 0.5, 1, 4

    try:
        import httptools  # noqa: F401

        http_impl = "httptools"
    except ImportError:
        http_impl = "h11"

    with tempfile.TemporaryDirectory(prefix="nekobot-bench-api-") as tmp:
        root = Path(tmp)
        (root / "kernel").mkdir()
        kernel = Server("kernel", root / "kernel" / "data", root / "kernel.log")
        servers = [kernel]
        try:
            kernel.wait_ready("/api/health")
            token, body = prepare_kernel(kernel.port)
            (root / "body.json").write_bytes(body)
            bare = Server("bare", root / "body.json", root / "bare.log")
            servers.append(bare)
            bare.wait_ready(PATH)
            bare_status, bare_body = request("GET", bare.port, PATH, token=token)
            assert bare_status == 200 and len(bare_body) == len(body), (bare_status, len(bare_body))
            runs: dict[str, list[float]] = {"bare": [], "kernel": []}
            #: 200 responses per CPU-second the server used (robust to a busy machine).
            per_cpu: dict[str, list[float]] = {"bare": [], "kernel": []}
            statuses: dict[str, Counter[int]] = {"bare": Counter(), "kernel": Counter()}
            with pinning(servers) as pin_note:
                for server in (bare, kernel):  # untimed warm-up
                    load(server.port, token, min(1.0, opts.seconds), opts.connections)
                for _ in range(opts.rounds):
                    for server in (bare, kernel):
                        cpu = cpu_seconds(server.proc.pid)
                        rate, counts = load(server.port, token, opts.seconds, opts.connections)
                        cpu = cpu_seconds(server.proc.pid) - cpu
                        runs[server.kind].append(rate)
                        per_cpu[server.kind].append(counts[200] / cpu if cpu > 0 else float("nan"))
                        statuses[server.kind].update(counts)
        finally:
            for server in servers:
                server.stop()
        profile_text = ""
        if opts.profile:
            profile = root / "kernel.prof"
            env = {**os.environ, PROFILE_ENV: str(profile)}
            (root / "kernel2").mkdir()
            profiled = Server("kernel", root / "kernel2" / "data", root / "kernel2.log", env)
            try:
                profiled.wait_ready("/api/health")
                token, _ = prepare_kernel(profiled.port)
                with pinning([profiled]):
                    load(profiled.port, token, opts.seconds, opts.connections)
            finally:
                profiled.stop()
            profile_text = top_functions(profile)

    bare_rate = sum(runs["bare"]) / len(runs["bare"])
    kernel_rate = sum(runs["kernel"]) / len(runs["kernel"])
    ratio = kernel_rate / bare_rate
    bare_cpu = sum(per_cpu["bare"]) / len(per_cpu["bare"])
    kernel_cpu = sum(per_cpu["kernel"]) / len(per_cpu["kernel"])
    non_200 = {
        kind: sum(n for status, n in counts.items() if status != 200)
        for kind, counts in statuses.items()
    }
    figures = {
        "bare_req_per_s": bare_rate,
        "kernel_req_per_s": kernel_rate,
        "kernel_vs_bare": ratio,
        "bare_req_per_cpu_s": bare_cpu,
        "kernel_req_per_cpu_s": kernel_cpu,
        "kernel_vs_bare_per_cpu": kernel_cpu / bare_cpu,
        "kernel_non_200": float(non_200["kernel"]),
        "bare_non_200": float(non_200["bare"]),
    }

    def fmt(rates: list[float]) -> str:
        return ", ".join(f"{r:,.0f}" for r in rates)

    def status_note(kind: str) -> str:
        return ", ".join(f"{s}: {n:,}" for s, n in sorted(statuses[kind].items()))

    lines = [
        f"== api_http: GET {PATH} through uvicorn, kernel vs bare Starlette ==",
        f"{machine_note()}; {pin_note}",
        f"uvicorn: loop asyncio, http {http_impl}, log level warning, no access log;"
        f" body {len(body):,} bytes",
        f"{opts.connections} keep-alive connections, {opts.seconds:g} s per run,"
        f" {opts.rounds} alternation(s) after an untimed warm-up",
        f"  bare Starlette : {bare_rate:8,.0f} req/s  (runs: {fmt(runs['bare'])})",
        f"  kernel         : {kernel_rate:8,.0f} req/s  (runs: {fmt(runs['kernel'])})"
        "  auth + envelope + rate limit",
        f"  kernel / bare  : {ratio:8.3f}",
        f"  per server CPU-second (less sensitive to a busy machine): bare {bare_cpu:,.0f},"
        f" kernel {kernel_cpu:,.0f} req/CPU-s; kernel / bare {kernel_cpu / bare_cpu:.3f}",
        f"  statuses: bare {{{status_note('bare')}}}; kernel {{{status_note('kernel')}}}"
        + ("  -- non-200 answers happened!" if any(non_200.values()) else ""),
        f"target: kernel >= {TARGET_RATIO:.0%} of bare ->"
        f" {verdict(ratio, TARGET_RATIO, lower_is_better=False)} (wall clock),"
        f" {verdict(kernel_cpu / bare_cpu, TARGET_RATIO, lower_is_better=False)} (per CPU-s)",
    ]
    if profile_text:
        lines += ["kernel server profile (cProfile, one timed run):", profile_text]
    print("\n".join(lines))
    return figures


if __name__ == "__main__":
    main()
