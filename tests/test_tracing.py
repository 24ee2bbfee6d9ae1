"""OpenTelemetry spans, captured with the SDK's in-memory exporter."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import TaskStatus
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, Tracer
from prometheus_client import CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from lifecycle import Lifecycle, StartupError, instrument_metrics, instrument_tracing
from lifecycle.testing import lifespan_client

from .asgi import raw_call

pytestmark = pytest.mark.anyio


class Spans:
    """The finished spans, looked up by name."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer: Tracer = self.provider.get_tracer("tests")

    def all(self) -> Sequence[ReadableSpan]:
        return self.exporter.get_finished_spans()

    def named(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.all() if span.name == name]

    def one(self, name: str) -> ReadableSpan:
        found = self.named(name)
        assert len(found) == 1, f"{len(found)} spans named {name!r} in {self.names()}"
        return found[0]

    def names(self) -> list[str]:
        return [span.name for span in self.all()]


@pytest.fixture
def spans() -> Spans:
    return Spans()


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.trace_id


def linked(span: ReadableSpan) -> set[int]:
    return {link.context.span_id for link in span.links}


def exception_type(span: ReadableSpan) -> object:
    (event,) = span.events
    assert event.attributes is not None
    return event.attributes["exception.type"]


# -- startup and shutdown -----------------------------------------------------------------


async def test_start_and_stop_spans_follow_the_dependency_graph(spans: Spans) -> None:
    lc = Lifecycle()
    tracer = spans.tracer

    @lc.service
    async def settings() -> AsyncIterator[str]:
        yield "settings"

    @lc.service
    async def db(settings: str) -> AsyncIterator[str]:
        with tracer.start_as_current_span("connect"):
            await anyio.lowlevel.checkpoint()
        yield "db"
        with tracer.start_as_current_span("disconnect"):
            await anyio.lowlevel.checkpoint()

    @lc.service
    async def cache(settings: str, *, task_status: TaskStatus[str]) -> None:
        with tracer.start_as_current_span("warm"):
            await anyio.lowlevel.checkpoint()
        task_status.started("cache")
        await anyio.sleep_forever()

    @lc.service
    async def api(db: str, cache: str) -> AsyncIterator[str]:
        yield "api"

    instrument_tracing(lc, tracer_provider=spans.provider)
    async with lc.run():
        pass

    startup, shutdown = spans.one("lifecycle startup"), spans.one("lifecycle shutdown")
    assert startup.parent is None
    assert shutdown.parent is None
    assert startup.attributes is not None
    assert startup.attributes["lifecycle.service.count"] == 4
    start = {name: spans.one(f"start {name}") for name in ("settings", "db", "cache", "api")}
    stop = {name: spans.one(f"stop {name}") for name in ("settings", "db", "cache", "api")}
    for name in start:
        assert parent_of(start[name]) == span_id(startup)
        assert trace_id(start[name]) == trace_id(startup)
        assert parent_of(stop[name]) == span_id(shutdown)
        assert start[name].attributes is not None
        assert start[name].attributes["lifecycle.service.name"] == name
        assert start[name].status.status_code is StatusCode.UNSET
    # Starts link to the starts of their dependencies ...
    assert linked(start["settings"]) == set()
    assert linked(start["db"]) == {span_id(start["settings"])}
    assert linked(start["api"]) == {span_id(start["db"]), span_id(start["cache"])}
    # ... stops to the stops of their dependents, which stopped before them.
    assert linked(stop["api"]) == set()
    assert linked(stop["db"]) == {span_id(stop["api"])}
    assert linked(stop["settings"]) == {span_id(stop["db"]), span_id(stop["cache"])}
    # A service's own spans nest under its start and stop spans.
    assert parent_of(spans.one("connect")) == span_id(start["db"])
    assert parent_of(spans.one("disconnect")) == span_id(stop["db"])
    assert parent_of(spans.one("warm")) == span_id(start["cache"])
    # Spans end in order: each start before its dependents' starts end.
    assert start["settings"].end_time is not None
    assert start["api"].start_time is not None
    assert start["settings"].end_time <= start["api"].start_time


