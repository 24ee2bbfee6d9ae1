"""One replica of the service that tests/test_lb_drill.py runs three of behind HAProxy.

Configured by environment: ``REPLICA_NAME`` (shown, with the process id, in every answer's
``x-replica`` header) and ``DRAIN_DELAY``. Routes: the library's probes (``/readyz`` is
what HAProxy checks), ``/fast?n=N``, ``/slow?n=N&seconds=S&stream=0|1`` (answers after
``S`` seconds, or streams its body over them) and ``/inflight`` (the seconds left to each slow
request this process is serving). Every body is a function of ``n`` alone (`fast_body`,
`slow_body`), so that the client can tell a whole body from a truncated or misrouted one.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

import lifecycle
from lifecycle.starlette import health_routes

REPLICA = f"{os.environ.get('REPLICA_NAME', '?')}/{os.getpid()}"
PARTS = 5  # a streamed slow body comes in this many parts, spread over its seconds
PAD = "0123456789abcdef" * 64  # 1 KiB in every part, so a body spans several writes

lc = lifecycle.Lifecycle(drain_delay=float(os.environ.get("DRAIN_DELAY", "1.5")))
ends: dict[object, float] = {}  # when each slow request in flight here ends


def fast_body(n: int) -> str:
    return f"fast {n} {PAD * 4} end {n}\n"


def slow_parts(n: int) -> list[str]:
    return [f"slow {n} part {i} {PAD}\n" for i in range(PARTS)] + [f"end {n}\n"]


def slow_body(n: int) -> str:
    return "".join(slow_parts(n))


@lc.service
async def settings() -> AsyncIterator[dict[str, str]]:
    yield {"replica": REPLICA}


async def fast(request: Request) -> Response:
    n = int(request.query_params["n"])
    return PlainTextResponse(fast_body(n), headers={"x-replica": REPLICA})


async def slow(request: Request) -> Response:
    n = int(request.query_params["n"])
    seconds = float(request.query_params["seconds"])
    if request.query_params.get("stream") != "1":
        with in_flight(seconds):
            await anyio.sleep(seconds)
        return PlainTextResponse(slow_body(n), headers={"x-replica": REPLICA})

    async def parts() -> AsyncIterator[str]:
        with in_flight(seconds):
            *body, end = slow_parts(n)
            for part in body:
                yield part
                await anyio.sleep(seconds / PARTS)
            yield end

    return StreamingResponse(parts(), media_type="text/plain", headers={"x-replica": REPLICA})


@contextmanager
def in_flight(seconds: float) -> Iterator[None]:
    token = object()
    ends[token] = time.monotonic() + seconds
    try:
        yield
    finally:
        del ends[token]


async def inflight(request: Request) -> Response:
    """The seconds each slow request in flight here has still to run."""
    now = time.monotonic()
    return JSONResponse({"replica": REPLICA, "remaining": [end - now for end in ends.values()]})


app = Starlette(
    routes=[
        *health_routes(lc),
        Route("/fast", fast),
        Route("/slow", slow),
        Route("/inflight", inflight),
    ],
    lifespan=lc.lifespan,
)
