"""The example service, on embedded defaults and against real PostgreSQL and Redis.

The example app's drivers (aiosqlite, asyncpg, redis) are asyncio-only, so these tests run on
asyncio alone.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from example_app.main import app, lc, warm_cache
from lifecycle import StartupError
from lifecycle.testing import assert_started_before, assert_stopped_before, lifespan_client

from .servers import require_postgres, require_redis

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]


@pytest.fixture
def embedded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("SQLITE_PATH", str(tmp_path / "items.db"))


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
        assert 'lifecycle_service_state{service="db",state="running"} 1.0' in metrics
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


async def test_unreachable_database_fails_startup_naming_the_service(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:1/test")
    monkeypatch.delenv("REDIS_URL", raising=False)
    with pytest.raises(StartupError, match="service 'db' raised") as info:
        async with lifespan_client(app):
            pytest.fail("startup should have failed")
    assert "settings" in info.value.rolled_back


@pytest.mark.usefixtures("embedded")
async def test_a_request_past_its_budget_gets_504_with_the_marker() -> None:
    from lifecycle import DEADLINE_EXPIRED_HEADER

    async with lifespan_client(app) as client:
        response = await client.get(
            "/slow", params={"seconds": 5}, headers={"x-request-timeout-ms": "100"}
        )
        fine = await client.get("/slow", params={"seconds": 0.01})
    assert response.status_code == 504
    assert response.headers[DEADLINE_EXPIRED_HEADER]
    assert response.headers["content-type"] == "application/problem+json"
    assert fine.status_code == 200
