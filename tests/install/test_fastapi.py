"""``anyio-lifecycle[fastapi]`` alone: health_router and provide, without httpx."""

# No `from __future__ import annotations`: FastAPI resolves the endpoint's annotations, which
# name a service local to the test.
import importlib.util
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI

import lifecycle
from lifecycle.fastapi import health_router, provide

pytestmark = pytest.mark.anyio


def test_only_fastapi_is_installed_beside_the_core() -> None:
    # (fastapi itself requires opentelemetry-api.)
    for module in ("trio", "prometheus_client", "httpx"):
        assert importlib.util.find_spec(module) is None, module


async def get(app: Any, path: str, state: Any) -> tuple[int, Any]:
    """One GET through the ASGI interface (no HTTP client is installed in this set)."""
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": dict(state or {}),
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = sent[0]["status"]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return status, json.loads(body)


async def test_probes_and_a_provided_service() -> None:
    lc = lifecycle.Lifecycle()

    @lc.service
    async def db() -> AsyncIterator[str]:
        yield "the db"

    app = FastAPI()
    app.include_router(health_router(lc))

    @app.get("/db")
    async def read(value: Annotated[str, Depends(provide(db))]) -> str:
        return value

    async with lc.lifespan(app) as state:
        for path in ("/livez", "/readyz", "/startupz"):
            status, _ = await get(app, path, state)
            assert status == 200, path
        status, body = await get(app, "/db", state)
        assert (status, body) == (200, "the db")
