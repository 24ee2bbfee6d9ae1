"""What DeadlineMiddleware costs per request, against baselines measured in the same run.

Every variant serves the same Starlette app (one route, a plain-text response); requests carry
``x-request-timeout-ms: 5000`` and the middlewares have a 30 s default, so every request runs
under a deadline. Variants:

- ``bare``: the Starlette app alone.
- ``lifecycle``: ``lifecycle.DeadlineMiddleware``.
- ``lifecycle, plain scopes``: the same with its shared timer switched off, so that each
  request's cancel scope arms its own event-loop timer, as anyio does by default.
- ``scope+deadline``: a minimal pure ASGI middleware opening ``anyio.CancelScope(deadline=...)``
  per request: the straightforward design, which arms one event-loop timer per request.
- ``scope only``: the same with ``anyio.CancelScope()`` and no deadline: the floor of any
  design that runs each request in an anyio cancel scope, as the deadline contract requires.
- ``BaseHTTPMiddleware``: Starlette's ``BaseHTTPMiddleware`` with ``anyio.fail_after``.

(a) In process: microseconds added per request against ``bare``, each request in a fresh task
    and a fresh context as uvicorn runs it; variants alternate round by round and the median
    of the paired differences is printed.
(b) Under uvicorn (h11, asyncio) on loopback: the throughput ratio of each variant to
    ``bare``. This machine's speed drifts by +-20 % within seconds, so the two servers of a
    pair run side by side, pinned to the same CPU (the kernel shares it fairly), each driven
    by its own load generator pinned to another CPU, and the ratio of their request counts is
    taken round by round. Load comes from ``wrk`` when it is installed, else from a Python
    keep-alive client. A pair of identical ``bare`` servers calibrates the method.

Run: ``.venv/bin/python benchmarks/deadline.py`` (``--seconds``/``--rounds`` to change the
sample, ``--skip-uvicorn`` for (a) only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from importlib.metadata import version
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import lifecycle

DEFAULT_TIMEOUT = 30.0
HEADERS = [(b"host", b"bench"), (b"user-agent", b"bench"), (b"x-request-timeout-ms", b"5000")]
CONNECTIONS = 32


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello")


def bare_app() -> Starlette:
    return Starlette(routes=[Route("/", hello)])


def anyio_scope_middleware(app: Any, *, with_deadline: bool) -> Any:
    async def middleware(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        deadline = anyio.current_time() + DEFAULT_TIMEOUT if with_deadline else float("inf")
        with anyio.CancelScope(deadline=deadline):
            await app(scope, receive, send)

    return middleware


def lifecycle_with_plain_scopes() -> Any:
    """DeadlineMiddleware with its shared timer switched off: one loop timer per request."""
    from lifecycle import _deadline

    middleware = lifecycle.DeadlineMiddleware(bare_app(), default_timeout=DEFAULT_TIMEOUT)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        _deadline._use_shared_timer = False
        try:
            await middleware(scope, receive, send)
        finally:
            _deadline._use_shared_timer = True

    return app


class FailAfterMiddleware(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        with anyio.fail_after(DEFAULT_TIMEOUT):
            return await call_next(request)


VARIANTS: dict[str, Callable[[], Any]] = {
    "bare": bare_app,
    "lifecycle": lambda: lifecycle.DeadlineMiddleware(bare_app(), default_timeout=DEFAULT_TIMEOUT),
    "lifecycle, plain scopes": lifecycle_with_plain_scopes,
    "scope+deadline": lambda: anyio_scope_middleware(bare_app(), with_deadline=True),
    "scope only": lambda: anyio_scope_middleware(bare_app(), with_deadline=False),
    "BaseHTTPMiddleware": lambda: FailAfterMiddleware(bare_app()),
}
LABELS = {
    "bare": "bare Starlette app",
    "lifecycle": "lifecycle.DeadlineMiddleware",
    "lifecycle, plain scopes": "  the same without the shared timer",
    "scope+deadline": "anyio.CancelScope(deadline=...) middleware",
    "scope only": "anyio.CancelScope() middleware (no deadline)",
    "BaseHTTPMiddleware": "BaseHTTPMiddleware + anyio.fail_after",
}


# -- (a) in process ---------------------------------------------------------------------------


def http_scope() -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "root_path": "",
        "headers": HEADERS,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: Any) -> None:
    pass


async def run_requests_asyncio(app: Any, count: int) -> float:
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    for _ in range(count):
        await loop.create_task(app(http_scope(), receive, send), context=contextvars.Context())
    return (time.perf_counter() - started) / count


async def run_requests_trio(app: Any, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        await app(http_scope(), receive, send)
    return (time.perf_counter() - started) / count


def bench_in_process(backend: str, rounds: int, per_round: int) -> dict[str, float]:
    """Median added microseconds per request of each variant against ``bare``."""
    apps = {name: factory() for name, factory in VARIANTS.items()}
    runner = run_requests_asyncio if backend == "asyncio" else run_requests_trio
    samples: dict[str, list[float]] = {name: [] for name in apps}

    async def main() -> None:
        for app in apps.values():  # warm up
            await runner(app, 200)
        for index in range(rounds):
            order = list(apps) if index % 2 else list(reversed(apps))
            for name in order:
                samples[name].append(await runner(apps[name], per_round))

    anyio.run(main, backend=backend)
    base = samples["bare"]
    result = {"bare": statistics.median(base) * 1e6}
    for name, values in samples.items():
        if name != "bare":
            result[name] = statistics.median(v - b for v, b in zip(values, base, strict=True)) * 1e6
    return result


def print_in_process(backend: str, result: dict[str, float]) -> None:
    note = "each request in a fresh task, as uvicorn runs it" if backend == "asyncio" else ""
    print(f"  {backend}{f' ({note})' if note else ''}:")
    print(f"    {LABELS['bare']:<46} {result['bare']:7.1f} us per request")
    baseline = result["BaseHTTPMiddleware"]
    for name in list(VARIANTS)[1:]:
        added = result[name]
        versus = (
            ""
            if name == "BaseHTTPMiddleware"
            else f"   ({added - baseline:+6.1f} us vs BaseHTTPMiddleware)"
        )
        print(f"    {LABELS[name]:<46} {added:+7.1f} us{versus}")


# -- (b) under uvicorn ----------------------------------------------------------------------


def serve(variant: str, port: int) -> None:
    import uvicorn

    from lifecycle import _deadline

    if variant == "lifecycle, plain scopes":  # a process of its own: no need to toggle per call
        _deadline._use_shared_timer = False
        variant = "lifecycle"
    app = VARIANTS[variant]()
    # Pinned: with uvicorn[standard] installed, "auto" would pick uvloop and httptools.
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="asyncio",
        http="h11",
        log_level="warning",
        access_log=False,
    )


def load_client(port: int, connections: int, seconds: float) -> None:
    """A keep-alive HTTP/1.1 load generator: prints how many responses it received."""
    request = (
        b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\nuser-agent: bench\r\n"
        b"x-request-timeout-ms: 5000\r\n\r\n"
    )
    done = 0

    async def connection(stop: float) -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < stop:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                done += 1
        finally:
            writer.close()
            await writer.wait_closed()

    async def main() -> None:
        stop = time.monotonic() + seconds
        await asyncio.gather(*(connection(stop) for _ in range(connections)))

    asyncio.run(main())
    print(done)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinned(cpu: int | None) -> Callable[[], None] | None:
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


@contextmanager
def servers(variants: list[str], cpu: int | None) -> Iterator[list[int]]:
    ports = [free_port() for _ in variants]
    with ExitStack() as stack:
        processes = []
        for variant, port in zip(variants, ports, strict=True):
            process = subprocess.Popen(
                [sys.executable, __file__, "--serve", variant, str(port)],
                preexec_fn=pinned(cpu),
            )
            processes.append(process)
            stack.callback(process.wait)
            stack.callback(process.terminate)
        for port in ports:
            wait_listening(port)
        yield ports


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the benchmark server on port {port} did not start within 20 s")


def run_load(ports: list[int], seconds: float, cpu: int | None, wrk: str | None) -> list[int]:
    """Drive every server at once, each with its own load generator; return request counts."""
    commands = []
    for port in ports:
        if wrk:
            command = [
                wrk,
                "-t1",
                f"-c{CONNECTIONS}",
                f"-d{seconds:g}s",
                "-H",
                "x-request-timeout-ms: 5000",
                f"http://127.0.0.1:{port}/",
            ]
        else:
            command = [
                sys.executable,
                __file__,
                "--load",
                str(port),
                str(CONNECTIONS),
                str(seconds),
            ]
        commands.append(command)
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, text=True, preexec_fn=pinned(cpu))
        for command in commands
    ]
    counts = []
    for process in processes:
        output, _ = process.communicate(timeout=seconds + 60)
        if wrk:
            (line,) = [line for line in output.splitlines() if "requests in" in line]
            counts.append(int(line.split()[0]))
        else:
            counts.append(int(output.strip()))
    return counts


def bench_uvicorn(rounds: int, seconds: float, variants: list[str]) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, load_cpu = (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)
    wrk = shutil.which("wrk")
    generator = "wrk -t1 -c32" if wrk else f"a Python keep-alive client, {CONNECTIONS} connections"
    print(
        f"(b) uvicorn {version('uvicorn')} (h11, asyncio) on loopback; load: {generator}; "
        f"{rounds} rounds of {seconds:g} s per pair"
    )
    if server_cpu is None:
        print("    (one CPU only: servers and load generators share it, ratios are rough)")
    print(f"    {'variant':<46} {'ratio':>6}  per round          (bare requests/s)")
    for variant in variants:
        with servers(["bare", variant], server_cpu) as ports:
            run_load(ports, 1.0, load_cpu, wrk)  # warm up
            ratios, bare_rates = [], []
            for _ in range(rounds):
                bare_count, variant_count = run_load(ports, seconds, load_cpu, wrk)
                ratios.append(variant_count / bare_count)
                bare_rates.append(bare_count / seconds)
        label = (
            "bare (calibration: two identical servers)" if variant == "bare" else LABELS[variant]
        )
        per_round = " ".join(f"{ratio:.2f}" for ratio in ratios)
        print(
            f"    {label:<46} {statistics.median(ratios):6.3f}  [{per_round}]"
            f"  ({statistics.median(bare_rates):.0f}/s, sharing the CPU)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--skip-uvicorn", action="store_true")
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="NAME"
    )
    parser.add_argument("--serve", nargs=2, metavar=("VARIANT", "PORT"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--load", nargs=3, metavar=("PORT", "CONNS", "SECONDS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return
    if args.load:
        load_client(int(args.load[0]), int(args.load[1]), float(args.load[2]))
        return

    print(
        f"lifecycle deadline benchmark: Python {platform.python_version()}, "
        f"anyio {version('anyio')}, starlette {version('starlette')}, trio {version('trio')}"
    )
    print(
        "(a) in process: microseconds added per request against the bare app (median of 40 rounds)"
    )
    for backend in ("asyncio", "trio"):
        print_in_process(backend, bench_in_process(backend, rounds=40, per_round=1000))
    if not args.skip_uvicorn:
        bench_uvicorn(args.rounds, args.seconds, args.variants)


if __name__ == "__main__":
    main()
