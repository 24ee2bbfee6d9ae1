"""``anyio-lifecycle[tracing]`` alone: the OpenTelemetry API without an SDK must not crash."""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator

import pytest

import lifecycle

pytestmark = pytest.mark.anyio


def test_the_api_without_the_sdk_is_installed() -> None:
    assert importlib.util.find_spec("opentelemetry.trace") is not None
    assert importlib.util.find_spec("opentelemetry.sdk") is None
    for module in ("fastapi", "httpx", "trio", "prometheus_client"):
        assert importlib.util.find_spec(module) is None, module


async def test_a_traced_lifespan_with_jobs_runs_on_the_no_op_provider() -> None:
    lc = lifecycle.Lifecycle()
    stopped: list[str] = []

    @lc.service
    async def db() -> AsyncIterator[str]:
        yield "db"
        stopped.append("db")

    @lc.worker(queue_size=5)
    async def work(job: int, db: str) -> int:
        return job * 2

    lifecycle.instrument_tracing(lc)
    async with lc.run():
        assert await work.call(21) == 42
    assert stopped == ["db"]


async def test_a_request_under_a_deadline_on_the_no_op_provider() -> None:
    import anyio
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def hello(request: object) -> PlainTextResponse:
        return PlainTextResponse("hello")

    lc = lifecycle.Lifecycle()
    tracing = lifecycle.instrument_tracing(lc)
    app = lifecycle.DeadlineMiddleware(Starlette(routes=[Route("/", hello)]), default_timeout=5)
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "root_path": "",
        "headers": [],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    try:
        with anyio.fail_after(5):
            await app(scope, receive, send)  # type: ignore[arg-type]
    finally:
        tracing.close()
    assert sent[0]["status"] == 200
    assert sent[-1]["body"] == b"hello"
