"""Probe latency while a health check is slow, against a trivial endpoint in the same run.

One app serves ``/readyz`` (``lifecycle.starlette.health_routes``) next to ``/trivial``, a
handler returning a constant JSON body. Its only health check takes 2 s and runs back to back,
so a run is in flight during every measurement: a probe that waited on it would take 2 s.
Requests alternate between the two endpoints, one at a time over one keep-alive connection,
and the script prints the median and p99 latency of each and their ratio (target: ``/readyz``
within 1.5x of the trivial endpoint).

(a) Real HTTP: uvicorn in a child process on loopback, the client in this process.
(b) In process, through ``httpx.ASGITransport``, on asyncio and on trio.

Run: ``.venv/bin/python benchmarks/health.py`` (``--requests N`` to change the sample size).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import anyio
import anyio.lowlevel
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from lifecycle import Lifecycle
from lifecycle.starlette import health_routes
from lifecycle.testing import lifespan_client

CHECK_SECONDS = 2.0
TOKEN = "benchmark-token-0123456789"


def build_app() -> tuple[Starlette, Lifecycle]:
    lc = Lifecycle()

    # Runs back to back (interval == its duration), so one is always in flight.
    @lc.health_check(interval=CHECK_SECONDS, timeout=CHECK_SECONDS * 3)
    async def slow_dependency() -> None:
        await anyio.sleep(CHECK_SECONDS)

    async def trivial(request: Request) -> Response:
        return Response(b'{"status":"pass"}', media_type="application/json")

    routes = [*health_routes(lc, details_token=TOKEN), Route("/trivial", trivial)]
    return Starlette(lifespan=lc.lifespan, routes=routes), lc


def summarize(label: str, samples: dict[str, list[float]]) -> None:
    def stats(values: list[float]) -> tuple[float, float]:
        return statistics.median(values), statistics.quantiles(values, n=100)[98]

    base_median, base_p99 = stats(samples["/trivial"])
    median, p99 = stats(samples["/readyz"])
    n = len(samples["/readyz"])
    print(
        f"{label} ({n:,} requests each)\n"
        f"    /trivial  median {base_median * 1e3:7.3f} ms   p99 {base_p99 * 1e3:7.3f} ms\n"
        f"    /readyz   median {median * 1e3:7.3f} ms   p99 {p99 * 1e3:7.3f} ms\n"
        f"    ratio     median {median / base_median:6.2f}x     p99 {p99 / base_p99:6.2f}x"
        f"   (target <= 1.5x)"
    )


def check_in_flight(report: dict[str, object], before: str | None = None) -> str:
    (entry,) = report["checks"]["slow_dependency"]  # type: ignore[index]
    assert entry["status"] == "pass", entry
    took = entry["observedValue"]
    assert took >= CHECK_SECONDS * 1000 * 0.95, f"the check took {took} ms, not ~2 s"
    if before is not None:
        assert entry["time"] != before, "no check run finished during the measurement"
    return str(entry["time"])


def measure_sync(get: Callable[[str], httpx.Response], requests: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {"/trivial": [], "/readyz": []}
    for _ in range(requests):
        for path, bucket in samples.items():
            began = time.perf_counter()
            response = get(path)
            bucket.append(time.perf_counter() - began)
            assert response.status_code == 200, (path, response.status_code)
    return samples


# -- (a) uvicorn over loopback ---------------------------------------------------------------


def serve(port: int) -> None:
    import uvicorn

    app, _ = build_app()
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bench_uvicorn(requests: int) -> None:
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port)])
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10.0) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if client.get("/startupz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.05)
            details = {"Authorization": f"Bearer {TOKEN}"}
            first = check_in_flight(client.get("/healthz", headers=details).json())
            measure_sync(client.get, 300)  # warm-up
            began = time.perf_counter()
            samples = measure_sync(client.get, requests)
            took = time.perf_counter() - began
            if took < CHECK_SECONDS * 1.5:  # make sure whole check runs overlapped it
                samples = {k: v + measure_sync(client.get, requests)[k] for k, v in samples.items()}
            check_in_flight(client.get("/healthz", headers=details).json(), first)
    finally:
        server.terminate()
        server.wait(timeout=20)
    summarize("(a) uvicorn (asyncio, h11) over loopback, one keep-alive connection", samples)


# -- (b) in process ---------------------------------------------------------------------------


async def bench_in_process(requests: int) -> None:
    import sniffio

    app, _ = build_app()
    samples: dict[str, list[float]] = {"/trivial": [], "/readyz": []}
    details = {"Authorization": f"Bearer {TOKEN}"}
    async with lifespan_client(app) as client:
        first = check_in_flight((await client.get("/healthz", headers=details)).json())
        for _ in range(300):  # warm-up
            for path in samples:
                await client.get(path)
            await anyio.lowlevel.checkpoint()
        began = time.perf_counter()
        while True:
            for _ in range(requests):
                for path, bucket in samples.items():
                    start = time.perf_counter()
                    response = await client.get(path)
                    bucket.append(time.perf_counter() - start)
                    assert response.status_code == 200, (path, response.status_code)
                # An in-process request never suspends: without this (untimed) checkpoint the
                # loop would never run the check's timers, nor the watchdog's.
                await anyio.lowlevel.checkpoint()
            if time.perf_counter() - began >= CHECK_SECONDS * 1.5:
                break
        check_in_flight((await client.get("/healthz", headers=details)).json(), first)
    backend = sniffio.current_async_library()
    summarize(f"(b) in process (httpx.ASGITransport) on {backend}", samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    print(
        f"/readyz latency while its health check takes {CHECK_SECONDS:.0f} s (a run is always "
        f"in flight), against a trivial endpoint of the same app, measured in the same run."
    )
    bench_uvicorn(args.requests)
    anyio.run(bench_in_process, args.requests, backend="asyncio")
    anyio.run(bench_in_process, args.requests, backend="trio")


if __name__ == "__main__":
    main()
