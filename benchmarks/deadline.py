"""What DeadlineMiddleware costs per request, against baselines measured in the same run.

Every variant serves the same Starlette app with two routes: ``/`` answers plain text, ``/json``
serialises a 1 KB JSON body. Variants:

- ``bare``: the Starlette app alone.
- ``pass-through``: ``lifecycle.DeadlineMiddleware`` with no default, sent no budget header: no
  deadline applies, so the request should cost (almost) nothing.
- ``deadline``: ``lifecycle.DeadlineMiddleware`` with a 30 s default, sent
  ``x-request-timeout-ms: 5000``: every request runs under a deadline.
- ``deadline, plain scopes``: the same on its fallback path (``anyio.CancelScope``), which it
  takes when its fast scope fails its self-test on the installed anyio (in process only).
- ``anyio scope``: a minimal pure ASGI middleware opening ``anyio.CancelScope(deadline=...)``
  per request: the straightforward design.
- ``BaseHTTPMiddleware``: Starlette's ``BaseHTTPMiddleware`` with ``anyio.fail_after``.

(a) In process: microseconds added per request against ``bare``, each request in a fresh task
    and a fresh context as uvicorn runs it; variants alternate round by round and the median
    of the paired differences is printed, with the interquartile range.
(b) Under uvicorn on loopback, h11 on asyncio and httptools on uvloop: the throughput ratio of
    each variant to ``bare``. This machine's speed drifts within seconds, so the two servers
    of a pair run side by side, pinned to the same CPU (the kernel shares it fairly), each
    driven by its own ``wrk -t1 -c32`` pinned to another CPU, and the ratio of their request
    counts is taken round by round; the median and the range of the rounds are printed. A pair
    of identical ``bare`` servers calibrates the method. (b) needs ``wrk`` on the PATH
    (``apt-get install wrk``) and uvicorn, httptools and uvloop installed (``pip install
    'uvicorn[standard]'``); without them it says so and is skipped. Both servers of a pair
    get the same requests: when the variant is sent the budget header, ``bare`` is sent it
    too (and ignores it), so the server's cost of parsing one more header is not counted
    against the middleware.
(c) With ``--instructions``: the same in-process requests counted in CPU instructions by
    ``valgrind --tool=callgrind`` (``apt-get install valgrind``), which do not drift with the
    machine's load as microseconds do: the instructions a variant adds per request against
    ``bare``, from the difference of two runs of different lengths. Slow (the requests run
    about 50 times slower under valgrind); it replaces (a) and (b).

Run: ``.venv/bin/python benchmarks/deadline.py`` (``--seconds``/``--rounds`` to change the
sample, ``--skip-uvicorn`` for (a) only, ``--instructions`` for (c)).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextvars
import importlib.util
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from importlib.metadata import version
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

import lifecycle

DEFAULT_TIMEOUT = 30.0
BUDGET_HEADER = (b"x-request-timeout-ms", b"5000")
BASE_HEADERS = [(b"host", b"bench"), (b"user-agent", b"bench"), (b"accept", b"*/*")]
CONNECTIONS = 32
# About 1 KB once serialised.
DOCUMENT = {
    "items": [
        {"id": i, "name": f"item-{i}", "price": i * 1.25, "tags": ["a", "b"]} for i in range(18)
    ]
}


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello")


async def document(request: Request) -> Response:
    return JSONResponse(DOCUMENT)


def bare_app() -> Starlette:
    return Starlette(routes=[Route("/", hello), Route("/json", document)])


def anyio_scope_middleware(app: Any) -> Any:
    async def middleware(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        with anyio.CancelScope(deadline=anyio.current_time() + DEFAULT_TIMEOUT):
            await app(scope, receive, send)

    return middleware


def lifecycle_with_plain_scopes() -> Any:
    """DeadlineMiddleware on its fallback path: anyio.CancelScope per request."""
    from lifecycle import _deadline

    middleware = lifecycle.DeadlineMiddleware(bare_app(), default_timeout=DEFAULT_TIMEOUT)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        _deadline._use_lean_scope = False
        try:
            await middleware(scope, receive, send)
        finally:
            _deadline._use_lean_scope = _deadline._LEAN_SCOPE_WORKS

    return app


class FailAfterMiddleware(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        with anyio.fail_after(DEFAULT_TIMEOUT):
            return await call_next(request)


VARIANTS: dict[str, Callable[[], Any]] = {
    "bare": bare_app,
    "pass-through": lambda: lifecycle.DeadlineMiddleware(bare_app()),
    "deadline": lambda: lifecycle.DeadlineMiddleware(bare_app(), default_timeout=DEFAULT_TIMEOUT),
    "deadline, plain scopes": lifecycle_with_plain_scopes,
    "anyio scope": lambda: anyio_scope_middleware(bare_app()),
    "BaseHTTPMiddleware": lambda: FailAfterMiddleware(bare_app()),
}
LABELS = {
    "bare": "bare Starlette app",
    "pass-through": "DeadlineMiddleware, no deadline (pass-through)",
    "deadline": "DeadlineMiddleware, with a deadline",
    "deadline, plain scopes": "  the same on the fallback (anyio.CancelScope)",
    "anyio scope": "anyio.CancelScope(deadline=...) middleware",
    "BaseHTTPMiddleware": "BaseHTTPMiddleware + anyio.fail_after",
}
# Which variants are sent the budget header (the pass-through must not be).
SENDS_BUDGET = {"deadline", "deadline, plain scopes", "anyio scope", "BaseHTTPMiddleware"}
UVICORN_VARIANTS = ["bare", "pass-through", "deadline", "anyio scope", "BaseHTTPMiddleware"]
PATHS = {"/": "plain text", "/json": "1 KB JSON body"}


# -- (a) in process ---------------------------------------------------------------------------


def http_scope(path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: Any) -> None:
    pass


def headers_for(variant: str) -> list[tuple[bytes, bytes]]:
    return [*BASE_HEADERS, BUDGET_HEADER] if variant in SENDS_BUDGET else list(BASE_HEADERS)


async def run_requests_asyncio(app: Any, path: str, headers: Any, count: int) -> float:
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    for _ in range(count):
        scope = http_scope(path, headers)
        await loop.create_task(app(scope, receive, send), context=contextvars.Context())
    return (time.perf_counter() - started) / count


async def run_requests_trio(app: Any, path: str, headers: Any, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        await app(http_scope(path, headers), receive, send)
    return (time.perf_counter() - started) / count


def bench_in_process(
    backend: str, path: str, rounds: int, per_round: int
) -> dict[str, tuple[float, float, float]]:
    """Median and quartiles of the added microseconds per request of each variant."""
    apps = {name: factory() for name, factory in VARIANTS.items()}
    headers = {name: headers_for(name) for name in apps}
    runner = run_requests_asyncio if backend == "asyncio" else run_requests_trio
    samples: dict[str, list[float]] = {name: [] for name in apps}

    async def main() -> None:
        for name, app in apps.items():  # warm up
            await runner(app, path, headers[name], 200)
        for index in range(rounds):
            order = list(apps) if index % 2 else list(reversed(apps))
            for name in order:
                samples[name].append(await runner(apps[name], path, headers[name], per_round))

    anyio.run(main, backend=backend)
    base = samples["bare"]
    result = {"bare": spread([value * 1e6 for value in base])}
    for name, values in samples.items():
        if name != "bare":
            result[name] = spread([(v - b) * 1e6 for v, b in zip(values, base, strict=True)])
    return result


def spread(values: list[float]) -> tuple[float, float, float]:
    """Median, first and third quartile."""
    first, _, third = statistics.quantiles(values, n=4)
    return statistics.median(values), first, third


def print_in_process(
    backend: str, path: str, result: dict[str, tuple[float, float, float]]
) -> None:
    note = ", each request in a fresh task as uvicorn runs it" if backend == "asyncio" else ""
    print(f"  {backend}, {PATHS[path]}{note}:")
    median, first, third = result["bare"]
    print(f"    {LABELS['bare']:<48} {median:7.1f} us per request  (IQR {first:.1f}..{third:.1f})")
    for name in list(VARIANTS)[1:]:
        median, first, third = result[name]
        print(f"    {LABELS[name]:<48} {median:+7.1f} us  (IQR {first:+.1f}..{third:+.1f})")


# -- (c) in process, counted in instructions ---------------------------------------------------

COUNT_SHORT, COUNT_LONG = 50, 550


def run_counted(variant: str, backend: str, path: str, count: int) -> None:
    """Serve ``count`` requests after a warm-up: what ``--count`` runs under valgrind."""
    app = VARIANTS[variant]()
    headers = headers_for(variant)
    runner = run_requests_asyncio if backend == "asyncio" else run_requests_trio

    async def main() -> None:
        await runner(app, path, headers, 50)
        await runner(app, path, headers, count)

    anyio.run(main, backend=backend)


def instructions(variant: str, backend: str, path: str, count: int, valgrind: str) -> int:
    """The instructions a process serving ``count`` requests of ``variant`` executes."""
    with tempfile.TemporaryDirectory() as scratch:
        output = subprocess.run(
            [
                valgrind,
                "--tool=callgrind",
                f"--callgrind-out-file={scratch}/callgrind.out",
                sys.executable,
                __file__,
                "--count",
                variant,
                backend,
                path,
                str(count),
            ],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},  # the same dict layouts in every run
        ).stderr
    (line,) = [line for line in output.splitlines() if "Collected :" in line]
    return int(line.split()[-1])


def per_request(variant: str, backend: str, path: str, valgrind: str) -> float:
    short, long = (
        instructions(variant, backend, path, count, valgrind) for count in (COUNT_SHORT, COUNT_LONG)
    )
    return (long - short) / (COUNT_LONG - COUNT_SHORT)


def bench_instructions() -> None:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print("(c) skipped: counting instructions needs valgrind (apt-get install valgrind).")
        return
    print(
        "(c) in process, counted by valgrind --tool=callgrind: instructions added per request "
        f"against the bare app (difference of runs of {COUNT_SHORT} and {COUNT_LONG} requests)"
    )
    workers = max(1, len(os.sched_getaffinity(0)))
    for backend in ("asyncio", "trio"):
        for path in PATHS:
            print(f"  {backend}, {PATHS[path]}:")
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                counted = {
                    name: pool.submit(per_request, name, backend, path, valgrind)
                    for name in VARIANTS
                }
                counts = {name: future.result() for name, future in counted.items()}
            bare = counts["bare"]
            print(f"    {LABELS['bare']:<48} {bare:9.0f} instructions per request")
            for name in list(VARIANTS)[1:]:
                added = counts[name] - bare
                print(f"    {LABELS[name]:<48} {added:+9.0f}  ({added / bare:+.0%})")


# -- (b) under uvicorn ----------------------------------------------------------------------

SERVERS = {
    "h11/asyncio": {"loop": "asyncio", "http": "h11"},
    "httptools/uvloop": {"loop": "uvloop", "http": "httptools"},
}


def serve(variant: str, server: str, port: int) -> None:
    import uvicorn

    uvicorn.run(
        VARIANTS[variant](),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        **SERVERS[server],  # type: ignore[arg-type]
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def servers(variants: list[str], server: str, cpu: int | None) -> Iterator[list[int]]:
    ports = [free_port() for _ in variants]
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    with ExitStack() as stack:
        for variant, port in zip(variants, ports, strict=True):
            process = subprocess.Popen(
                [*pin, sys.executable, __file__, "--serve", variant, server, str(port)]
            )
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


def run_load(
    ports: list[int], path: str, budget: bool, seconds: float, cpu: int | None, wrk: str
) -> list[int]:
    """Drive every server at once, each with its own wrk; return the request counts.

    Every server gets the same requests: with the budget header if ``budget``, so that a
    server's cost of parsing one more header is not counted against the middleware.
    """
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    header = ["-H", "x-request-timeout-ms: 5000"] if budget else []
    processes = []
    for port in ports:
        command = [*pin, wrk, "-t1", f"-c{CONNECTIONS}", f"-d{seconds:g}s", *header]
        command.append(f"http://127.0.0.1:{port}{path}")
        processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True))
    counts = []
    for process in processes:
        output, _ = process.communicate(timeout=seconds + 60)
        (line,) = [line for line in output.splitlines() if "requests in" in line]
        counts.append(int(line.split()[0]))
    return counts


def missing_for_uvicorn() -> list[str]:
    missing = []
    if shutil.which("wrk") is None:
        missing.append("wrk on the PATH (apt-get install wrk)")
    if shutil.which("taskset") is None:
        missing.append("taskset on the PATH (util-linux)")
    missing.extend(
        f"the {module} package (pip install 'uvicorn[standard]')"
        for module in ("uvicorn", "httptools", "uvloop")
        if importlib.util.find_spec(module) is None
    )
    return missing


def bench_uvicorn(rounds: int, seconds: float) -> None:
    missing = missing_for_uvicorn()
    if missing:
        print("(b) skipped: the uvicorn benchmark needs " + ", ".join(missing) + ".")
        return
    wrk = shutil.which("wrk")
    assert wrk is not None
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, load_cpu = (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)
    print(
        f"(b) uvicorn {version('uvicorn')} on loopback (httptools {version('httptools')}, uvloop "
        f"{version('uvloop')}); load: wrk -t1 -c{CONNECTIONS}; both servers of a pair on CPU "
        f"{server_cpu}, wrk on CPU {load_cpu}; {rounds} rounds of {seconds:g} s per pair"
    )
    if server_cpu is None:
        print("    (one CPU only: servers and load generators share it, ratios are rough)")
    for server in SERVERS:
        for path in PATHS:
            print(f"  {server}, {PATHS[path]}:")
            print(f"    {'variant':<48} {'ratio':>6}  rounds (min..max)      bare req/s")
            for variant in UVICORN_VARIANTS:
                budget = variant in SENDS_BUDGET
                with servers(["bare", variant], server, server_cpu) as ports:
                    run_load(ports, path, budget, 1.0, load_cpu, wrk)  # warm up
                    ratios, bare_rates = [], []
                    for _ in range(rounds):
                        bare_count, variant_count = run_load(
                            ports, path, budget, seconds, load_cpu, wrk
                        )
                        ratios.append(variant_count / bare_count)
                        bare_rates.append(bare_count / seconds)
                label = (
                    "bare (calibration: two identical servers)"
                    if variant == "bare"
                    else LABELS[variant]
                )
                print(
                    f"    {label:<48} {statistics.median(ratios):6.3f}  "
                    f"({min(ratios):.2f}..{max(ratios):.2f})"
                    f"               {statistics.median(bare_rates):6.0f}/s (sharing the CPU)"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--in-process-rounds", type=int, default=30)
    parser.add_argument("--skip-uvicorn", action="store_true")
    parser.add_argument("--instructions", action="store_true")
    parser.add_argument(
        "--serve", nargs=3, metavar=("VARIANT", "SERVER", "PORT"), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--count", nargs=4, metavar=("VARIANT", "BACKEND", "PATH", "N"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], args.serve[1], int(args.serve[2]))
        return
    if args.count:
        run_counted(args.count[0], args.count[1], args.count[2], int(args.count[3]))
        return

    from lifecycle import _deadline

    print(
        f"lifecycle deadline benchmark: Python {platform.python_version()}, "
        f"anyio {version('anyio')}, starlette {version('starlette')}, trio {version('trio')}; "
        f"fast request scope: {'on' if _deadline._LEAN_SCOPE_WORKS else 'OFF (self-test failed)'}"
    )
    if args.instructions:
        bench_instructions()
        return
    print(
        "(a) in process: microseconds added per request against the bare app "
        f"(median of {args.in_process_rounds} paired rounds of 1000 requests, interquartile range)"
    )
    for backend in ("asyncio", "trio"):
        for path in PATHS:
            result = bench_in_process(backend, path, rounds=args.in_process_rounds, per_round=1000)
            print_in_process(backend, path, result)
    if not args.skip_uvicorn:
        bench_uvicorn(args.rounds, args.seconds)


if __name__ == "__main__":
    main()