async def test_a_failed_start_and_its_rollback(spans: Spans) -> None:
    lc = Lifecycle()

    @lc.service
    async def db() -> AsyncIterator[str]:
        yield "db"

    @lc.service
    async def cache(db: str) -> AsyncIterator[str]:
        raise ConnectionError("cache is down")
        yield "cache"  # pragma: no cover

    instrument_tracing(lc, tracer_provider=spans.provider)
    with pytest.raises(StartupError):
        async with lc.run():
            pass

    startup, rollback = spans.one("lifecycle startup"), spans.one("lifecycle rollback")
    assert startup.status.status_code is StatusCode.ERROR
    assert "cache is down" in (startup.status.description or "")
    assert parent_of(rollback) == span_id(startup)
    failed = spans.one("start cache")
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "ConnectionError: cache is down"
    assert [event.name for event in failed.events] == ["exception"]
    assert parent_of(spans.one("stop db")) == span_id(rollback)
    assert spans.named("stop cache") == []


async def test_a_start_cancelled_by_a_timeout_is_marked(spans: Spans) -> None:
    lc = Lifecycle()

    @lc.service(start_timeout=0.01)
    async def slow() -> AsyncIterator[str]:
        await anyio.sleep_forever()
        yield "never"  # pragma: no cover

    instrument_tracing(lc, tracer_provider=spans.provider)
    with pytest.raises(StartupError):
        async with lc.run():
            pass
    start = spans.one("start slow")
    assert start.status.status_code is StatusCode.ERROR
    assert "did not start within" in (start.status.description or "")


async def test_a_start_cancelled_by_a_failure_elsewhere_is_marked_cancelled(
    spans: Spans,
) -> None:
    lc = Lifecycle()

    @lc.service
    async def failing() -> AsyncIterator[str]:
        await anyio.sleep(0.01)
        raise ConnectionError("down")
        yield "never"  # pragma: no cover

    @lc.service
    async def slow() -> AsyncIterator[str]:
        await anyio.sleep_forever()
        yield "never"  # pragma: no cover

    instrument_tracing(lc, tracer_provider=spans.provider)
    with pytest.raises(StartupError):
        async with lc.run():
            pass
    start = spans.one("start slow")
    assert start.status.status_code is StatusCode.ERROR
    assert start.status.description == "cancelled"
    assert start.events == ()


async def test_what_a_service_does_once_running_is_not_under_its_start_span(
    spans: Spans,
) -> None:
    lc = Lifecycle()
    tracer = spans.tracer
    go = anyio.Event()
    consumed, listened, polled = anyio.Event(), anyio.Event(), anyio.Event()

    @lc.service
    async def consumer(*, task_status: TaskStatus[str]) -> None:
        with tracer.start_as_current_span("subscribe"):
            await anyio.lowlevel.checkpoint()
        task_status.started("consumer")
        try:
            await go.wait()
            with tracer.start_as_current_span("handle message"):
                await anyio.lowlevel.checkpoint()
            consumed.set()
            await anyio.sleep_forever()
        finally:
            # Cancelled to stop it: it cleans up in its own task.
            tracer.start_span("unsubscribe").end()

    async def listen() -> None:
        await go.wait()
        with tracer.start_as_current_span("handle event"):
            await anyio.lowlevel.checkpoint()
        listened.set()

    @lc.service
    async def listener() -> AsyncIterator[str]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listen)  # spawned while it starts, runs on after
            yield "listener"
            tg.cancel_scope.cancel()

    @lc.background()
    async def poller() -> None:
        await go.wait()
        with tracer.start_as_current_span("poll"):
            await anyio.lowlevel.checkpoint()
        polled.set()
        await anyio.sleep_forever()

    instrument_tracing(lc, tracer_provider=spans.provider)
    async with lc.run():
        go.set()
        await consumed.wait()
        await listened.wait()
        await polled.wait()

    startup = spans.one("lifecycle startup")
    assert parent_of(spans.one("subscribe")) == span_id(spans.one("start consumer"))
    for name in ("handle message", "handle event", "poll"):
        span = spans.one(name)
        assert span.parent is None, name  # a trace of its own, not the startup's
        assert trace_id(span) != trace_id(startup), name
    assert parent_of(spans.one("unsubscribe")) == span_id(spans.one("stop consumer"))


