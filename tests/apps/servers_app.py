"""A small app for the tests that run it under every server (test_servers_e2e.py).

Set by the environment:

- ``DRAIN_DELAY``: seconds to keep serving after SIGTERM (default 1).
- ``HANG_START=1``: the ``db`` service never finishes starting (for Ctrl+C during startup).
- ``GIVE_UP=1``: a background task that fails at once, every time, and asks the whole server
  to shut down when it gives up (``on_give_up="shutdown"``).

Routes: the probes, ``/fast``, and ``/slow?seconds=S``, which answer a body that says how
long they took, so that a truncated answer shows.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import lifecycle
from lifecycle.starlette import drain_route, exception_handlers, health_routes

DRAIN_TOKEN = "servers-app-drain-token"

lc = lifecycle.Lifecycle(
    startup_timeout=60.0,
    shutdown_timeout=10.0,
    drain_delay=float(os.environ.get("DRAIN_DELAY", "1")),
)


@lc.service
async def settings() -> AsyncIterator[dict[str, str]]:
    yield {"pid": str(os.getpid())}
    print(f"settings stopped in {os.getpid()}", flush=True)


@lc.service
async def db(settings: dict[str, str]) -> AsyncIterator[str]:
    if os.environ.get("HANG_START") == "1":
        print("db start hangs", flush=True)
        await anyio.sleep_forever()
    yield "db"
    print(f"db stopped in {os.getpid()}", flush=True)


if os.environ.get("GIVE_UP") == "1":

    @lc.background(max_restarts=1, backoff_base=0.05, backoff_max=0.05, on_give_up="shutdown")
    async def doomed() -> None:
        await anyio.sleep(0.2)
        raise RuntimeError("the feed is gone")


async def fast(request: Request) -> JSONResponse:
    return JSONResponse({"pid": os.getpid(), "db": lc.get(db)})


async def slow(request: Request) -> JSONResponse:
    seconds = float(request.query_params.get("seconds", "1"))
    began = time.monotonic()
    await anyio.sleep(seconds)
    return JSONResponse({"slept": seconds, "took": time.monotonic() - began, "pid": os.getpid()})


app = Starlette(
    lifespan=lc.lifespan,
    routes=[
        *health_routes(lc),
        drain_route(lc, token=DRAIN_TOKEN),
        Route("/fast", fast),
        Route("/slow", slow),
    ],
    exception_handlers=exception_handlers(),  # type: ignore[arg-type]
)
