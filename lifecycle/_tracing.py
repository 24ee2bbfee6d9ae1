"""OpenTelemetry spans of a `Lifecycle`: startup, shutdown, restarts and background jobs.

Only the OpenTelemetry *API* is used (``pip install 'lifecycle[tracing]'``): spans go to
whatever tracer provider the application configures (an SDK with an exporter), and nowhere
when it configures none. The spans:

- ``lifecycle startup``, with a child ``start <service>`` per service, linked to the start
  spans of the services it depends on; ``lifecycle shutdown`` (or the rollback of a failed
  startup, a child of the startup span), with a child ``stop <service>`` per cleanup, linked to
  the stop spans of the services that depend on it. A service's own spans made while it
  starts (or cleans up) are children of its start (or stop) span.
- ``job <pool>`` around each worker pool job, in the context of the code that submitted it:
  a job submitted while handling a request is a child of the request's span.
- ``restart <task>`` over the backoff before each restart of a supervised task, and
  ``periodic <job>`` around each run of a periodic job, each the root of a trace of its own,
  linked to the start span of its service.

Failures set the span's status to ``ERROR`` and record the exception; cancellation sets
``ERROR`` with the description ``cancelled``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Coroutine, Iterator, Mapping
from contextvars import Token
from typing import TYPE_CHECKING, Any, TypeVar

from . import _deadline
from ._observe import (
    JobObserver,
    Observer,
    TaskObserver,
    attach,
    check_attachable,
    detach,
)

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer, TracerProvider

    from ._graph import Lifecycle, Service
    from ._health import HealthCheck
    from ._workers import BackgroundTask, PeriodicJob, WorkerPool

__all__ = ["TRACER_NAME", "LifecycleTracing", "instrument_tracing"]

R = TypeVar("R")

TRACER_NAME = "lifecycle"
"""The instrumentation scope name of every span this library makes."""

_INSTALL_HINT = "pip install 'lifecycle[tracing]'"


def instrument_tracing(
    lifecycle: Lifecycle, *, tracer_provider: TracerProvider | None = None
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
    tracer = trace.get_tracer(TRACER_NAME, _version(), tracer_provider=tracer_provider)
    tracing = LifecycleTracing(lifecycle, tracer)
    attach(lifecycle, tracing._observer)
    return tracing


def _version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("lifecycle")
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
        _deadline._observers.append(self._deadlines)

    def __repr__(self) -> str:
        return f"<LifecycleTracing of {self.lifecycle!r}>"

    def close(self) -> None:
        """Stop tracing the Lifecycle (from its next run, or next job, on)."""
        detach(self.lifecycle, self._observer)
        if self._deadlines in _deadline._observers:
            _deadline._observers.remove(self._deadlines)


class _DeadlineAttributes:
    """Puts a request's deadline on its span (the current one: a server instrumentation's)."""

    def request_started(self, budget: float, client_budget: float | None) -> None:
        from opentelemetry import trace

        span = trace.get_current_span()
        if span.is_recording():
            span.set_attribute("lifecycle.deadline.budget_ms", round(budget * 1000))
            if client_budget is not None:
                span.set_attribute(
                    "lifecycle.deadline.client_budget_ms", round(client_budget * 1000)
                )

    def request_finished(self, remaining: float, outcome: str) -> None:
        from opentelemetry import trace

        span = trace.get_current_span()
        if span.is_recording():
            span.set_attribute("lifecycle.deadline.remaining_ms", round(remaining * 1000))
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


def _root_linked_to_current() -> tuple[Context, list[Any]]:
    """An empty context (a new trace), and a link to the current span if there is one."""
    from opentelemetry.context import Context
    from opentelemetry.trace import Link, get_current_span

    current = get_current_span().get_span_context()
    return Context(), [Link(current)] if current.is_valid else []


class _TracingObserver(Observer):
    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer
        self.startup: Span | None = None
        self.shutdown: Span | None = None
        self.starts: dict[str, Span] = {}
        self.stops: dict[str, Span] = {}
        self.dependents: dict[str, list[str]] = {}
        # Each service's span is made current in its host task while it starts or stops.
        self.tokens: dict[str, Token[Context]] = {}

    # -- startup and shutdown ----------------------------------------------------------------

    def run_starting(self, lifecycle: Lifecycle) -> None:
        self.starts.clear()
        self.stops.clear()
        self.shutdown = None
        self.startup = self.tracer.start_span(
            "lifecycle startup", attributes={"lifecycle.services": len(lifecycle.declared)}
        )

    def run_started(self, lifecycle: Lifecycle, error: BaseException | None) -> None:
        if self.startup is None:
            return
        if error is not None:
            _fail(self.startup, error)
        self.startup.end()
        self.startup = None

    def run_stopping(self, lifecycle: Lifecycle) -> None:
        from opentelemetry.trace import set_span_in_context

        self.dependents = {name: [] for name in lifecycle.declared}
        for service in lifecycle.declared.values():
            for target in set(service.depends.values()):
                self.dependents.setdefault(target, []).append(service.name)
        # A rollback (startup still open) is part of the startup's trace.
        parent = set_span_in_context(self.startup) if self.startup is not None else None
        self.shutdown = self.tracer.start_span(
            "lifecycle shutdown" if parent is None else "lifecycle rollback", context=parent
        )

    def run_stopped(self, lifecycle: Lifecycle, errors: Mapping[str, BaseException]) -> None:
        from opentelemetry.trace import Status, StatusCode

        if self.shutdown is None:
            return
        if errors:
            self.shutdown.set_status(
                Status(StatusCode.ERROR, "cleanups failed: " + ", ".join(sorted(errors)))
            )
        self.shutdown.end()
        self.shutdown = None

    # -- each service, in its host task ------------------------------------------------------

    def service_starting(self, service: Service[Any]) -> None:
        links = [
            self.starts[target].get_span_context()
            for target in dict.fromkeys(service.depends.values())
            if target in self.starts
        ]
        self.starts[service.name] = self._begin(service, "start", self.startup, links)

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
            attributes={"lifecycle.service": service.name, "lifecycle.internal": service._internal},
        )
        self.tokens[service.name] = context.attach(set_span_in_context(span))
        return span

    def _end(self, service: Service[Any], span: Span | None, error: BaseException | None) -> None:
        from opentelemetry import context

        token = self.tokens.pop(service.name, None)
        if token is not None:
            context.detach(token)
        if span is None or not span.is_recording():
            return
        if error is not None:
            _fail(span, error)
        span.end()

    # -- background work ---------------------------------------------------------------------

    def worker_pool(self, pool: WorkerPool[Any, Any]) -> JobObserver:
        return _TracedJobs(self.tracer, pool.name)

    def background_task(self, task: BackgroundTask) -> TaskObserver:
        return _TracedTask(self.tracer, task.name, "restart", "lifecycle.task")

    def periodic_job(self, job: PeriodicJob) -> TaskObserver:
        return _TracedTask(self.tracer, job.name, "periodic", "lifecycle.job")

    def health_check(self, check: HealthCheck) -> TaskObserver:
        return _TracedTask(self.tracer, check.name, "health", "lifecycle.check")


class _TracedJobs(JobObserver):
    """A span around each job of one pool, in the submitter's context."""

    def __init__(self, tracer: Tracer, pool: str) -> None:
        self.tracer = tracer
        self.name = f"job {pool}"
        self.pool = pool
        # `started` and `wrap` are called for the same job with no await in between, so the
        # wait time of the job about to be wrapped is kept here.
        self.waited = 0.0

    def started(self, waited: float) -> None:
        self.waited = waited

    def wrap(self, payload: Any, job: Coroutine[Any, Any, R]) -> Coroutine[Any, Any, R]:
        return self._traced(job, self.waited)

    async def _traced(self, job: Coroutine[Any, Any, R], waited: float) -> R:
        # This runs in the submitter's copied context: the current span is the submitter's.
        span = self.tracer.start_span(
            self.name,
            attributes={"lifecycle.pool": self.pool, "lifecycle.job.wait_seconds": waited},
        )
        with _current(span):
            return await job


