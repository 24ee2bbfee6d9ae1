"""The scenarios the peers' own suites check, expressed against lifecycle.

Each section names the peer whose suite covers the behaviour: asgi-lifespan's
LifespanManager, Starlette's lifespan and lifespan state, svcs's cleanup, anyio's
TaskGroup.start, and the concurrency helpers of lionpride/lionherd-core. These are our own
tests of the same scenarios, so that lifecycle is held to what users of those projects
already rely on.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import TaskStatus
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from lifecycle import (
    Lifecycle,
    ServiceState,
    ShutdownError,
    StartupError,
    as_completed,
    bounded_map,
    gather,
    race,
    retry,
)
from lifecycle.testing import LifespanNotSupported, lifespan_client

pytestmark = pytest.mark.anyio


# -- asgi-lifespan: LifespanManager -------------------------------------------------------


def recording_app(log: list[str], *, fail: str | None = None) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        log.append("startup")
        if fail == "startup":
            raise OSError("startup broke")
        yield {"greeting": "hello"}
        log.append("shutdown")
        if fail == "shutdown":
            raise OSError("shutdown broke")

    async def index(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.state.greeting)

    return Starlette(routes=[Route("/", index)], lifespan=lifespan)


async def test_startup_runs_on_entry_and_shutdown_on_exit() -> None:
    log: list[str] = []
    async with lifespan_client(recording_app(log)) as client:
        assert log == ["startup"]
        assert (await client.get("/")).text == "hello"
    assert log == ["startup", "shutdown"]


@pytest.mark.parametrize("phase", ["startup", "shutdown"])
async def test_a_lifespan_exception_is_raised_as_itself(phase: str) -> None:
    log: list[str] = []
    with pytest.raises(OSError, match=f"{phase} broke"):
        async with lifespan_client(recording_app(log, fail=phase)):
            assert phase == "shutdown"
    assert log[-1] == phase


async def test_the_blocks_exception_still_shuts_down_and_propagates() -> None:
    log: list[str] = []
    with pytest.raises(LookupError, match="from the block"):
        async with lifespan_client(recording_app(log)):
            raise LookupError("from the block")
    assert log == ["startup", "shutdown"]


async def test_an_app_raising_after_receiving_startup_is_not_unsupported() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        raise ZeroDivisionError("bad math during startup")

    # It speaks the protocol and broke: its own error, not LifespanNotSupported.
    with pytest.raises(ZeroDivisionError):
        async with lifespan_client(app, lifespan="auto"):
            pytest.fail("startup failed")  # pragma: no cover


async def test_an_app_raising_before_receiving_is_unsupported_in_on_mode() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError(scope["type"])

    with pytest.raises(LifespanNotSupported) as info:
        async with lifespan_client(app):
            pytest.fail("not supported")  # pragma: no cover
    assert isinstance(info.value.__cause__, NotImplementedError)


@pytest.mark.parametrize("phase", ["startup", "shutdown"])
async def test_a_slow_phase_is_cut_at_its_timeout(phase: str) -> None:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if phase == "startup":
            await anyio.sleep_forever()
        yield
        await anyio.sleep_forever()

    with pytest.raises(TimeoutError, match=f"{phase}_timeout of 0.05s"):
        async with lifespan_client(
            Starlette(lifespan=lifespan), startup_timeout=0.05, shutdown_timeout=0.05
        ):
            assert phase == "shutdown"


# -- Starlette: lifespan and lifespan state ------------------------------------------------


async def test_each_request_gets_a_shallow_copy_of_the_lifespan_state() -> None:
    shared: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        yield {"count": 0, "shared": shared}

    async def bump(request: Request) -> JSONResponse:
        request.state.count += 1  # rebinding: stays in this request's copy
        request.state.shared.append("seen")  # mutating: the object is shared, as in Starlette
        return JSONResponse(request.state.count)

    app = Starlette(routes=[Route("/", bump)], lifespan=lifespan)
    async with lifespan_client(app) as client:
        assert (await client.get("/")).json() == 1
        assert (await client.get("/")).json() == 1
    assert shared == ["seen", "seen"]


async def test_a_lifecycle_apps_state_holds_every_started_service() -> None:
    lc = Lifecycle()

    @lc.service
    async def settings() -> AsyncIterator[str]:
        yield "settings"

    @lc.service
    async def db(settings: str) -> AsyncIterator[str]:
        yield f"db({settings})"

    async def index(request: Request) -> JSONResponse:
        return JSONResponse([request.state.settings, request.state.db])

    app = Starlette(routes=[Route("/", index)], lifespan=lc.lifespan)
    async with lifespan_client(app) as client:
        assert (await client.get("/")).json() == ["settings", "db(settings)"]


async def test_state_set_during_a_request_does_not_leak_into_the_next() -> None:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        yield {}

    async def index(request: Request) -> JSONResponse:
        seen = getattr(request.state, "mark", None)
        request.state.mark = "set"
        return JSONResponse(seen)

    app = Starlette(routes=[Route("/", index)], lifespan=lifespan)
    async with lifespan_client(app) as client:
        assert (await client.get("/")).json() is None
        assert (await client.get("/")).json() is None


# -- svcs: cleanup ---------------------------------------------------------------------------


def three_with_cleanups(log: list[str], failing: str | None = None) -> Lifecycle:
    lc = Lifecycle()

    def cleanup(name: str) -> None:
        log.append(name)
        if name == failing:
            raise RuntimeError(f"{name} cleanup broke")

    @lc.service
    async def first() -> AsyncIterator[str]:
        yield "first"
        cleanup("first")

    @lc.service
    async def second(first: str) -> AsyncIterator[str]:
        yield "second"
        cleanup("second")

    @lc.service
    async def third(second: str) -> AsyncIterator[str]:
        yield "third"
        cleanup("third")

    return lc


async def test_cleanups_run_in_reverse_order_of_acquisition() -> None:
    log: list[str] = []
    async with three_with_cleanups(log).run():
        pass
    assert log == ["third", "second", "first"]


async def test_a_failing_cleanup_is_logged_and_the_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log: list[str] = []
    lc = three_with_cleanups(log, failing="second")
    with caplog.at_level(logging.ERROR), pytest.raises(ShutdownError, match="'second'") as info:
        async with lc.run():
            pass
    assert log == ["third", "second", "first"]
    assert set(info.value.errors) == {"second"}
    assert "second cleanup broke" in caplog.text
    assert lc.service_state("first") is ServiceState.STOPPED


async def test_cleanups_run_when_the_body_is_cancelled() -> None:
    log: list[str] = []
    with anyio.CancelScope() as scope:
        async with three_with_cleanups(log).run():
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert log == ["third", "second", "first"]


async def test_an_async_cleanup_runs_shielded_after_cancellation() -> None:
    lc = Lifecycle()
    closed = []

    @lc.service
    async def conn() -> AsyncIterator[str]:
        try:
            yield "conn"
        finally:
            await anyio.lowlevel.checkpoint()  # cancellation would interrupt it, unshielded
            closed.append("closed")

    with anyio.CancelScope() as scope:
        async with lc.run():
            scope.cancel()
            await anyio.sleep_forever()
    assert closed == ["closed"]


# -- anyio: TaskGroup.start ------------------------------------------------------------------


async def test_the_value_passed_to_started_is_handed_to_dependents() -> None:
    lc = Lifecycle()

    @lc.service
    async def listener(*, task_status: TaskStatus[int]) -> None:
        task_status.started(8080)
        await anyio.sleep_forever()

    @lc.service
    async def announcer(listener: int) -> AsyncIterator[str]:
        yield f"listening on {listener}"

    async with lc.run() as services:
        assert services["listener"] == 8080
        assert services["announcer"] == "listening on 8080"


async def test_an_error_before_started_fails_startup_naming_the_service() -> None:
    lc = Lifecycle()

    @lc.service
    async def listener(*, task_status: TaskStatus[int]) -> None:
        raise PermissionError("port 80 needs root")

    with pytest.raises(StartupError, match="'listener'") as info:
        async with lc.run():
            pytest.fail("startup failed")  # pragma: no cover
    assert isinstance(info.value.failures["listener"], PermissionError)


async def test_returning_without_calling_started_fails_startup() -> None:
    lc = Lifecycle()

    @lc.service
    async def listener(*, task_status: TaskStatus[int]) -> None:
        return

    with pytest.raises(StartupError, match="'listener'"):
        async with lc.run():
            pytest.fail("startup failed")  # pragma: no cover
    assert lc.service_state("listener") is ServiceState.FAILED


async def test_cancelling_a_start_before_started_cancels_the_service() -> None:
    lc = Lifecycle()
    starting = anyio.Event()
    cancelled: list[str] = []

    @lc.service
    async def listener(*, task_status: TaskStatus[int]) -> None:
        try:
            starting.set()
            await anyio.sleep_forever()
        finally:
            cancelled.append("listener")

    async def cancel_when_starting(scope: anyio.CancelScope) -> None:
        await starting.wait()
        scope.cancel()

    async with anyio.create_task_group() as tg:
        with anyio.CancelScope() as scope:
            tg.start_soon(cancel_when_starting, scope)
            async with lc.run():
                pytest.fail("startup was cancelled")  # pragma: no cover
    assert cancelled == ["listener"]


async def test_a_started_service_keeps_running_until_stop() -> None:
    lc = Lifecycle()
    ticks: list[int] = []
    ticked = anyio.Event()

    @lc.service
    async def ticker(*, task_status: TaskStatus[None]) -> None:
        task_status.started()
        while True:
            ticks.append(len(ticks))
            ticked.set()
            await anyio.sleep(0.001)

    async with lc.run():
        await ticked.wait()
        assert lc.service_state("ticker") is ServiceState.RUNNING
    count = len(ticks)
    await anyio.sleep(0.01)
    assert len(ticks) == count  # stopped means stopped: nothing left running


# -- lionpride / lionherd-core: the concurrency helpers -------------------------------------


async def test_gather_returns_results_in_the_order_given_not_of_completion() -> None:
    finish_first = anyio.Event()

    async def slow() -> str:
        await finish_first.wait()
        return "slow"

    async def fast() -> str:
        finish_first.set()
        return "fast"

    assert await gather(slow, fast) == ("slow", "fast")


async def test_gather_with_return_exceptions_keeps_the_others_running() -> None:
    async def fails() -> int:
        raise ValueError("one")

    async def succeeds() -> int:
        await anyio.lowlevel.checkpoint()
        return 2

    results = await gather(fails, succeeds, return_exceptions=True)
    assert isinstance(results[0], ValueError)
    assert results[1] == 2


async def test_race_returns_the_first_success_and_cancels_the_rest() -> None:
    cancelled: list[str] = []

    async def slow() -> str:
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.append("slow")
        return "never"  # pragma: no cover

    async def quick() -> str:
        await anyio.lowlevel.checkpoint()
        return "quick"

    assert await race(slow, quick) == "quick"
    assert cancelled == ["slow"]


async def test_bounded_map_never_exceeds_its_limit() -> None:
    running = 0
    most = 0

    async def work(n: int) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await anyio.lowlevel.checkpoint()
        running -= 1
        return n

    assert await bounded_map(work, range(50), limit=4) == list(range(50))
    assert most == 4


async def test_as_completed_yields_in_completion_order() -> None:
    gates = [anyio.Event() for _ in range(3)]

    async def work(n: int) -> int:
        await gates[n].wait()
        if n > 0:
            gates[n - 1].set()
        return n

    gates[2].set()
    async with as_completed(work, range(3), limit=3) as results:
        assert [index async for index, _ in results] == [2, 1, 0]


async def test_retry_retries_until_success_then_returns() -> None:
    attempts: list[int] = []

    async def flaky() -> str:
        attempts.append(len(attempts))
        if len(attempts) < 3:
            raise ConnectionError("again")
        return "done"

    assert await retry(flaky, attempts=3, base_delay=0.001) == "done"
    assert len(attempts) == 3


async def test_a_deadline_around_gather_cancels_every_call() -> None:
    cancelled: list[int] = []

    async def forever(n: int) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.append(n)

    with anyio.move_on_after(0.01) as scope:
        await gather(partial(forever, 1), partial(forever, 2))
    assert scope.cancelled_caught
    assert sorted(cancelled) == [1, 2]
