"""Admission control: ConcurrencyLimitMiddleware bounds the requests in flight."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import lifecycle

pytestmark = pytest.mark.anyio


class Gate:
    """Requests to /work enter and wait here until the test opens the gate."""

    def __init__(self) -> None:
        self.open = anyio.Event()
        self.entered = 0

    async def work(self, request: Request) -> PlainTextResponse:
        self.entered += 1
        await self.open.wait()
        return PlainTextResponse("done")


async def probe(request: Request) -> PlainTextResponse:
    return PlainTextResponse("alive")


async def broken(request: Request) -> PlainTextResponse:
    raise RuntimeError("bug")


def limited(gate: Gate, **options: Any) -> lifecycle.ConcurrencyLimitMiddleware:
    routes = [Route("/work", gate.work), Route("/healthz", probe), Route("/broken", broken)]
    return lifecycle.ConcurrencyLimitMiddleware(Starlette(routes=routes), **options)


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://test",
    )


async def wait_until(condition: Callable[[], bool]) -> None:
    # The middleware has no hook that says "a request is now waiting": poll its statistics.
    with anyio.fail_after(5):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.001)


def assert_overloaded(response: httpx.Response, retry_after: str = "1") -> None:
    assert response.status_code == 503
    assert response.headers["retry-after"] == retry_after
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == lifecycle.OVERLOADED_TYPE
    assert problem["status"] == 503


async def test_past_the_limit_requests_are_rejected_with_retry_after() -> None:
    gate = Gate()
    app = limited(gate, max_concurrency=2, max_wait=0, retry_after=3)
    statuses: list[int] = []
    async with client(app) as http, anyio.create_task_group() as tg:

        async def call() -> None:
            statuses.append((await http.get("/work")).status_code)

        tg.start_soon(call)
        tg.start_soon(call)
        await wait_until(lambda: gate.entered == 2)
        assert_overloaded(await http.get("/work"), retry_after="3")
        assert app.statistics().in_flight == 2
        gate.open.set()
    assert statuses == [200, 200]
    stats = app.statistics()
    assert (stats.admitted, stats.rejected, stats.in_flight, stats.waited) == (2, 1, 0, 0)


async def test_a_request_waits_for_a_slot_within_max_wait() -> None:
    gate = Gate()
    app = limited(gate, max_concurrency=1, max_wait=5.0)
    statuses: list[int] = []
    async with client(app) as http, anyio.create_task_group() as tg:

        async def call() -> None:
            statuses.append((await http.get("/work")).status_code)

        tg.start_soon(call)
        await wait_until(lambda: gate.entered == 1)
        tg.start_soon(call)
        await wait_until(lambda: app.statistics().waiting == 1)
        assert gate.entered == 1  # the second one is waiting, not running
        gate.open.set()
    assert statuses == [200, 200]
    stats = app.statistics()
    assert (stats.admitted, stats.waited, stats.rejected, stats.waiting) == (2, 1, 0, 0)


async def test_a_wait_that_runs_out_is_a_503() -> None:
    gate = Gate()
    app = limited(gate, max_concurrency=1, max_wait=0.05)
    async with client(app) as http, anyio.create_task_group() as tg:
        tg.start_soon(http.get, "/work")
        await wait_until(lambda: gate.entered == 1)
        assert_overloaded(await http.get("/work"))
        gate.open.set()
    assert app.statistics().waiting == 0


async def test_the_line_of_waiting_requests_is_bounded() -> None:
    gate = Gate()
    app = limited(gate, max_concurrency=1, max_waiting=1, max_wait=5.0)
    async with client(app) as http, anyio.create_task_group() as tg:
        tg.start_soon(http.get, "/work")
        await wait_until(lambda: gate.entered == 1)
        tg.start_soon(http.get, "/work")
        await wait_until(lambda: app.statistics().waiting == 1)
        assert_overloaded(await http.get("/work"))  # the line is full: no wait at all
        gate.open.set()
    stats = app.statistics()
    assert (stats.admitted, stats.rejected) == (2, 1)


async def test_health_probes_and_other_scopes_are_exempt() -> None:
    gate = Gate()
    app = limited(gate, max_concurrency=1, max_wait=0)
    async with client(app) as http, anyio.create_task_group() as tg:
        tg.start_soon(http.get, "/work")
        await wait_until(lambda: gate.entered == 1)
        assert (await http.get("/healthz")).text == "alive"
        gate.open.set()

    seen: list[str] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    passthrough = lifecycle.ConcurrencyLimitMiddleware(inner, max_concurrency=1)
    await passthrough({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    assert seen == ["lifespan"]


async def test_probes_stay_exempt_under_a_root_path() -> None:
    # Behind a proxy (uvicorn --root-path /api), the ASGI path includes the root path.
    gate = Gate()
    app = limited(gate, max_concurrency=1, max_wait=0)
    rooted = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, root_path="/api"), base_url="http://test"
    )
    async with rooted as http, anyio.create_task_group() as tg:
        tg.start_soon(http.get, "/api/work")
        await wait_until(lambda: gate.entered == 1)
        assert (await http.get("/api/healthz")).text == "alive"
        assert_overloaded(await http.get("/api/work"))
        gate.open.set()
    stats = app.statistics()
    assert (stats.admitted, stats.rejected) == (1, 1)


async def test_errors_and_cancellations_give_the_slot_back() -> None:
    gate = Gate()
    app = limited(gate, max_concurrency=1, max_wait=5.0)
    async with client(app) as http:
        assert (await http.get("/broken")).status_code == 500
        assert app.statistics().in_flight == 0

        async with anyio.create_task_group() as tg:
            tg.start_soon(http.get, "/work")
            await wait_until(lambda: gate.entered == 1)
            tg.start_soon(http.get, "/work")
            await wait_until(lambda: app.statistics().waiting == 1)
            tg.cancel_scope.cancel()  # a running and a waiting request are cancelled
        stats = app.statistics()
        assert (stats.in_flight, stats.waiting) == (0, 0)

        gate.open.set()
        assert (await http.get("/work")).status_code == 200  # the slot was not leaked


async def test_time_spent_waiting_counts_against_the_request_deadline() -> None:
    gate = Gate()
    limiter = limited(gate, max_concurrency=1, max_wait=10.0)
    app = lifecycle.DeadlineMiddleware(limiter)
    async with client(app) as http, anyio.create_task_group() as tg:
        tg.start_soon(http.get, "/work")
        await wait_until(lambda: gate.entered == 1)
        response = await http.get("/work", headers={"x-request-timeout-ms": "60"})
        assert response.status_code == 504  # the deadline, not the limiter, ended the wait
        assert response.headers[lifecycle.DEADLINE_EXPIRED_HEADER] == "1"
        gate.open.set()
    stats = limiter.statistics()
    assert (stats.waiting, stats.rejected, stats.admitted) == (0, 0, 1)


@pytest.mark.parametrize(
    "backends", [("asyncio", "trio"), ("trio", "asyncio")], ids=["asyncio-first", "trio-first"]
)
def test_one_middleware_serves_one_backend_after_another(backends: tuple[str, str]) -> None:
    # A module-level app tested on both backends: the same middleware serves one event loop
    # after another, and a request still waits for its slot on each.
    gates: list[Gate] = []

    async def work(request: Request) -> PlainTextResponse:
        return await gates[-1].work(request)

    app = lifecycle.ConcurrencyLimitMiddleware(
        Starlette(routes=[Route("/work", work)]), max_concurrency=1, max_wait=5.0
    )

    async def one_request_waits_for_the_other() -> list[int]:
        gate = Gate()
        gates.append(gate)
        statuses: list[int] = []
        async with client(app) as http, anyio.create_task_group() as tg:

            async def call() -> None:
                statuses.append((await http.get("/work")).status_code)

            tg.start_soon(call)
            await wait_until(lambda: gate.entered == 1)
            tg.start_soon(call)
            await wait_until(lambda: app.statistics().waiting == 1)
            gate.open.set()
        return statuses

    for backend in (*backends, backends[0]):
        assert anyio.run(one_request_waits_for_the_other, backend=backend) == [200, 200]
    stats = app.statistics()
    assert (stats.admitted, stats.waited, stats.in_flight, stats.waiting) == (6, 3, 0, 0)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"max_concurrency": 0}, ValueError, "max_concurrency must be a whole number >= 1, not 0"),
        (
            {"max_concurrency": 2.5},
            TypeError,
            "max_concurrency must be a whole number >= 1, not 2.5",
        ),
        (
            {"max_concurrency": True},
            TypeError,
            "max_concurrency must be a whole number >= 1, not True",
        ),
        (
            {"max_concurrency": 1, "max_waiting": -1},
            ValueError,
            "max_waiting must be a whole number >= 0, not -1",
        ),
        ({"max_concurrency": 1, "max_wait": -1}, ValueError, "max_wait must be a finite"),
        ({"max_concurrency": 1, "max_wait": "1"}, TypeError, "max_wait must be a number"),
        (
            {"max_concurrency": 1, "retry_after": 1.5},
            TypeError,
            "retry_after must be a whole number >= 0, not 1.5",
        ),
        ({"max_concurrency": 1, "exempt_paths": "/x"}, TypeError, "use exempt_paths=['/x']"),
    ],
)
def test_options_are_validated(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        lifecycle.ConcurrencyLimitMiddleware(Starlette(), **options)


# -- problem bodies: one shape for the whole package ------------------------------------------


async def test_every_problem_body_of_the_package_has_the_same_shape() -> None:
    from lifecycle.exceptions import PoolClosed, QueueFull, ServiceNotRunning
    from lifecycle.starlette import drain_route, exception_handlers

    async def full(request: Request) -> PlainTextResponse:
        raise QueueFull("the queue 'jobs' is full")

    async def closed(request: Request) -> PlainTextResponse:
        raise PoolClosed("pool 'jobs' is draining")

    async def not_running(request: Request) -> PlainTextResponse:
        raise ServiceNotRunning("service 'jobs' is not running")

    gate = Gate()
    gate.open.set()
    busy = lifecycle.ConcurrencyLimitMiddleware(
        Starlette(routes=[Route("/work", gate.work)]), max_concurrency=1, max_wait=0
    )
    handlers = Starlette(
        routes=[
            Route("/full", full),
            Route("/closed", closed),
            Route("/not-running", not_running),
            drain_route(lifecycle.Lifecycle(), token="a-token-of-16-chars"),
        ],
        exception_handlers=exception_handlers(),
    )

    async def never(request: Request) -> PlainTextResponse:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    deadline = lifecycle.DeadlineMiddleware(
        Starlette(routes=[Route("/", never)]), default_timeout=0.02, reserve=0.0
    )
    strict = lifecycle.DeadlineMiddleware(Starlette(routes=[Route("/", never)]), strict=True)

    responses: dict[str, httpx.Response] = {}
    async with client(handlers) as http:
        responses["queue full"] = await http.get("/full")
        responses["shutting down"] = await http.get("/closed")
        responses["not running"] = await http.get("/not-running")
        responses["unauthorized"] = await http.post("/drain")
    async with client(deadline) as http:
        responses["expired"] = await http.get("/")
    async with client(strict) as http:
        responses["malformed"] = await http.get("/", headers={"grpc-timeout": "soon"})
    busy._free = 0  # every slot taken: the next request is refused at once
    async with client(busy) as http:
        responses["overloaded"] = await http.get("/work")

    expected = {
        "queue full": (503, "urn:lifecycle:problem:queue-full"),
        "shutting down": (503, "urn:lifecycle:problem:shutting-down"),
        "expired": (504, lifecycle.DEADLINE_EXPIRED_TYPE),
        "malformed": (400, lifecycle.MALFORMED_BUDGET_TYPE),
        "overloaded": (503, lifecycle.OVERLOADED_TYPE),
        "not running": (503, "urn:lifecycle:problem:service-unavailable"),
        "unauthorized": (401, "urn:lifecycle:problem:unauthorized"),
    }
    instances = set()
    for name, response in responses.items():
        status, type_ = expected[name]
        assert response.status_code == status, name
        assert response.headers["content-type"] == "application/problem+json", name
        assert response.headers["cache-control"] == "no-store", name
        problem = response.json()
        assert set(problem) == {"type", "title", "status", "detail", "instance"}, name
        assert problem["type"] == type_, name
        assert problem["status"] == status, name
        assert re.fullmatch(r"urn:uuid:[0-9a-f-]{36}", problem["instance"]), name
        instances.add(problem["instance"])
        # Internal names (queues, pools) stay out of what the caller sees.
        assert "jobs" not in problem["detail"], name
    assert len(instances) == len(responses)
    # Every type the package answers with is one of those `_problem` defines, and each is
    # documented where users look: the README and `_problem`'s docstring.
    from lifecycle import _problem

    types = [
        name
        for name in _problem.__all__
        if name.endswith("_TYPE") and name != "PROBLEM_CONTENT_TYPE"
    ]
    defined = {getattr(_problem, name) for name in types}
    assert {type_ for _, type_ in expected.values()} == defined
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for type_ in defined:
        assert f"`{type_}`" in readme, type_
        assert f"``{type_}``" in (_problem.__doc__ or ""), type_
