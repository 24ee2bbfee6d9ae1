"""Per-request deadlines: DeadlineMiddleware, remaining(), route timeouts, what does not inherit."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import math
import re
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import httpx
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

import lifecycle
import lifecycle.fastapi
from lifecycle import _deadline
from lifecycle._deadline import _parse_grpc_timeout, _parse_milliseconds, _read_budget

from .asgi import raw_call
from .scope_paths import anyio_backend  # noqa: F401 - every test on each scope's code path

pytestmark = pytest.mark.anyio

BUDGET = "x-request-timeout-ms"


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def budget_seen(request: Request) -> JSONResponse:
    """What the code inside the request sees of its deadline (an async endpoint's helper)."""
    deadline = anyio.current_effective_deadline()
    return JSONResponse(
        {
            "remaining": lifecycle.remaining(),
            "effective_deadline_left": None
            if deadline == math.inf
            else deadline - anyio.current_time(),
        }
    )


async def seen(request: Request) -> JSONResponse:
    return budget_seen(request)


async def forever(request: Request) -> Response:
    await anyio.sleep_forever()
    raise AssertionError("unreachable")


def wrap(routes: list[Route], **options: Any) -> lifecycle.DeadlineMiddleware:
    return lifecycle.DeadlineMiddleware(Starlette(routes=routes), **options)


def assert_expired_response(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 504
    assert response.headers[lifecycle.DEADLINE_EXPIRED_HEADER] == "1"
    assert response.headers["content-type"] == "application/problem+json"
    problem: dict[str, Any] = response.json()
    assert problem["type"] == lifecycle.DEADLINE_EXPIRED_TYPE
    assert problem["status"] == 504
    assert problem["title"] == "Deadline expired"
    assert problem["detail"]
    assert re.fullmatch(r"urn:uuid:[0-9a-f-]{36}", problem["instance"])
    return problem


# -- 1. the inbound budget ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "value", "seconds"),
    [
        ("x-request-timeout-ms", "1500", 1.5),
        ("grpc-timeout", "2S", 2.0),
        ("grpc-timeout", "1500m", 1.5),
        ("grpc-timeout", "1M", 60.0),
        ("x-envoy-expected-rq-timeout-ms", "2500", 2.5),
        ("connect-timeout-ms", "750", 0.75),
    ],
)
async def test_a_budget_header_sets_the_deadline_the_request_sees(
    header: str, value: str, seconds: float
) -> None:
    app = wrap([Route("/", seen)], default_timeout=30.0, reserve=0.01)
    async with client(app) as http:
        response = await http.get("/", headers={header: value})
    body = response.json()
    assert response.status_code == 200
    assert seconds - 1.0 < body["remaining"] <= seconds - 0.01
    assert body["effective_deadline_left"] == pytest.approx(body["remaining"], abs=0.05)
    assert app.statistics().received == 1


async def test_the_smallest_of_several_budget_headers_wins() -> None:
    app = wrap([Route("/", seen)], reserve=0.0)
    async with client(app) as http:
        response = await http.get(
            "/", headers={"x-request-timeout-ms": "9000", "grpc-timeout": "3S"}
        )
    assert 2.0 < response.json()["remaining"] <= 3.0


async def test_without_a_header_the_default_applies_and_without_a_default_nothing() -> None:
    with_default = wrap([Route("/", seen)], default_timeout=4.0, reserve=0.5)
    without = wrap([Route("/", seen)])
    async with client(with_default) as a, client(without) as b:
        defaulted = (await a.get("/")).json()
        unbounded = (await b.get("/")).json()
    assert 3.0 < defaulted["remaining"] <= 3.5
    assert unbounded == {"remaining": None, "effective_deadline_left": None}
    assert with_default.statistics().received == 0


async def test_a_client_cannot_extend_its_budget_past_max_timeout() -> None:
    app = wrap([Route("/", seen)], default_timeout=1.0, max_timeout=2.0, reserve=0.0)
    async with client(app) as http:
        clamped = (await http.get("/", headers={BUDGET: "600000"})).json()
        shorter = (await http.get("/", headers={BUDGET: "500"})).json()
    assert 1.5 < clamped["remaining"] <= 2.0
    assert shorter["remaining"] <= 0.5
    stats = app.statistics()
    assert (stats.received, stats.clamped) == (2, 1)


async def test_only_the_configured_headers_are_read() -> None:
    app = wrap([Route("/", seen)], headers=["X-Budget-Ms"], reserve=0.0)
    async with client(app) as http:
        ignored = (await http.get("/", headers={BUDGET: "100", "grpc-timeout": "1m"})).json()
        read = (await http.get("/", headers={"x-budget-ms": "2000"})).json()
    assert ignored["remaining"] is None
    assert 1.0 < read["remaining"] <= 2.0


async def test_health_probes_and_other_exempt_paths_have_no_deadline() -> None:
    routes = [Route("/healthz", seen), Route("/metrics", seen), Route("/work", seen)]
    default = wrap(routes, default_timeout=5.0)
    custom = wrap(routes, default_timeout=5.0, exempt_paths=["/work"])
    async with client(default) as a, client(custom) as b:
        probe = (await a.get("/healthz", headers={BUDGET: "1"})).json()
        metrics = (await a.get("/metrics")).json()
        work = (await b.get("/work")).json()
        no_longer_exempt = (await b.get("/healthz")).json()
    assert probe["remaining"] is None
    assert metrics["remaining"] is None
    assert work["remaining"] is None
    assert no_longer_exempt["remaining"] is not None
    assert default.statistics().received == 0


async def test_exempt_paths_are_matched_below_the_root_path() -> None:
    # Behind a proxy (uvicorn --root-path /api), the ASGI path includes the root path.
    app = wrap([Route("/healthz", seen), Route("/work", seen)], default_timeout=5.0)
    rooted = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, root_path="/api"), base_url="http://test"
    )
    async with rooted as http:
        probe = await http.get("/api/healthz", headers={BUDGET: "1"})
        work = await http.get("/api/work")
    assert probe.status_code == 200
    assert probe.json()["remaining"] is None
    assert work.json()["remaining"] is not None
    assert app.statistics().received == 0


