"""The example service, on embedded defaults and against real PostgreSQL and Redis.

The example app's drivers (aiosqlite, asyncpg, redis) are asyncio-only, so these tests run on
asyncio alone.
"""

from __future__ import annotations

import math
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest
from anyio.abc import SocketStream
from anyio.streams.stapled import MultiListener
from fastapi import FastAPI

from example_app.cache import MemoryCache
from example_app.main import MAX_NAME_LENGTH, REINDEX_QUEUE_SIZE, app, lc, reindex, warm_cache
from lifecycle import (
    DEADLINE_EXPIRED_HEADER,
    Services,
    ServiceState,
    ShutdownError,
    StartupError,
)
from lifecycle.testing import (
    Faults,
    OrderAssertions,
    assert_started_before,
    assert_stopped_before,
    lifespan_client,
)

from .servers import require_postgres, require_redis

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]


@pytest.fixture
def embedded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("SQLITE_PATH", str(tmp_path / "items.db"))


@pytest.fixture
def lifecycle_app() -> FastAPI:
    """The app the plugin's lifecycle_* fixtures run (see lifecycle.pytest_plugin).

    Tests that use them take ``embedded`` first, so that the environment is set before the
    app starts.
    """
    return app


@pytest.fixture(params=["embedded", "real"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """The embedded SQLite and in-process cache, then the real PostgreSQL and Redis."""
    if request.param == "embedded":
        monkeypatch.delenv("DATABASE_URL", raising=False)
        monkeypatch.delenv("REDIS_URL", raising=False)
        monkeypatch.setenv("SQLITE_PATH", str(tmp_path / "items.db"))
    else:
        monkeypatch.setenv("DATABASE_URL", require_postgres())
        monkeypatch.setenv("REDIS_URL", require_redis())
    return str(request.param)


async def exercise_items() -> dict[str, object]:
    name = f"item-{uuid.uuid4()}"
    async with lifespan_client(app) as client:
        created = await client.post("/items", json={"name": name})
        assert created.status_code == 201
        item_id = created.json()["id"]
        assert (await client.get(f"/items/{item_id}")).json() == {"id": item_id, "name": name}
        # Second read comes from the cache: prove it by asking the cache directly.
        assert await lc.get("cache").get(f"item:{item_id}") == name
        assert {"id": item_id, "name": name} in (await client.get("/items")).json()
        assert (await client.get("/items/999999999")).status_code == 404
        about = (await client.get("/about")).json()
        # The database's and the cache's own checks ran against the real thing.
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        checks = ready.json()["checks"]
        assert checks["db"][0]["status"] == "pass"
        assert checks["cache"][0]["status"] == "pass"
        assert (await client.get("/livez")).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert (
            'lifecycle_service_state{lifecycle_service_state="running",service="db"} 1.0' in metrics
        )
    jobs = warm_cache.statistics()
    assert jobs.accepted == jobs.completed == 1  # the new item was warmed, then drained
    assert_stopped_before(lc, "worker:warm_cache", "db")
    assert_started_before(lc, "settings", "db")
    assert_started_before(lc, "settings", "cache")
    assert_stopped_before(lc, "db", "settings")
    assert_stopped_before(lc, "cache", "settings")
    return about


@pytest.mark.usefixtures("embedded")
async def test_embedded_defaults_need_no_server() -> None:
    about = await exercise_items()
    assert about["database"] == "sqlite"
    assert about["cache"] == "memory"


async def test_real_postgres_and_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", require_postgres())
    monkeypatch.setenv("REDIS_URL", require_redis())
    about = await exercise_items()
    assert about["database"] == "postgresql"
    assert about["cache"] == "redis"


async def test_the_services_start_in_dependency_order_and_serve_the_app(
    embedded: None,
    lifecycle_client: httpx.AsyncClient,
    lifecycle_services: Services,
    lifecycle_order: OrderAssertions,
) -> None:
    created = await lifecycle_client.post("/items", json={"name": "via the plugin"})
    item_id = created.json()["id"]
    assert await lifecycle_services["db"].get_item(item_id) == "via the plugin"
    assert lifecycle_services["cache"] is lc.get("cache")
    lifecycle_order.started_before("settings", "db")
    lifecycle_order.started_before("settings", "cache")
    with pytest.raises(AssertionError, match="Expected 'db' to be running before 'settings'"):
        lifecycle_order.started_before("db", "settings")


async def test_a_cache_that_fails_to_stop_is_named_and_the_others_still_stop(
    embedded: None, lifecycle_faults: Faults, lifecycle_order: OrderAssertions
) -> None:
    lifecycle_faults.fail_stop("cache", ConnectionResetError("cache gone"))
    with pytest.raises(ShutdownError, match="'cache' raised ConnectionResetError"):
        async with lifespan_client(app) as client:
            assert (await client.get("/livez")).status_code == 200
    assert lc.service_state("db") is ServiceState.STOPPED
    lifecycle_order.stopped_before("cache", "settings")
    lifecycle_order.stopped_before("db", "settings")


async def test_unreachable_database_fails_startup_naming_the_service(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:1/test")
    monkeypatch.delenv("REDIS_URL", raising=False)
    with pytest.raises(StartupError, match="service 'db' raised") as info:
        async with lifespan_client(app):
            pytest.fail("startup should have failed")
    assert "settings" in info.value.rolled_back


async def test_a_request_past_its_budget_gets_504_with_the_marker(
    embedded: None, lifecycle_client: httpx.AsyncClient
) -> None:
    response = await lifecycle_client.get(
        "/slow", params={"seconds": 5}, headers={"x-request-timeout-ms": "100"}
    )
    fine = await lifecycle_client.get("/slow", params={"seconds": 0.01})
    assert response.status_code == 504
    assert response.headers[DEADLINE_EXPIRED_HEADER]
    assert response.headers["content-type"] == "application/problem+json"
    assert fine.status_code == 200


# -- writes that succeeded are reported as such ------------------------------------------


@asynccontextmanager
async def workers_blocked(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    """Hold every job that reads an item from the database until the block exits.

    Both pools' jobs start with ``db.get_item``, so their queues fill up and stay full.
    """
    database = lc.get("db")
    real_get_item = database.get_item
    release = anyio.Event()

    async def get_item(item_id: int) -> str | None:
        await release.wait()
        return await real_get_item(item_id)

    monkeypatch.setattr(database, "get_item", get_item)
    try:
        yield
    finally:
        release.set()


@pytest.mark.usefixtures("embedded")
async def test_a_stored_item_is_201_even_when_the_warm_cache_queue_is_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lifecycle import QueueFull

    name = f"item-{uuid.uuid4()}"
    async with lifespan_client(app) as client:
        async with workers_blocked(monkeypatch):
            jobs = warm_cache.statistics()
            with pytest.raises(QueueFull):  # noqa: PT012 - fill it until it is full
                for _ in range(jobs.concurrency + jobs.queue_size + 1):
                    warm_cache.submit_nowait(0)
            created = await client.post("/items", json={"name": name})
            assert created.status_code == 201
            assert "retry-after" not in created.headers
            item_id = created.json()["id"]
            assert created.json() == {"id": item_id, "name": name}
            # Stored once, not warmed: the warm was skipped, and counted as rejected.
            listed = (await client.get("/items")).json()
            assert [row for row in listed if row["name"] == name] == [created.json()]
            assert await lc.get("cache").get(f"item:{item_id}") is None
            assert warm_cache.statistics().rejected == 2  # the filling's and the item's
        assert (await client.get(f"/items/{item_id}")).json() == created.json()
        metrics = (await client.get("/metrics")).text
        assert 'lifecycle_pool_jobs_rejected_total{pool="warm_cache"} 2.0' in metrics


# -- input is validated before it reaches a driver ----------------------------------------


@pytest.mark.parametrize("item_id", ["9223372036854775808", "99999999999999999999", "0", "-1"])
async def test_an_item_id_out_of_range_is_422(backend: str, item_id: str) -> None:
    async with lifespan_client(app) as client:
        response = await client.get(f"/items/{item_id}")
        largest = await client.get(f"/items/{2**63 - 1}")
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["path", "item_id"]
    assert largest.status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        b'{"name": "nul\\u0000byte"}',
        b'{"name": "line\\nbreak"}',
        b'{"name": "del\\u007f"}',
        b'{"name": "lone \\ud800 surrogate"}',
        b'{"name": ""}',
        b'{"name": "' + b"x" * (MAX_NAME_LENGTH + 1) + b'"}',
    ],
    ids=["nul", "newline", "del", "surrogate", "empty", "too-long"],
)
async def test_an_unstorable_item_name_is_422_and_stores_nothing(backend: str, body: bytes) -> None:
    async with lifespan_client(app) as client:
        before = (await client.get("/items")).json()
        response = await client.post(
            "/items", content=body, headers={"content-type": "application/json"}
        )
        after = (await client.get("/items")).json()
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "name"]
    assert after == before


@pytest.mark.parametrize("name", ["x" * MAX_NAME_LENGTH, "caf\u00e9 \u2615 \U0001f600"])
async def test_a_long_or_non_ascii_item_name_is_stored_as_sent(backend: str, name: str) -> None:
    async with lifespan_client(app) as client:
        created = await client.post("/items", json={"name": name})
        assert created.status_code == 201
        read = await client.get(f"/items/{created.json()['id']}")
    assert read.json()["name"] == name


@pytest.mark.parametrize("seconds", ["-1", "-0.001", "nan", "inf", "-inf", "30.5", "1e309"])
async def test_slow_rejects_a_negative_infinite_or_too_long_sleep_with_422(
    embedded: None, lifecycle_client: httpx.AsyncClient, seconds: str
) -> None:
    response = await lifecycle_client.get("/slow", params={"seconds": seconds})
    instant = await lifecycle_client.get("/slow", params={"seconds": "0"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "seconds"]
    assert instant.json() == {"slept": 0.0}


# -- the upstream's failures are 502, our deadline's are still 504 ------------------------


@asynccontextmanager
async def fake_upstream(answer: bytes | None) -> AsyncIterator[str]:
    """An HTTP server answering every request with ``answer``, or never (``None``)."""
    listener: MultiListener[SocketStream] = await anyio.create_tcp_listener(local_host="127.0.0.1")

    async def serve(stream: SocketStream) -> None:
        async with stream:
            received = b""
            while b"\r\n\r\n" not in received:
                received += await stream.receive()
            if answer is None:
                await anyio.sleep_forever()
            await stream.send(answer)

    port = listener.listeners[0].extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        yield f"http://127.0.0.1:{port}"
        tg.cancel_scope.cancel()


def http_response(status: str, body: bytes = b"", *headers: str) -> bytes:
    head = [f"HTTP/1.1 {status}", f"content-length: {len(body)}", "connection: close", *headers]
    return "\r\n".join(head).encode() + b"\r\n\r\n" + body


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def get_upstream_items(monkeypatch: pytest.MonkeyPatch, url: str, **kwargs: object) -> object:
    monkeypatch.setenv("UPSTREAM_URL", url)
    async with lifespan_client(app) as client:
        return await client.get("/upstream/items", **kwargs)  # type: ignore[arg-type]


def assert_bad_gateway(response: object, detail: str) -> None:
    import httpx

    assert isinstance(response, httpx.Response)
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json() == {
        "type": "about:blank",
        "title": "Bad Gateway",
        "status": 502,
        "detail": detail,
    }
    assert DEADLINE_EXPIRED_HEADER not in response.headers


@pytest.mark.usefixtures("embedded")
async def test_an_unreachable_upstream_is_502(monkeypatch: pytest.MonkeyPatch) -> None:
    response = await get_upstream_items(monkeypatch, f"http://127.0.0.1:{closed_port()}")
    assert_bad_gateway(response, "The upstream service did not answer (ConnectError).")


@pytest.mark.usefixtures("embedded")
@pytest.mark.parametrize(
    ("answer", "detail"),
    [
        (http_response("500 Internal Server Error"), "The upstream service answered 500."),
        (http_response("404 Not Found"), "The upstream service answered 404."),
        (http_response("504 Gateway Timeout"), "The upstream service answered 504."),
        (
            http_response("200 OK", b"<html>", "content-type: text/html"),
            "The upstream service did not answer a list of items.",
        ),
        (
            http_response("200 OK", b'{"id": 1}', "content-type: application/json"),
            "The upstream service did not answer a list of items.",
        ),
    ],
    ids=["500", "404", "504-without-marker", "not-json", "not-a-list"],
)
async def test_an_upstream_error_or_garbage_is_502(
    monkeypatch: pytest.MonkeyPatch, answer: bytes, detail: str
) -> None:
    async with fake_upstream(answer) as url:
        response = await get_upstream_items(monkeypatch, url)
    assert_bad_gateway(response, detail)


@pytest.mark.usefixtures("embedded")
async def test_an_upstream_answering_items_is_passed_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    body = b'[{"id": 1, "name": "upstream"}]'
    async with fake_upstream(http_response("200 OK", body)) as url:
        response = await get_upstream_items(monkeypatch, url)
    assert response.status_code == 200  # type: ignore[attr-defined]
    assert response.json() == [{"id": 1, "name": "upstream"}]  # type: ignore[attr-defined]


@pytest.mark.usefixtures("embedded")
@pytest.mark.parametrize(
    "answer",
    [None, http_response("504 Gateway Timeout", b"", f"{DEADLINE_EXPIRED_HEADER}: 1")],
    ids=["upstream-hangs", "upstream-deadline-expired"],
)
async def test_a_deadline_spent_on_the_upstream_is_still_504_with_the_marker(
    monkeypatch: pytest.MonkeyPatch, answer: bytes | None
) -> None:
    async with fake_upstream(answer) as url:
        response = await get_upstream_items(
            monkeypatch, url, headers={"x-request-timeout-ms": "300"}
        )
    assert response.status_code == 504  # type: ignore[attr-defined]
    assert response.headers[DEADLINE_EXPIRED_HEADER]  # type: ignore[attr-defined]
    assert response.headers["content-type"] == "application/problem+json"  # type: ignore[attr-defined]


# -- reindex: bounded, validated, all or nothing -------------------------------------------


@pytest.mark.parametrize(
    "ids",
    [list(range(1, REINDEX_QUEUE_SIZE + 2)), [0], [-1], [1, 2**63]],
    ids=["too-many", "zero", "negative", "out-of-range"],
)
async def test_reindex_rejects_too_many_or_invalid_ids_with_422(
    embedded: None, lifecycle_client: httpx.AsyncClient, ids: list[int]
) -> None:
    response = await lifecycle_client.post("/reindex", json={"ids": ids})
    accepted = reindex.statistics().accepted
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][:2] == ["body", "ids"]
    assert accepted == 0


@pytest.mark.usefixtures("embedded")
async def test_reindex_queues_every_id_or_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REINDEX_SECONDS", "0")
    async with lifespan_client(app) as client, workers_blocked(monkeypatch):
        fill = await client.post("/reindex", json={"ids": [1] * REINDEX_QUEUE_SIZE})
        assert fill.status_code == 202
        assert fill.json() == {"queued": REINDEX_QUEUE_SIZE}
        # At most one slot is left: two ids are refused together, at once, none queued.
        refused = await client.post(
            "/reindex", json={"ids": [1, 2]}, headers={"x-request-timeout-ms": "2000"}
        )
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "2"
        assert refused.headers["content-type"] == "application/problem+json"
        assert reindex.statistics().accepted == REINDEX_QUEUE_SIZE
    jobs = reindex.statistics()
    assert jobs.accepted == jobs.completed == REINDEX_QUEUE_SIZE


@pytest.mark.usefixtures("embedded")
async def test_reindex_of_every_item_refuses_more_than_one_request_may_queue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REINDEX_SECONDS", "0")
    async with lifespan_client(app) as client:
        database = lc.get("db")
        for n in range(REINDEX_QUEUE_SIZE):
            await database.add_item(f"item-{n}")
        every = await client.post("/reindex")
        await database.add_item("one too many")
        too_many = await client.post("/reindex")
    assert every.status_code == 202
    assert every.json() == {"queued": REINDEX_QUEUE_SIZE}
    assert too_many.status_code == 422
    assert "pass their ids in batches" in too_many.json()["detail"]
    jobs = reindex.statistics()
    assert jobs.accepted == jobs.completed == REINDEX_QUEUE_SIZE


# -- metrics -------------------------------------------------------------------------------


def sample(metrics: str, name: str) -> float:
    """The value of an unlabelled sample in a Prometheus exposition, 0 when absent."""
    for line in metrics.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return 0.0


async def test_metrics_export_the_deadline_and_admission_middleware(
    embedded: None, lifecycle_client: httpx.AsyncClient
) -> None:
    # The app and its middleware live as long as the process: compare, don't count.
    before = (await lifecycle_client.get("/metrics")).text
    expired = await lifecycle_client.get(
        "/slow", params={"seconds": 5}, headers={"x-request-timeout-ms": "100"}
    )
    assert expired.status_code == 504
    after = (await lifecycle_client.get("/metrics")).text
    deadline_expired = "lifecycle_deadline_expired_total"
    assert sample(after, deadline_expired) == sample(before, deadline_expired) + 1
    admitted = "lifecycle_admission_admitted_total"
    assert sample(after, admitted) >= sample(before, admitted) + 1 >= 1


# -- the in-process cache is bounded -------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_memory_cache_drops_expired_entries_when_written_to() -> None:
    clock = FakeClock()
    cache = MemoryCache(clock=clock)
    for n in range(5000):
        await cache.set(f"item:{n}", "x" * 100, 1.0)
    assert len(cache) == 5000
    clock.now += 1.0
    await cache.set("item:new", "y", 1.0)  # never reading the old keys again
    assert len(cache) == 1
    assert await cache.get("item:new") == "y"
    assert await cache.get("item:0") is None


async def test_memory_cache_holds_at_most_max_entries_evicting_the_oldest_write() -> None:
    clock = FakeClock()
    cache = MemoryCache(3, clock=clock)
    for key in "abc":
        await cache.set(key, key.upper(), 60.0)
    await cache.set("a", "A2", 60.0)  # rewritten: now the newest
    await cache.set("d", "D", 60.0)
    assert len(cache) == 3
    assert [await cache.get(key) for key in "abcd"] == ["A2", None, "C", "D"]
    for n in range(100):
        await cache.set(f"many:{n}", "x", math.inf)
        assert len(cache) <= 3
    assert [await cache.get(f"many:{n}") for n in (97, 98, 99)] == ["x", "x", "x"]


async def test_memory_cache_expires_entries_on_read() -> None:
    clock = FakeClock()
    cache = MemoryCache(clock=clock)
    await cache.set("a", "A", 1.0)
    clock.now += 0.999
    assert await cache.get("a") == "A"
    clock.now += 0.001
    assert await cache.get("a") is None
    assert len(cache) == 0


@pytest.mark.parametrize("max_entries", [0, -1, 1.5, True])
async def test_memory_cache_refuses_a_bound_that_is_not_a_positive_count(
    max_entries: object,
) -> None:
    with pytest.raises(ValueError, match="max_entries must be a whole number"):
        MemoryCache(max_entries)  # type: ignore[arg-type]


@pytest.mark.usefixtures("embedded")
async def test_the_app_cache_is_bounded_by_cache_max_entries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CACHE_MAX_ENTRIES", "2")
    async with lifespan_client(app) as client:
        ids = [
            (await client.post("/items", json={"name": f"item-{n}"})).json()["id"] for n in range(3)
        ]
        for item_id in ids:
            assert (await client.get(f"/items/{item_id}")).status_code == 200
        store = lc.get("cache")
        assert isinstance(store, MemoryCache)
        assert len(store) == 2
