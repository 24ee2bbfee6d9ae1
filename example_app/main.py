"""The example service: ``uvicorn example_app.main:app``.

Services (started in dependency order, stopped in reverse):

    settings -> db -> (routes)
    settings -> cache -> (routes)
    settings, db, cache -> worker:warm_cache (a bounded worker pool)
    settings, db -> worker:reindex
    settings -> upstream (an httpx client propagating the request's deadline)
    db -> periodic:report_items
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
import httpx
from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel

import lifecycle
from lifecycle.fastapi import provide
from lifecycle.httpx import DeadlineTransport
from lifecycle.starlette import exception_handlers, health_routes, metrics_route

from . import cache as cache_module
from . import db as db_module
from .cache import Cache
from .db import Database
from .settings import Settings

logging.basicConfig(
    level=os.environ.get("LOG_LEVEL", "INFO").upper(),
    format="%(levelname)s:%(name)s: %(message)s",
)
log = logging.getLogger("example_app")

# DRAIN_DELAY: seconds to keep serving with /readyz failing after SIGTERM (see the README's
# "Graceful drain"); deploy/kubernetes.yaml sets it, local runs default to none.
lc = lifecycle.Lifecycle(
    startup_timeout=30.0,
    shutdown_timeout=float(os.environ.get("SHUTDOWN_TIMEOUT", "20")),
    drain_delay=float(os.environ.get("DRAIN_DELAY", "0")),
)

# Fault injection for the drain tests: HANG_CLEANUP=cache makes that service's cleanup hang,
# to show that shutdown is still bounded and names it.
HANG_CLEANUP = os.environ.get("HANG_CLEANUP", "")


async def _maybe_hang(service: str) -> None:
    if service == HANG_CLEANUP:
        log.warning("%s cleanup hangs (HANG_CLEANUP)", service)
        await anyio.sleep_forever()


@lc.service
async def settings() -> AsyncIterator[Settings]:
    yield Settings.from_env()


async def ping(component: Database | Cache) -> None:
    """The database's and the cache's own health check, run in the background."""
    await component.ping()


@lc.service(start_timeout=10.0, stop_timeout=5.0, health=ping)
async def db(settings: Settings) -> AsyncIterator[Database]:
    async with db_module.connect(settings.database_url, settings.sqlite_path) as database:
        log.info("database ready (%s)", database.kind)
        yield database
        await _maybe_hang("db")
    log.info("database closed")


@lc.service(start_timeout=10.0, stop_timeout=5.0, health=ping)
async def cache(settings: Settings) -> AsyncIterator[Cache]:
    async with cache_module.connect(settings.redis_url) as store:
        log.info("cache ready (%s)", store.kind)
        yield store
        await _maybe_hang("cache")
    log.info("cache closed")


@lc.service(stop_timeout=5.0)
async def upstream(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the upstream service; each call carries the request's deadline."""
    transport = DeadlineTransport(httpx.AsyncHTTPTransport(retries=1))
    async with httpx.AsyncClient(
        base_url=settings.upstream_url, transport=transport, timeout=5.0
    ) as client:
        yield client


@lc.worker(concurrency=4, queue_size=100, drain_timeout=10.0)
async def warm_cache(item_id: int, db: Database, cache: Cache, settings: Settings) -> None:
    """Background job: load a new item into the cache, off the request path."""
    name = await db.get_item(item_id)
    if name is not None:
        await cache.set(f"item:{item_id}", name, settings.cache_ttl)


@lc.worker(concurrency=1, queue_size=1000, drain_timeout=10.0)
async def reindex(item_id: int, db: Database, settings: Settings) -> None:
    """Background job: rebuild an item's search entry (simulated: it takes a while)."""
    name = await db.get_item(item_id)
    await anyio.sleep(settings.reindex_seconds)
    log.info("reindexed item %d (%s)", item_id, name)


