"""The test kit: lifespan client, fault injection, order assertions."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from lifecycle import Lifecycle, ServiceState, ShutdownError, StartupError
from lifecycle.testing import (
    assert_started_before,
    assert_stopped_before,
    inject_faults,
    lifespan_client,
)

pytestmark = pytest.mark.anyio


def chain() -> tuple[Lifecycle, list[str]]:
    lc = Lifecycle()
    log: list[str] = []

    @lc.service
    async def config() -> AsyncIterator[str]:
        log.append("start config")
        yield "config"
        log.append("stop config")

    @lc.service(start_timeout=0.05, stop_timeout=0.05)
    async def db(config: str) -> AsyncIterator[str]:
        log.append("start db")
        yield "db"
        log.append("stop db")

    @lc.service
    async def api(db: str) -> AsyncIterator[str]:
        log.append("start api")
        yield "api"
        log.append("stop api")

    return lc, log


async def test_fail_start_never_calls_the_service() -> None:
    lc, log = chain()
    boom = ConnectionError("injected")
    with inject_faults(lc) as faults:
        faults.fail_start("db", boom)
        with pytest.raises(StartupError) as info:
            async with lc.run():
                pass
    assert info.value.failures == {"db": boom}
    assert log == ["start config", "stop config"]


async def test_hang_start_is_cut_by_the_start_timeout() -> None:
    lc, log = chain()
    with inject_faults(lc) as faults:
        faults.hang_start("db")
        with pytest.raises(StartupError, match="did not start within its start_timeout"):
            async with lc.run():
                pass
    assert log == ["start config", "stop config"]
    assert lc.service_state("db") is ServiceState.FAILED


async def test_fail_and_hang_stop_run_the_real_cleanup_first() -> None:
    lc, log = chain()
    with inject_faults(lc) as faults:
        faults.fail_stop("api")
        faults.hang_stop("db")
        with pytest.raises(ShutdownError) as info:
            async with lc.run():
                pass
    assert set(info.value.errors) == {"api", "db"}
    assert isinstance(info.value.errors["db"], TimeoutError)
    assert "injected stop failure in 'api'" in str(info.value.errors["api"])
    assert log[-3:] == ["stop api", "stop db", "stop config"]
    assert_stopped_before(lc, "db", "config")


async def test_faults_are_removed_after_the_block() -> None:
    lc, _ = chain()
    with inject_faults(lc) as faults:
        faults.fail_start("db")
    async with lc.run():
        pass


def test_fault_in_an_unknown_service_is_refused() -> None:
    lc, _ = chain()
    with inject_faults(lc) as faults, pytest.raises(LookupError, match=r"'dbb'.*'db'"):
        faults.fail_start("dbb")


async def test_order_assertions_fail_when_the_order_is_wrong() -> None:
    lc, _ = chain()
    async with lc.run():
        pass
    assert_started_before(lc, "config", "db")
    assert_stopped_before(lc, "api", "db")
    with pytest.raises(AssertionError, match="Expected 'db' to be running before 'config'"):
        assert_started_before(lc, "db", "config")
    with pytest.raises(AssertionError, match=r"Expected 'config' to have stopped.*\nservice"):
        assert_stopped_before(lc, "config", "api")


async def test_lifespan_client_waits_for_startup_and_runs_shutdown() -> None:
    lc, log = chain()

    async def index(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.state.api)

    app = Starlette(routes=[Route("/", index)], lifespan=lc.lifespan)
    async with lifespan_client(app) as client:
        assert log == ["start config", "start db", "start api"]
        assert (await client.get("/")).text == "api"
    assert log[-1] == "stop config"


async def test_lifespan_client_reraises_the_shutdown_error() -> None:
    lc, _ = chain()
    app = Starlette(lifespan=lc.lifespan)
    with inject_faults(lc) as faults:
        faults.fail_stop("db")
        with pytest.raises(ShutdownError, match="'db' raised RuntimeError"):
            async with lifespan_client(app):
                pass


async def test_lifespan_client_keeps_the_body_exception() -> None:
    lc, log = chain()
    app = Starlette(lifespan=lc.lifespan)
    with pytest.raises(KeyError, match="from the test"):
        async with lifespan_client(app):
            raise KeyError("from the test")
    assert log[-1] == "stop config"


async def test_lifespan_client_startup_timeout_raises_a_plain_timeout_error() -> None:
    lc = Lifecycle()
    stopped: list[str] = []

    @lc.service
    async def first() -> AsyncIterator[str]:
        try:
            yield "first"
        finally:
            stopped.append("first")

    @lc.service
    async def hangs(first: str) -> AsyncIterator[str]:
        await anyio.sleep_forever()
        yield "never"  # pragma: no cover

    app = Starlette(lifespan=lc.lifespan)
    with pytest.raises(TimeoutError, match=r"did not complete within the startup_timeout of 0\.2s"):
        async with lifespan_client(app, startup_timeout=0.2):
            pytest.fail("startup should not complete")  # pragma: no cover
    assert stopped == ["first"]  # what had started was rolled back
    assert lc.service_state("hangs") is ServiceState.CANCELLED
