"""``anyio-lifecycle[trio]`` alone: a lifespan, with drain_delay, on trio."""

from __future__ import annotations

import importlib.util
import os
import signal
from collections.abc import AsyncIterator

import anyio
import pytest

import lifecycle


def test_only_trio_is_installed_beside_the_core() -> None:
    assert importlib.util.find_spec("trio") is not None
    for module in ("fastapi", "httpx", "prometheus_client", "opentelemetry"):
        assert importlib.util.find_spec(module) is None, module


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_sigterm_fails_readiness_for_the_drain_delay_then_stops_in_order() -> None:
    import trio

    lc = lifecycle.Lifecycle(drain_delay=0.5)
    stopped: list[str] = []

    @lc.service
    async def settings() -> AsyncIterator[str]:
        yield "settings"
        stopped.append("settings")

    @lc.service
    async def db(settings: str) -> AsyncIterator[str]:
        yield "db"
        stopped.append("db")

    health = lc.health  # set up before the start, as the routes would
    previous = signal.signal(signal.SIGTERM, lambda *_: stopped.append("server's handler"))
    try:
        async with lc.run() as services:
            trio.lowlevel.current_trio_token()  # raises unless this loop is trio
            assert services["db"] == "db"
            assert health.readiness().status.name == "PASS"
            sent = anyio.current_time()
            os.kill(os.getpid(), signal.SIGTERM)
            with anyio.fail_after(2):
                while health.readiness().status.name == "PASS":  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            assert anyio.current_time() - sent < 0.3  # readiness fails at once
            assert health.liveness().status.name == "PASS"
            with anyio.fail_after(2):
                while "server's handler" not in stopped:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            assert anyio.current_time() - sent >= 0.5
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped == ["server's handler", "db", "settings"]
