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
