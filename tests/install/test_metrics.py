"""``anyio-lifecycle[metrics]`` alone: instrument_metrics and the Prometheus exposition."""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest

import lifecycle

pytestmark = pytest.mark.anyio


def test_only_prometheus_client_is_installed_beside_the_core() -> None:
    for module in ("fastapi", "httpx", "trio", "opentelemetry"):
        assert importlib.util.find_spec(module) is None, module


async def test_services_and_pools_are_exposed() -> None:
    lc = lifecycle.Lifecycle()

    @lc.service
    async def db() -> AsyncIterator[str]:
        yield "db"

    @lc.worker(queue_size=5)
    async def work(job: int, db: str) -> None:
        pass

    registry = CollectorRegistry()
    lifecycle.instrument_metrics(lc, registry=registry)
    async with lc.run():
        await work.call(1)
        text = generate_latest(registry).decode()
    assert 'service="db"' in text, text
    assert 'pool="work"' in text, text
