"""What `lifecycle.instrument_tracing` adds to each request under a deadline, in process.

Both variants serve the same Starlette app under a real server instrumentation
(opentelemetry-instrumentation-asgi's ``OpenTelemetryMiddleware``, on an SDK tracer provider
that records every span and exports none) with ``lifecycle.DeadlineMiddleware`` inside it,
each request sent ``x-request-timeout-ms: 5000``:

- ``tracing off``: no ``instrument_tracing``: the deadline middleware has no observer.
- ``tracing on``: ``instrument_tracing(lc)``: the deadline goes on each server span
  (budget when the request starts, what is left and the outcome as the response starts).

Each request runs in a fresh task and a fresh context, as uvicorn runs it. The variants
alternate in short rounds (this machine's speed drifts within seconds); the median of the
paired per-request differences is printed with the interquartile range, and the ratio of
the medians. The instrumentation itself costs far more than either (it is in both): the
difference is lifecycle's share.

Run: ``.venv/bin/python benchmarks/tracing.py`` (``--rounds``/``--requests`` to change the
sample).
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import statistics
import time
from typing import Any

from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.trace import TracerProvider
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import lifecycle

HEADERS = [(b"host", b"bench"), (b"x-request-timeout-ms", b"5000")]


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello")


def app(provider: TracerProvider) -> Any:
    deadline = lifecycle.DeadlineMiddleware(
        Starlette(routes=[Route("/", hello)]), default_timeout=30.0
    )
    return OpenTelemetryMiddleware(
        deadline, tracer_provider=provider, meter_provider=NoOpMeterProvider()
    )


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
        "headers": list(HEADERS),
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: Any) -> None:
    pass


async def per_request(target: Any, count: int) -> float:
    loop = asyncio.get_running_loop()
    began = time.perf_counter()
    for _ in range(count):
        await loop.create_task(target(http_scope(), receive, send), context=contextvars.Context())
    return (time.perf_counter() - began) / count


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4)
    return median, q1, q3


async def bench(rounds: int, requests: int) -> None:
    provider = TracerProvider()  # records every span, exports none
    target = app(provider)
    lc = lifecycle.Lifecycle()
    off: list[float] = []
    on: list[float] = []
    await per_request(target, 500)  # warm up
    for index in range(rounds):
        # Alternate which variant goes first, so that drift does not favour one.
        for variant in ("off", "on") if index % 2 == 0 else ("on", "off"):
            if variant == "on":
                tracing = lifecycle.instrument_tracing(lc, tracer_provider=provider)
                try:
                    on.append(await per_request(target, requests))
                finally:
                    tracing.close()
            else:
                off.append(await per_request(target, requests))
    added = [(b - a) * 1e6 for a, b in zip(off, on, strict=True)]
    median, q1, q3 = quartiles(added)
    off_median = statistics.median(off) * 1e6
    on_median = statistics.median(on) * 1e6
    print(
        f"asyncio, in process, OpenTelemetryMiddleware + DeadlineMiddleware, {rounds} paired "
        f"rounds of {requests:,} requests:\n"
        f"  tracing off: {off_median:.1f} us/request\n"
        f"  tracing on:  {on_median:.1f} us/request\n"
        f"  added by instrument_tracing: {median:+.2f} us/request "
        f"(interquartile range {q1:+.2f} .. {q3:+.2f}); ratio {on_median / off_median:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--requests", type=int, default=200)
    arguments = parser.parse_args()
    asyncio.run(bench(arguments.rounds, arguments.requests))


if __name__ == "__main__":
    main()