async def test_a_span_made_right_after_reporting_started_is_not_under_the_start_span(
    spans: Spans,
) -> None:
    lc = Lifecycle()
    tracer = spans.tracer

    @lc.service
    async def consumer(*, task_status: TaskStatus[str]) -> None:
        task_status.started("consumer")
        with tracer.start_as_current_span("handle message"):
            await anyio.sleep_forever()

    instrument_tracing(lc, tracer_provider=spans.provider)
    async with lc.run():
        pass
    assert spans.one("handle message").parent is None


# -- worker jobs --------------------------------------------------------------------------


async def test_a_job_is_a_child_of_the_request_that_submitted_it(spans: Spans) -> None:
    lc = Lifecycle()
    tracer = spans.tracer
    done = anyio.Event()

    @lc.worker(concurrency=2)
    async def index(job: int) -> None:
        with tracer.start_as_current_span("index work"):
            await anyio.lowlevel.checkpoint()
        done.set()

    async def add_item(request: Request) -> PlainTextResponse:
        # What an ASGI tracing middleware (opentelemetry-instrumentation-asgi) does.
        with tracer.start_as_current_span("POST /items"):
            index.submit_nowait(7)
        return PlainTextResponse("queued", status_code=202)

    instrument_tracing(lc, tracer_provider=spans.provider)
    app = Starlette(lifespan=lc.lifespan, routes=[Route("/items", add_item, methods=["POST"])])
    async with lifespan_client(app) as client:
        assert (await client.post("/items")).status_code == 202
        await done.wait()

    request, job = spans.one("POST /items"), spans.one("job index")
    assert parent_of(job) == span_id(request)
    assert trace_id(job) == trace_id(request)
    assert job.attributes is not None
    assert job.attributes["lifecycle.pool.name"] == "index"
    wait = job.attributes["lifecycle.job.wait.duration"]
    assert isinstance(wait, float)
    assert wait >= 0
    assert job.status.status_code is StatusCode.UNSET
    assert parent_of(spans.one("index work")) == span_id(job)
    # The job ran after the request's span had ended: it is still its child.
    assert request.end_time is not None
    assert job.end_time is not None
    assert job.end_time >= request.end_time


async def test_failed_and_timed_out_jobs(spans: Spans) -> None:
    lc = Lifecycle()

    @lc.worker(job_timeout=0.01)
    async def work(job: str) -> None:
        if job == "fail":
            raise ValueError("bad input")
        await anyio.sleep_forever()

    instrument_tracing(lc, tracer_provider=spans.provider)
    async with lc.run():
        with pytest.raises(ValueError, match="bad input"):
            await work.call("fail")
        with pytest.raises(TimeoutError) as timeout:
            await work.call("hang")

    failed, timed_out = spans.named("job work")
    assert failed.parent is None  # submitted outside any span: a trace of its own
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "ValueError: bad input"
    assert [event.name for event in failed.events] == ["exception"]
    # Cut off by its job_timeout: the TimeoutError the pool counts it failed with.
    assert work.statistics().failed == 2
    assert timed_out.status.status_code is StatusCode.ERROR
    assert timed_out.status.description == f"TimeoutError: {timeout.value}"
    assert "ran out of time (its job_timeout)" in str(timeout.value)
    assert [event.name for event in timed_out.events] == ["exception"]
    assert exception_type(timed_out) == "TimeoutError"


async def test_a_job_cut_off_by_the_drain_is_cancelled_not_timed_out(spans: Spans) -> None:
    lc = Lifecycle()
    began = anyio.Event()

    @lc.worker(job_timeout=30.0, drain_timeout=0.01)
    async def work(job: str) -> None:
        began.set()
        await anyio.sleep_forever()

    instrument_tracing(lc, tracer_provider=spans.provider)
    async with lc.run():
        work.submit_nowait("stuck")
        await began.wait()

    assert work.statistics().abandoned == 1
    job = spans.one("job work")
    assert job.status.status_code is StatusCode.ERROR
    assert job.status.description == "cancelled"
    assert job.events == ()


# -- supervised tasks and periodic jobs ---------------------------------------------------