async def test_non_http_scopes_pass_through_untouched() -> None:
    seen_scopes: list[dict[str, Any]] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen_scopes.append(scope)
        seen_scopes.append({"remaining": lifecycle.remaining()})

    app = lifecycle.DeadlineMiddleware(inner, default_timeout=0.5)

    async def receive() -> dict[str, Any]:
        raise AssertionError("not called")

    async def send(message: Any) -> None:
        raise AssertionError("not called")

    for kind in ("lifespan", "websocket"):
        scope = {"type": kind, "path": "/", "headers": [(b"x-request-timeout-ms", b"1")]}
        await app(scope, receive, send)
    assert [s.get("type") for s in seen_scopes[::2]] == ["lifespan", "websocket"]
    assert seen_scopes[1::2] == [{"remaining": None}, {"remaining": None}]


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"default_timeout": 0}, ValueError, "default_timeout must be a positive"),
        ({"default_timeout": math.inf}, ValueError, "finite"),
        ({"default_timeout": math.nan}, ValueError, "finite"),
        ({"default_timeout": "5"}, TypeError, "default_timeout must be a number"),
        ({"max_timeout": True}, TypeError, "max_timeout must be a number"),
        ({"default_timeout": 10, "max_timeout": 5}, ValueError, "lower default_timeout"),
        ({"reserve": -1}, ValueError, "reserve must be"),
        ({"default_timeout": 0.01, "reserve": 0.05}, ValueError, "leaves nothing after"),
        ({"min_budget": -1}, ValueError, "min_budget must be"),
        ({"headers": "x-request-timeout-ms"}, TypeError, "use headers=['x-request-timeout-ms']"),
        ({"headers": ["bad header"]}, ValueError, "'bad header' is not a valid"),
        ({"headers": ["a-ms", "A-MS"]}, ValueError, "listed twice"),
        ({"exempt_paths": "/healthz"}, TypeError, "use exempt_paths=['/healthz']"),
        ({"exempt_paths": ["healthz"]}, ValueError, "must be a string starting with '/'"),
    ],
)
def test_options_are_validated_when_the_middleware_is_built(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        lifecycle.DeadlineMiddleware(Starlette(), **options)


# -- 2. inside the request ------------------------------------------------------------------


async def test_the_deadline_is_visible_in_child_tasks_and_nested_calls() -> None:
    async def endpoint(request: Request) -> JSONResponse:
        results: dict[str, float | None] = {}

        async def child() -> None:
            results["child"] = lifecycle.remaining()

        async with anyio.create_task_group() as tg:
            tg.start_soon(child)
        with anyio.fail_after(0.2):
            await anyio.lowlevel.checkpoint()
            results["shorter"] = lifecycle.remaining()
        results["after"] = lifecycle.remaining()
        return JSONResponse(results)

    app = wrap([Route("/", endpoint)], default_timeout=10.0)
    async with client(app) as http:
        results = (await http.get("/", headers={BUDGET: "3000"})).json()
    assert 2.0 < results["child"] <= 3.0
    assert results["shorter"] <= 0.2  # an inner deadline wins while it is shorter
    assert 2.0 < results["after"] <= 3.0


async def test_sync_endpoints_in_worker_threads_read_the_deadline() -> None:
    def sync_endpoint(request: Request) -> JSONResponse:
        assert threading.current_thread() is not threading.main_thread()
        return JSONResponse({"remaining": lifecycle.remaining()})

    async def offloads(request: Request) -> JSONResponse:
        return JSONResponse({"remaining": await anyio.to_thread.run_sync(lifecycle.remaining)})

    app = wrap([Route("/sync", sync_endpoint), Route("/offload", offloads)], reserve=0.0)
    async with client(app) as http:
        in_sync = (await http.get("/sync", headers={BUDGET: "2000"})).json()
        offloaded = (await http.get("/offload", headers={BUDGET: "2000"})).json()
        unbounded = (await http.get("/sync")).json()
    assert 1.0 < in_sync["remaining"] <= 2.0
    assert 1.0 < offloaded["remaining"] <= 2.0
    assert unbounded["remaining"] is None


async def test_a_sync_endpoint_that_overruns_gets_a_504_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def stubborn(request: Request) -> PlainTextResponse:
        # Cannot be cancelled: waits for its deadline to pass, then works on a little longer.
        while (lifecycle.remaining() or 0.0) > 0:
            time.sleep(0.005)
        time.sleep(0.05)
        return PlainTextResponse("too late")

    app = wrap([Route("/", stubborn)], reserve=0.01)
    with caplog.at_level(logging.WARNING, logger="lifecycle.deadline"):
        async with client(app) as http:
            response = await http.get("/", headers={BUDGET: "60"})
    assert_expired_response(response)
    assert app.statistics().overran == 1
    (record,) = [r for r in caplog.records if "past its deadline" in r.getMessage()]
    assert "GET /" in record.getMessage()


async def test_a_deadline_already_past_when_set_is_not_an_overrun(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A budget below the reserve puts the deadline in the past on arrival, and a route timeout
    # applied late can do the same; code stopped at its first checkpoint did not overrun.
    async def prompt(request: Request) -> PlainTextResponse:
        await anyio.lowlevel.checkpoint()
        return PlainTextResponse("ok")

    async def slow_to_route(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/route":
            await anyio.sleep(0.1)  # longer than the route's timeout
        await router(scope, receive, send)

    router = Starlette(
        routes=[Route("/", prompt), Route("/route", lifecycle.request_timeout(0.06)(prompt))]
    )
    # With a default, the route's timeout replaces it and counts from the request's arrival.
    app = lifecycle.DeadlineMiddleware(slow_to_route, default_timeout=30.0, reserve=0.05)
    with caplog.at_level(logging.WARNING, logger="lifecycle.deadline"):
        async with client(app) as http:
            for value in ("5n", "1u"):
                assert_expired_response(await http.get("/", headers={"grpc-timeout": value}))
            assert_expired_response(await http.get("/route"))
    stats = app.statistics()
    assert (stats.expired, stats.overran) == (3, 0)
    assert not [r for r in caplog.records if "past its deadline" in r.getMessage()]


# -- 3. expiry --------------------------------------------------------------------------------


async def test_expiry_before_the_response_is_a_504_with_the_marker() -> None:
    cancelled = anyio.Event()

    async def slow(request: Request) -> Response:
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()
        raise AssertionError("unreachable")

    app = wrap([Route("/", slow)], default_timeout=30.0)
    async with client(app) as http:
        response = await http.get("/", headers={BUDGET: "50"})
    problem = assert_expired_response(response)
    assert "before the response started" in problem["detail"]
    assert response.headers["cache-control"] == "no-store"
    assert cancelled.is_set()  # the handler was cancelled, not left running
    stats = app.statistics()
    assert (stats.expired, stats.aborted, stats.in_flight) == (1, 0, 0)


async def test_the_default_timeout_expires_too() -> None:
    app = wrap([Route("/", forever)], default_timeout=0.05)
    async with client(app) as http:
        assert_expired_response(await http.get("/"))


async def test_many_concurrent_deadlines_expire_independently() -> None:
    async def maybe_slow(request: Request) -> PlainTextResponse:
        if request.query_params["slow"] == "1":
            await anyio.sleep_forever()
        return PlainTextResponse("ok")

    app = wrap([Route("/", maybe_slow)], default_timeout=30.0)
    statuses: dict[int, int] = {}
    async with client(app) as http:

        async def call(index: int) -> None:
            slow = index % 2
            # Only the slow ones get short budgets, so a loaded machine cannot fail the others.
            headers = {BUDGET: str(20 + (index * 7) % 60)} if slow else {}
            response = await http.get(f"/?slow={slow}", headers=headers)
            statuses[index] = response.status_code

        async with anyio.create_task_group() as tg:
            for index in range(40):
                tg.start_soon(call, index)
    assert statuses == {i: 504 if i % 2 else 200 for i in range(40)}
    assert app.statistics().expired == 20


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the shared timer is asyncio's
async def test_the_shared_timer_keeps_memory_proportional_to_requests_in_flight() -> None:
    app = wrap([Route("/", seen)], default_timeout=30.0)
    async with client(app) as http:
        for _ in range(300):
            await http.get("/")
    timer = _deadline._timer_for(asyncio.get_running_loop())
    assert 0 < len(timer.heap) < 140  # 300 finished requests, compacted as they went


async def test_expiry_mid_stream_aborts_the_response_without_a_second_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"first chunk\n"
        await anyio.sleep_forever()
        yield b"never"

    async def stream(request: Request) -> StreamingResponse:
        return StreamingResponse(chunks(), media_type="text/plain")

    app = wrap([Route("/", stream)], default_timeout=30.0)
    with caplog.at_level(logging.WARNING, logger="lifecycle.deadline"):
        sent = await raw_call(app, headers=[(b"x-request-timeout-ms", b"300")])
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 200
    assert sent[1] == {"type": "http.response.body", "body": b"first chunk\n", "more_body": True}
    stats = app.statistics()
    assert (stats.aborted, stats.expired) == (1, 0)
    assert any("aborted" in r.getMessage() for r in caplog.records)


async def test_a_budget_below_min_budget_is_rejected_without_running_the_app() -> None:
    calls = 0

    async def counted(request: Request) -> PlainTextResponse:
        nonlocal calls
        calls += 1
        return PlainTextResponse("ok")

    app = wrap([Route("/", counted)], min_budget=0.1, reserve=0.01)
    async with client(app) as http:
        rejected = await http.get("/", headers={BUDGET: "100"})  # 90 ms after the reserve
        accepted = await http.get("/", headers={BUDGET: "200"})
    problem = assert_expired_response(rejected)
    assert "not started" in problem["detail"]
    assert accepted.status_code == 200
    assert calls == 1
    assert app.statistics().rejected_early == 1


def installed_middleware(app: Starlette) -> lifecycle.DeadlineMiddleware:
    """The DeadlineMiddleware Starlette built from ``add_middleware`` (after one request)."""
    layer: Any = app.middleware_stack
    while not isinstance(layer, lifecycle.DeadlineMiddleware):
        layer = layer.app
    return layer


async def test_a_deadline_exceeded_escaping_the_app_becomes_the_504(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def upstream_expired(request: Request) -> Response:
        raise lifecycle.DeadlineExceeded("upstream said so")

    async def in_a_task_group(request: Request) -> Response:
        async def fails() -> None:
            raise lifecycle.DeadlineExceeded("upstream said so")

        async with anyio.create_task_group() as tg:
            tg.start_soon(fails)
            tg.start_soon(anyio.sleep_forever)
        raise AssertionError("unreachable")

    # Installed with add_middleware, it sits inside Starlette's ServerErrorMiddleware, which
    # would otherwise answer 500 to any exception before it reached the deadline middleware.
    app = Starlette(routes=[Route("/plain", upstream_expired), Route("/group", in_a_task_group)])
    app.add_middleware(lifecycle.DeadlineMiddleware, default_timeout=30.0)
    with caplog.at_level(logging.INFO, logger="lifecycle.deadline"):
        async with client(app) as http:
            problems = [assert_expired_response(await http.get(p)) for p in ("/plain", "/group")]
    assert installed_middleware(app).statistics().expired == 2
    # The exception's text is internal: it goes to the log under the body's instance.
    logged = [r.getMessage() for r in caplog.records if "upstream said so" in r.getMessage()]
    for problem in problems:
        assert "upstream said so" not in problem["detail"]
        assert [line for line in logged if problem["instance"] in line]


async def test_other_errors_are_not_turned_into_504s() -> None:
    async def mixed(request: Request) -> Response:
        async def expired() -> None:
            raise lifecycle.DeadlineExceeded("upstream")

        async def broken() -> None:
            raise KeyError("bug")

        async with anyio.create_task_group() as tg:
            tg.start_soon(expired)
            tg.start_soon(broken)
        raise AssertionError("unreachable")

    app = wrap([Route("/", mixed)])
    with pytest.raises(ExceptionGroup) as caught:
        await raw_call(app)
    assert caught.group_contains(KeyError)
    assert app.statistics().expired == 0


async def test_an_outer_cancellation_is_not_swallowed() -> None:
    started = anyio.Event()

    async def slow(request: Request) -> Response:
        started.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    app = wrap([Route("/", slow)], default_timeout=30.0)
    sent: list[dict[str, Any]] = []
    with anyio.CancelScope() as outer:
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                sent.extend(await raw_call(app))

            tg.start_soon(run)
            await started.wait()
            outer.cancel()
    assert outer.cancelled_caught
    assert sent == []  # no 504 for a cancellation that is not the deadline's
    assert app.statistics().expired == 0


# -- 4. bad input -----------------------------------------------------------------------------

MALFORMED = [
    (BUDGET, "abc"),
    (BUDGET, "-5"),
    (BUDGET, "1 000"),
    (BUDGET, "1.5"),
    (BUDGET, "1e3"),
    (BUDGET, "inf"),
    (BUDGET, "nan"),
    (BUDGET, "NaN"),
    (BUDGET, "12345678901"),  # 11 digits: overflowing
    (BUDGET, ""),
    (BUDGET, "+100"),
    (BUDGET, "0x10"),
    (BUDGET, "100, 200"),
    ("grpc-timeout", "5x"),
    ("grpc-timeout", "5"),
    ("grpc-timeout", "m"),
    ("grpc-timeout", "5 S"),
    ("grpc-timeout", "123456789S"),  # 9 digits
    ("grpc-timeout", "-1S"),
    ("grpc-timeout", "1.5S"),
    ("grpc-timeout", "infS"),
    ("grpc-timeout", "5ms"),
    ("connect-timeout-ms", "99999999999999999999"),
    ("x-envoy-expected-rq-timeout-ms", "-0"),
]


@pytest.mark.parametrize(("header", "value"), MALFORMED)
async def test_malformed_budgets_are_ignored_and_counted(header: str, value: str) -> None:
    app = wrap([Route("/", seen)], default_timeout=7.0, reserve=0.0)
    async with client(app) as http:
        response = await http.get("/", headers={header: value})
    assert response.status_code == 200
    assert 6.0 < response.json()["remaining"] <= 7.0  # the default applies
    stats = app.statistics()
    assert (stats.malformed, stats.received) == (1, 0)


@pytest.mark.parametrize(("header", "value"), MALFORMED[:6] + MALFORMED[13:17])
async def test_malformed_budgets_get_a_400_in_strict_mode(header: str, value: str) -> None:
    app = wrap([Route("/", seen)], strict=True)
    async with client(app) as http:
        response = await http.get("/", headers={header: value})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == lifecycle.MALFORMED_BUDGET_TYPE
    assert problem["status"] == 400
    assert repr(header) in problem["detail"]
    assert app.statistics().malformed == 1


async def test_a_repeated_budget_header_takes_its_smallest_value() -> None:
    app = wrap([Route("/", seen)], default_timeout=7.0, reserve=0.0)
    async with client(app) as http:
        larger_first = await http.get("/", headers=[(BUDGET, "5000"), (BUDGET, "300")])
        smaller_first = await http.get("/", headers=[(BUDGET, "300"), (BUDGET, "5000")])
        grpc = await http.get("/", headers=[("grpc-timeout", "4S"), ("grpc-timeout", "200m")])
    assert 0.2 < larger_first.json()["remaining"] <= 0.3
    assert 0.2 < smaller_first.json()["remaining"] <= 0.3
    assert 0.1 < grpc.json()["remaining"] <= 0.2
    stats = app.statistics()
    assert (stats.received, stats.malformed) == (3, 0)


async def test_several_schemes_take_the_smallest_budget_whatever_the_order() -> None:
    app = wrap([Route("/", seen)], default_timeout=7.0, reserve=0.0)
    schemes = [
        ("grpc-timeout", "3S"),
        ("x-envoy-expected-rq-timeout-ms", "250"),
        (BUDGET, "4000"),
        ("connect-timeout-ms", "2000"),
    ]
    async with client(app) as http:
        for headers in (schemes, schemes[::-1]):
            response = await http.get("/", headers=headers)
            assert 0.15 < response.json()["remaining"] <= 0.25


@pytest.mark.parametrize(
    ("header", "value"),
    [
        (BUDGET, "0"),
        (BUDGET, "000"),
        ("grpc-timeout", "0S"),
        ("grpc-timeout", "0n"),
        ("connect-timeout-ms", "0"),
        ("x-envoy-expected-rq-timeout-ms", "0"),
    ],
)
async def test_a_budget_of_zero_is_already_expired_not_the_default(header: str, value: str) -> None:
    ran = []

    async def endpoint(request: Request) -> Response:
        ran.append(request.url.path)
        return PlainTextResponse("ok")

    app = wrap([Route("/", endpoint)], default_timeout=30.0)
    async with client(app) as http:
        assert_expired_response(await http.get("/", headers={header: value}))
        # Even beside a longer budget of another scheme: the smallest one wins.
        assert_expired_response(await http.get("/", headers=[(header, value), (BUDGET, "9000")]))
    assert ran == []
    stats = app.statistics()
    assert (stats.rejected_early, stats.received, stats.malformed) == (2, 2, 0)


async def test_a_zero_budget_expires_at_once_without_a_default_too() -> None:
    app = wrap([Route("/", seen)])
    async with client(app) as http:
        assert_expired_response(await http.get("/", headers={BUDGET: "0"}))


@pytest.mark.parametrize(("header", "value"), MALFORMED)
async def test_a_malformed_value_never_gets_more_than_the_default(header: str, value: str) -> None:
    app = wrap([Route("/", seen)], default_timeout=0.5, max_timeout=60.0, reserve=0.0)
    async with client(app) as http:
        alone = await http.get("/", headers={header: value})
        # A malformed value beside a valid one is ignored: the valid one applies.
        beside = await http.get("/", headers=[(header, value), ("grpc-timeout", "200m")])
    assert 0.0 < alone.json()["remaining"] <= 0.5
    assert 0.0 < beside.json()["remaining"] <= 0.2


async def test_non_ascii_and_binary_header_values_never_cause_a_500() -> None:
    app = wrap([Route("/", seen)], default_timeout=7.0)
    async with client(app) as http:
        for value in ("\u0661\u0660\u0660".encode(), b"\xff\xfe", "\uff11\uff10\uff10".encode()):
            response = await http.get("/", headers=[(b"x-request-timeout-ms", value)])
            assert response.status_code == 200
    assert app.statistics().malformed == 3


@given(value=st.binary(max_size=24))
@settings(max_examples=300, deadline=None)
def test_fuzz_the_budget_parsers(value: bytes) -> None:
    for parse in (_parse_milliseconds, _parse_grpc_timeout):
        try:
            seconds = parse(value)
        except _deadline._MalformedBudget:
            continue  # anything else escaping the parser fails the test
        assert math.isfinite(seconds)
        assert seconds >= 0  # 0 is a budget already spent
        assert (seconds == 0) == (value.strip(b" \t").rstrip(b"HMSmun").strip(b"0") == b"")


@given(
    values=st.lists(
        st.tuples(
            st.sampled_from([*lifecycle.DEFAULT_BUDGET_HEADERS, "x-other"]),
            st.one_of(
                st.binary(max_size=12),
                st.integers(-(10**12), 10**12).map(lambda n: str(n).encode()),
                st.sampled_from([b"inf", b"nan", b"1e9", b"5S", b"10m", b"3n", b"99999999H"]),
            ),
        ),
        max_size=5,
    )
)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@pytest.mark.parametrize(
    ("backend", "fast_scope"),
    [("asyncio", True), ("asyncio", False), ("trio", True)],
    ids=["asyncio", "asyncio-plain-scope", "trio"],
)
def test_fuzz_the_middleware_never_answers_500(
    backend: str, fast_scope: bool, values: list[tuple[str, bytes]]
) -> None:
    headers = [(name.encode(), value) for name, value in values]
    found = [(n, v) for n, v in headers if n.decode() in lifecycle.DEFAULT_BUDGET_HEADERS]
    expected_budget, problem = _read_budget(found) if found else (None, None)

    async def main() -> None:
        for strict in (False, True):
            app = wrap(
                [Route("/", seen)], default_timeout=1000.0, max_timeout=5000.0, strict=strict
            )
            sent = await raw_call(app, headers=headers)
            status = sent[0]["status"]
            if strict and problem is not None:
                assert status == 400
            else:
                assert status in (200, 504)  # 504: a valid but tiny budget (1 ns) expired
                if status == 200 and expected_budget is not None:
                    remaining = json.loads(sent[1]["body"])["remaining"]
                    assert remaining <= min(expected_budget, 5000.0)

    # Not monkeypatch: hypothesis runs many examples in one function-scoped fixture.
    _deadline._use_lean_scope = fast_scope
    try:
        anyio.run(main, backend=backend)
    finally:
        _deadline._use_lean_scope = _deadline._LEAN_SCOPE_WORKS


# -- 5. what does not inherit ---------------------------------------------------------------


async def test_background_tasks_outlive_the_request_deadline() -> None:
    outcome: dict[str, Any] = {}

    async def background(deadline: float) -> None:
        outcome["remaining"] = lifecycle.remaining()
        outcome["effective"] = anyio.current_effective_deadline()
        await anyio.sleep_until(deadline + 0.05)  # past the request's deadline
        outcome["finished"] = True

    async def endpoint(request: Request) -> PlainTextResponse:
        deadline = lifecycle.current_deadline()
        return PlainTextResponse("queued", background=BackgroundTask(background, deadline))

    app = wrap([Route("/", endpoint)])
    async with client(app) as http:
        response = await http.get("/", headers={BUDGET: "200"})
    assert response.status_code == 200
    assert outcome == {"remaining": None, "effective": math.inf, "finished": True}
    assert app.statistics().expired == 0


async def test_sync_background_tasks_in_threads_see_no_deadline() -> None:
    outcome: list[float | None] = []

    async def endpoint(request: Request) -> PlainTextResponse:
        return PlainTextResponse(
            "ok", background=BackgroundTask(lambda: outcome.append(lifecycle.remaining()))
        )

    app = wrap([Route("/", endpoint)])
    async with client(app) as http:
        await http.get("/", headers={BUDGET: "5000"})
    assert outcome == [None]


async def test_a_route_can_keep_its_deadline_for_background_tasks() -> None:
    outcome: dict[str, Any] = {}

    async def background() -> None:
        outcome["remaining"] = lifecycle.remaining()
        try:
            await anyio.sleep(5)
        finally:
            outcome["cancelled"] = True

    @lifecycle.request_timeout(0.3, keep_for_background=True)
    async def endpoint(request: Request) -> PlainTextResponse:
        return PlainTextResponse("queued", background=BackgroundTask(background))

    app = wrap([Route("/", endpoint)], default_timeout=30.0)
    async with client(app) as http:
        response = await http.get("/")
    assert response.status_code == 200  # the response was complete before the deadline
    assert outcome["remaining"] is not None
    assert outcome["cancelled"] is True
    assert app.statistics().aborted == 0


async def test_fastapi_background_tasks_outlive_the_request_deadline() -> None:
    finished = anyio.Event()

    async def later(deadline: float) -> None:
        assert lifecycle.remaining() is None
        await anyio.sleep_until(deadline + 0.05)  # past the request's deadline
        finished.set()

    api = FastAPI()

    @api.get("/")
    async def endpoint(tasks: BackgroundTasks) -> dict[str, str]:
        tasks.add_task(later, lifecycle.current_deadline())
        return {"status": "queued"}

    app = lifecycle.DeadlineMiddleware(api)
    async with client(app) as http:
        response = await http.get("/", headers={BUDGET: "200"})
    assert response.json() == {"status": "queued"}
    assert finished.is_set()


async def test_work_started_outside_the_request_does_not_inherit_unless_asked() -> None:
    results: dict[str, Any] = {}

    async def job(name: str, deadline: float | None, *, captured: bool) -> None:
        try:
            if captured:
                with lifecycle.deadline_scope(deadline):
                    results[name] = lifecycle.remaining()
                    results[f"{name}-thread"] = await anyio.to_thread.run_sync(lifecycle.remaining)
                    await anyio.sleep_forever()
            else:
                results[name] = lifecycle.remaining()
        except lifecycle.DeadlineExceeded:
            results[f"{name}-exceeded"] = True

    async with anyio.create_task_group() as lifespan_group:

        async def endpoint(request: Request) -> PlainTextResponse:
            deadline = lifecycle.current_deadline()
            with lifecycle.deadline_scope(None):  # what starts here does not see the request's
                lifespan_group.start_soon(partial(job, "detached", None, captured=False))
            lifespan_group.start_soon(partial(job, "inherited", deadline, captured=True))
            return PlainTextResponse("ok")

        app = wrap([Route("/", endpoint)])
        async with client(app) as http:
            response = await http.get("/", headers={BUDGET: "300"})
    assert response.status_code == 200
    assert results["detached"] is None
    assert 0 < results["inherited"] <= 0.3
    assert 0 < results["inherited-thread"] <= 0.3
    assert results["inherited-exceeded"] is True


async def test_worker_pool_jobs_do_not_inherit_the_deadline_unless_the_pool_asks() -> None:
    lc = lifecycle.Lifecycle()
    seen: dict[str, float | None] = {}

    @lc.worker(concurrency=1, queue_size=4)
    async def detached(job: str) -> None:
        seen[job] = lifecycle.remaining()

    @lc.worker(concurrency=1, queue_size=4, inherit_deadline=True)
    async def inheriting(job: str) -> None:
        seen[job] = lifecycle.remaining()

    async def endpoint(request: Request) -> PlainTextResponse:
        await detached.call("detached")
        await inheriting.call("inheriting")
        return PlainTextResponse("ok")

    app = wrap([Route("/", endpoint)], reserve=0.0)
    async with lc.run(), client(app) as http:
        response = await http.get("/", headers={BUDGET: "2000"})
    assert response.status_code == 200
    assert seen["detached"] is None
    inherited = seen["inheriting"]
    assert inherited is not None
    assert 1.0 < inherited <= 2.0


async def test_current_deadline_outside_any_request_is_none() -> None:
    assert lifecycle.current_deadline() is None
    assert lifecycle.remaining() is None
    assert await anyio.to_thread.run_sync(lifecycle.remaining) is None
    with anyio.fail_after(2):
        await anyio.lowlevel.checkpoint()
        deadline = lifecycle.current_deadline()
        assert deadline is not None
        assert 0 < deadline - anyio.current_time() <= 2


def test_deadline_scope_rejects_nan() -> None:
    async def main() -> None:
        with lifecycle.deadline_scope(math.nan):
            pass

    with pytest.raises(ValueError, match="NaN"):
        anyio.run(main)


# -- 7. per route -----------------------------------------------------------------------------


async def test_a_route_timeout_replaces_the_default_and_the_maximum() -> None:
    @lifecycle.request_timeout(0.05)
    async def short(request: Request) -> Response:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    @lifecycle.request_timeout(60.0)
    async def long(request: Request) -> JSONResponse:
        return budget_seen(request)

    app = wrap(
        [Route("/short", short), Route("/long", long)],
        default_timeout=0.5,
        max_timeout=1.0,
        reserve=0.0,
    )
    async with client(app) as http:
        assert_expired_response(await http.get("/short"))
        longer = (await http.get("/long")).json()
        client_wins = (await http.get("/long", headers={BUDGET: "300"})).json()
    assert 50.0 < longer["remaining"] <= 60.0
    assert client_wins["remaining"] <= 0.3


async def test_a_route_can_opt_out_of_deadlines() -> None:
    @lifecycle.request_timeout(None)
    async def stream_forever(request: Request) -> JSONResponse:
        await anyio.sleep(0.4)  # longer than the 200 ms the client sent
        return budget_seen(request)

    app = wrap([Route("/", stream_forever)], default_timeout=0.2)
    async with client(app) as http:
        response = await http.get("/", headers={BUDGET: "200"})
    assert response.status_code == 200
    assert response.json() == {"remaining": None, "effective_deadline_left": None}


class RecordingObserver:
    """A deadline observer (what metrics and tracing implement) that records its calls."""

    def __init__(self) -> None:
        self.started: list[float] = []
        self.finished: list[tuple[float, str]] = []

    def request_started(
        self, scope: object, budget: float, client_budget: float | None
    ) -> RecordingObserver:
        self.started.append(budget)
        return self

    def response_started(self, remaining: float, outcome: str) -> None:
        pass

    def request_finished(self, remaining: float, outcome: str) -> None:
        self.finished.append((remaining, outcome))


async def test_observers_see_the_deadline_in_force_when_the_request_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    observer = RecordingObserver()
    monkeypatch.setattr(_deadline, "observers", [observer])

    async def plain(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    routes = [
        Route("/plain", plain),
        Route("/longer", lifecycle.request_timeout(60.0)(plain)),
        Route("/unbounded", lifecycle.request_timeout(None)(plain)),
    ]
    app = wrap(routes, default_timeout=0.5, reserve=0.0)
    async with client(app) as http:
        for path in ("/plain", "/longer", "/unbounded"):
            assert (await http.get(path)).status_code == 200
    assert observer.started == [0.5, 0.5, 0.5]
    # The route that lifted its deadline ran without a budget: there is no budget left to
    # report for it.
    (plain_left, plain_outcome), (longer_left, longer_outcome) = observer.finished
    assert 0.0 < plain_left <= 0.5
    assert 59.0 < longer_left <= 60.0
    assert plain_outcome == longer_outcome == "completed"


async def test_the_route_decorator_runs_sync_endpoints_in_a_thread() -> None:
    @lifecycle.request_timeout(2.0)
    def sync_endpoint(request: Request) -> JSONResponse:
        assert threading.current_thread() is not threading.main_thread()
        return JSONResponse({"remaining": lifecycle.remaining()})

    app = wrap([Route("/", sync_endpoint)], default_timeout=30.0, reserve=0.0)
    async with client(app) as http:
        response = await http.get("/")
    assert 1.0 < response.json()["remaining"] <= 2.0


async def test_the_fastapi_dependency_sets_a_route_timeout_and_opts_out() -> None:
    api = FastAPI()

    async def remaining_dep() -> float | None:
        return lifecycle.remaining()

    @api.get("/short", dependencies=[lifecycle.fastapi.request_timeout(0.05)])
    async def short() -> None:
        await anyio.sleep_forever()

    @api.get("/budget", dependencies=[lifecycle.fastapi.request_timeout(2.0)])
    async def budget(seen_by_dependency: float | None = Depends(remaining_dep)) -> dict[str, Any]:
        return {"dependency": seen_by_dependency, "endpoint": lifecycle.remaining()}

    @api.get("/none", dependencies=[lifecycle.fastapi.request_timeout(None)])
    async def unbounded() -> dict[str, Any]:
        return {"endpoint": lifecycle.remaining()}

    app = lifecycle.DeadlineMiddleware(api, default_timeout=30.0, reserve=0.0)
    async with client(app) as http:
        assert_expired_response(await http.get("/short"))
        budget_body = (await http.get("/budget")).json()
        none_body = (await http.get("/none", headers={BUDGET: "5000"})).json()
    assert 1.0 < budget_body["dependency"] <= 2.0
    assert 1.0 < budget_body["endpoint"] <= 2.0
    assert none_body == {"endpoint": None}


async def test_the_route_decorator_keeps_fastapi_parameters_working() -> None:
    api = FastAPI()

    @api.get("/items/{item_id}")
    @lifecycle.request_timeout(2.0)
    async def item(item_id: int, q: str = "none") -> dict[str, Any]:
        return {"item_id": item_id, "q": q, "remaining": lifecycle.remaining()}

    app = lifecycle.DeadlineMiddleware(api, default_timeout=30.0, reserve=0.0)
    async with client(app) as http:
        body = (await http.get("/items/7?q=x")).json()
    assert (body["item_id"], body["q"]) == (7, "x")
    assert 1.0 < body["remaining"] <= 2.0


async def test_a_route_timeout_outside_the_middleware_is_an_error() -> None:
    @lifecycle.request_timeout(1.0)
    async def endpoint(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async with client(Starlette(routes=[Route("/", endpoint)])) as http:
        with pytest.raises(RuntimeError, match=r"wrap the app with lifecycle\.DeadlineMiddleware"):
            await http.get("/")


@pytest.mark.parametrize(
    ("timeout", "error"),
    [(0, ValueError), (-1, ValueError), (math.inf, ValueError), ("1", TypeError)],
)
def test_route_timeouts_are_validated(timeout: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="timeout must be"):
        lifecycle.request_timeout(timeout)
    with pytest.raises(error, match="timeout must be"):
        lifecycle.fastapi.request_timeout(timeout)


# -- internals worth pinning ----------------------------------------------------------------


def test_the_fast_scope_passes_its_self_test_on_the_installed_anyio() -> None:
    # If an anyio upgrade changes its asyncio cancel scope, deadlines fall back to plain
    # scopes (correct, slower); this test makes the fallback visible.
    assert _deadline._LEAN_SCOPE_WORKS


def test_statistics_are_a_frozen_snapshot() -> None:
    app = lifecycle.DeadlineMiddleware(Starlette())
    stats = app.statistics()
    with pytest.raises(AttributeError):
        stats.expired = 3  # type: ignore[misc]
    assert stats == lifecycle.DeadlineStatistics(0, 0, 0, 0, 0, 0, 0, 0)


def test_remaining_outside_any_event_loop_or_request_is_none() -> None:
    assert lifecycle.remaining() is None
    assert lifecycle.current_deadline() is None


# -- 8. the request's scope: anyio's semantics on both code paths -----------------------------
# Like every test here, each runs on asyncio with the fast scope and with plain anyio scopes,
# and on trio (`scope_paths.anyio_backend`); on asyncio, in a task anyio did not create, as a
# server runs requests (`in_server_task`): that is where the fast scope takes its short path.


async def in_server_task(call: Any) -> Any:
    """Await ``call()`` in a fresh task and context that anyio knows nothing of (asyncio)."""
    if sniffio_backend() != "asyncio":
        return await call()
    loop = asyncio.get_running_loop()
    return await loop.create_task(call(), context=contextvars.Context())


def sniffio_backend() -> str:
    import sniffio

    return sniffio.current_async_library()


def status_of(sent: list[dict[str, Any]]) -> int:
    (start,) = [m for m in sent if m["type"] == "http.response.start"]
    return int(start["status"])


async def test_nested_timeouts_compose_with_the_request_deadline() -> None:
    seen_inside: dict[str, float] = {}

    async def endpoint(request: Request) -> JSONResponse:
        outer = anyio.current_effective_deadline()
        with anyio.move_on_after(0.05) as shorter:
            seen_inside["shorter"] = anyio.current_effective_deadline() - shorter.deadline
            await anyio.sleep(1)
        with anyio.fail_after(60):  # longer than the request's: the request's still binds
            seen_inside["longer"] = anyio.current_effective_deadline() - outer
            await anyio.lowlevel.checkpoint()
        seen_inside["after"] = anyio.current_effective_deadline() - outer
        return JSONResponse({"moved_on": shorter.cancelled_caught})

    app = wrap([Route("/", endpoint)], default_timeout=5.0)
    sent = await in_server_task(lambda: raw_call(app))
    assert status_of(sent) == 200
    assert json.loads(sent[-1]["body"]) == {"moved_on": True}
    assert seen_inside == {"shorter": 0.0, "longer": 0.0, "after": 0.0}


async def test_expiry_never_interrupts_a_shielded_block() -> None:
    finished: list[str] = []

    async def endpoint(request: Request) -> Response:
        with anyio.CancelScope(shield=True):
            await anyio.sleep(0.1)  # well past the 20 ms deadline
            finished.append("shielded")
        await anyio.sleep(1)
        raise AssertionError("unreachable")

    app = wrap([Route("/", endpoint)], default_timeout=0.02, reserve=0.0)
    sent = await in_server_task(lambda: raw_call(app))
    assert status_of(sent) == 504
    assert finished == ["shielded"]


async def test_a_task_group_in_the_handler_is_cancelled_into_a_504() -> None:
    children_cancelled = 0

    async def child() -> None:
        nonlocal children_cancelled
        try:
            await anyio.sleep_forever()
        finally:
            children_cancelled += 1

    async def endpoint(request: Request) -> Response:
        async with anyio.create_task_group() as tg:
            tg.start_soon(child)
            tg.start_soon(child)
            await anyio.sleep_forever()
        raise AssertionError("unreachable")

    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(lifecycle.DeadlineMiddleware, default_timeout=0.02, reserve=0.0)
    sent = await in_server_task(lambda: raw_call(app))  # an ExceptionGroup would raise here
    assert status_of(sent) == 504
    assert children_cancelled == 2


async def test_cancellation_is_level_triggered() -> None:
    swallowed = 0

    async def endpoint(request: Request) -> Response:
        nonlocal swallowed
        for _ in range(3):
            try:
                await anyio.sleep(1)
            except anyio.get_cancelled_exc_class():
                swallowed += 1  # a handler that swallows it: cancelled again at the next await
        await anyio.sleep(1)
        raise AssertionError("unreachable")

    app = wrap([Route("/", endpoint)], default_timeout=0.02, reserve=0.0)
    sent = await in_server_task(lambda: raw_call(app))
    assert status_of(sent) == 504
    assert swallowed == 3


async def test_no_cancellation_is_left_for_the_next_request_in_the_same_task() -> None:
    async def endpoint(request: Request) -> Response:
        if request.query_params.get("slow"):
            await anyio.sleep(1)
        await anyio.sleep(0.03)  # longer than the first request's deadline
        return PlainTextResponse("ok")

    app = wrap([Route("/", endpoint)], default_timeout=5.0, reserve=0.0)

    async def keep_alive() -> list[int]:
        statuses = []
        for headers in ([(b"x-request-timeout-ms", b"10")], [], [(b"grpc-timeout", b"1S")]):
            statuses.append(status_of(await raw_call(app, headers=headers)))
            assert anyio.current_effective_deadline() == math.inf
            if sniffio_backend() == "asyncio":
                task = asyncio.current_task()
                assert task is not None
                assert task.cancelling() == 0
        await anyio.sleep(0.05)  # nothing pending is delivered later either
        return statuses

    assert await in_server_task(keep_alive) == [504, 200, 200]


async def test_an_outer_cancellation_passes_through_the_request_scope() -> None:
    entered = anyio.Event()

    async def endpoint(request: Request) -> Response:
        entered.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    app = wrap([Route("/", endpoint)], default_timeout=30.0)
    sent: list[dict[str, Any]] = []

    async def serve() -> None:
        sent.extend(await raw_call(app))

    async with anyio.create_task_group() as tg:
        tg.start_soon(in_server_task, serve)
        await entered.wait()
        tg.cancel_scope.cancel()
    assert sent == []
    assert app.statistics().expired == 0


def test_the_fast_scope_self_test_fails_a_scope_that_leaves_its_task_state_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The self-test checks behaviour, not attribute names: a scope whose clean exit forgets
    # to restore the task's state fails it, and the middleware would use anyio.CancelScope.
    original = _deadline._LeanScope.__exit__

    def leaky_exit(self: Any, *exc_info: Any) -> bool:
        state = _deadline._task_data.get(weakref.ref(self._host_task))
        result: bool = original(self, *exc_info)
        if state is not None and state.cancel_scope is None:
            state.cancel_scope = self  # left behind
        return result

    assert _deadline._lean_scope_works()
    monkeypatch.setattr(_deadline._LeanScope, "__exit__", leaky_exit)
    assert not _deadline._lean_scope_works()


async def test_each_code_path_runs_its_own_scope(request: pytest.FixtureRequest) -> None:
    # The suite's three runs of every test really take the three code paths.
    kinds: list[str] = []

    async def endpoint(request: Request) -> Response:
        state = _deadline.current_request.get()
        assert isinstance(state, _deadline._RequestState)
        kinds.append(f"{type(state.scope).__module__}.{type(state.scope).__name__}")
        return PlainTextResponse("ok")

    app = wrap([Route("/", endpoint)], default_timeout=5.0)
    assert status_of(await in_server_task(lambda: raw_call(app))) == 200
    expected = {
        "asyncio": "lifecycle._deadline._LeanScope",
        "asyncio-plain-scope": "anyio._backends._asyncio.CancelScope",
        "trio": "trio.CancelScope",
    }
    (path,) = [name for name in expected if request.node.name.endswith(f"[{name}]")]
    assert kinds == [expected[path]]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the fast scope is asyncio's
async def test_the_fast_scope_leaves_the_server_task_as_it_came() -> None:
    # A server's task (not anyio's) has no anyio state before the request, and none after
    # it: nothing is left for the task's end to clean up.
    async def endpoint(request: Request) -> Response:
        await anyio.lowlevel.checkpoint()
        return PlainTextResponse("ok")

    app = wrap([Route("/", endpoint)], default_timeout=5.0)

    async def serve_twice() -> list[bool]:
        task = asyncio.current_task()
        assert task is not None
        left = []
        for _ in range(2):
            assert status_of(await raw_call(app)) == 200
            left.append(_deadline._task_data.get(weakref.ref(task)) is not None)
        return left

    assert await in_server_task(serve_twice) == [False, False]


def test_a_fast_scope_that_anyio_no_longer_agrees_with_falls_back_to_plain_scopes() -> None:
    # As if anyio kept its task states elsewhere than where the fast scope writes them: the
    # self-test at import sees the deadline missing, logs it, and every request then runs in
    # plain anyio scopes, with the same behaviour.
    script = textwrap.dedent(
        """
        import asyncio, json, logging, types, weakref
        import anyio._backends._asyncio as backend

        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
        elsewhere = weakref.WeakKeyDictionary()
        class Moved(types.ModuleType):
            _task_states = property(lambda module: elsewhere)
        backend.__class__ = Moved  # what `from ... import _task_states` finds, not anyio

        import anyio
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse
        from starlette.routing import Route
        import lifecycle
        from lifecycle import _deadline

        async def endpoint(request):
            if request.query_params.get("slow"):
                await anyio.sleep(1)
            return JSONResponse(anyio.current_effective_deadline() - anyio.current_time())

        app = lifecycle.DeadlineMiddleware(
            Starlette(routes=[Route("/", endpoint)]), default_timeout=5.0, reserve=0.0
        )

        async def call(query):
            sent = []
            async def receive():
                return {"type": "http.request", "body": b""}
            async def send(message):
                sent.append(message)
            scope = {"type": "http", "method": "GET", "path": "/", "root_path": "",
                     "query_string": query, "headers": [(b"x-request-timeout-ms", b"50")]}
            await app(scope, receive, send)
            status = sent[0]["status"]
            return status, json.loads(sent[1]["body"]) if status == 200 else None

        async def main():
            loop = asyncio.get_running_loop()
            return [await loop.create_task(call(q)) for q in (b"", b"slow=1")]

        print(json.dumps([_deadline._LEAN_SCOPE_WORKS, *asyncio.run(main())]))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    works, (fast_status, seen), (slow_status, _) = json.loads(done.stdout)
    assert works is False
    assert "does not behave as lifecycle's fast request scope expects" in done.stderr
    assert fast_status == 200
    assert 0 < seen <= 0.05  # the request's deadline, seen by anyio
    assert slow_status == 504


async def test_a_copy_of_the_context_that_outlives_the_request_keeps_nothing_of_it_alive() -> None:
    # uvicorn arms its keep-alive timer in the last send, so the timer keeps a copy of the
    # request's context, and asyncio keeps that (cancelled) timer until it cleans its heap
    # up: that copy must not keep the request's objects alive (for the collector to sweep).
    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = wrap([Route("/", endpoint)], default_timeout=5.0)
    kept: list[contextvars.Context] = []

    class ServerSend:
        async def __call__(self, message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                kept.append(contextvars.copy_context())  # as the keep-alive timer does

    async def serve() -> weakref.ref[Any]:
        server_send = ServerSend()
        scope = {"type": "http", "method": "GET", "path": "/", "root_path": "", "headers": []}
        scope |= {"query_string": b"", "scheme": "http", "server": ("t", 80)}

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        await app(scope, receive, server_send)
        return weakref.ref(server_send)

    server_send = await in_server_task(serve)
    assert server_send() is None  # freed as soon as the request was: nothing held it
    (context,) = kept
    state = context[_deadline.current_request]
    assert isinstance(state, _deadline._RequestState)
    assert state.deadline is None  # and what it sees in a thread: no deadline
    assert state.scope is _deadline._ENDED_SCOPE


# -- 9. the pass-through ----------------------------------------------------------------------


async def test_without_header_default_or_route_timeout_the_request_passes_straight_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_deadline, "_route_timeouts_need_scope", False)
    monkeypatch.setattr(_deadline, "_route_timeouts_exist", False)
    opened: list[float] = []
    real_open = _deadline._open_scope

    def counting_open(loop: Any, deadline: float, now: float) -> Any:
        opened.append(deadline)
        return real_open(loop, deadline, now)

    monkeypatch.setattr(_deadline, "_open_scope", counting_open)
    received_send: list[Any] = []
    inner = Starlette(routes=[Route("/", seen)])

    marked: list[Any] = []

    async def spy(scope: Any, receive: Any, send: Any) -> None:
        received_send.append(send)
        marked.append(_deadline.current_request.get())
        await inner(scope, receive, send)

    app = lifecycle.DeadlineMiddleware(spy)
    sends: list[Any] = []

    async def server_send(message: Any) -> None:
        sends.append(message)

    request_scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "root_path": ""}
    request_scope |= {"query_string": b"", "scheme": "http", "server": ("t", 80)}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    await in_server_task(lambda: app(request_scope, receive, server_send))
    assert received_send == [server_send]  # the server's own send: no wrapper
    assert opened == []  # no scope, so no timer
    assert marked == [None]  # no context variable set: no route timeout needs to find it
    assert json.loads(sends[-1]["body"]) == {"remaining": None, "effective_deadline_left": None}
    # With a header, the same middleware opens a scope.
    request_scope["headers"] = [(b"x-request-timeout-ms", b"5000")]
    await in_server_task(lambda: app(request_scope, receive, server_send))
    assert len(opened) == 1


async def test_a_route_timeout_in_a_passed_through_request_opens_its_scope_lazily(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_deadline, "_route_timeouts_need_scope", False)

    @lifecycle.request_timeout(0.05)
    async def short(request: Request) -> Response:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    @lifecycle.request_timeout(30.0)
    async def long(request: Request) -> JSONResponse:
        return budget_seen(request)

    @lifecycle.request_timeout(0.05)
    def sync_short(request: Request) -> JSONResponse:
        time.sleep(0.1)  # cannot be cancelled: answered 504 when it returns
        return JSONResponse({})

    app = Starlette(
        routes=[Route("/short", short), Route("/long", long), Route("/sync", sync_short)]
    )
    app.add_middleware(lifecycle.DeadlineMiddleware, reserve=0.0)
    async with client(app) as http:
        assert_expired_response(await http.get("/short"))
        assert_expired_response(await http.get("/sync"))
        longer = (await http.get("/long")).json()
        unbounded = (await http.get("/")).status_code
    assert 29.0 < longer["remaining"] <= 30.0
    assert unbounded == 404
    assert installed_middleware(app).statistics().expired == 2
