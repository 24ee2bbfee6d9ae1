"""The drain protocol in process: signal interception, the delay, the preStop route.

The end-to-end drain under a real uvicorn with real SIGTERM is in test_drain_e2e.py.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable, Iterator
from types import FrameType

import anyio
import pytest
from starlette.applications import Starlette

import lifecycle
from lifecycle import Lifecycle
from lifecycle.starlette import drain_route
from lifecycle.testing import lifespan_client

pytestmark = pytest.mark.anyio

TOKEN = "a-long-enough-secret-token"


class FakeServer:
    """Stands in for uvicorn's own SIGTERM handler: records when it is called."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, float]] = []

    def handle_exit(self, signum: int, frame: FrameType | None) -> None:
        self.calls.append((signum, anyio.current_time()))


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer()
    previous = {
        sig: signal.signal(sig, fake.handle_exit) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield fake
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def wait_for(condition: Callable[[], object]) -> None:
    with anyio.fail_after(5):
        while not condition():  # noqa: ASYNC110 - polling a flag set from a signal handler
            await anyio.sleep(0.005)


async def test_first_signal_fails_readiness_at_once_and_forwards_after_the_delay(
    server: FakeServer,
) -> None:
    lc = Lifecycle(drain_delay=0.3)
    async with lc.run():
        sent = anyio.current_time()
        signal.raise_signal(signal.SIGTERM)
        await wait_for(lambda: lc.draining)
        assert anyio.current_time() - sent < 0.1
        assert server.calls == []  # the server does not know yet: it keeps serving
        await wait_for(lambda: server.calls)
    ((signum, forwarded),) = server.calls
    assert signum == signal.SIGTERM
    assert 0.25 <= forwarded - sent < 2


async def test_second_signal_skips_the_rest_of_the_delay(server: FakeServer) -> None:
    lc = Lifecycle(drain_delay=30)
    async with lc.run():
        sent = anyio.current_time()
        signal.raise_signal(signal.SIGINT)
        await wait_for(lambda: lc.draining)
        signal.raise_signal(signal.SIGINT)
        await wait_for(lambda: server.calls)
        assert anyio.current_time() - sent < 2
        assert server.calls[0][0] == signal.SIGINT
        # Signals after the hand-over go straight to the server (uvicorn: force exit).
        signal.raise_signal(signal.SIGINT)
        await wait_for(lambda: len(server.calls) == 2)


async def test_handlers_are_restored_after_the_run(server: FakeServer) -> None:
    lc = Lifecycle(drain_delay=1)
    async with lc.run():
        assert signal.getsignal(signal.SIGTERM) != server.handle_exit
    assert signal.getsignal(signal.SIGTERM) == server.handle_exit


async def test_no_delay_leaves_signals_alone(server: FakeServer) -> None:
    lc = Lifecycle()
    async with lc.run():
        assert signal.getsignal(signal.SIGTERM) == server.handle_exit


async def test_prestop_route_drains_for_the_delay_then_sigterm_goes_straight_through(
    server: FakeServer,
) -> None:
    lc = Lifecycle(drain_delay=0.3)
    app = Starlette(routes=[drain_route(lc, token=TOKEN)], lifespan=lc.lifespan)
    async with lifespan_client(app) as client:
        assert (await client.post("/drain")).status_code == 401
        wrong = await client.post("/drain", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        # A problem body like every other error lifecycle answers.
        assert wrong.headers["content-type"] == "application/problem+json"
        assert wrong.headers["www-authenticate"] == "Bearer"
        problem = wrong.json()
        assert problem["type"] == "urn:lifecycle:problem:unauthorized"
        assert (problem["status"], problem["title"]) == (401, "Unauthorized")
        assert problem["instance"].startswith("urn:uuid:")
        assert "nope" not in wrong.text
        assert not lc.draining
        began = anyio.current_time()
        response = await client.post("/drain", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200
        assert response.json() == {"draining": True, "drain_delay": 0.3}
        assert anyio.current_time() - began >= 0.25
        assert lc.draining
        signal.raise_signal(signal.SIGTERM)  # what Kubernetes sends after preStop
        sent = anyio.current_time()
        await wait_for(lambda: server.calls)
        assert anyio.current_time() - sent < 0.2


def test_drain_route_refuses_a_weak_token() -> None:
    with pytest.raises(ValueError, match="at least 16 characters"):
        drain_route(Lifecycle(), token="short")


def test_drain_delay_must_be_a_finite_number_of_seconds() -> None:
    with pytest.raises(ValueError, match="drain_delay must be a finite number of seconds >= 0"):
        Lifecycle(drain_delay=-1)
    with pytest.raises(ValueError, match="drain_delay must be a finite number"):
        Lifecycle(drain_delay=math.inf)
    for bad in (None, "5", True):
        with pytest.raises(TypeError, match="drain_delay must be a number of seconds, not"):
            Lifecycle(drain_delay=bad)  # type: ignore[arg-type]


async def test_prestop_route_outlasts_a_short_request_deadline_and_a_full_service(
    server: FakeServer,
) -> None:
    """Behind both middlewares, the hook still waits out the whole delay and answers 200."""
    lc = Lifecycle(drain_delay=0.3)
    inner = Starlette(routes=[drain_route(lc, token=TOKEN)], lifespan=lc.lifespan)
    full = lifecycle.ConcurrencyLimitMiddleware(inner, max_concurrency=1, max_wait=0)
    app = lifecycle.DeadlineMiddleware(full, default_timeout=0.1)
    async with lifespan_client(app) as client:
        began = anyio.current_time()
        response = await client.post(
            "/drain",
            headers={"Authorization": f"bearer {TOKEN}"},  # the scheme in any case
        )
        assert response.status_code == 200, response.text
        assert anyio.current_time() - began >= 0.25


async def test_a_non_ascii_token_can_be_presented() -> None:
    lc = Lifecycle(drain_delay=0.01)
    token = "sécret-jeton-assez-long"
    app = Starlette(routes=[drain_route(lc, token=token)], lifespan=lc.lifespan)
    async with lifespan_client(app) as client:
        header = f"Bearer {token}".encode()
        response = await client.post("/drain", headers=[(b"authorization", header)])
        assert response.status_code == 200
        wrong = await client.post("/drain", headers=[(b"authorization", "Bearer sé".encode())])
        assert wrong.status_code == 401
