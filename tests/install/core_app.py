"""A Starlette app on the core install alone: services, a worker pool, health routes, the
deadline middleware and the drain, as a user of ``pip install anyio-lifecycle uvicorn``
would write it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import lifecycle
from lifecycle.starlette import health_routes

lc = lifecycle.Lifecycle(drain_delay=1.0, shutdown_timeout=10)
done: list[int] = []


@lc.service
async def settings() -> AsyncIterator[dict[str, float]]:
    yield {"work": 0.01}


@lc.worker(concurrency=2, queue_size=10)
async def work(job: int, settings: dict[str, float]) -> None:
    await anyio.sleep(settings["work"])
    done.append(job)


async def submit(request: Request) -> JSONResponse:
    await work.submit(int(request.query_params["job"]))
    return JSONResponse({"remaining": lifecycle.remaining(), "done": len(done)})


app = Starlette(
    routes=[Route("/submit", submit, methods=["POST"]), *health_routes(lc)],
    middleware=[Middleware(lifecycle.DeadlineMiddleware, default_timeout=5.0)],
    lifespan=lc.lifespan,
)