@lc.periodic(every=60.0, jitter=5.0, timeout=10.0)
async def report_items(db: Database) -> None:
    """Periodic job: log how many items there are."""
    log.info("%d items stored", len(await db.list_items()))


app = FastAPI(
    title="lifecycle example",
    lifespan=lc.lifespan,
    # A full job queue answers 503 with Retry-After instead of queueing without bound.
    exception_handlers=dict(exception_handlers(retry_after=2)),
)
# Every request runs under a deadline: the caller's budget (x-request-timeout-ms, grpc-timeout,
# ...) clamped to 30 s, or 10 s by default; expiry answers 504. At most 100 requests run at
# once; more wait up to 0.5 s, then get 503 with Retry-After. Probes and /metrics are exempt.
# The middleware added last is the outermost: the wait for a slot counts against the deadline.
app.add_middleware(lifecycle.ConcurrencyLimitMiddleware, max_concurrency=100, max_wait=0.5)
app.add_middleware(lifecycle.DeadlineMiddleware, default_timeout=10.0, max_timeout=30.0)
# Probes: /livez, /readyz, /startupz, /healthz (details with HEALTH_DETAILS_TOKEN only).
app.router.routes.extend(
    health_routes(lc, details_token=os.environ.get("HEALTH_DETAILS_TOKEN") or None)
)
# Prometheus metrics for every service, pool, check and middleware, at /metrics.
metrics = lifecycle.instrument_metrics(lc)
app.router.routes.append(metrics_route())

DB = Annotated[Database, Depends(provide(db))]
Upstream = Annotated[httpx.AsyncClient, Depends(provide(upstream))]
CacheDep = Annotated[Cache, Depends(provide(cache))]
SettingsDep = Annotated[Settings, Depends(provide(settings))]


class NewItem(BaseModel):
    name: str


class Item(BaseModel):
    id: int
    name: str


@app.post("/items", status_code=201)
async def add_item(item: NewItem, database: DB) -> Item:
    item_id = await database.add_item(item.name)
    warm_cache.submit_nowait(item_id)  # raises QueueFull -> 503 when the queue is full
    return Item(id=item_id, name=item.name)


@app.get("/items/{item_id}")
async def get_item(item_id: int, database: DB, store: CacheDep, config: SettingsDep) -> Item:
    key = f"item:{item_id}"
    name = await store.get(key)
    if name is None:
        name = await database.get_item(item_id)
        if name is None:
            raise HTTPException(404, f"no item {item_id}")
        await store.set(key, name, config.cache_ttl)
    return Item(id=item_id, name=name)


@app.get("/items")
async def list_items(database: DB) -> list[Item]:
    return [Item(**row) for row in await database.list_items()]


class ReindexRequest(BaseModel):
    ids: list[int] | None = None  # all items when not given


@app.post("/reindex", status_code=202)
async def reindex_items(database: DB, request: ReindexRequest | None = None) -> dict[str, int]:
    """Queue a reindex job per item; the pool works through them in the background."""
    ids = request.ids if request and request.ids is not None else None
    if ids is None:
        ids = [row["id"] for row in await database.list_items()]
    for item_id in ids:
        await reindex.submit(item_id)  # waits for room: backpressure on the caller
    return {"queued": len(ids)}


@app.get("/upstream/items")
async def upstream_items(client: Upstream) -> list[Item]:
    """Items as the upstream service sees them; the call gets what is left of our deadline."""
    response = await client.get("/items")
    response.raise_for_status()
    return [Item(**row) for row in response.json()]


@app.get("/slow")
async def slow(seconds: float = 1.0) -> dict[str, float]:
    """A slow request (think: a report), to watch in-flight requests survive a drain."""
    await anyio.sleep(seconds)
    return {"slept": seconds}


@app.get("/about")
async def about(database: DB, store: CacheDep) -> dict[str, object]:
    return {
        "database": database.kind,
        "cache": store.kind,
        "timeline": lc.timeline().render().splitlines(),
    }