async def test_restarts_and_periodic_runs_are_traces_linked_to_their_service(
    spans: Spans,
) -> None:
    lc = Lifecycle()
    gave_up = anyio.Event()
    ran = anyio.Event()
    runs = 0

    @lc.background(restart="on_failure", max_restarts=2, backoff_base=0.001)
    async def listener() -> None:
        nonlocal runs
        runs += 1
        if runs == 3:
            gave_up.set()
        raise ConnectionError(f"lost connection {runs}")

    @lc.periodic(every=3600.0, first_run="now")
    async def report() -> None:
        ran.set()
        raise ValueError("no report")

    instrument_tracing(lc, tracer_provider=spans.provider)
    async with lc.run():
        await gave_up.wait()
        await ran.wait()

    start_listener = spans.one("start background:listener")
    restarts = spans.named("restart listener")
    assert len(restarts) == 2
    for number, restart in enumerate(restarts, start=1):
        assert restart.parent is None
        assert linked(restart) == {span_id(start_listener)}
        assert restart.attributes is not None
        assert restart.attributes["lifecycle.task.name"] == "listener"
        assert restart.attributes["lifecycle.restart.count"] == number
        assert (
            restart.attributes["lifecycle.restart.cause"]
            == f"ConnectionError: lost connection {number}"
        )
        backoff = restart.attributes["lifecycle.restart.backoff.duration"]
        assert isinstance(backoff, float)
        assert 0 <= backoff <= 0.001 * 2 ** (number - 1)

    run = spans.one("periodic report")
    assert run.parent is None
    assert linked(run) == {span_id(spans.one("start periodic:report"))}
    assert run.status.status_code is StatusCode.ERROR
    assert run.status.description == "ValueError: no report"


async def test_the_observer_side_of_health_check_spans(spans: Spans) -> None:
    # The health monitor does not call this hook yet; this checks what it will get.
    lc = Lifecycle()

    @lc.health_check
    async def database() -> None:
        pass

    tracing = instrument_tracing(lc, tracer_provider=spans.provider)
    observer = tracing._observer.health_check(database)

    async def failing_run() -> None:
        raise ConnectionError("database is down")

    with pytest.raises(ConnectionError):
        await observer.wrap(failing_run())
    run = spans.one("health database")
    assert run.parent is None
    assert run.attributes is not None
    assert run.attributes["lifecycle.check.name"] == "database"
    assert run.status.description == "ConnectionError: database is down"


async def test_periodic_and_health_check_runs_cut_off_by_their_timeout(spans: Spans) -> None:
    lc = Lifecycle()
    hung = anyio.Event()
    runs = 0

    @lc.periodic(every=3600.0, first_run="now", timeout=0.01)
    async def report() -> None:
        await anyio.sleep_forever()

    @lc.health_check(interval=3600.0, timeout=0.01)
    async def ping() -> None:
        await anyio.sleep_forever()

    @lc.health_check(interval=0.01, timeout=30.0)
    async def slow() -> None:
        nonlocal runs
        runs += 1
        if runs == 2:
            hung.set()
            await anyio.sleep_forever()  # until the app stops: cancelled, not timed out

    instrument_tracing(lc, tracer_provider=spans.provider)
    async with lc.run():
        with anyio.fail_after(5):
            while not (spans.named("periodic report") and spans.named("health ping")):  # noqa: ASYNC110 - runs are periodic
                await anyio.sleep(0.01)
            await hung.wait()

    assert report.statistics().timeouts == 1
    run = spans.one("periodic report")
    assert run.status.status_code is StatusCode.ERROR
    assert run.status.description == "TimeoutError: Periodic job 'report' timed out after 0.01s."
    assert exception_type(run) == "TimeoutError"

    assert ping.statistics().timeouts == 1
    check = spans.one("health ping")
    assert check.status.status_code is StatusCode.ERROR
    assert check.status.description == (
        "TimeoutError: Health check 'ping' did not answer within its timeout of 0.01s."
    )
    assert exception_type(check) == "TimeoutError"
    assert linked(check) == {span_id(spans.one("start health:ping"))}

    assert slow.statistics().timeouts == 0
    passed, cancelled = spans.named("health slow")
    assert passed.status.status_code is StatusCode.UNSET
    assert cancelled.status.status_code is StatusCode.ERROR
    assert cancelled.status.description == "cancelled"
    assert cancelled.events == ()


# -- alongside metrics, and enabling ------------------------------------------------------


