"""lifecycle.httpx.DeadlineTransport: outbound calls bounded by, and carrying, the deadline."""

from __future__ import annotations

import logging
import math
import re
import socket
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

import lifecycle
from lifecycle.httpx import DeadlineExceeded, DeadlineTransport

from .scope_paths import anyio_backend  # noqa: F401 - every test on each scope's code path

pytestmark = pytest.mark.anyio

BUDGET = "x-request-timeout-ms"


class Recorder(httpx.AsyncBaseTransport):
    """Records what reaches the wire side of the DeadlineTransport, then forwards it."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.requests: list[httpx.Request] = []
        self.closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        self.closed = True
        await self.inner.aclose()


upstream_cancelled: list[str] = []


async def echo(request: Request) -> JSONResponse:
    return JSONResponse({"budget": request.headers.get(BUDGET)})


async def stall(request: Request) -> Response:
    try:
        await anyio.sleep_forever()
    finally:
        upstream_cancelled.append(request.url.path)
    raise AssertionError("unreachable")


async def expired(request: Request) -> Response:
    return PlainTextResponse(
        "expired", status_code=504, headers={lifecycle.DEADLINE_EXPIRED_HEADER: "1"}
    )


async def plain_504(request: Request) -> Response:
    return PlainTextResponse("gateway timeout", status_code=504)


UPSTREAM = Starlette(
    routes=[
        Route("/echo", echo),
        Route("/stall", stall),
        Route("/expired", expired),
        Route("/plain-504", plain_504),
    ]
)


def upstream_client(**options: Any) -> tuple[httpx.AsyncClient, Recorder]:
    recorder = Recorder(httpx.ASGITransport(app=UPSTREAM))
    transport = DeadlineTransport(recorder, **options)
    return httpx.AsyncClient(transport=transport, base_url="http://upstream"), recorder


def service(handler: Any, **options: Any) -> lifecycle.DeadlineMiddleware:
    """Our service: DeadlineMiddleware around a Starlette app whose '/' runs ``handler``."""
    options.setdefault("default_timeout", 30.0)
    return lifecycle.DeadlineMiddleware(Starlette(routes=[Route("/", handler)]), **options)


def caller(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service")


def assert_expired_response(response: httpx.Response) -> None:
    assert response.status_code == 504
    assert response.headers[lifecycle.DEADLINE_EXPIRED_HEADER] == "1"
    problem = response.json()
    assert problem["type"] == lifecycle.DEADLINE_EXPIRED_TYPE
    assert problem["instance"].startswith("urn:uuid:")
    # Nothing of the upstream (its host, URL or path) reaches the external caller.
    assert "upstream" not in response.text
    assert "http" not in problem["detail"]


async def test_without_a_deadline_requests_pass_through_unchanged() -> None:
    http, recorder = upstream_client()
    async with http:
        response = await http.get("/echo", timeout=httpx.Timeout(5.0, connect=1.0))
    assert response.json() == {"budget": None}
    (sent,) = recorder.requests
    assert sent.extensions["timeout"] == {"connect": 1.0, "read": 5.0, "write": 5.0, "pool": 5.0}


async def test_the_budget_is_forwarded_and_caps_every_timeout() -> None:
    http, recorder = upstream_client(reserve=0.1)
    results: dict[str, Any] = {}

    async def handler(request: Request) -> JSONResponse:
        results["remaining"] = lifecycle.remaining()
        response = await http.get("/echo", timeout=httpx.Timeout(60.0, connect=0.05))
        return JSONResponse(response.json())

    async with http, caller(service(handler, reserve=0.0)) as client:
        body = (await client.get("/", headers={BUDGET: "2000"})).json()
    forwarded = int(body["budget"])
    assert 1000 < forwarded <= 1900  # what was left, minus the transport's reserve
    assert forwarded <= (results["remaining"] - 0.1) * 1000
    timeouts = recorder.requests[0].extensions["timeout"]
    assert timeouts["connect"] == 0.05  # a shorter configured timeout is kept
    for key in ("read", "write", "pool"):
        assert timeouts[key] == pytest.approx(forwarded / 1000, abs=0.002)


async def test_the_budget_header_goes_only_to_allowed_hosts() -> None:
    http, recorder = upstream_client(hosts=["upstream", "*.internal"])

    async def handler(request: Request) -> JSONResponse:
        seen = {}
        for url in ("http://upstream/echo", "http://api.internal/echo", "http://example.com/echo"):
            seen[url] = (await http.get(url)).json()["budget"]
        return JSONResponse(seen)

    async with http, caller(service(handler)) as client:
        seen = (await client.get("/", headers={BUDGET: "5000"})).json()
    assert seen["http://upstream/echo"] is not None
    assert seen["http://api.internal/echo"] is not None
    assert seen["http://example.com/echo"] is None
    # The host that was not sent the budget is still bounded by it.
    assert recorder.requests[2].extensions["timeout"]["read"] <= 5.0


async def test_a_redirect_to_a_host_outside_hosts_does_not_get_the_budget() -> None:
    received: dict[str, str | None] = {}

    def upstream(request: httpx.Request) -> httpx.Response:
        received[request.url.host] = request.headers.get(BUDGET)
        if request.url.host == "api.internal":
            return httpx.Response(302, headers={"location": "http://partner.example.com/x"})
        return httpx.Response(200)

    transport = DeadlineTransport(httpx.MockTransport(upstream), hosts=["api.internal"])
    async with httpx.AsyncClient(transport=transport, follow_redirects=True) as http:
        request = http.build_request("GET", "http://api.internal/start")
        configured = request.extensions["timeout"]
        with anyio.fail_after(5.0):
            response = await http.send(request)
    assert response.status_code == 200
    assert received["api.internal"] is not None
    # httpx builds the redirected request from the previous one's headers: ours must not be
    # among them.
    assert received["partner.example.com"] is None
    # The caller's request is left as it was built, and is the one the response points back to.
    assert BUDGET not in request.headers
    assert request.extensions["timeout"] == configured
    (redirect,) = response.history
    assert redirect.request is request
    assert response.request.url == "http://partner.example.com/x"


async def test_a_smaller_budget_set_by_the_caller_is_kept() -> None:
    http, _ = upstream_client()

    async def handler(request: Request) -> JSONResponse:
        smaller = (await http.get("/echo", headers={BUDGET: "250"})).json()["budget"]
        larger = (await http.get("/echo", headers={BUDGET: "999999"})).json()["budget"]
        garbage = (await http.get("/echo", headers={BUDGET: "soon"})).json()["budget"]
        return JSONResponse([smaller, larger, garbage])

    async with http, caller(service(handler)) as client:
        smaller, larger, garbage = (await client.get("/", headers={BUDGET: "5000"})).json()
    assert smaller == "250"
    assert int(larger) <= 5000
    assert int(garbage) <= 5000


async def test_a_spent_budget_fails_fast_without_sending() -> None:
    http, recorder = upstream_client(reserve=0.5)
    caught: list[BaseException] = []

    async def handler(request: Request) -> Response:
        try:
            await http.get("/echo")
        except DeadlineExceeded as exc:
            caught.append(exc)
        # Swallowing it does not help: the request's budget is spent, so it ends as a 504.
        return PlainTextResponse("fallback")

    async with http, caller(service(handler)) as client:
        response = await client.get("/", headers={BUDGET: "300"})  # less than the reserve
    assert_expired_response(response)
    assert recorder.requests == []
    (exc,) = caught
    assert isinstance(exc, lifecycle.DeadlineExceeded)
    assert isinstance(exc, httpx.TimeoutException)
    assert isinstance(exc, TimeoutError)
    assert exc.request.url == "http://upstream/echo"
    assert "was not sent" in str(exc)


async def test_an_upstream_expiry_comes_back_as_our_504_even_through_error_middleware(
    caplog: pytest.LogCaptureFixture,
) -> None:
    http, _ = upstream_client()

    async def handler(request: Request) -> Response:
        response = await http.get("/expired")
        response.raise_for_status()  # never reached: the transport raised
        return PlainTextResponse("unreachable")

    app = service(handler)
    with caplog.at_level(logging.INFO, logger="lifecycle.deadline"):
        async with http, caller(app) as client:
            response = await client.get("/", headers={BUDGET: "2000"})
    # Starlette's ServerErrorMiddleware sits between the handler and DeadlineMiddleware; the
    # transport ends the request through its cancel scope, so this is not a 500.
    assert_expired_response(response)
    assert app.statistics().expired == 1
    # The upstream's URL and host stay inside: in the log, under the body's instance.
    problem = response.json()
    assert "upstream" not in problem["detail"].lower()
    assert "http" not in problem["detail"]
    (logged,) = [r.getMessage() for r in caplog.records if problem["instance"] in r.getMessage()]
    assert "GET http://upstream/expired answered 504" in logged


async def test_a_504_without_the_marker_or_from_an_unbudgeted_host_is_a_plain_response() -> None:
    http, _ = upstream_client(hosts=["elsewhere"])

    async def handler(request: Request) -> JSONResponse:
        plain = await http.get("/plain-504")
        marked_but_not_ours = await http.get("/expired")  # we did not send it our budget
        return JSONResponse([plain.status_code, marked_but_not_ours.status_code])

    async with http, caller(service(handler)) as client:
        response = await client.get("/", headers={BUDGET: "2000"})
    assert response.json() == [504, 504]


async def test_an_upstream_that_hangs_is_cut_off_at_the_budget() -> None:
    upstream_cancelled.clear()
    http, _ = upstream_client(reserve=0.02)

    async def handler(request: Request) -> Response:
        await http.get("/stall")
        return PlainTextResponse("unreachable")

    app = service(handler, reserve=0.01)
    async with http, caller(app) as client:
        response = await client.get("/", headers={BUDGET: "150"})
    assert_expired_response(response)
    assert upstream_cancelled == ["/stall"]  # nothing left running upstream


class SlowBody(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"start\n"
        await anyio.sleep_forever()
        yield b"never"


class SlowBodyTransport(httpx.AsyncBaseTransport):
    """Answers at once, then takes forever over the body (ASGITransport buffers bodies)."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=SlowBody())


