"""Holding SIGTERM and SIGINT from the server, whichever way it listens, in process.

Two kinds of server handler stand in here for the real servers (which the end-to-end tests in
test_servers_e2e.py run as subprocesses): a Python-level handler installed with
`signal.signal`, as uvicorn does, and a handler registered on the asyncio event loop with
``loop.add_signal_handler``, as hypercorn and granian's workers do, on asyncio's own loop and
on uvloop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from types import FrameType

import anyio
import httpx
import pytest

from lifecycle import Lifecycle, LifecycleState, StartupError
from lifecycle import _servers as servers
from lifecycle._signals import SignalHold
from lifecycle.fastapi import provide
from lifecycle.starlette import exception_handlers, health_routes

pytestmark = pytest.mark.anyio

ASYNCIO_LOOPS = [
    pytest.param(("asyncio", {}), id="asyncio"),
    pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
]


async def wait_for(condition: Callable[[], object]) -> None:
    with anyio.fail_after(5):
        while not condition():  # noqa: ASYNC110 - polling a flag set from a signal handler
            await anyio.sleep(0.005)


class LoopServer:
    """A server that hears its signals through the event loop, as hypercorn does."""

    def __init__(self, *signals: signal.Signals) -> None:
        self.loop = asyncio.get_running_loop()
        self.signals = signals
        self.calls: list[int] = []
        for sig in signals:
            self.loop.add_signal_handler(sig, self.calls.append, int(sig))

    def close(self) -> None:
        for sig in self.signals:
            self.loop.remove_signal_handler(sig)


class PythonServer:
    """A server with Python-level handlers, as uvicorn has."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.calls.append(signum)


