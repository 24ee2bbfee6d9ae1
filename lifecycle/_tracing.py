"""OpenTelemetry spans of a `Lifecycle`: startup, shutdown, restarts and background jobs.

Only the OpenTelemetry *API* is used (``pip install 'anyio-lifecycle[tracing]'``): spans go to
whatever tracer provider the application configures (an SDK with an exporter), and nowhere
when it configures none. The spans:

- ``lifecycle startup``, with a child ``start <service>`` per service, linked to the start
  spans of the services it depends on; ``lifecycle shutdown`` (or the rollback of a failed
  startup, a child of the startup span), with a child ``stop <service>`` per cleanup, linked to
  the stop spans of the services that depend on it. A service's own spans made while it
  starts (or cleans up) are children of its start (or stop) span, in whichever of its tasks
  they are made; what it does once it runs (a long-running service's work, the tasks it
  spawned, a supervised task's runs) starts traces of its own.
- ``job <pool>`` around each worker pool job, in the context of the code that submitted it:
  a job submitted while handling a request is a child of the request's span.
- ``restart <task>`` over the backoff before each restart of a supervised task,
  ``periodic <job>`` around each run of a periodic job, and ``health <check>`` around each run
  of a health check, each the root of a trace of its own, linked to the start span of its
  service.

Failures set the span's status to ``ERROR`` and record the exception. A job, periodic run or
health-check run cut off by its own timeout records a `TimeoutError` (the pool counts the job
failed with one; the periodic job or check counts a timeout); any other cancellation sets
``ERROR`` with the description ``cancelled``.

Attributes follow OpenTelemetry's naming conventions (``lifecycle.<thing>.name``, durations
in seconds as floats under ``.duration`` names); the README lists each one. At the end of
shutdown the tracer provider is flushed, within what is left of the shutdown budget.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from contextvars import Token
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import anyio

from . import _deadline
from ._kernel import Kernel, Observer
from ._observe import (
    JobObserver,
    TaskObserver,
    attach,
    check_attachable,
    detach,
)

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import (
        Link,
        Span,
        SpanContext,
        Status,
        StatusCode,
        Tracer,
        TracerProvider,
    )
    from opentelemetry.util.types import AnyValue, Attributes

    from ._health import HealthCheck
    from ._kernel import Service
    from ._lifecycle import Lifecycle
    from ._workers import BackgroundTask, PeriodicJob, WorkerPool

__all__ = ["TRACER_NAME", "LifecycleTracing", "instrument_tracing"]

R = TypeVar("R")

TRACER_NAME = "lifecycle"
"""The instrumentation scope name of every span this library makes."""

_INSTALL_HINT = "pip install 'anyio-lifecycle[tracing]'"
_LOG = logging.getLogger("lifecycle.tracing")
# How long the flush at the end of shutdown may take when shutdown has no timeout (the batch
# span processor's own default export timeout).
_FLUSH_TIMEOUT = 30.0


def instrument_tracing(
    lifecycle: Lifecycle,
    *,
    tracer_provider: TracerProvider | None = None,
    health_runs: Literal["changes", "all"] = "changes",
) -> LifecycleTracing:
    """Trace ``lifecycle``'s startup, shutdown, restarts and jobs with OpenTelemetry.

    Call it once, before the app starts. Spans are made with the OpenTelemetry API only; set
    up an SDK (a ``TracerProvider`` with an exporter) in the application to send them
    somewhere::

        lifecycle.instrument_tracing(lc)  # the global tracer provider

    Args:
        lifecycle: The `Lifecycle` to trace.
        tracer_provider: Where the spans go; ``None`` for the global tracer provider
            (``opentelemetry.trace.set_tracer_provider``), looked up when each span starts.
        health_runs: Which health-check runs get a span (each the root of a trace of its
            own): ``"changes"`` (the default) the first run, every failing run and the first
            passing run after a failure; ``"all"`` every run. A check runs every few seconds,
            and a span per run would be tens of thousands of traces a day per process. Under
            ``"changes"``, what the check's own code traces (a database driver's spans) is
            not sampled unless the run gets its span.

    Returns:
        The tracing; `LifecycleTracing.close` stops it.

    Raises:
        ImportError: opentelemetry-api is not installed.
        TypeError: ``lifecycle`` is not a `Lifecycle`.
        RuntimeError: The Lifecycle is running, or is already traced.
    """
    try:
        from opentelemetry import trace
    except ImportError as exc:
        raise ImportError(
            f"Tracing needs opentelemetry-api, which is not installed: {_INSTALL_HINT}."
        ) from exc
    check_attachable(
        lifecycle,
        _TracingObserver,
        api="instrument_tracing",
        what="tracing",
        verb="traces",
        handle="LifecycleTracing",
    )
    if health_runs not in ("changes", "all"):
        raise ValueError(f"health_runs must be 'changes' or 'all', not {health_runs!r}.")
    tracer = trace.get_tracer(TRACER_NAME, _version(), tracer_provider=tracer_provider)
    tracing = LifecycleTracing(lifecycle, tracer)
    tracing._observer.provider = tracer_provider
    tracing._observer.every_health_run = health_runs == "all"
    attach(lifecycle, tracing._observer)
    return tracing


def _version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("anyio-lifecycle")
    except metadata.PackageNotFoundError:
        return None


class LifecycleTracing:
    """The OpenTelemetry tracing of a `Lifecycle`; see `instrument_tracing`.

    Attributes:
        lifecycle: The traced `Lifecycle`.
        tracer: The OpenTelemetry tracer the spans are made with.
    """

    def __init__(self, lifecycle: Lifecycle, tracer: Tracer) -> None:
        self.lifecycle = lifecycle
        self.tracer = tracer
        self._observer = _TracingObserver(tracer)
        # Deadline attributes on the span of each request under a DeadlineMiddleware.
        self._deadlines = _DeadlineAttributes()
        _deadline.observers.append(self._deadlines)

    def __repr__(self) -> str:
        return f"<LifecycleTracing of {self.lifecycle!r}>"

    def close(self) -> None:
        """Stop tracing the Lifecycle (from its next run, or next job, on)."""
        detach(self.lifecycle, self._observer)
        if self._deadlines in _deadline.observers:
            _deadline.observers.remove(self._deadlines)


class _DeadlineAttributes:
    """Puts each request's deadline on its server span.

    The span is the one current as the request reaches the middleware: a server
    instrumentation's (opentelemetry-instrumentation-asgi or -fastapi, FastAPI's own). Such
    an instrumentation ends it on the response's final message, before the middleware
    returns, so what is left of the budget is set as the response starts.
    """

    def request_started(
        self, scope: object, budget: float, client_budget: float | None
    ) -> _DeadlineSpan | None:
        span = _current_span()()
        if not span.is_recording():
            return None
        # One set_attribute each: the SDK's set_attributes costs more for two.
        span.set_attribute("lifecycle.deadline.budget", budget)
        if client_budget is not None:
            span.set_attribute("lifecycle.deadline.client_budget", client_budget)
        return _DeadlineSpan(span)


@functools.cache
def _current_span() -> Callable[[], Span]:
    """``opentelemetry.trace.get_current_span``, imported once (opentelemetry is optional)."""
    from opentelemetry.trace import get_current_span

    return get_current_span


class _DeadlineSpan:
    """The server span of one request under a deadline."""

    __slots__ = ("span",)

    def __init__(self, span: Span) -> None:
        self.span = span

    def response_started(self, remaining: float, outcome: str) -> None:
        self._set(remaining, outcome)

    def request_finished(self, remaining: float, outcome: str) -> None:
        # Still recording only when the response never completed (aborted, or no final
        # message): then this is the outcome to keep.
        self._set(remaining, outcome)

    def _set(self, remaining: float, outcome: str) -> None:
        span = self.span
        if span.is_recording():
            span.set_attribute("lifecycle.deadline.remaining", remaining)
            span.set_attribute("lifecycle.deadline.outcome", outcome)


# -- spans --------------------------------------------------------------------------------


def _fail(span: Span, error: BaseException) -> None:
    """Mark ``span`` failed by ``error`` (or cancelled, for a cancellation)."""
    from opentelemetry.trace import Status, StatusCode

    if isinstance(error, Exception):
        span.record_exception(error)
        text = str(error)
        description = f"{type(error).__name__}: {text}" if text else type(error).__name__
        span.set_status(Status(StatusCode.ERROR, description))
    else:
        span.set_status(Status(StatusCode.ERROR, "cancelled"))


class _Phase:
    """The span of the phase a service is in: its start, its stop, or none while it runs.

    While a service starts or stops, its host task makes the `stand_in` for this span current,
    not the span itself. The tasks the service spawns meanwhile (a long-running service's own
    task, the loop of a supervised task, a task group's children) copy that context and keep
    it for as long as they run, out of the host task's reach; the stand-in is how the start
    span is taken back from them once the service runs, and how the stop span reaches them
    (a long-running service cleans up in its own task) when it stops.
    """

    __slots__ = ("span", "stand_in")

    def __init__(self) -> None:
        self.span: Span | None = None
        self.stand_in = _stand_in_type()(self)


@functools.cache
def _stand_in_type() -> Callable[[_Phase], Span]:
    """The class of `_Phase.stand_in`, made on first use (opentelemetry is optional)."""
    from opentelemetry.trace import INVALID_SPAN
    from opentelemetry.trace import Span as SpanBase

    class PhaseSpan(SpanBase):
        """Acts as the span of its phase, or as no span at all between phases.

        As no span (``INVALID_SPAN``), it makes the spans started under it roots of traces of
        their own, and what is recorded on it goes nowhere.
        """

        __slots__ = ("_phase",)

        def __init__(self, phase: _Phase) -> None:
            self._phase = phase

        def __repr__(self) -> str:
            return f"<span of the current phase: {self._span!r}>"

        @property
        def _span(self) -> Span:
            span = self._phase.span
            return INVALID_SPAN if span is None else span

        def end(self, end_time: int | None = None) -> None:
            self._span.end(end_time)

        def get_span_context(self) -> SpanContext:
            return self._span.get_span_context()

        def set_attributes(self, attributes: Mapping[str, AnyValue]) -> None:
            self._span.set_attributes(attributes)

        def set_attribute(self, key: str, value: AnyValue) -> None:
            self._span.set_attribute(key, value)

        def add_event(
            self, name: str, attributes: Attributes = None, timestamp: int | None = None
        ) -> None:
            self._span.add_event(name, attributes, timestamp)

        def add_link(self, context: SpanContext, attributes: Attributes = None) -> None:
            self._span.add_link(context, attributes)

        def update_name(self, name: str) -> None:
            self._span.update_name(name)

        def is_recording(self) -> bool:
            return self._span.is_recording()

        def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
            self._span.set_status(status, description)

        def record_exception(
            self,
            exception: BaseException,
            attributes: Attributes = None,
            timestamp: int | None = None,
            escaped: bool = False,
        ) -> None:
            self._span.record_exception(exception, attributes, timestamp, escaped)

    return PhaseSpan


class _TracingObserver(Observer):
    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer
        self.startup: Span | None = None
        self.shutdown: Span | None = None
        self.starts: dict[str, Span] = {}
        self.stops: dict[str, Span] = {}
        self.phases: dict[str, _Phase] = {}
        self.dependents: dict[str, list[str]] = {}
        # The stand-in of each service's phase span is made current in its host task while it
        # starts or stops.
        self.tokens: dict[str, Token[Context]] = {}
        self.every_health_run = False
        self.provider: TracerProvider | None = None  # None: the global one
        self.stopping_at = 0.0  # time.monotonic() when shutdown began

    # -- startup and shutdown ----------------------------------------------------------------

    def run_starting(self, lifecycle: Kernel) -> None:
        self.stopping_at = time.monotonic()  # until shutdown (or a rollback) begins
        self.starts.clear()
        self.stops.clear()
        self.phases.clear()
        self.shutdown = None
        self.startup = self.tracer.start_span(
            "lifecycle startup", attributes={"lifecycle.service.count": len(lifecycle.declared)}
        )

    def run_started(self, lifecycle: Kernel, error: BaseException | None) -> None:
        if self.startup is None:
            return
        if error is not None:
            _fail(self.startup, error)
        self.startup.end()
        self.startup = None
        if error is not None:  # rolled back: the process is likely to end
            self._flush(lifecycle.shutdown_timeout)

    def run_stopping(self, lifecycle: Kernel) -> None:
        from opentelemetry.trace import set_span_in_context

        self.stopping_at = time.monotonic()

        self.dependents = {name: [] for name in lifecycle.declared}
        for service in lifecycle.declared.values():
            for target in set(service.depends.values()):
                self.dependents.setdefault(target, []).append(service.name)
        # A rollback (startup still open) is part of the startup's trace.
        parent = set_span_in_context(self.startup) if self.startup is not None else None
        self.shutdown = self.tracer.start_span(
            "lifecycle shutdown" if parent is None else "lifecycle rollback", context=parent
        )

    def run_stopped(self, lifecycle: Kernel, errors: Mapping[str, BaseException]) -> None:
        from opentelemetry.trace import Status, StatusCode

        if self.shutdown is None:
            return
        if errors:
            self.shutdown.set_status(
                Status(StatusCode.ERROR, "cleanups failed: " + ", ".join(sorted(errors)))
            )
        self.shutdown.end()
        self.shutdown = None
        if self.startup is None:  # a rollback's is flushed once the startup span ends
            self._flush(lifecycle.shutdown_timeout)

    def _flush(self, shutdown_timeout: float | None) -> None:
        """Export the spans the provider's processors still hold, within the shutdown budget.

        The end of the lifespan is the last moment spans are sure to leave: uvicorn ends the
        process by raising SIGTERM again once the lifespan is done, so the batch processor's
        own flush at exit never runs. The flush blocks the event loop, which has nothing
        left to serve by then.
        """
        from opentelemetry import trace

        provider = self.provider if self.provider is not None else trace.get_tracer_provider()
        force_flush = getattr(provider, "force_flush", None)  # an SDK provider has it
        if not callable(force_flush):
            return
        if shutdown_timeout is None:
            budget = _FLUSH_TIMEOUT
        else:
            budget = shutdown_timeout - (time.monotonic() - self.stopping_at)
        if budget <= 0:
            _LOG.warning(
                "Spans still buffered by the tracer provider were not flushed: the "
                "shutdown_timeout of %ss was spent; they may be lost.",
                shutdown_timeout,
            )
            return
        try:
            flushed = force_flush(max(1, int(budget * 1000)))
        except Exception:
            _LOG.exception("Flushing the tracer provider's spans at shutdown failed.")
            return
        if flushed is False:
            _LOG.warning(
                "The tracer provider did not flush its spans within %.3fs (what was left of "
                "the shutdown budget); some may be lost.",
                budget,
            )

    # -- each service, in its host task ------------------------------------------------------

    def service_starting(self, service: Service[Any]) -> None:
        links = [
            self.starts[target].get_span_context()
            for target in dict.fromkeys(service.depends.values())
            if target in self.starts
        ]
        self.starts[service.name] = self._begin(service, "start", self.startup, links)

    def service_ready(self, service: Service[Any]) -> None:
        # In the service's own task, which runs on before the host task ends the start span.
        current = self.phases.get(service.name)
        if current is not None:
            current.span = None

    def service_started(self, service: Service[Any]) -> None:
        self._end(service, self.starts.get(service.name), None)

    def service_start_failed(self, service: Service[Any], error: BaseException) -> None:
        self._end(service, self.starts.get(service.name), error)

    def service_stopping(self, service: Service[Any]) -> None:
        links = [
            self.stops[name].get_span_context()
            for name in self.dependents.get(service.name, ())
            if name in self.stops
        ]
        self.stops[service.name] = self._begin(service, "stop", self.shutdown, links)

    def service_stopped(self, service: Service[Any], error: BaseException | None) -> None:
        self._end(service, self.stops.get(service.name), error)

    def _begin(
        self, service: Service[Any], phase: str, parent: Span | None, links: list[Any]
    ) -> Span:
        from opentelemetry import context
        from opentelemetry.trace import Link, set_span_in_context

        span = self.tracer.start_span(
            f"{phase} {service.name}",
            context=set_span_in_context(parent) if parent is not None else None,
            links=[Link(link) for link in links],
            attributes={
                "lifecycle.service.name": service.name,
                "lifecycle.service.internal": service.internal,
            },
        )
        current = self.phases.get(service.name)
        if current is None:
            current = self.phases[service.name] = _Phase()
        current.span = span
        self.tokens[service.name] = context.attach(set_span_in_context(current.stand_in))
        return span

    def _end(self, service: Service[Any], span: Span | None, error: BaseException | None) -> None:
        from opentelemetry import context

        current = self.phases.get(service.name)
        if current is not None:
            current.span = None  # in every task that copied the context too
        token = self.tokens.pop(service.name, None)
        if token is not None:
            context.detach(token)
        if span is None or not span.is_recording():
            return
        if error is not None:
            _fail(span, error)
        span.end()

    def _links_to_start(self, service: Service[Any]) -> list[Link]:
        """A link to the span of ``service``'s start in this run, if it was traced."""
        from opentelemetry.trace import Link

        start = self.starts.get(service.name)
        return [] if start is None else [Link(start.get_span_context())]

    # -- background work ---------------------------------------------------------------------

    def worker_pool(self, pool: WorkerPool[Any, Any]) -> JobObserver:
        return _TracedJobs(self.tracer, pool)

    def background_task(self, task: BackgroundTask) -> TaskObserver:
        links = self._links_to_start(task.service)
        return _TracedTask(
            self.tracer, f"restart {task.name}", {"lifecycle.task.name": task.name}, links
        )

    def periodic_job(self, job: PeriodicJob) -> TaskObserver:
        links = self._links_to_start(job.service)
        return _TracedRun(self.tracer, job, links)

    def health_check(self, check: HealthCheck) -> TaskObserver:
        links = self._links_to_start(check.service)
        return _TracedCheck(self.tracer, check, links, every_run=self.every_health_run)


class _TracedJobs(JobObserver):
    """A span around each job of one pool, in the submitter's context."""

    def __init__(self, tracer: Tracer, pool: WorkerPool[Any, Any]) -> None:
        self.tracer = tracer
        self.name = f"job {pool.name}"
        self.pool = pool.name
        self.job_timeout = pool.job_timeout
        # `started` and `wrap` are called for the same job with no await in between, so the
        # wait time of the job about to be wrapped is kept here.
        self.waited = 0.0

    def started(self, waited: float) -> None:
        self.waited = waited

    def wrap(self, payload: Any, job: Coroutine[Any, Any, R]) -> Coroutine[Any, Any, R]:
        # Called in the worker's task outside the job's own timeout scope: this deadline is
        # that of what runs the job (the pool's drain, the app's shutdown).
        around = anyio.current_effective_deadline()
        return self._traced(payload, job, self.waited, around)

    async def _traced(
        self, payload: Any, job: Coroutine[Any, Any, R], waited: float, around: float
    ) -> R:
        # This runs in the submitter's copied context: the current span is the submitter's.
        span = self.tracer.start_span(
            self.name,
            attributes={"lifecycle.pool.name": self.pool, "lifecycle.job.wait.duration": waited},
        )
        # Inside the job's timeout scope now: a nearer deadline than ``around`` is the job's.
        deadline = anyio.current_effective_deadline()

        def timed_out() -> TimeoutError | None:
            if deadline >= around or anyio.current_time() < deadline:
                return None  # cut off from around: the pool abandons it
            why = "its job_timeout" if self.job_timeout else "the deadline it inherited"
            return TimeoutError(
                f"Job {payload!r} of worker pool {self.pool!r} ran out of time ({why})."
            )

        with _current(span, timed_out):
            return await job


class _TracedTask(TaskObserver):
    """Spans of the restarts of a supervised task (or the runs of a periodic job or check).

    Each is the root of a trace of its own, linked to the start span of its service.
    """

    def __init__(
        self, tracer: Tracer, name: str, attributes: dict[str, Any], links: list[Link]
    ) -> None:
        self.tracer = tracer
        self.span_name = name
        self.attributes = attributes
        self.links = links

    def wrap(self, run: Awaitable[R]) -> Awaitable[R]:
        return self._traced(run)

    async def _traced(self, run: Awaitable[R]) -> R:
        span = self._start(self.attributes)
        with _current(span, self._timeout()):
            return await run

    def _timeout(self) -> Callable[[], TimeoutError | None] | None:
        """At the start of a run: what tells, if it is cancelled, whether its timeout cut it."""
        return None

    @contextlib.contextmanager
    def restarting(self, restart: int, delay: float, error: str | None) -> Iterator[object]:
        attributes = {
            **self.attributes,
            "lifecycle.restart.count": restart,
            "lifecycle.restart.backoff.duration": delay,
        }
        if error is not None:
            attributes["lifecycle.restart.cause"] = error
        with _current(self._start(attributes)) as span:
            yield span

    def _start(self, attributes: dict[str, Any]) -> Span:
        from opentelemetry.context import Context

        return self.tracer.start_span(
            self.span_name, context=Context(), links=self.links, attributes=attributes
        )


class _TracedRun(_TracedTask):
    """The runs of a periodic job, which its ``timeout`` may cut off."""

    def __init__(self, tracer: Tracer, job: PeriodicJob, links: list[Link]) -> None:
        super().__init__(
            tracer, f"periodic {job.name}", {"lifecycle.periodic.name": job.name}, links
        )
        self.job = job

    def _timeout(self) -> Callable[[], TimeoutError | None] | None:
        timeout = self.job.timeout
        if timeout is None:
            return None
        # A run is wrapped inside the scope of its timeout: this is its deadline (or a nearer
        # one around it, which only a stopping app sets, after the last run started).
        deadline = anyio.current_effective_deadline()
        name = self.job.name

        def timed_out() -> TimeoutError | None:
            if anyio.current_time() < deadline:
                return None
            return TimeoutError(f"Periodic job {name!r} timed out after {timeout}s.")

        return timed_out


class _TracedCheck(_TracedTask):
    """The runs of a health check, which its ``timeout`` may cut off."""

    def __init__(
        self, tracer: Tracer, check: HealthCheck, links: list[Link], *, every_run: bool
    ) -> None:
        super().__init__(
            tracer, f"health {check.name}", {"lifecycle.check.name": check.name}, links
        )
        self.check = check
        self.every_run = every_run
        self.failing: bool | None = None  # how the last run went; None before the first

    async def _traced(self, run: Awaitable[R]) -> R:
        if self.every_run:
            return await super()._traced(run)
        import time

        from opentelemetry.trace import (
            NonRecordingSpan,
            SpanContext,
            TraceFlags,
            set_span_in_context,
        )

        # Run under an unsampled parent, so that the spans of what the check calls are not
        # sampled either (a parent-based sampler follows it): a run that gets no span of its
        # own leaves no trace at all.
        unsampled = NonRecordingSpan(
            SpanContext(
                trace_id=random.getrandbits(128) or 1,
                span_id=random.getrandbits(64) or 1,
                is_remote=False,
                trace_flags=TraceFlags(TraceFlags.DEFAULT),
            )
        )
        from opentelemetry import context

        began = time.time_ns()
        timed_out = self._timeout()
        token = context.attach(set_span_in_context(unsampled))
        try:
            result = await run
        except BaseException as exc:
            context.detach(token)
            error: BaseException = exc
            if timed_out is not None and isinstance(exc, anyio.get_cancelled_exc_class()):
                error = timed_out() or exc
            span = self._start_at(began)
            _fail(span, error)
            span.end()
            self.failing = True
            raise
        context.detach(token)
        failed = _check_failed(result)
        if failed or self.failing is not False:  # a failure, a recovery, or the first run
            span = self._start_at(began)
            if failed:
                from opentelemetry.trace import Status, StatusCode

                span.set_status(Status(StatusCode.ERROR, "the check reported a failure"))
            span.end()
        self.failing = failed
        return result

    def _start_at(self, began: int) -> Span:
        from opentelemetry.context import Context

        return self.tracer.start_span(
            self.span_name,
            context=Context(),
            links=self.links,
            attributes=self.attributes,
            start_time=began,
        )

    def _timeout(self) -> Callable[[], TimeoutError | None] | None:
        # The check cancels a run at its timeout and counts the timeout at once, before the
        # run sees the cancellation; runs never overlap.
        check = self.check
        before = check.statistics().timeouts

        def timed_out() -> TimeoutError | None:
            if check.statistics().timeouts == before:
                return None
            return TimeoutError(
                f"Health check {check.name!r} did not answer within its timeout of "
                f"{check.timeout}s."
            )

        return timed_out


def _check_failed(result: object) -> bool:
    """Whether what a check's run returned reports a failure (``False``, a failing result)."""
    from ._health import CheckResult, HealthStatus

    if result is False:
        return True
    return isinstance(result, CheckResult) and result.status is HealthStatus.FAIL


@contextlib.contextmanager
def _current(
    span: Span, timed_out: Callable[[], TimeoutError | None] | None = None
) -> Iterator[Span]:
    """Make ``span`` current for the block; end it after, failed if the block raised.

    ``timed_out`` says, if the block is cancelled, whether that was its timeout, and with
    which `TimeoutError`.
    """
    from opentelemetry.trace import use_span

    try:
        with use_span(span, record_exception=False, set_status_on_exception=False):
            yield span
    except BaseException as exc:
        error: BaseException = exc
        if timed_out is not None and isinstance(exc, anyio.get_cancelled_exc_class()):
            error = timed_out() or exc
        _fail(span, error)
        raise
    finally:
        span.end()
