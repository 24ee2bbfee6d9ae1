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

import json
import logging
import os
import unicodedata
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
import httpx
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from pydantic import AfterValidator, BaseModel, Field, TypeAdapter, ValidationError

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
    async with cache_module.connect(settings.redis_url, settings.cache_max_entries) as store:
        log.info("cache ready (%s)", store.kind)
        yield store
        await _maybe_hang("cache")
    log.info("cache closed")


@lc.service(stop_timeout=5.0)
async def upstream(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the upstream service; each call carries the request's deadline."""
    transport = DeadlineTransport(httpx.AsyncHTTPTransport(retries=1))
    async with httpx.AsyncClient(
        base_url=settings.upstream_url or "", transport=transport, timeout=5.0
    ) as client:
        yield client


@lc.worker(concurrency=4, queue_size=100, drain_timeout=10.0)
async def warm_cache(item_id: int, db: Database, cache: Cache, settings: Settings) -> None:
    """Background job: load a new item into the cache, off the request path."""
    name = await db.get_item(item_id)
    if name is not None:
        await cache.set(f"item:{item_id}", name, settings.cache_ttl)


# POST /reindex admits a request's jobs all at once or not at all, so no request may ask for
# more jobs than the queue holds.
REINDEX_QUEUE_SIZE = 1000


@lc.worker(concurrency=1, queue_size=REINDEX_QUEUE_SIZE, drain_timeout=10.0)
async def reindex(item_id: int, db: Database, settings: Settings) -> None:
    """Background job: rebuild an item's search entry (simulated: it takes a while)."""
    name = await db.get_item(item_id)
    await anyio.sleep(settings.reindex_seconds)
    log.info("reindexed item %d (%s)", item_id, name)


@lc.periodic(every=60.0, jitter=5.0, timeout=10.0)
async def report_items(db: Database) -> None:
    """Periodic job: log how many items there are."""
    log.info("%d items stored", len(await db.list_items()))


class BadGateway(Exception):
    """The upstream service could not be reached or gave an answer we cannot use."""


async def bad_gateway(request: Request, exc: Exception) -> Response:
    body = {"type": "about:blank", "title": "Bad Gateway", "status": 502, "detail": str(exc)}
    return Response(json.dumps(body), status_code=502, media_type="application/problem+json")


async def invalid_request(request: Request, exc: Exception) -> Response:
    # FastAPI's own handler, but ASCII-escaped: its JSON echoes the input as UTF-8, which an
    # unpaired surrogate (a name of "\ud800") is not, so it would answer 500 instead of 422.
    assert isinstance(exc, RequestValidationError)
    body = json.dumps({"detail": jsonable_encoder(exc.errors())}, ensure_ascii=True)
    return Response(body, status_code=422, media_type="application/json")


# The longest a request may run: callers' budgets are clamped to it, and /slow sleeps no longer.
MAX_REQUEST_SECONDS = 30.0

app = FastAPI(
    title="lifecycle example",
    lifespan=lc.lifespan,
    # A full job queue answers 503 with Retry-After instead of queueing without bound; a failed
    # upstream, 502. (A DeadlineExceeded has no handler here: DeadlineMiddleware answers 504.)
    exception_handlers={
        **exception_handlers(retry_after=2),
        BadGateway: bad_gateway,
        RequestValidationError: invalid_request,
    },
)
# Every request runs under a deadline: the caller's budget (x-request-timeout-ms, grpc-timeout,
# ...) clamped to 30 s, or 10 s by default; expiry answers 504. At most 100 requests run at
# once; more wait up to 0.5 s, then get 503 with Retry-After. Probes and /metrics are exempt.
# The middleware added last is the outermost: the wait for a slot counts against the deadline.
app.add_middleware(lifecycle.ConcurrencyLimitMiddleware, max_concurrency=100, max_wait=0.5)
app.add_middleware(
    lifecycle.DeadlineMiddleware, default_timeout=10.0, max_timeout=MAX_REQUEST_SECONDS
)
# Probes: /livez, /readyz, /startupz, /healthz (details with HEALTH_DETAILS_TOKEN only).
app.router.routes.extend(
    health_routes(lc, details_token=os.environ.get("HEALTH_DETAILS_TOKEN") or None)
)
# Prometheus metrics for every service, pool, check and middleware, at /metrics.
metrics = lifecycle.instrument_metrics(lc)
metrics.watch(app)  # the middleware above: lifecycle_deadline_* and lifecycle_admission_*
app.router.routes.append(metrics_route())

DB = Annotated[Database, Depends(provide(db))]
Upstream = Annotated[httpx.AsyncClient, Depends(provide(upstream))]
CacheDep = Annotated[Cache, Depends(provide(cache))]
SettingsDep = Annotated[Settings, Depends(provide(settings))]


# The largest id a BIGSERIAL (PostgreSQL) or an INTEGER PRIMARY KEY (SQLite) holds; ids start
# at 1. Anything outside is no item, and would overflow the drivers.
MAX_ITEM_ID = 2**63 - 1
MAX_NAME_LENGTH = 200


def _printable(name: str) -> str:
    # PostgreSQL cannot store NUL in text, and no driver can encode an unpaired surrogate.
    if any(unicodedata.category(char) in ("Cc", "Cs") for char in name):
        raise ValueError(
            "name must not contain control characters (such as NUL or a newline) or unpaired "
            "surrogates"
        )
    return name


ItemName = Annotated[
    str, Field(min_length=1, max_length=MAX_NAME_LENGTH), AfterValidator(_printable)
]
ItemId = Annotated[int, Field(ge=1, le=MAX_ITEM_ID)]


class NewItem(BaseModel):
    name: ItemName


class Item(BaseModel):
    id: int
    name: str


_UPSTREAM_ITEMS = TypeAdapter(list[Item])


@app.post("/items", status_code=201)
async def add_item(item: NewItem, database: DB) -> Item:
    item_id = await database.add_item(item.name)
    try:
        warm_cache.submit_nowait(item_id)
    except (lifecycle.QueueFull, lifecycle.PoolClosed) as exc:
        # Warming is best effort: the item is stored, so answer 201 (an error would make the
        # client retry and store it twice); the first read fills the cache instead. The pool
        # counts the skip in lifecycle_pool_jobs_rejected_total{pool="warm_cache"}.
        log.warning("item %d stored but not warmed: %s", item_id, exc)
    return Item(id=item_id, name=item.name)


@app.get("/items/{item_id}")
async def get_item(
    item_id: Annotated[int, Path(ge=1, le=MAX_ITEM_ID)],
    database: DB,
    store: CacheDep,
    config: SettingsDep,
) -> Item:
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
    # All items when not given.
    ids: Annotated[list[ItemId], Field(max_length=REINDEX_QUEUE_SIZE)] | None = None


@app.post("/reindex", status_code=202)
async def reindex_items(database: DB, request: ReindexRequest | None = None) -> dict[str, int]:
    """Queue a reindex job per item; the pool works through them in the background.

    The jobs are queued all together or not at all, so the answer is never ambiguous: 202
    means every one is queued; 503 with Retry-After (the queue has no room for them all, or
    the app is draining) means none is, and the same request can be retried as it is.
    """
    ids = request.ids if request and request.ids is not None else None
    if ids is None:
        ids = [row["id"] for row in await database.list_items()]
        if len(ids) > REINDEX_QUEUE_SIZE:
            raise HTTPException(
                422,
                f"There are {len(ids)} items, more than the {REINDEX_QUEUE_SIZE} one request "
                f"may reindex; pass their ids in batches of at most {REINDEX_QUEUE_SIZE}.",
            )
    jobs = reindex.statistics()
    if len(ids) > jobs.queue_size - jobs.queued:
        raise lifecycle.QueueFull(
            f"Worker pool 'reindex' has room for {jobs.queue_size - jobs.queued} jobs, not "
            f"{len(ids)}; retry later."
        )
    # Nothing is awaited from the check to the last submit, so none of these can find the
    # queue full; the first raises PoolClosed, before anything is queued, if the app drains.
    for item_id in ids:
        reindex.submit_nowait(item_id)
    return {"queued": len(ids)}


def _itself(request: Request) -> str:
    """This server's own address, as the request reached it (the default upstream)."""
    host, port = request.scope.get("server") or ("127.0.0.1", 8000)
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - a wildcard bind; ask over loopback
        host = "127.0.0.1"
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


@app.get("/upstream/items")
async def upstream_items(client: Upstream, settings: SettingsDep, request: Request) -> list[Item]:
    """Items as the upstream service sees them; the call gets what is left of our deadline.

    An upstream that cannot be reached, or answers an error or something other than a list
    of items, is a 502; our deadline running out (on our side or, by its marker, the
    upstream's) stays the deadline middleware's 504.
    """
    try:
        base = "" if settings.upstream_url else _itself(request)
        response = await client.get(f"{base}/items")
        response.raise_for_status()
        return _UPSTREAM_ITEMS.validate_json(response.content)
    except lifecycle.DeadlineExceeded:
        raise  # also an httpx.TimeoutException, but not the upstream's fault
    except httpx.HTTPStatusError as exc:
        log.warning("upstream failed: %s", exc)
        raise BadGateway(f"The upstream service answered {exc.response.status_code}.") from exc
    except httpx.HTTPError as exc:
        log.warning("upstream failed: %r", exc)
        raise BadGateway(f"The upstream service did not answer ({type(exc).__name__}).") from exc
    except ValidationError as exc:
        log.warning("upstream failed: %s", exc)
        raise BadGateway("The upstream service did not answer a list of items.") from exc


@app.get("/slow")
async def slow(
    seconds: Annotated[float, Query(ge=0, le=MAX_REQUEST_SECONDS, allow_inf_nan=False)] = 1.0,
) -> dict[str, float]:
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