@pytest.fixture
def python_server() -> Iterator[PythonServer]:
    fake = PythonServer()
    previous = {sig: signal.signal(sig, fake.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield fake
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@pytest.fixture
async def loop_server() -> AsyncIterator[LoopServer]:
    server = LoopServer(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    try:
        yield server
    finally:
        server.close()


# -- the hold itself ------------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ASYNCIO_LOOPS)
async def test_a_loop_handler_is_held_and_other_signals_still_reach_the_loop(
    loop_server: LoopServer,
) -> None:
    seen: list[int] = []
    hold = SignalHold((signal.SIGTERM,), seen.append)
    assert hold.install()
    try:
        signal.raise_signal(signal.SIGTERM)
        await wait_for(lambda: seen)
        signal.raise_signal(signal.SIGUSR1)  # not held: the loop's own handler runs
        await wait_for(lambda: loop_server.calls)
        await anyio.sleep(0.05)
        assert seen == [signal.SIGTERM]
        assert loop_server.calls == [signal.SIGUSR1]
        hold.forward(signal.SIGTERM)
        await wait_for(lambda: len(loop_server.calls) == 2)
    finally:
        hold.release()
    assert loop_server.calls == [signal.SIGUSR1, signal.SIGTERM]
    signal.raise_signal(signal.SIGTERM)  # released: straight to the server again
    await wait_for(lambda: len(loop_server.calls) == 3)
    assert seen == [signal.SIGTERM]


async def test_a_python_handler_is_held_then_forwarded(python_server: PythonServer) -> None:
    seen: list[int] = []
    hold = SignalHold((signal.SIGTERM, signal.SIGINT), seen.append)
    assert hold.install()
    signal.raise_signal(signal.SIGINT)
    await wait_for(lambda: seen)
    assert python_server.calls == []
    hold.forward(signal.SIGINT)
    assert python_server.calls == [signal.SIGINT]
    assert signal.getsignal(signal.SIGTERM) == python_server.handle  # everything put back
    assert signal.getsignal(signal.SIGINT) == python_server.handle


async def test_nothing_is_held_outside_the_main_thread() -> None:
    def in_thread() -> bool:
        return SignalHold((signal.SIGTERM,), print).install()

    assert await anyio.to_thread.run_sync(in_thread) is False


# -- Ctrl+C during a hung startup -----------------------------------------------------------


def hanging_app(started: list[str], stopped: list[str]) -> Lifecycle:
    lc = Lifecycle(startup_timeout=60)

    @lc.service
    async def settings() -> AsyncIterator[str]:
        started.append("settings")
        yield "settings"
        stopped.append("settings")

    @lc.service
    async def db(settings: str) -> AsyncIterator[str]:
        await anyio.sleep_forever()  # a database that never answers
        yield "db"

    return lc


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_a_signal_during_startup_aborts_it_and_reaches_the_server(
    python_server: PythonServer, signum: signal.Signals
) -> None:
    started: list[str] = []
    stopped: list[str] = []
    lc = hanging_app(started, stopped)

    async def interrupt() -> None:
        await wait_for(lambda: started)
        await anyio.sleep(0.05)
        signal.raise_signal(signum)

    began = anyio.current_time()
    async with anyio.create_task_group() as tg:
        tg.start_soon(interrupt)
        with pytest.raises(StartupError) as caught:
            async with lc.run():
                pytest.fail("the startup cannot have succeeded")
    took = anyio.current_time() - began
    assert took < 2, f"startup_timeout is 60 s; the abort took {took:.2f}s"
    error = caught.value
    assert error.interrupted_by == signum.name
    assert error.failures == {}
    assert error.cancelled == ("db",)
    assert error.rolled_back == ("settings",)
    assert stopped == ["settings"]
    assert str(error).startswith(f"Startup interrupted by {signum.name}.")
    assert lc.state is LifecycleState.FAILED
    # The signal was then handed to the server, which stops as it would have.
    assert python_server.calls == [signum]
    assert signal.getsignal(signum) == python_server.handle


@pytest.mark.parametrize("anyio_backend", ASYNCIO_LOOPS)
async def test_a_loop_server_learns_of_the_interrupt_after_the_rollback(
    loop_server: LoopServer,
) -> None:
    started: list[str] = []
    stopped: list[str] = []
    lc = hanging_app(started, stopped)

    async def interrupt() -> None:
        await wait_for(lambda: started)
        signal.raise_signal(signal.SIGTERM)

    async with anyio.create_task_group() as tg:
        tg.start_soon(interrupt)
        with pytest.raises(StartupError, match="interrupted by SIGTERM"):
            async with lc.run():
                pass
        assert stopped == ["settings"]
        await wait_for(lambda: loop_server.calls)
    assert loop_server.calls == [signal.SIGTERM]


async def test_signals_are_the_servers_again_once_started(python_server: PythonServer) -> None:
    lc = Lifecycle()
    async with lc.run():
        assert signal.getsignal(signal.SIGINT) == python_server.handle
        assert signal.getsignal(signal.SIGTERM) == python_server.handle


# -- the drain under a server that listens through the loop ---------------------------------


@pytest.mark.parametrize("anyio_backend", ASYNCIO_LOOPS)
async def test_the_drain_holds_a_loop_servers_sigterm_for_the_delay(
    loop_server: LoopServer,
) -> None:
    lc = Lifecycle(drain_delay=0.3)
    async with lc.run():
        sent = anyio.current_time()
        signal.raise_signal(signal.SIGTERM)
        await wait_for(lambda: lc.draining)
        assert anyio.current_time() - sent < 0.1
        assert loop_server.calls == []  # the server keeps accepting
        await wait_for(lambda: loop_server.calls)
        assert anyio.current_time() - sent >= 0.25
    assert loop_server.calls == [signal.SIGTERM]


# -- a server that never runs the lifespan ----------------------------------------------------


async def test_without_a_lifespan_probes_and_routes_say_why_and_it_is_logged_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi import Depends, FastAPI

    monkeypatch.setattr(servers, "_reported_no_lifespan", False)
    lc = Lifecycle()

    @lc.service
    async def db() -> AsyncIterator[str]:
        yield "db"

    app = FastAPI(lifespan=lc.lifespan, exception_handlers=exception_handlers())
    app.router.routes.extend(health_routes(lc))

    @app.get("/items")
    async def items(database: str = Depends(provide(db))) -> dict[str, str]:
        return {"db": database}

    # httpx's ASGI transport sends no lifespan events at all, as daphne does not.
    transport = httpx.ASGITransport(app=app)
    caplog.set_level(logging.INFO, logger="lifecycle")
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        ready = await client.get("/readyz")
        first = await client.get("/items")
        second = await client.get("/items")
        live = await client.get("/livez")
    assert ready.status_code == 503
    assert "lifespan never started" in ready.json()["output"]
    assert live.status_code == 200  # nothing to restart: the process itself is fine
    assert "lifespan never started" in live.json()["output"]
    for response in (first, second):
        assert response.status_code == 503
        body = response.json()
        assert body["type"] == "urn:lifecycle:problem:service-unavailable"
        assert "lifespan never started" in body["detail"]
        assert "uvicorn, hypercorn or granian" in body["detail"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "lifespan never started" in errors[0].getMessage()


TRIO_SCRIPT = """
import signal, anyio, trio
from lifecycle import Lifecycle

lc = Lifecycle(drain_delay=0.2)

async def main():
    async with lc.run():
        signal.raise_signal(signal.SIGINT)
        try:
            with anyio.fail_after(5):
                await anyio.sleep_forever()
        finally:
            print("body cancelled; draining:", lc.draining, flush=True)

try:
    trio.run(main)
except KeyboardInterrupt:
    print("KeyboardInterrupt after the drain", flush=True)
"""


def test_under_trio_the_drain_hands_sigint_to_trio_as_keyboardinterrupt() -> None:
    """With trio's own SIGINT handler (not a stand-in): after the delay, trio delivers
    KeyboardInterrupt to the main task, as it would have without the drain."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", TRIO_SCRIPT], capture_output=True, text=True, timeout=30
    )
    assert done.stdout.splitlines() == [
        "body cancelled; draining: True",
        "KeyboardInterrupt after the drain",
    ], done.stdout + done.stderr