async def test_metrics_and_tracing_together(spans: Spans) -> None:
    lc = Lifecycle()

    @lc.worker
    async def work(job: int) -> int:
        return job

    registry = CollectorRegistry()
    metrics = instrument_metrics(lc, registry=registry)
    tracing = instrument_tracing(lc, tracer_provider=spans.provider)
    async with lc.run():
        assert await work.call(1) == 1
    assert len(spans.named("job work")) == 1
    assert (
        'lifecycle_pool_jobs_completed_total{pool="work"} 1.0' in generate_latest(registry).decode()
    )

    tracing.close()  # metrics go on, traces stop
    async with lc.run():
        assert await work.call(2) == 2
    assert len(spans.named("job work")) == 1
    assert (
        'lifecycle_pool_job_run_duration_seconds_count{pool="work"} 2.0'
        in generate_latest(registry).decode()
    )
    metrics.close()
    assert metrics._observer not in lc.observers
    assert tracing._observer not in lc.observers


async def test_instrument_tracing_refuses_what_it_cannot_do(spans: Spans) -> None:
    lc = Lifecycle()
    with pytest.raises(TypeError, match="traces a Lifecycle"):
        instrument_tracing("lc")  # type: ignore[arg-type]
    tracing = instrument_tracing(lc, tracer_provider=spans.provider)
    with pytest.raises(RuntimeError, match="already enabled"):
        instrument_tracing(lc, tracer_provider=spans.provider)
    tracing.close()
    async with lc.run():
        with pytest.raises(RuntimeError, match="before the app starts"):
            instrument_tracing(lc, tracer_provider=spans.provider)


async def test_each_health_check_run_is_a_span_when_asked(spans: Spans) -> None:
    lc = Lifecycle()

    @lc.service
    async def db() -> AsyncIterator[str]:
        yield "db"

    @lc.health_check(interval=0.01, timeout=1)
    async def ping(db: str) -> None:
        pass

    instrument_tracing(lc, tracer_provider=spans.provider, health_runs="all")
    async with lc.run():
        with anyio.fail_after(5):
            while len(spans.named("health ping")) < 2:  # noqa: ASYNC110 - runs are periodic
                await anyio.sleep(0.01)
    assert all(span.parent is None for span in spans.named("health ping"))  # own traces


# -- deadlines on the server span of a real instrumentation ------------------------------


