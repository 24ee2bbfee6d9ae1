"""The test kit: lifespan client, fault injection, order assertions."""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from trio.testing import MockClock

from lifecycle import Lifecycle, ServiceState, ShutdownError, StartupError
from lifecycle.testing import (
    DEFAULT_SHUTDOWN_TIMEOUT,
    DEFAULT_STARTUP_TIMEOUT,
    LifespanNotSupported,
    OrderAssertions,
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


# -- lifespan_client: the lifespan protocol's edge cases ------------------------------------


async def test_lifespan_client_refuses_unknown_keywords_naming_client_options() -> None:
    app = Starlette()
    with pytest.raises(TypeError, match=r"'headers'.*client_options=\{\.\.\.\}"):
        lifespan_client(app, headers={"x": "1"})  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"may not set \['transport'\]"):
        lifespan_client(app, client_options={"transport": None})
    with pytest.raises(ValueError, match="startup_timeout must be a finite number"):
        lifespan_client(app, startup_timeout=0)
    with pytest.raises(ValueError, match="shutdown_timeout must be a finite number"):
        lifespan_client(app, shutdown_timeout=math.inf)
    with pytest.raises(ValueError, match="lifespan must be 'on', 'auto' or 'off'"):
        lifespan_client(app, lifespan="yes")  # type: ignore[arg-type]


async def test_lifespan_client_passes_client_options_to_httpx() -> None:
    async def echo(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.headers["x-token"])

    app = Starlette(routes=[Route("/", echo)])
    async with lifespan_client(app, client_options={"headers": {"x-token": "t0k"}}) as client:
        assert (await client.get("/")).text == "t0k"


def test_lifespan_client_timeouts_are_finite_by_default() -> None:
    signature = inspect.signature(lifespan_client)
    assert signature.parameters["startup_timeout"].default == DEFAULT_STARTUP_TIMEOUT
    assert signature.parameters["shutdown_timeout"].default == DEFAULT_SHUTDOWN_TIMEOUT
    assert 0 < DEFAULT_STARTUP_TIMEOUT < math.inf
    assert 0 < DEFAULT_SHUTDOWN_TIMEOUT < math.inf


def reports_and_stays(failed_phase: str, ended: list[str]) -> ASGIApp:
    """A lifespan app that reports ``failed_phase`` as failed, then stays alive."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            assert (await receive())["type"] == "lifespan.startup"
            if failed_phase == "startup":
                await send({"type": "lifespan.startup.failed", "message": "no database"})
                await anyio.sleep_forever()
            await send({"type": "lifespan.startup.complete"})
            assert (await receive())["type"] == "lifespan.shutdown"
            await send({"type": "lifespan.shutdown.failed", "message": "flush lost"})
            await anyio.sleep_forever()
        finally:
            ended.append(failed_phase)

    return app  # type: ignore[return-value]


async def test_startup_failed_from_an_app_that_stays_alive_raises_at_once() -> None:
    ended: list[str] = []
    # No timeout of the client's own: the failure itself ends the wait (it used to hang).
    with anyio.fail_after(10), pytest.raises(RuntimeError) as info:
        async with lifespan_client(reports_and_stays("startup", ended), startup_timeout=None):
            pytest.fail("startup failed")  # pragma: no cover
    assert "'lifespan.startup.failed'" in str(info.value)
    assert "no database" in str(info.value)
    assert ended == ["startup"]  # what the app still ran was cancelled, not left behind


async def test_shutdown_failed_from_an_app_that_stays_alive_raises_at_once() -> None:
    ended: list[str] = []
    with anyio.fail_after(10), pytest.raises(RuntimeError, match="flush lost") as info:
        async with lifespan_client(reports_and_stays("shutdown", ended), shutdown_timeout=None):
            pass
    assert "'lifespan.shutdown.failed'" in str(info.value)
    assert ended == ["shutdown"]


async def test_a_starlette_startup_failure_is_raised_as_itself() -> None:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        raise ConnectionRefusedError("db down")
        yield  # pragma: no cover

    with pytest.raises(ConnectionRefusedError, match="db down"):
        async with lifespan_client(Starlette(lifespan=lifespan)):
            pytest.fail("startup failed")  # pragma: no cover


class Interrupt(BaseException):
    """A user's own BaseException."""