async def test_a_slow_response_body_is_cut_off_at_the_budget() -> None:
    outcome: list[str] = []

    async def handler(request: Request) -> Response:
        async with http.stream("GET", "http://upstream/slow-body") as response:
            assert response.status_code == 200
            try:
                async for chunk in response.aiter_bytes():
                    outcome.append(chunk.decode())
            except DeadlineExceeded as exc:
                outcome.append(str(exc))
                raise
        return PlainTextResponse("unreachable")

    transport = DeadlineTransport(SlowBodyTransport())
    async with httpx.AsyncClient(transport=transport) as http, caller(service(handler)) as client:
        response = await client.get("/", headers={BUDGET: "300"})
    assert_expired_response(response)
    assert outcome[0] == "start\n"
    assert "reading the response body" in outcome[-1]


def refused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again: connecting is refused


async def test_retries_of_the_wrapped_transport_stay_inside_the_budget() -> None:
    port = refused_port()
    # httpcore retries refused connections with exponential backoff (0.5 s, 1 s, 2 s...).
    transport = DeadlineTransport(httpx.AsyncHTTPTransport(retries=6), reserve=0.02)
    attempts: list[float] = []

    async def handler(request: Request) -> Response:
        try:
            await http.get(f"http://127.0.0.1:{port}/")
        finally:
            attempts.append(anyio.current_time() - start)
        return PlainTextResponse("unreachable")

    async with httpx.AsyncClient(transport=transport) as http, caller(service(handler)) as client:
        start = anyio.current_time()
        response = await client.get("/", headers={BUDGET: "400"})
    assert_expired_response(response)
    (elapsed,) = attempts
    assert elapsed < 1.0  # the backoff alone would have taken 15 s