class _TracedTask(TaskObserver):
    """Spans of the runs of a periodic job, or the restarts of a supervised task."""

    def __init__(self, tracer: Tracer, name: str, what: str, attribute: str) -> None:
        self.tracer = tracer
        self.span_name = f"{what} {name}"
        self.attributes: dict[str, Any] = {attribute: name}

    def wrap(self, run: Awaitable[R]) -> Awaitable[R]:
        return self._traced(run)

    async def _traced(self, run: Awaitable[R]) -> R:
        root, links = _root_linked_to_current()
        span = self.tracer.start_span(
            self.span_name, context=root, links=links, attributes=self.attributes
        )
        with _current(span):
            return await run

    @contextlib.contextmanager
    def restarting(self, restart: int, delay: float, error: str | None) -> Iterator[object]:
        root, links = _root_linked_to_current()
        attributes = {
            **self.attributes,
            "lifecycle.restart": restart,
            "lifecycle.backoff_seconds": delay,
        }
        if error is not None:
            attributes["lifecycle.error"] = error
        span = self.tracer.start_span(
            self.span_name, context=root, links=links, attributes=attributes
        )
        with _current(span):
            yield span


@contextlib.contextmanager
def _current(span: Span) -> Iterator[Span]:
    """Make ``span`` current for the block; end it after, failed if the block raised."""
    from opentelemetry.trace import use_span

    try:
        with use_span(span, record_exception=False, set_status_on_exception=False):
            yield span
    except BaseException as exc:
        _fail(span, exc)
        raise
    finally:
        span.end()
