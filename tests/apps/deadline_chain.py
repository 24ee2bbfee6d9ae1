"""One hop of the A -> B -> C chain that tests/test_deadline_e2e.py runs under real uvicorns.

Configured by environment: ``HOP_NAME`` (A, B or C) and ``NEXT_URL`` (the next hop's base
URL, empty for the last one). Every hop runs under DeadlineMiddleware and calls the next one
through lifecycle.httpx.DeadlineTransport.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import lifecycle
from lifecycle.httpx import DeadlineTransport

NAME = os.environ.get("HOP_NAME", "?")
NEXT_URL = os.environ.get("NEXT_URL", "")
BUDGET = "x-request-timeout-ms"

counters = {"running": 0, "cancelled": 0}
client = httpx.AsyncClient(transport=DeadlineTransport(reserve=0.05))


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with client:
        yield


async def hop(request: Request) -> JSONResponse:
    """Report the budget this hop received and sees, then the hops after it."""
    seen = [
        {"name": NAME, "header": request.headers.get(BUDGET), "remaining": lifecycle.remaining()}
    ]
    if NEXT_URL:
        response = await client.get(f"{NEXT_URL}/hop")
        seen.extend(response.json())
    return JSONResponse(seen)


async def stall(request: Request) -> Response:
    """Forward to the next hop; the last hop waits forever (a database that never answers)."""
    counters["running"] += 1
    try:
        if NEXT_URL:
            response = await client.get(f"{NEXT_URL}/stall")
            return Response(response.content, status_code=response.status_code)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")
    except anyio.get_cancelled_exc_class():
        counters["cancelled"] += 1
        raise
    finally:
        counters["running"] -= 1


async def stream(request: Request) -> StreamingResponse:
    """Send one chunk, then stall: the deadline expires after the response started."""

    async def chunks() -> AsyncIterator[bytes]:
        counters["running"] += 1
        try:
            yield b"first chunk\n"
            await anyio.sleep_forever()
            yield b"never"
        finally:
            counters["running"] -= 1

    return StreamingResponse(chunks(), media_type="text/plain")


async def metrics(request: Request) -> JSONResponse:
    """Exempt from deadlines by default: what is running and what the middleware counted."""
    return JSONResponse(
        {"name": NAME, **counters, "deadlines": dataclasses.asdict(middleware.statistics())}
    )


routes = [
    Route("/hop", hop),
    Route("/stall", stall),
    Route("/stream", stream),
    Route("/metrics", metrics),
]
middleware = lifecycle.DeadlineMiddleware(
    Starlette(routes=routes, lifespan=lifespan), default_timeout=10.0, max_timeout=30.0
)
app = middleware
