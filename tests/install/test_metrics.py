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


async def _get(app: object, path: str, headers: list[tuple[bytes, bytes]]) -> list[dict]:
    """Call ``app`` as a server would (no HTTP client in this install set)."""
    import anyio

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"localhost"), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    sent: list[dict] = []
    asked = False

    async def receive() -> dict:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": b""}
        await anyio.sleep_forever()
        raise AssertionError

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)  # type: ignore[operator]
    return sent


async def test_the_route_gzips_and_merges_worker_processes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    """What a user of the extra runs under ``uvicorn --workers N``: multiprocess mode, and a
    scrape that asks for gzip, as Prometheus does."""
    import gzip
    import os

    from prometheus_client.parser import text_string_to_metric_families
    from starlette.applications import Starlette

    from lifecycle.starlette import metrics_route

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    lc = lifecycle.Lifecycle()

    @lc.worker(queue_size=5)
    async def work(job: int) -> None:
        pass

    metrics = lifecycle.instrument_metrics(lc, registry=CollectorRegistry())
    app = Starlette(routes=[metrics_route()])
    try:
        async with lc.run():
            await work.call(1)
            start, body = await _get(app, "/metrics", [(b"accept-encoding", b"gzip")])
    finally:
        metrics.close()
    headers = dict(start["headers"])
    assert headers[b"content-encoding"] == b"gzip"
    text = gzip.decompress(body["body"]).decode()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    capacity = ("lifecycle_pool_queue_capacity_jobs", (("pid", str(os.getpid())), ("pool", "work")))
    assert samples[capacity] == 5
    assert samples[("lifecycle_pool_jobs_completed_total", (("pool", "work"),))] == 1