async def test_retries_by_the_caller_recompute_the_budget_and_stop_when_it_is_spent() -> None:
    class FailsOnce(httpx.AsyncBaseTransport):
        def __init__(self) -> None:
            self.timeouts: list[float] = []

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            self.timeouts.append(request.extensions["timeout"]["read"])
            await anyio.sleep(0.05)
            raise httpx.ConnectError("refused", request=request)

    inner = FailsOnce()
    transport = DeadlineTransport(inner, reserve=0.02)
    outcome: list[str] = []

    async def handler(request: Request) -> Response:
        async with httpx.AsyncClient(transport=transport) as http:
            for _ in range(100):
                try:
                    await http.get("http://upstream/")
                except httpx.ConnectError:
                    continue
                except httpx.TimeoutException as exc:  # how a retry library sees it
                    outcome.append(type(exc).__name__)
                    break
        return PlainTextResponse("fallback")

    async with caller(service(handler)) as client:
        response = await client.get("/", headers={BUDGET: "500"})
    assert_expired_response(response)
    assert outcome == ["DeadlineExceeded"]
    assert len(inner.timeouts) >= 2
    assert inner.timeouts == sorted(inner.timeouts, reverse=True)  # each attempt gets less


async def test_a_shorter_inner_deadline_does_not_end_the_request() -> None:
    http, _ = upstream_client(reserve=0.01)

    async def handler(request: Request) -> Response:
        try:
            with anyio.fail_after(0.1):
                await http.get("/stall")
        except TimeoutError as exc:
            return PlainTextResponse(f"fell back after {type(exc).__name__}")
        return PlainTextResponse("unreachable")

    async with http, caller(service(handler)) as client:
        response = await client.get("/", headers={BUDGET: "5000"})
    assert response.status_code == 200
    assert response.text.startswith("fell back")


async def test_outside_a_request_any_anyio_deadline_bounds_outbound_calls() -> None:
    http, recorder = upstream_client(reserve=0.02)
    async with http:
        with anyio.fail_after(3):
            body = (await http.get("/echo")).json()
        with pytest.raises(DeadlineExceeded), anyio.fail_after(0.2):
            await http.get("/stall")
    assert 2000 < int(body["budget"]) <= 2980
    assert len(recorder.requests) == 2


async def test_closing_the_transport_closes_the_wrapped_one() -> None:
    recorder = Recorder(httpx.ASGITransport(app=UPSTREAM))
    async with httpx.AsyncClient(transport=DeadlineTransport(recorder)):
        pass
    assert recorder.closed


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"transport": object()}, TypeError, "transport must be an httpx.AsyncBaseTransport"),
        ({"header": "bad header"}, ValueError, "'bad header' is not a valid HTTP header name"),
        ({"reserve": -0.1}, ValueError, "reserve must be a finite number"),
        ({"reserve": math.nan}, ValueError, "reserve must be a finite number"),
        ({"reserve": "1"}, TypeError, "reserve must be a number"),
        ({"hosts": "api.internal"}, TypeError, "use hosts=['api.internal']"),
        ({"hosts": [""]}, ValueError, "must be a host name"),
    ],
)
def test_options_are_validated(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        DeadlineTransport(**options)