async def test_a_base_exception_from_the_apps_startup_is_raised_as_itself() -> None:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        raise Interrupt("stop now")
        yield  # pragma: no cover

    with pytest.raises(Interrupt, match="stop now"):
        async with lifespan_client(Starlette(lifespan=lifespan)):
            pytest.fail("startup failed")  # pragma: no cover


def plain_lifespan_app(
    log: list[str], shutdown: Callable[[], Awaitable[None]] | None = None
) -> Starlette:
    """A Starlette app whose lifespan's code after ``yield`` is not in a ``finally``."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        log.append("startup")
        yield
        if shutdown is not None:
            await shutdown()
        log.append("shutdown")

    return Starlette(lifespan=lifespan)


async def test_cancelling_the_block_from_outside_shuts_the_app_down_gracefully() -> None:
    log: list[str] = []
    with anyio.CancelScope() as outside:
        async with lifespan_client(plain_lifespan_app(log)) as client:
            assert (await client.get("/missing")).status_code == 404
            outside.cancel()
            await anyio.sleep_forever()
    assert outside.cancelled_caught
    assert log == ["startup", "shutdown"]


async def test_a_tests_move_on_after_shuts_the_app_down_gracefully() -> None:
    log: list[str] = []
    with anyio.move_on_after(0.01) as deadline:
        async with lifespan_client(plain_lifespan_app(log)):
            await anyio.sleep_forever()
    assert deadline.cancelled_caught
    assert log == ["startup", "shutdown"]


async def test_a_shutdown_overrunning_its_timeout_under_cancellation_is_cut_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log: list[str] = []
    cut: list[str] = []

    async def hang() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            cut.append("cancelled")

    app = plain_lifespan_app(log, shutdown=hang)
    with anyio.CancelScope() as outside:
        async with lifespan_client(app, shutdown_timeout=0.05):
            outside.cancel()
            await anyio.sleep_forever()
    assert outside.cancelled_caught
    assert log == ["startup"]
    assert cut == ["cancelled"]
    assert "shutdown failed while lifespan_client was cancelled" in caplog.text
    assert "shutdown_timeout of 0.05s" in caplog.text


async def test_cancelling_during_startup_cancels_the_apps_startup() -> None:
    lc = Lifecycle()
    starting = anyio.Event()
    stopped: list[str] = []

    @lc.service
    async def first() -> AsyncIterator[str]:
        try:
            yield "first"
        finally:
            stopped.append("first")

    @lc.service
    async def slow(first: str) -> AsyncIterator[str]:
        starting.set()
        await anyio.sleep_forever()
        yield "never"  # pragma: no cover

    async def cancel_when_starting(scope: anyio.CancelScope) -> None:
        await starting.wait()
        scope.cancel()

    async with anyio.create_task_group() as tg:
        with anyio.CancelScope() as outside:
            tg.start_soon(cancel_when_starting, outside)
            async with lifespan_client(Starlette(lifespan=lc.lifespan)):
                pytest.fail("startup was cancelled")  # pragma: no cover
    assert outside.cancelled_caught
    assert stopped == ["first"]  # rolled back


async def test_a_hanging_shutdown_is_cut_at_the_shutdown_timeout() -> None:
    log: list[str] = []
    app = plain_lifespan_app(log, shutdown=anyio.sleep_forever)
    with pytest.raises(TimeoutError, match=r"shutdown did not complete within the shutdown_ti"):
        async with lifespan_client(app, shutdown_timeout=0.05):
            pass
    assert log == ["startup"]


async def asserts_http(scope: Scope, receive: Receive, send: Send) -> None:
    """A bare ASGI app without lifespan support, as many are."""
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"served"})


async def test_an_app_without_lifespan_support_raises_lifespan_not_supported() -> None:
    with pytest.raises(LifespanNotSupported, match="lifespan='auto'") as info:
        async with lifespan_client(asserts_http):
            pytest.fail("no lifespan")  # pragma: no cover
    assert isinstance(info.value.__cause__, AssertionError)
    assert isinstance(info.value, RuntimeError)


async def test_an_app_returning_before_receiving_is_not_lifespan_capable() -> None:
    async def returns(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await asserts_http(scope, receive, send)  # pragma: no cover

    with pytest.raises(LifespanNotSupported, match="it returned before receiving"):
        async with lifespan_client(returns):
            pytest.fail("no lifespan")  # pragma: no cover
    async with lifespan_client(returns, lifespan="auto"):
        pass


async def test_auto_serves_an_app_without_lifespan_support_and_logs_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="lifecycle.testing")
    async with lifespan_client(asserts_http, lifespan="auto") as client:
        assert (await client.get("/")).text == "served"
    assert "ASGI 'lifespan' protocol appears unsupported" in caplog.text


async def test_auto_still_raises_a_lifespan_apps_startup_failure() -> None:
    lc, _ = chain()
    with inject_faults(lc) as faults:
        faults.fail_start("db")
        with pytest.raises(StartupError):
            async with lifespan_client(Starlette(lifespan=lc.lifespan), lifespan="auto"):
                pytest.fail("startup failed")  # pragma: no cover


async def test_lifespan_off_never_runs_the_lifespan() -> None:
    lc, log = chain()

    async def index(request: Request) -> PlainTextResponse:
        return PlainTextResponse("up")

    app = Starlette(routes=[Route("/", index)], lifespan=lc.lifespan)
    async with lifespan_client(app, lifespan="off") as client:
        assert (await client.get("/")).text == "up"
    assert log == []


async def test_an_app_returning_after_receiving_without_answering_is_an_error() -> None:
    async def forgets(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()

    with pytest.raises(RuntimeError, match=r"returned without answering 'lifespan\.startup'"):
        async with lifespan_client(forgets):
            pytest.fail("no answer")  # pragma: no cover


async def test_the_default_startup_timeout_ends_a_hanging_startup(
    lifecycle_clock: MockClock,
) -> None:
    async def hangs(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await anyio.sleep_forever()

    began = anyio.current_time()
    with pytest.raises(TimeoutError, match="startup did not complete within the startup_timeout"):
        async with lifespan_client(hangs):
            pytest.fail("startup hangs")  # pragma: no cover
    assert anyio.current_time() - began == pytest.approx(DEFAULT_STARTUP_TIMEOUT)


async def test_the_default_shutdown_timeout_ends_a_hanging_shutdown(
    lifecycle_clock: MockClock,
) -> None:
    log: list[str] = []
    app = plain_lifespan_app(log, shutdown=anyio.sleep_forever)
    began = anyio.current_time()
    with pytest.raises(TimeoutError, match="shutdown did not complete"):
        async with lifespan_client(app):
            began = anyio.current_time()
    assert anyio.current_time() - began == pytest.approx(DEFAULT_SHUTDOWN_TIMEOUT)
    assert log == ["startup"]


def test_order_assertions_are_bound_to_their_lifecycle() -> None:
    lc, _ = chain()
    anyio.run(_run_once, lc)
    order = OrderAssertions(lc)
    order.started_before("config", "db")
    order.stopped_before("api", "db")
    with pytest.raises(AssertionError, match="Expected 'config' to have stopped"):
        order.stopped_before("config", "api")


async def _run_once(lc: Lifecycle) -> None:
    async with lc.run():
        pass