async def _quick(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def _slow(request: Request) -> PlainTextResponse:
    await anyio.sleep(10)
    return PlainTextResponse("too late")


async def _stream(request: Request) -> StreamingResponse:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"first"
        await anyio.sleep(10)
        yield b"never"

    return StreamingResponse(chunks())


def _instrumented_app(instrumentation: str, spans: Spans) -> Any:
    """A real app with a `DeadlineMiddleware`, under a real server instrumentation."""
    from fastapi import FastAPI

    import lifecycle

    options = {"default_timeout": 0.1, "max_timeout": 1.0, "reserve": 0.0}
    paths = {"/quick": _quick, "/slow": _slow, "/stream": _stream}
    if instrumentation == "asgi":
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

        starlette = Starlette(routes=[Route(path, fn) for path, fn in paths.items()])
        return OpenTelemetryMiddleware(
            lifecycle.DeadlineMiddleware(starlette, **options),
            tracer_provider=spans.provider,
            meter_provider=_no_meters(),
        )
    if instrumentation == "fastapi-instrumentor":
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        app = FastAPI()
        FastAPIInstrumentor.instrument_app(
            app, tracer_provider=spans.provider, meter_provider=_no_meters()
        )
    else:  # FastAPI's own telemetry (FastAPI(telemetry=...), fastapi >= 0.136)
        app = FastAPI(telemetry={"tracer_provider": spans.provider, "metrics": False})
    for path, fn in paths.items():
        app.add_route(path, fn)
    app.add_middleware(lifecycle.DeadlineMiddleware, **options)
    return app


def _no_meters() -> Any:
    from opentelemetry.metrics import NoOpMeterProvider

    return NoOpMeterProvider()


@pytest.mark.parametrize("instrumentation", ["asgi", "fastapi-instrumentor", "fastapi-native"])
async def test_the_server_span_of_a_real_instrumentation_gets_the_deadline(
    spans: Spans, instrumentation: str
) -> None:
    """The instrumentation ends its span on the response's last message, before the deadline
    middleware returns: the deadline must be on it by then."""
    lc = Lifecycle()
    tracing = instrument_tracing(lc, tracer_provider=spans.provider)
    try:
        app = _instrumented_app(instrumentation, spans)
        async with lifespan_client(app) as client:
            quick = await client.get("/quick", headers={"x-request-timeout-ms": "3000"})
            slow = await client.get("/slow")
        # httpx's ASGI transport refuses a truncated response: the aborted stream is read raw.
        with anyio.fail_after(5):
            stream = await raw_call(app, "/stream", [(b"host", b"testserver")])
    finally:
        tracing.close()
    assert quick.status_code == 200
    assert slow.status_code == 504
    assert [m["type"] for m in stream] == ["http.response.start", "http.response.body"]
    assert stream[-1]["more_body"]  # aborted after it started: no final body message
    servers = {
        span.attributes.get("url.path", span.attributes.get("http.target")): span
        for span in spans.all()
        if span.kind is SpanKind.SERVER and span.attributes is not None
    }
    assert set(servers) == {"/quick", "/slow", "/stream"}, spans.names()
    quick_attributes = servers["/quick"].attributes or {}
    assert quick_attributes["lifecycle.deadline.client_budget"] == 3.0
    assert quick_attributes["lifecycle.deadline.budget"] == 1.0  # clamped to max_timeout
    remaining = quick_attributes["lifecycle.deadline.remaining"]
    assert isinstance(remaining, float)
    assert 0.5 < remaining <= 1.0
    assert quick_attributes["lifecycle.deadline.outcome"] == "completed"
    slow_attributes = servers["/slow"].attributes or {}
    assert slow_attributes["lifecycle.deadline.budget"] == 0.1
    assert "lifecycle.deadline.client_budget" not in slow_attributes
    assert slow_attributes["lifecycle.deadline.outcome"] == "expired"
    assert -0.5 < float(slow_attributes["lifecycle.deadline.remaining"]) <= 0.0  # type: ignore[arg-type]
    stream_attributes = servers["/stream"].attributes or {}
    assert stream_attributes["lifecycle.deadline.outcome"] == "aborted"
    assert float(stream_attributes["lifecycle.deadline.remaining"]) <= 0.0  # type: ignore[arg-type]


async def test_a_request_without_a_recording_span_is_not_watched(spans: Spans) -> None:
    import lifecycle

    lc = Lifecycle()
    tracing = instrument_tracing(lc, tracer_provider=spans.provider)
    try:
        app = lifecycle.DeadlineMiddleware(
            Starlette(routes=[Route("/quick", _quick)]), default_timeout=1.0
        )
        async with lifespan_client(app, lifespan="off") as client:
            assert (await client.get("/quick")).is_success
    finally:
        tracing.close()
    assert spans.all() == ()


async def test_by_default_only_the_runs_that_change_something_are_traced(spans: Spans) -> None:
    """The first run, each failure and the first pass after one; the check's own calls are
    traced only within those runs."""
    lc = Lifecycle()
    outcomes = iter([True, True, False, False, True, True, True])
    done = anyio.Event()
    tracer = spans.provider.get_tracer("the check's driver")

    @lc.health_check(interval=0.001, timeout=1)
    async def ping() -> bool:
        with tracer.start_as_current_span("driver call"):
            pass
        outcome = next(outcomes, None)
        if outcome is None:
            done.set()
            return True
        return outcome

    instrument_tracing(lc, tracer_provider=spans.provider)
    async with lc.run():
        with anyio.fail_after(5):
            await done.wait()
    runs = spans.named("health ping")
    # run 1 (first), 3 and 4 (failing), 5 (recovered): not 2, 6, 7 or the last.
    assert [span.status.status_code for span in runs] == [
        StatusCode.UNSET,
        StatusCode.ERROR,
        StatusCode.ERROR,
        StatusCode.UNSET,
    ]
    assert all(span.parent is None for span in runs)
    # The driver's spans exist only as children of the runs that were traced.
    assert {span.parent.span_id for span in spans.named("driver call")} == {
        span.context.span_id for span in runs
    } or len(spans.named("driver call")) == 0


def test_health_runs_must_be_changes_or_all() -> None:
    with pytest.raises(ValueError, match="health_runs must be 'changes' or 'all'"):
        instrument_tracing(Lifecycle(), health_runs="some")  # type: ignore[arg-type]
