"""The kernel: services, their plan, the run, and the observers that watch it.

The kernel knows services and nothing else. A `Kernel` holds service declarations;
`Kernel.run` validates the graph, then starts every service in its own *host* task inside one
task group through ``TaskGroup.start``: a service starts the moment the services it depends
on are running, and independent services start concurrently. Each host drives its service
from start to cleanup in the same task (so a service may hold cancel scopes or task groups
across its ``yield``), and waits, shielded, until shutdown asks it to stop; it then waits for
every service that depends on it to finish stopping before it runs its own cleanup. Shutdown
therefore runs in reverse dependency order, with independent cleanups running concurrently,
each under ``CancelScope(shield=True)`` and its own deadline.

Extensions (worker pools, health, the drain) are built on one seam, all of it public on
`Kernel`: `Kernel.declare` with ``internal=True`` declares a service of theirs,
`Kernel.observers` watches runs (an `Observer` that raises is logged and detached, never
failing a service), `Kernel.crashed` names the services that crashed while running, and
`Kernel.hooks` is where the test kit injects faults. `parameters` is the one parser of a
function's parameters into the services they receive, for every kind of declaration. The
`lifecycle.Lifecycle` facade, which users see, composes the extensions on top.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import enum
import inspect
import logging
import math
import signal
import sys
import textwrap
import time
import types
import warnings
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, cast, overload

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup, TaskStatus

from ._signals import SignalHold
from ._timeline import LifecycleState, ServiceState, Timeline, TimelineEntry
from ._validate import describe, seconds
from .exceptions import GraphError, ServiceNotRunning, ShutdownError, StartupError

__all__ = [
    "TASK_STATUS",
    "Hooks",
    "Kernel",
    "Observer",
    "Observers",
    "Service",
    "ServiceForm",
    "Services",
    "parameters",
]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
AppT = TypeVar("AppT")

logger = logging.getLogger("lifecycle.services")

TASK_STATUS = "task_status"
"""The keyword through which a long-running service reports that it started."""


class ServiceForm(enum.Enum):
    """The two kinds of service function."""

    GENERATOR = "async generator"  # yields its value once; code after the yield is cleanup
    TASK = "long-running task"  # calls task_status.started(value); cancelled at stop


@dataclass(frozen=True, eq=False)
class Service(Generic[T_co]):
    """A declared service: what `Lifecycle.service` returns.

    Pass it to ``depends=`` of another service, to `Lifecycle.get`, or to
    `lifecycle.fastapi.provide`; its type parameter is the type of the value it starts with.

    Attributes:
        name: The service's name, unique within its `Lifecycle`.
        fn: The function that runs the service.
        lifecycle: The `Lifecycle` it is declared on.
        depends: Each parameter of ``fn`` mapped to the name of the service whose value it
            receives.
        start_timeout: Seconds its start may take, or ``None`` for no limit of its own.
        stop_timeout: Seconds its cleanup may take, or ``None`` for no limit of its own.
        health: What ``health=`` of `Lifecycle.service` was given (a check function or a
            `lifecycle.CheckSpec`), or ``None``; the kernel only keeps it.
        internal: Declared by an extension (a worker pool, a health checker): it runs in
            the graph like any service but is left out of the values handed to the app.
        kind: What declared it: ``"service"`` (`Lifecycle.service`), ``"worker"``,
            ``"background"``, ``"periodic"``, ``"health check"`` (the user's own
            declarations through the other decorators), or ``"lifecycle"`` (lifecycle's own
            machinery: the event-loop watchdog, the drain's signal handlers).
    """

    name: str
    fn: Callable[..., Any] = field(repr=False)
    lifecycle: Kernel = field(repr=False)
    depends: Mapping[str, str]
    start_timeout: float | None
    stop_timeout: float | None
    form: ServiceForm = field(repr=False)
    health: object | None = field(default=None, repr=False)
    internal: bool = field(default=False, repr=False)
    kind: str = field(default="service", repr=False)
    check: Callable[[Mapping[str, Service[Any]]], None] | None = field(default=None, repr=False)


class Hooks(Protocol):
    """Fault injection points, set as `Kernel.hooks` by `lifecycle.testing.inject_faults`."""

    async def before_start(self, service: str) -> None:
        """Awaited in the service's host task just before its function is called."""

    async def after_stop(self, service: str) -> None:
        """Awaited in the service's host task just after its cleanup ran cleanly."""


class Services(Mapping[str, Any]):
    """The started services' values, by name: what ``async with lc.run()`` yields.

    Index it with a name (``services["db"]``) or, keeping the value's type, with the
    `Service` itself (``services[db]``).
    """

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)

    @overload
    def __getitem__(self, key: Service[T]) -> T: ...

    @overload
    def __getitem__(self, key: str) -> Any: ...

    def __getitem__(self, key: Service[Any] | str) -> Any:
        name = key.name if isinstance(key, Service) else key
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Services({sorted(self._values)!r})"


# -- observers ----------------------------------------------------------------------------


class Observer:
    """Watches the runs of a `Kernel`; every method is a no-op unless overridden.

    Each service's ``service_*`` calls but `service_ready` happen in that service's host task,
    so an observer may set context variables in ``service_starting`` and reset them in
    ``service_started`` or ``service_start_failed`` (likewise from ``service_stopping`` to
    ``service_stopped``). Tasks the service spawns meanwhile copy those variables and keep
    them after the host task resets its own.

    Extensions ask observers for more through `Observers.collect`: an observer that also has
    a method named as the extension asks (``worker_pool``, ``health_check``...) is asked.
    """

    def run_starting(self, kernel: Kernel) -> None:
        """Startup begins (the graph is valid)."""

    def run_started(self, kernel: Kernel, error: BaseException | None) -> None:
        """Startup ended: every service runs (``error`` is ``None``) or it was rolled back."""

    def run_stopping(self, kernel: Kernel) -> None:
        """Shutdown (or a startup's rollback) begins."""

    def run_stopped(self, kernel: Kernel, errors: Mapping[str, BaseException]) -> None:
        """Shutdown ended; ``errors`` holds the cleanups that failed, by service."""

    def service_starting(self, service: Service[Any]) -> None:
        """A service's start begins (its dependencies are running)."""

    def service_ready(self, service: Service[Any]) -> None:
        """A long-running service called ``task_status.started()``, in the task it called it in.

        Its host task calls `service_started` only once it resumes, while the service's own
        task runs on meanwhile: this is the first moment the service is known to run.
        """

    def service_started(self, service: Service[Any]) -> None:
        """A service started and is running."""

    def service_start_failed(self, service: Service[Any], error: BaseException) -> None:
        """A service's start raised, timed out or was cancelled."""

    def service_stopping(self, service: Service[Any]) -> None:
        """A service's cleanup begins."""

    def service_stopped(self, service: Service[Any], error: BaseException | None) -> None:
        """A service's cleanup ended, cleanly (``error`` is ``None``) or not."""


_observer_logger = logging.getLogger("lifecycle.observers")


class Observers:
    """The observers attached to one `Kernel`, called in the order they were attached.

    Observers are instruments: one that raises is logged with its traceback and detached, and
    the service it was watching goes on as if it had not been watched. With none attached,
    each place that would call them costs one truth test (``if kernel.observers:``).
    """

    def __init__(self) -> None:
        self._attached: list[Any] = []

    def __bool__(self) -> bool:
        return bool(self._attached)

    def __iter__(self) -> Iterator[Any]:
        return iter(tuple(self._attached))

    def __contains__(self, observer: object) -> bool:
        return any(o is observer for o in self._attached)

    def __repr__(self) -> str:
        return f"<Observers {self._attached!r}>"

    def add(self, observer: Any) -> None:
        """Attach ``observer``, after those attached already.

        Raises:
            ValueError: It is attached already.
        """
        if observer in self:
            raise ValueError(f"{observer!r} is already attached; attach an observer once.")
        self._attached.append(observer)

    def remove(self, observer: Any) -> None:
        """Detach ``observer`` (nothing happens if it is not attached)."""
        self._attached = [o for o in self._attached if o is not observer]

    def call(self, hook: str, /, *args: Any) -> None:
        """Call method ``hook`` of every observer that has it, isolating each from the others."""
        for observer in tuple(self._attached):
            method = getattr(observer, hook, None)
            if method is None:
                continue
            try:
                method(*args)
            except Exception as exc:
                self.failed(observer, hook, exc)

    def collect(self, hook: str, /, *args: Any) -> list[Any]:
        """Call ``hook`` like `call`, and return what the calls returned, ``None`` left out.

        This is how an extension asks each observer for a per-component observer (a worker
        pool asks ``worker_pool(pool)``).
        """
        found = []
        for observer in tuple(self._attached):
            method = getattr(observer, hook, None)
            if method is None:
                continue
            try:
                result = method(*args)
            except Exception as exc:
                self.failed(observer, hook, exc)
            else:
                if result is not None:
                    found.append(result)
        return found

    def failed(self, observer: Any, hook: str, exc: Exception) -> None:
        """Log that ``observer`` raised from ``hook`` and detach it (idempotent)."""
        attached = observer in self
        self.remove(observer)
        _observer_logger.error(
            "Observer %r raised %s from %s()%s; what it watched goes on unobserved.",
            observer,
            describe(exc),
            hook,
            "; it is detached" if attached else "",
            exc_info=exc,
            extra={"phase": "observe"},
        )


# -- the kernel -----------------------------------------------------------------------------


_NO_APP: Any = object()  # lifespan() called without the app: a mistake with a message


class Kernel:
    """Declares services and governs their life: start, run, stop.

    `lifecycle.Lifecycle` is the kernel with the extensions composed on top; use that. The
    kernel's own public names beyond the documented `Lifecycle` API are its seam to
    extensions: `declare`, `observers`, `crashed` and `hooks`.

    Args:
        startup_timeout: Seconds all of startup may take, or ``None`` for no limit.
        shutdown_timeout: Seconds all of shutdown (or a rollback) may take, or ``None`` for no
            limit. Every cleanup's own deadline is cut to fit in it.
    """

    def __init__(
        self,
        *,
        startup_timeout: float | None = 30.0,
        shutdown_timeout: float | None = 30.0,
    ) -> None:
        self.startup_timeout = seconds("startup_timeout", startup_timeout, optional=True)
        self.shutdown_timeout = seconds("shutdown_timeout", shutdown_timeout, optional=True)
        self._services: dict[str, Service[Any]] = {}
        self._state = LifecycleState.IDLE
        self._run: _Run | None = None
        self._graph_error: GraphError | None = None  # of the last run, refused unstarted
        self._state_changed: anyio.Event | None = None
        self.hooks: Hooks | None = None
        """Fault injection (`lifecycle.testing.inject_faults` sets it); ``None`` otherwise."""
        self.observers = Observers()
        """What watches this kernel's runs: metrics, tracing, extensions' bookkeeping."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._state.value} services={list(self._services)!r}>"

    # -- declaring (the seam) -------------------------------------------------------------

    def declare(
        self,
        fn: Callable[..., Any],
        /,
        *,
        name: str | None = None,
        depends: Mapping[str, Service[Any] | str] | None = None,
        start_timeout: float | None = None,
        stop_timeout: float | None = None,
        health: object | None = None,
        internal: bool = False,
        kind: str = "service",
        check: Callable[[Mapping[str, Service[Any]]], None] | None = None,
    ) -> Service[Any]:
        """Declare the service ``fn`` runs; `Lifecycle.service` is the decorator over this.

        Extensions declare their own services with ``internal=True``: those run in the graph
        like any other, but are left out of the values handed to the app. An extension's
        ``check`` is called with every declared service when the graph is validated, before
        anything starts, and raises `GraphError` to refuse the graph with a message of its
        own (a worker pool says "put the job parameter first").

        Raises:
            GraphError: The name is taken, or the parameters cannot be wired.
            TypeError: ``fn`` is neither of the two supported kinds of function.
            ValueError: A timeout is not a positive number of seconds.
            RuntimeError: The kernel is running.
        """
        start_timeout = seconds("start_timeout", start_timeout, optional=True)
        stop_timeout = seconds("stop_timeout", stop_timeout, optional=True)
        name, form = _service_form(fn, name, kind)
        service: Service[Any] = Service(
            name=name,
            fn=fn,
            lifecycle=self,
            depends=parameters(self, fn, kind="Service", name=name, depends=depends),
            start_timeout=start_timeout,
            stop_timeout=stop_timeout,
            form=form,
            health=health,
            internal=internal,
            kind=kind,
            check=check,
        )
        if self._state in _ACTIVE:
            raise RuntimeError(
                f"Cannot declare {service.name!r} while the Lifecycle is {self._state.value}; "
                f"declare every service before it starts."
            )
        if service.name in self._services:
            raise GraphError(
                f"A service named {service.name!r} is already declared on this Lifecycle; "
                f"give one of them another name with @lc.service(name=...)."
            )
        self._services[service.name] = service
        return service

    def crashed(self) -> dict[str, BaseException]:
        """The services of the current run that crashed while running, with their errors."""
        if self._run is None:
            return {}
        return {
            name: record.crash
            for name, record in self._run.records.items()
            if record.crash is not None
        }

    # -- validating -----------------------------------------------------------------------

    def validate(self) -> None:
        """Check the graph without starting anything.

        `run` does this first; call it yourself to fail fast (in a test, say).

        Raises:
            GraphError: A dependency is unknown or the graph has a cycle.
        """
        _plan(self._services)

    # -- running --------------------------------------------------------------------------

    @asynccontextmanager
    async def run(self) -> AsyncIterator[Services]:
        """Start every service, yield their values, and stop them all on exit.

        Startup either completes or rolls back: when a start fails or times out, the services
        that had started are stopped again in reverse dependency order and `StartupError` is
        raised; when startup is cancelled from outside, they are stopped the same way and the
        cancellation propagates. On exit every started service is stopped, even when the
        body raised or was cancelled.

        Yields:
            The started services' values (`Services`).

        Raises:
            GraphError: The graph is invalid; nothing was started.
            StartupError: A start failed or timed out; what had started was rolled back.
            ShutdownError: A cleanup failed or timed out (raised after every cleanup ran).
            RuntimeError: This Lifecycle is already running.
        """
        try:
            plan = _plan(self._services)
        except GraphError as exc:
            # Nothing starts; a task waiting in wait_started() learns why.
            self._graph_error = exc
            self._set_state(self._state)
            raise
        self._graph_error = None
        _show_logs_by_default()
        self._begin_run()
        run = _Run(self, plan)
        self._run = run
        # Errors, KeyboardInterrupt and SystemExit included, are raised after the task group
        # has exited (every host has finished by then), so that they reach the caller as
        # themselves rather than wrapped in the task group's exception group. Cancellation
        # passes through the task group untouched.
        cancelled = anyio.get_cancelled_exc_class()
        error: BaseException | None = None
        hosts = _HostGroup()
        try:
            try:
                task_group = await hosts.open()
                try:
                    await run.start(task_group)
                except cancelled:
                    raise
                except BaseException as exc:
                    error = _unwrap(exc)
                    if isinstance(error, cancelled):
                        raise
                else:
                    self._set_state(LifecycleState.RUNNING)
                    # A running service raising SystemExit, KeyboardInterrupt or another
                    # BaseException cancels this scope (see `_Run.fatal`): the body ends at
                    # once, everything stops, and that exception is raised.
                    with anyio.CancelScope() as body:
                        run.body = body
                        if run.fatal is not None:
                            body.cancel()
                        try:
                            yield Services(run.values)
                        except BaseException as exc:
                            self._set_state(LifecycleState.STOPPING)
                            errors = await run.stop()
                            if errors:
                                # The body's exception wins; the cleanup failures were
                                # logged one by one and are summarised on it.
                                exc.add_note(_shutdown_error(errors, run).args[0])
                            if isinstance(exc, cancelled):
                                raise
                            error = exc
                        else:
                            self._set_state(LifecycleState.STOPPING)
                            errors = await run.stop()
                            if errors:
                                error = _shutdown_error(errors, run)
            finally:
                # Every host has finished by now, but those that shutdown had to abandon.
                hosts_error = await hosts.close(run.abandon_at)
                if hosts_error is not None and error is None:
                    error = hosts_error
                if run.fatal is not None:
                    raise run.fatal  # wins over everything, a cancellation included
        finally:
            self._set_state(LifecycleState.STOPPED if run.started_ok else LifecycleState.FAILED)
        if error is not None:
            raise error

    def lifespan(self, app: object = _NO_APP) -> AbstractAsyncContextManager[dict[str, Any]]:
        """The ASGI lifespan: ``Starlette(lifespan=lc.lifespan)``, ``FastAPI(lifespan=...)``.

        Yields the lifespan state ``{service name: value}``, so ``request.state.<name>`` works
        in handlers.

        Args:
            app: The application (unused; part of Starlette's lifespan signature).

        Returns:
            An async context manager running the services for the app's lifetime.

        Raises:
            TypeError: It was called without the app: ``lifespan=lc.lifespan()`` instead of
                ``lifespan=lc.lifespan``.
        """
        if app is _NO_APP:
            raise TypeError(
                "lc.lifespan was called without the app; pass the method itself, uncalled: "
                "FastAPI(lifespan=lc.lifespan), not lifespan=lc.lifespan(). To run the "
                "services outside an app, use `async with lc.run():`."
            )
        return self._lifespan()

    @asynccontextmanager
    async def _lifespan(self) -> AsyncIterator[dict[str, Any]]:
        async with self.run() as services:
            yield dict(services)

    def wrap_lifespan(
        self,
        lifespan: Callable[[AppT], AbstractAsyncContextManager[Mapping[str, Any] | None]],
    ) -> Callable[[AppT], AbstractAsyncContextManager[dict[str, Any]]]:
        """Compose an existing lifespan with this Lifecycle.

        The services start first, then ``lifespan`` runs inside them (so it can use
        `get`); on the way out it ends before the services stop. The state it yields is
        merged into the services' lifespan state.

        Args:
            lifespan: A Starlette-style lifespan: ``lifespan(app)`` returning an async context
                manager that yields a state mapping or ``None``.

        Returns:
            A lifespan to pass to ``Starlette(lifespan=...)`` or ``FastAPI(lifespan=...)``.
        """

        @asynccontextmanager
        async def combined(app: AppT) -> AsyncIterator[dict[str, Any]]:
            async with self.run() as services, lifespan(app) as extra:
                state = dict(services)
                for key in extra or {}:
                    if key in state:
                        raise GraphError(
                            f"The wrapped lifespan yields state {key!r}, which is also a "
                            f"service name; rename one of them."
                        )
                state.update(extra or {})
                yield state

        return combined

    async def wait_started(self) -> Services:
        """Wait until the current (or next) run has started every service.

        Returns:
            The started services' values.

        Raises:
            StartupError: Startup failed (the run's own error is re-raised).
            GraphError: The run was refused because the graph is invalid.
            RuntimeError: The run ended before startup completed.
        """
        finished = (LifecycleState.FAILED, LifecycleState.STOPPED)
        # A run that had already ended when we were called is not the one we wait for.
        stale = self._run if self._state in finished else None
        stale_graph_error = self._graph_error
        while True:
            if self._graph_error is not None and self._graph_error is not stale_graph_error:
                raise self._graph_error
            run = self._run
            if run is not None and run is not stale:
                if self._state is LifecycleState.RUNNING:
                    return Services(run.values)
                if self._state is LifecycleState.FAILED:
                    raise run.error or RuntimeError(
                        "The Lifecycle's startup was cancelled before it completed."
                    )
                if self._state is not LifecycleState.STARTING:
                    raise RuntimeError(
                        f"The Lifecycle is already {self._state.value}; wait_started() "
                        f"missed the time it was running."
                    )
            if self._state_changed is None:
                self._state_changed = anyio.Event()
            await self._state_changed.wait()

    # -- inspecting -----------------------------------------------------------------------

    @property
    def state(self) -> LifecycleState:
        """Where the whole Lifecycle is: idle, starting, running, stopping, stopped, failed."""
        return self._state

    @property
    def declared(self) -> Mapping[str, Service[Any]]:
        """The declared services, by name, in declaration order."""
        return dict(self._services)

    def service_state(self, service: Service[Any] | str) -> ServiceState:
        """The state of one service in the current or last run (``PENDING`` before any run).

        Raises:
            LookupError: No such service is declared.
        """
        name = self._name_of(service)
        record = None if self._run is None else self._run.records.get(name)
        return ServiceState.PENDING if record is None else record.state

    @overload
    def get(self, service: Service[T]) -> T: ...

    @overload
    def get(self, service: str) -> Any: ...

    def get(self, service: Service[Any] | str) -> Any:
        """The started value of a running service.

        Raises:
            ServiceNotRunning: The service is not running (the app's lifespan has not started
                it, or it has stopped).
            LookupError: No such service is declared.
        """
        name = self._name_of(service)
        record = None if self._run is None else self._run.records.get(name)
        if record is None or record.state is not ServiceState.RUNNING:
            state = "never run" if record is None else record.state.value
            raise ServiceNotRunning(
                f"Service {name!r} is not running (it is {state}); its value exists only while "
                f"the Lifecycle runs: pass lifespan=lc.lifespan to the app, or use "
                f"`async with lc.run()`.",
                never_started=self._state is LifecycleState.IDLE,
            )
        return record.value

    def timeline(self) -> Timeline:
        """The start/stop timeline of the current or last run (empty before any run)."""
        if self._run is None:
            return Timeline(
                tuple(TimelineEntry(name, ServiceState.PENDING) for name in self._services)
            )
        return self._run.timeline()

    # -- internals ------------------------------------------------------------------------

    def _name_of(self, service: Service[Any] | str) -> str:
        if isinstance(service, Service):
            if self._services.get(service.name) is not service:
                raise LookupError(f"{service!r} is declared on another Lifecycle.")
            return service.name
        if service not in self._services:
            raise LookupError(
                f"No service named {service!r} is declared{_suggest(service, self._services)}."
            )
        return service

    def _begin_run(self) -> None:
        if self._state in _ACTIVE:
            raise RuntimeError(
                f"This Lifecycle is already {self._state.value}; a Lifecycle runs one lifespan "
                f"at a time. Use one Lifecycle per app, or wait for the running one to stop."
            )
        self._set_state(LifecycleState.STARTING)

    def _set_state(self, state: LifecycleState) -> None:
        if state is not self._state and state not in _RUN_MOVES[self._state]:
            raise RuntimeError(
                f"A Lifecycle that is {self._state.value} cannot become {state.value}: "
                f"{_RUN_MOVES_WHY[state]}"
            )
        self._state = state
        event, self._state_changed = self._state_changed, None
        if event is not None:
            # An event left by a waiter of an earlier run on an event loop that has since
            # closed cannot be set (nor can that waiter be woken): forget it.
            with contextlib.suppress(RuntimeError):
                event.set()


# -- declaration and validation -----------------------------------------------------------

_ACTIVE = (LifecycleState.STARTING, LifecycleState.RUNNING, LifecycleState.STOPPING)

# The run's state machine: from each state, the states it may move to.
_RUN_MOVES: dict[LifecycleState, set[LifecycleState]] = {
    LifecycleState.IDLE: {LifecycleState.STARTING},
    LifecycleState.STARTING: {LifecycleState.RUNNING, LifecycleState.FAILED},
    LifecycleState.RUNNING: {LifecycleState.STOPPING},
    LifecycleState.STOPPING: {LifecycleState.STOPPED, LifecycleState.FAILED},
    LifecycleState.STOPPED: {LifecycleState.STARTING},
    LifecycleState.FAILED: {LifecycleState.STARTING},
}
_RUN_MOVES_WHY = {
    LifecycleState.IDLE: "a Lifecycle is idle only before its first run.",
    LifecycleState.STARTING: "a run starts only once the previous one has ended.",
    LifecycleState.RUNNING: "only a starting run can become running.",
    LifecycleState.STOPPING: "only a running Lifecycle stops.",
    LifecycleState.STOPPED: "a run ends only from stopping.",
    LifecycleState.FAILED: "a run fails only while it starts or stops.",
}


def _service_form(
    fn: Callable[..., Any], name: str | None, kind: str = "service"
) -> tuple[str, ServiceForm]:
    """The name of the service ``fn`` runs, and which of the two kinds of function it is."""
    if not callable(fn):
        raise TypeError(f"@lc.service decorates a function, not {fn!r}.")
    name = name if name is not None else getattr(fn, "__name__", None)
    if not isinstance(name, str) or not name:
        raise TypeError(
            f"Cannot name the service {fn!r}; pass a non-empty string with @lc.service(name=...)."
        )
    wrapped = getattr(fn, "__wrapped__", None)
    if (
        not inspect.isasyncgenfunction(fn)
        and wrapped is not None
        and inspect.isasyncgenfunction(wrapped)
    ):
        raise TypeError(
            f"Service {name!r} is wrapped by a decorator such as @asynccontextmanager; "
            f"remove it: @lc.service takes the async generator itself (lifecycle runs it as "
            f"a context manager: code before the yield starts it, code after cleans up)."
        )
    takes_status = TASK_STATUS in _signature(fn, "Service", name).parameters
    if inspect.isgeneratorfunction(fn):
        raise TypeError(
            f"Service {name!r} is a plain generator (def ... yield); make it `async def`, "
            f"so that its start and cleanup can await."
        )
    if inspect.isasyncgenfunction(fn):
        if takes_status:
            raise TypeError(
                f"Service {name!r} is an async generator and also takes task_status; use one "
                f"form: yield the value once, or take task_status and call "
                f"task_status.started(value)."
            )
        if kind == "service" and _yields_in_a_loop(fn):
            warnings.warn(
                f"Service {name!r} yields inside a loop, but a service yields exactly once "
                f"(its value; the code after the yield is its cleanup). For a service that "
                f"keeps working, take task_status, call task_status.started(value), then loop.",
                stacklevel=_user_frame(),
            )
        return name, ServiceForm.GENERATOR
    if inspect.iscoroutinefunction(fn):
        if takes_status:
            return name, ServiceForm.TASK
        raise TypeError(
            f"Service {name!r} is an async function without task_status; make it an async "
            f"generator that yields its value once (cleanup after the yield), or give it a "
            f"keyword parameter task_status and call task_status.started(value) when ready."
        )
    if inspect.isfunction(fn) or inspect.ismethod(fn):
        raise TypeError(
            f"Service {name!r} is a plain function; make it an async generator that yields "
            f"its value once (`async def {name}(...): ... yield value`), or an async "
            f"function taking task_status that calls task_status.started(value)."
        )
    raise TypeError(
        f"Service {name!r} must be an async generator function (yield the value once) or "
        f"an async function taking task_status, not {type(fn).__name__} {fn!r}."
    )


def _show_logs_by_default() -> None:
    """Make lifecycle's INFO lines visible when nothing configured logging at all.

    Under a plain ``uvicorn module:app`` no one configures the root logger (uvicorn sets up
    only its own loggers), so the startup summary and the drain's lines would go nowhere.
    Then, and only then, the ``lifecycle`` logger gets a handler of its own, writing to
    stderr; the root logger is left alone. It steps aside as soon as the root logger has a
    handler (the app configured logging after all), and it is never added when the
    ``lifecycle`` logger already has one: add ``logging.NullHandler()`` to it to turn this off.
    """
    package = logging.getLogger("lifecycle")
    if package.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.set_name("lifecycle: shown by default")
    handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s: %(message)s"))
    handler.addFilter(lambda record: not logging.getLogger().handlers)
    package.addHandler(handler)
    if package.level == logging.NOTSET:
        package.setLevel(logging.INFO)


def _user_frame() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside lifecycle."""
    level = 2  # level 1 is the warning's own caller
    frame: types.FrameType | None = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module != "lifecycle" and not module.startswith("lifecycle."):
            break
        level, frame = level + 1, frame.f_back
    return level


def _not_ready(record: _Record) -> str:
    """A hint for a start that timed out: what the service has not done yet."""
    if record.service.form is ServiceForm.TASK and not record.reported:
        return (
            " It has not called task_status.started() yet: a long-running service must "
            "call it once it is ready, then go on running until it is cancelled."
        )
    if record.service.form is ServiceForm.GENERATOR:
        return " It has not yielded its value yet."
    return ""


def _yields_in_a_loop(fn: Callable[..., Any]) -> bool:
    """Whether ``fn``'s own body yields inside a loop (a service must yield exactly once)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return False  # no source to read (a lambda, the REPL): the shutdown check remains
    function = next((n for n in ast.walk(tree) if isinstance(n, ast.AsyncFunctionDef)), None)
    if function is None:
        return False

    def visit(node: ast.AST, in_loop: bool) -> bool:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue  # a nested function's yields are its own
            looping = in_loop or isinstance(child, ast.For | ast.AsyncFor | ast.While)
            if isinstance(child, ast.Yield | ast.YieldFrom) and in_loop:
                return True
            if visit(child, looping):
                return True
        return False

    return visit(function, False)


def _signature(fn: Callable[..., Any], kind: str, name: str) -> inspect.Signature:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"Cannot read the parameters of {kind.lower()} {name!r}: {exc}") from None


def parameters(
    kernel: Kernel,
    fn: Callable[..., Any],
    *,
    kind: str,
    name: str,
    depends: Mapping[str, Service[Any] | str] | None = None,
    job: bool = False,
) -> dict[str, str]:
    """Map each parameter of ``fn`` to the name of the service whose value it receives.

    The one parser of parameters for every declaration (services, worker handlers, checks,
    supervised tasks, periodic jobs), so that each mistake gets the same error everywhere.
    Each parameter is named after its service unless ``depends`` maps it to another one.

    Args:
        kernel: Where the services are declared (a `Service` in ``depends`` must be its).
        fn: The declared function.
        kind: What ``fn`` is, for messages: ``"Service"``, ``"Worker handler"``...
        name: The declaration's name, for messages.
        depends: Parameter names mapped to the `Service` (or service name) they receive.
        job: The first parameter is the job (a worker handler's), not a service.

    Raises:
        GraphError: A parameter cannot receive a service (``*args``, ``**kwargs``,
            positional-only), or ``depends`` names a parameter ``fn`` does not have.
        TypeError: ``depends`` maps to something that is not a service, or the parameters
            cannot be read.
    """
    qualname = getattr(fn, "__qualname__", fn)
    listed = list(_signature(fn, kind, name).parameters.values())
    if job:
        if not listed or listed[0].kind not in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            raise GraphError(
                f"The {kind.lower()} {qualname!r} must take the job as its first positional "
                f"parameter; its other parameters are services."
            )
        listed = listed[1:]
    params: dict[str, str] = {}
    for param in listed:
        if param.name == TASK_STATUS:
            if kind == "Service":
                continue  # the long-running form's; see _service_form
            raise GraphError(
                f"{kind} {name!r} takes task_status, which only a long-running service "
                f"takes (to report that it started); remove the parameter."
            )
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            stars = "*" if param.kind is param.VAR_POSITIONAL else "**"
            raise GraphError(
                f"{kind} {name!r} takes {stars}{param.name}; every parameter must name one "
                f"service, so remove it."
            )
        if param.kind is param.POSITIONAL_ONLY:
            raise GraphError(
                f"{kind} {name!r} takes {param.name!r} as positional-only; services are "
                f"passed by keyword, so remove the '/'."
            )
        params[param.name] = param.name

    for key, target in (depends or {}).items():
        if key not in params:
            raise GraphError(
                f"{kind} {name!r} maps depends={{{key!r}: ...}}, but {key!r} is not a "
                f"parameter of {qualname!r}; its parameters are {sorted(params)!r}"
                f"{_suggest(key, params)}."
            )
        if isinstance(target, Service):
            if target.lifecycle is not kernel:
                raise GraphError(
                    f"{kind} {name!r} depends on {target!r}, which is declared on another "
                    f"Lifecycle; declare both on the same one."
                )
            params[key] = target.name
        elif isinstance(target, str):
            params[key] = target
        else:
            raise TypeError(
                f"depends={{{key!r}: {target!r}}} of {kind.lower()} {name!r} must map to a "
                f"Service or a service name."
            )
    return params


@dataclass(frozen=True)
class _Plan:
    services: dict[str, Service[Any]]
    dependents: dict[str, list[str]]  # name -> services that depend on it


def _plan(services: Mapping[str, Service[Any]]) -> _Plan:
    """Validate the graph: every extension's own check, every dependency known, no cycle."""
    for service in services.values():
        if service.check is not None:
            service.check(services)
    dependents: dict[str, list[str]] = {name: [] for name in services}
    for service in services.values():
        for param, target in service.depends.items():
            if target not in services:
                via = "" if param == target else f" (parameter {param!r})"
                raise GraphError(
                    f"Service {service.name!r} depends on unknown service {target!r}{via}"
                    f"{_suggest(target, services)}; declare a service named {target!r}, or map "
                    f"the parameter to an existing one with depends={{{param!r}: <service>}}."
                )
            if service.name not in dependents[target]:
                dependents[target].append(service.name)

    # Depth-first search, colouring nodes; a grey node reached again closes a cycle. The
    # stack is explicit, so that a chain of thousands of services cannot exhaust Python's.
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(services, white)
    for root in services:
        if colour[root] != white:
            continue
        colour[root] = grey
        path = [root]
        pending = [iter(services[root].depends.values())]
        while pending:
            reached: str | None = next(pending[-1], None)
            if reached is None:
                colour[path.pop()] = black
                pending.pop()
            elif colour[reached] == grey:
                cycle = [*path[path.index(reached) :], reached]
                raise GraphError(
                    "Service dependencies form a cycle: "
                    + " -> ".join(repr(n) for n in cycle)
                    + "; break it by removing one of these dependencies."
                )
            elif colour[reached] == white:
                colour[reached] = grey
                path.append(reached)
                pending.append(iter(services[reached].depends.values()))
    return _Plan(dict(services), dependents)


def _suggest(name: str, known: Mapping[str, object]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# -- running ------------------------------------------------------------------------------


class _Record:
    """One service's state within one run."""

    __slots__ = (
        "abandoned",
        "busy",
        "crash",
        "error",
        "host_done",
        "hosting",
        "mark",
        "reported",
        "service",
        "start_began",
        "start_deadline",
        "start_ended",
        "started",
        "state",
        "stop_began",
        "stop_deadline",
        "stop_ended",
        "stop_error",
        "stop_late",
        "stop_limit",
        "value",
        "wake",
    )

    def __init__(self, service: Service[Any]) -> None:
        self.service = service
        self.state = ServiceState.PENDING
        self.value: Any = None
        self.started = False
        self.stop_limit = ""  # which limit bounds its cleanup, for the error if it is cut off
        self.stop_late = False  # its cleanup began with no shutdown budget left
        # Events exist only where something waits on them: startup of a thousand services
        # should not pay for three thousand events.
        # Set when the host task has finished; the services it depends on wait for it.
        self.host_done = anyio.Event() if service.depends else None
        # Asks a long-running service's host to stop (set too when the service exits on its
        # own); generator services wait on the run's single stop event instead.
        self.wake = anyio.Event() if service.form is ServiceForm.TASK else None
        self.error: BaseException | None = None  # why the start failed
        self.stop_error: BaseException | None = None  # why the cleanup failed
        self.crash: BaseException | None = None  # a long-running service's crash
        self.start_began: float | None = None
        self.start_ended: float | None = None
        self.start_deadline = math.inf  # on the loop's clock
        self.hosting = False  # its host task is alive
        self.reported = False  # a long-running service called task_status.started()
        self.busy = 0.0  # seconds its own code held the event loop (see `_metered`)
        self.mark = (0.0, 0.0)  # the run's and its own busy time as its current phase began
        self.stop_deadline = math.inf  # on the loop's clock
        self.abandoned = False  # shutdown stopped waiting for its host
        self.stop_began: float | None = None
        self.stop_ended: float | None = None


class _Run:
    """One run of a Lifecycle: starts the hosts, stops them, keeps the timeline."""

    def __init__(self, kernel: Kernel, plan: _Plan) -> None:
        self.kernel = kernel
        self.plan = plan
        self.records = {name: _Record(service) for name, service in plan.services.items()}
        self.origin = time.perf_counter()
        self.stop_requested = anyio.Event()
        # How many of its dependencies each service still waits for.
        self.waiting_for = {
            name: len(set(service.depends.values())) for name, service in plan.services.items()
        }
        self.hosts_alive = 0
        self.busy = 0.0  # seconds services' own code held the event loop, all together
        self.hosts_done: anyio.Event | None = None
        # The scopes that can cancel the starts in progress, and whether startup is being
        # abandoned (see `start`).
        self.starting: dict[_Record, anyio.CancelScope] = {}
        self.aborting = False
        self.aborted_by_budget = False  # rather than by a failed start or from outside
        self.starters_alive = 0
        self.starters_done = anyio.Event()
        # Set by `start`: where hosts and starters run, and the scope a failed start cancels.
        self.hosts: TaskGroup
        self.starters: TaskGroup
        self.abort: anyio.CancelScope
        self.startup_deadline = math.inf
        self.shutdown_deadline = math.inf
        self.started_ok = False
        self.interrupted: int | None = None  # the signal that interrupted the startup
        self.startup_hold: SignalHold | None = None
        self.stopping = False
        self.fatal: BaseException | None = None  # see `_fatal`
        self.body: anyio.CancelScope | None = None  # around the body of `Kernel.run`
        self.error: BaseException | None = None
        self.stop_order: list[str] = []

    @property
    def values(self) -> dict[str, Any]:
        return {
            name: rec.value
            for name, rec in self.records.items()
            if rec.started and not rec.service.internal
        }

    def now(self) -> float:
        """Seconds since the run began, for the timeline (wall-clock, not the loop's)."""
        return time.perf_counter() - self.origin

    # -- startup --------------------------------------------------------------------------

    async def start(self, task_group: TaskGroup) -> None:
        # SIGINT and SIGTERM abort a startup in progress at once, with the rollback, rather
        # than wait for the server to notice after the startup (or its timeout) ends. The
        # signal is then handed on to the server (or to Python's default), which stops.
        hold = self.startup_hold = SignalHold((signal.SIGINT, signal.SIGTERM), self._interrupt)
        try:
            hold.install()  # a no-op outside the main thread, where no signal arrives anyway
            await self._start(task_group)
        finally:
            self._end_startup_hold()

    def _end_startup_hold(self) -> None:
        hold, self.startup_hold = self.startup_hold, None
        if hold is None:
            return
        if self.interrupted is not None:
            if self.error is not None:
                # Said here, once, since the server may not live to report the error: the
                # signal handed on may end the process (SIGTERM's default action) or raise
                # KeyboardInterrupt in it (trio) at once.
                logger.warning("%s", self.error, extra={"phase": "startup"})
            hold.forward(self.interrupted)
        else:
            hold.release()

    def _interrupt(self, signum: int) -> None:
        """A SIGINT or SIGTERM arrived while starting: abort the startup (runs on the loop)."""
        name = signal.Signals(signum).name
        if self.interrupted is not None:
            logger.warning("%s received again: handing it on, not waiting for the rollback.", name)
            hold, self.startup_hold = self.startup_hold, None  # and the first one is not
            if hold is not None:
                hold.forward(signum)
            return
        self.interrupted = signum
        logger.warning(
            "%s received while starting: aborting the startup and rolling back.",
            name,
            extra={"phase": "startup"},
        )
        self.aborting = True
        abort = getattr(self, "abort", None)
        if abort is not None:
            abort.cancel()

    async def _start(self, task_group: TaskGroup) -> None:
        startup_timeout = self.kernel.startup_timeout
        deadline = math.inf if startup_timeout is None else anyio.current_time() + startup_timeout
        observers = self.kernel.observers
        if observers:
            observers.call("run_starting", self.kernel)
        self.startup_deadline = deadline
        try:
            with anyio.CancelScope() as abort, anyio.CancelScope(deadline=deadline):
                async with anyio.create_task_group() as watcher:
                    # The starters wait shielded, and each service starts under that shield:
                    # were a `TaskGroup.start` cancelled just as its service reported
                    # started, the task group would cancel the now-shielded host and wait for
                    # it forever. So a failed start, the startup budget or a cancellation
                    # from outside reaches the starts in progress through this task instead,
                    # which cancels their own start scopes.
                    watcher.start_soon(self._abort_starts_when_cancelled)
                    with anyio.CancelScope(shield=True):
                        async with anyio.create_task_group() as starters:
                            self.hosts, self.starters, self.abort = task_group, starters, abort
                            # Services with no dependencies start at once; each of the others
                            # is launched by the start of the last of its dependencies.
                            for name, count in self.waiting_for.items():
                                if count == 0:
                                    self._spawn_starter(self.records[name])
                            if self.starters_alive == 0:
                                self.starters_done.set()
            # A cancellation from outside that arrived while the starters were shielded
            # surfaces here (a task group whose tasks are done exits without a checkpoint).
            await anyio.lowlevel.checkpoint_if_cancelled()
        except BaseException as exc:
            # Cancelled from outside (or interrupted): roll back, then let it propagate.
            for record in self.records.values():
                if record.state is ServiceState.STARTING:
                    record.state = ServiceState.CANCELLED
                    record.start_ended = self.now()
            await self._rollback()
            if observers:
                observers.call("run_started", self.kernel, exc)
            raise

        if self.aborted_by_budget or (not self.aborting and anyio.current_time() >= deadline):
            for record in self.records.values():
                if record.state is ServiceState.STARTING:
                    record.error = TimeoutError(
                        f"Service {record.service.name!r} was still starting when the "
                        f"startup_timeout of {startup_timeout}s ran out.{_not_ready(record)}"
                    )
                    self._fail_start(record)
                elif record.state is ServiceState.PENDING and all(
                    self.records[dependency].started
                    for dependency in record.service.depends.values()
                ):
                    record.error = TimeoutError(
                        f"Service {record.service.name!r} was ready to start when the "
                        f"startup_timeout of {startup_timeout}s ran out."
                    )
                    self._fail_start(record)
        failures = {n: r.error for n, r in self.records.items() if r.error is not None}
        # Interrupted by a signal, with no start failed and not every service started (one
        # that arrived as the last service started is the server's to act on, below).
        interrupted_by = None
        if (
            self.interrupted is not None
            and not failures
            and not all(record.started for record in self.records.values())
        ):
            interrupted_by = signal.Signals(self.interrupted).name
        if not failures and interrupted_by is None:
            for record in self.records.values():
                if not record.started:  # not expected: never report a partial start as done
                    record.error = RuntimeError(
                        f"Service {record.service.name!r} was never started."
                    )
                    self._fail_start(record)
                    failures[record.service.name] = record.error
        if not failures and interrupted_by is None:
            self.started_ok = True
            self._log_started()
            if observers:  # the drain holds the signals from here (before this hold ends)
                observers.call("run_started", self.kernel, None)
            # A signal that arrived as the last service started goes to whoever holds the
            # signals now (the drain), or to the server.
            self._end_startup_hold()
            return

        cancelled = [n for n, r in self.records.items() if r.state is ServiceState.STARTING]
        for name in cancelled:
            self.records[name].state = ServiceState.CANCELLED
            self.records[name].start_ended = self.now()
        rollback_errors = await self._rollback()
        error = _startup_error(
            failures,
            cancelled,
            list(self.stop_order),
            rollback_errors,
            interrupted_by=interrupted_by,
        )
        self.error = error
        if observers:
            observers.call("run_started", self.kernel, error)
        raise error

    async def _abort_starts_when_cancelled(self) -> None:
        try:
            await self.starters_done.wait()
        finally:
            if not self.starters_done.is_set():
                # Why, decided now: a start failing later, while the others unwind, or the
                # unwinding outlasting the budget, does not change it.
                failed = any(record.error is not None for record in self.records.values())
                self.aborted_by_budget = (
                    not failed and anyio.current_time() >= self.startup_deadline
                )
                self.aborting = True
                for scope in self.starting.values():
                    scope.cancel()

    def _spawn_starter(self, record: _Record) -> None:
        self.starters_alive += 1
        self.starters.start_soon(self._starter, record)

    async def _starter(self, record: _Record) -> None:
        """Start ``record``'s service, then the dependents that this start made ready.

        The first such dependent starts in this same task (a chain costs one starter task,
        not one per link); the others get starter tasks of their own, so that they start
        concurrently.
        """
        try:
            next_record: _Record | None = record
            while next_record is not None:
                record, next_record = next_record, None
                if self.aborting or anyio.current_time() >= self.startup_deadline:
                    return  # startup is being abandoned: left PENDING
                record.state = ServiceState.STARTING
                record.start_began = self.now()
                try:
                    record.value = await self.hosts.start(self._host, record)
                except _StartAborted:
                    return  # left STARTING: reported as cancelled (or as out of budget)
                except Exception as exc:
                    record.error = exc
                    self._fail_start(record)
                    self.aborting = True  # at once: no other starter may begin a start now
                    self.abort.cancel()
                    return
                for name in self.plan.dependents[record.service.name]:
                    self.waiting_for[name] -= 1
                    if self.waiting_for[name] > 0:
                        continue
                    if next_record is None:
                        next_record = self.records[name]
                    else:
                        self._spawn_starter(self.records[name])
        finally:
            self.starters_alive -= 1
            if self.starters_alive == 0:
                self.starters_done.set()

    def _fail_start(self, record: _Record) -> None:
        record.state = ServiceState.FAILED
        record.start_ended = self.now()
        # No traceback here: the StartupError raised at the end carries this error as its
        # cause, and whoever runs the lifespan prints it once (uvicorn does).
        logger.error(
            "Service %r failed to start: %s",
            record.service.name,
            describe(record.error),
            extra={"service": record.service.name, "phase": "start"},
        )

    def _log_started(self) -> None:
        timeline = self.timeline()
        total = max((e.start_ended or 0.0 for e in timeline), default=0.0)
        chain = " -> ".join(
            f"{name} ({(timeline[name].start_duration or 0.0) * 1000:.1f}ms)"
            for name in timeline.slowest_chain
        )
        logger.info(
            "Started %d services in %.1fms; slowest chain: %s",
            len(self.records),
            total * 1000,
            chain or "none",
            extra={"phase": "startup", "duration": total},
        )

    # -- the host task: one per service, from start to cleanup -----------------------------

    async def _host(self, record: _Record, *, task_status: TaskStatus[Any]) -> None:
        service = record.service
        kwargs = {param: self.records[target].value for param, target in service.depends.items()}
        observers = self.kernel.observers
        if self.aborting:  # startup was abandoned since this start was launched
            raise _StartAborted
        self.hosts_alive += 1
        record.hosting = True
        try:
            if observers:
                observers.call("service_starting", service)
            # Abandoning startup cancels this scope. It spans the host's whole life, so it
            # nests around whatever scopes the service keeps open across its yield, and the
            # guard's shield blocks it once the service runs: a start that completes just as
            # it is cancelled simply counts as started, and is rolled back like the others.
            cancelled: BaseException | None = None
            with anyio.CancelScope() as abortable:
                self.starting[record] = abortable
                try:
                    if service.form is ServiceForm.GENERATOR:
                        await self._host_generator(record, kwargs, task_status)
                    else:
                        await self._host_task(record, kwargs, task_status)
                except anyio.get_cancelled_exc_class() as exc:
                    cancelled = exc
                    raise
                finally:
                    del self.starting[record]
            if abortable.cancelled_caught and not record.started:
                if anyio.current_time() >= record.start_deadline and not self.aborting:
                    raise self._start_timed_out(record)  # its own deadline, not an abort
                if observers and cancelled is not None:
                    observers.call("service_start_failed", service, cancelled)
                raise _StartAborted
        except _StartAborted:
            raise
        except BaseException as exc:
            if observers and not record.started:
                observers.call("service_start_failed", service, exc)
            if record.started:
                self._fatal(exc, record)
            raise
        finally:
            if record.host_done is not None:
                record.host_done.set()
            record.hosting = False
            self.hosts_alive -= 1
            if self.hosts_alive == 0 and self.hosts_done is not None:
                self.hosts_done.set()

    def _start_deadline(self, service: Service[Any]) -> float:
        timeout = service.start_timeout
        return math.inf if timeout is None else anyio.current_time() + timeout

    def _start_timed_out(self, record: _Record) -> TimeoutError:
        service = record.service
        error = TimeoutError(
            f"Service {service.name!r} did not start within its start_timeout of "
            f"{service.start_timeout}s.{_not_ready(record)}"
        )
        self._held_the_loop_note(record, error)
        return error

    def _overran(self, record: _Record, began: float, deadline: float) -> TimeoutError | None:
        """The error of a start that completed past its own deadline or the startup budget.

        A start can only be cut off where it awaits; one that blocked the event loop or
        shielded itself past its deadline completes all the same, and must not count as
        started (its host scope may already be cancelled, and the budget was not kept). A
        start whose deadline passed only because other services' code held the event loop
        meanwhile is not to blame, and counts as started.
        """
        service = record.service
        now = anyio.current_time()
        if now <= deadline and now <= self.startup_deadline:
            return None
        if self._blocked_by_others(record) >= now - min(deadline, self.startup_deadline):
            logger.warning(
                "Service %r started past its deadline only because other services' code held "
                "the event loop meanwhile (%.3fs); it counts as started.",
                service.name,
                self._blocked_by_others(record),
                extra={"service": service.name, "phase": "start"},
            )
            return None
        limit = (
            f"its start_timeout of {service.start_timeout}s"
            if now > deadline
            else f"the startup_timeout of {self.kernel.startup_timeout}s"
        )
        return TimeoutError(
            f"Service {service.name!r} took {now - began:.2f}s to start, past {limit}; it did "
            f"not yield to cancellation in time (it blocked the event loop, shielded itself, "
            f"swallowed the cancellation or waited for a thread), so it could not be cut "
            f"off. What it started was cleaned up again."
        )

    def _rolled_back_while_reporting(
        self, record: _Record, exc: BaseException, own: BaseException | None
    ) -> None:
        """Record a long-running service cut as it reported started (startup was abandoned).

        It ran, so it counts as rolled back, and what its cleanup raised counts.
        """
        cancelled = anyio.get_cancelled_exc_class()
        leaves = [exc] if own is None else [own, exc]
        while any(isinstance(e, BaseExceptionGroup) for e in leaves):
            leaves = [
                leaf
                for e in leaves
                for leaf in (e.exceptions if isinstance(e, BaseExceptionGroup) else (e,))
            ]
        errors = [e for e in leaves if not isinstance(e, cancelled)]
        if own is not None and not isinstance(own, cancelled):
            errors = [own]  # the same error may also come out of the task group
        record.started = True
        record.start_ended = record.stop_began = self.now()
        record.state = ServiceState.STOPPING
        self.stop_order.append(record.service.name)
        record.stop_error = errors[0] if errors else None
        self._stopped(record)

    def _mark(self, record: _Record) -> None:
        """Note how long services' own code has held the loop, as a phase of ``record`` begins."""
        record.mark = (self.busy, record.busy)

    def _blocked_by_others(self, record: _Record) -> float:
        """Seconds other services' own code held the event loop since ``record``'s mark."""
        run_then, own_then = record.mark
        return (self.busy - run_then) - (record.busy - own_then)

    def _held_the_loop_note(self, record: _Record, error: BaseException) -> None:
        others = self._blocked_by_others(record)
        if others > 0.01:
            error.add_note(
                f"Other services' own code held the event loop for {others:.3f}s meanwhile, "
                f"which delayed {record.service.name!r} past its deadline; see the service "
                f"that blocked."
            )

    def _cleanup_overran_start(self, error: TimeoutError, cleanup: BaseException | None) -> None:
        if cleanup is not None:
            error.add_note(f"Its cleanup then failed: {describe(cleanup)}")

    async def _host_generator(
        self, record: _Record, kwargs: dict[str, Any], task_status: TaskStatus[Any]
    ) -> None:
        service = record.service
        hooks = self.kernel.hooks
        agen = cast(Any, service.fn(**kwargs))
        began = anyio.current_time()
        self._mark(record)
        # The start deadline is the deadline of the abortable scope around the host's whole
        # life (see `_host`), not of the guard: a start that completes just as the deadline
        # cancels it must find its guard uncancelled, so that its cleanup can still run.
        deadline = record.start_deadline = self._start_deadline(service)
        abortable = self.starting[record]
        abortable.deadline = deadline
        overran: TimeoutError | None = None
        # One scope spans the generator's whole life, because the generator may leave its own
        # cancel scopes (a task group, say) open across its yield: a scope of ours opened
        # around one step and closed after it would break their nesting. Its deadline is none,
        # then the stop deadline. It is a shield once running, so that everything the service
        # owns, tasks it spawned included, stops only when its turn comes in the
        # reverse-order shutdown.
        with anyio.CancelScope() as guard:
            try:
                if hooks is not None:
                    await hooks.before_start(service.name)
                value = await _metered(agen.__anext__(), self, record)
            except StopAsyncIteration:
                raise RuntimeError(
                    f"Service {service.name!r} finished without yielding its value; an async "
                    f"generator service must yield exactly once."
                ) from None
            except Exception as exc:
                if abortable.cancel_called and anyio.current_time() >= deadline:
                    raise self._start_timed_out(record) from exc
                raise
            guard.shield = True
            abortable.deadline = math.inf
            overran = self._overran(record, began, deadline)
            if overran is None:
                self._running(record, value)
                task_status.started(value)
                await self._wait_for_stop(record)
                guard.deadline = self._begin_stop(record)
                self._mark(record)
            elif service.stop_timeout is not None:
                guard.deadline = anyio.current_time() + service.stop_timeout
            try:
                await _metered(agen.__anext__(), self, record)
            except StopAsyncIteration:
                pass
            except Exception as exc:
                record.stop_error = exc
            else:
                record.stop_error = RuntimeError(
                    f"Service {service.name!r} yielded more than once; an async generator "
                    f"service must yield exactly once (its value), then clean up."
                )
                await agen.aclose()
            if hooks is not None and record.stop_error is None and overran is None:
                try:
                    await hooks.after_stop(service.name)
                except Exception as exc:
                    record.stop_error = exc
        if overran is not None:
            cut = TimeoutError("it was cut off") if guard.cancelled_caught else None
            self._cleanup_overran_start(overran, record.stop_error or cut)
            record.stop_error = None
            raise overran
        if guard.cancelled_caught:
            self._stopped(record, timed_out=True)
        else:  # a cleanup that shields itself cannot be cut off, only reported
            self._stopped(record, overran=anyio.current_time() > guard.deadline)

    async def _host_task(
        self, record: _Record, kwargs: dict[str, Any], task_status: TaskStatus[Any]
    ) -> None:
        service = record.service
        hooks = self.kernel.hooks
        exited = False
        stop_deadline = math.inf
        # The service runs in a child task, so scopes here nest simply. Like the generator
        # form's, the guard is cancellable while starting and a shield once running: from the
        # moment the service reports started, before its own task runs on, so that abandoning
        # startup at that moment cannot reach a service that counts as started.
        guard = anyio.CancelScope()
        observers = self.kernel.observers

        reported = False
        cut_after_reporting = False

        def ready() -> None:
            nonlocal reported, cut_after_reporting
            reported = record.reported = True
            abortable = self.starting.get(record)
            if abortable is not None and abortable.cancel_called:
                # Startup was abandoned first: the start is cut (a shield now would keep the
                # service from the cancellation already on its way, and its start waiting).
                # It did run, though: its cancellation is its rollback (see below).
                cut_after_reporting = True
                return
            guard.shield = True
            if observers:
                observers.call("service_ready", service)

        cut_error: BaseException | None = None

        async def run_service(*, task_status: TaskStatus[Any]) -> None:
            nonlocal exited, cut_error
            reporter = _StartedReporter(task_status, ready)
            try:
                if hooks is not None:
                    await hooks.before_start(service.name)
                await _metered(service.fn(**kwargs, task_status=reporter), self, record)
                if not reporter.reported:
                    raise RuntimeError(
                        f"Service {service.name!r} returned without calling "
                        f"task_status.started(); call it once the service is ready."
                    )
            except BaseException as exc:
                # What its cleanup raises once cut: anyio's start() may swallow it on asyncio.
                if cut_after_reporting:
                    cut_error = exc
                raise
            finally:
                exited = True
                assert record.wake is not None
                record.wake.set()

        overran: TimeoutError | None = None
        try:
            with guard:
                async with anyio.create_task_group() as inner:
                    began = anyio.current_time()
                    self._mark(record)
                    deadline = record.start_deadline = self._start_deadline(service)
                    with anyio.CancelScope(deadline=deadline) as scope:
                        try:
                            value = await inner.start(run_service)
                        except Exception as exc:
                            if scope.cancel_called:
                                raise self._start_timed_out(record) from exc
                            raise
                    if scope.cancelled_caught:
                        # It reported started only after its deadline, shielded: say how long
                        # it took (the task group cancels it as the start is abandoned).
                        slow = self._overran(record, began, deadline) if reported else None
                        raise slow or self._start_timed_out(record)
                    guard.shield = True
                    overran = self._overran(record, began, deadline)
                    if overran is not None:
                        # Cancel it, as at a stop, within its own stop_timeout.
                        if service.stop_timeout is not None:
                            guard.deadline = anyio.current_time() + service.stop_timeout
                        inner.cancel_scope.cancel()
                        raise overran
                    self._running(record, value)
                    task_status.started(value)

                    await self._wait_for_stop(record)
                    if not exited:
                        # Stopping a long-running service means cancelling it; its own
                        # finally blocks run under that cancellation.
                        stop_deadline = self._begin_stop(record)
                        self._mark(record)
                        inner.cancel_scope.cancel()
        except BaseException as exc:
            if cut_after_reporting and not record.started:
                self._rolled_back_while_reporting(record, exc, cut_error)
                raise _StartAborted from None
            if not isinstance(exc, Exception):
                raise
            error = _unwrap(exc)
            if overran is not None and error is not overran:
                self._cleanup_overran_start(overran, error)  # its cancellation raised
                raise overran from None
            if not record.started:
                raise error from None
            if record.state is ServiceState.RUNNING:
                record.crash = error
                record.state = ServiceState.FAILED
                logger.error(
                    "Service %r crashed while running: %s",
                    service.name,
                    describe(error),
                    exc_info=error,
                    extra={"service": service.name, "phase": "run"},
                )
                return
            record.stop_error = error
        if record.state is ServiceState.RUNNING:
            # Returned on its own before being asked to stop.
            logger.warning(
                "Service %r returned while running, before it was asked to stop.",
                service.name,
                extra={"service": service.name, "phase": "run"},
            )
            record.state = ServiceState.STOPPED
            return
        # The service was cancelled at once when asked to stop, so its cleanup ran past the
        # deadline only if it shielded itself: that cannot be cut off, only reported.
        late = anyio.current_time() > stop_deadline
        timed_out = False
        if hooks is not None and record.stop_error is None and not late:
            with anyio.CancelScope(shield=True, deadline=stop_deadline) as scope:
                try:
                    await hooks.after_stop(service.name)
                except Exception as exc:
                    record.stop_error = exc
            timed_out = scope.cancelled_caught
        self._stopped(record, timed_out=timed_out, overran=late)

    # -- stopping -------------------------------------------------------------------------

    def _running(self, record: _Record, value: Any) -> None:
        record.value = value
        record.started = True
        record.state = ServiceState.RUNNING
        record.start_ended = self.now()
        took = record.start_ended - (record.start_began or 0.0)
        logger.debug(
            "Service %r started in %.1fms",
            record.service.name,
            took * 1000,
            extra={"service": record.service.name, "phase": "start", "duration": took},
        )
        if self.kernel.observers:
            self.kernel.observers.call("service_started", record.service)

    async def _wait_for_stop(self, record: _Record) -> None:
        """Wait, shielded, for the stop request, then for every started dependent to stop.

        Also returns when a long-running service exits on its own (it sets ``wake`` too).
        """
        # Shielded even inside the shielded guard: a generator service may have left its
        # own cancel scopes open across its yield, and their cancellation must not reach
        # this wait. No deadline: each dependent's cleanup is bounded by its own deadline,
        # and the order must hold even when the shutdown budget runs out.
        with anyio.CancelScope(shield=True):
            await (record.wake or self.stop_requested).wait()
            if not self.stopping:
                return
            for name in self.plan.dependents[record.service.name]:
                dependent = self.records[name]
                if dependent.started:
                    assert dependent.host_done is not None  # it has a dependency: us
                    await dependent.host_done.wait()

    def _begin_stop(self, record: _Record) -> float:
        """Mark the service stopping; return the deadline of its cleanup."""
        service = record.service
        if record.abandoned:
            # Shutdown went on without it and has ended: clean up quietly, within its own
            # stop_timeout, changing nothing that the run reported.
            timeout = service.stop_timeout
            return anyio.current_time() + (timeout if timeout is not None else ABANDON_GRACE)
        record.state = ServiceState.STOPPING
        record.stop_began = self.now()
        self.stop_order.append(service.name)
        if self.kernel.observers:
            self.kernel.observers.call("service_stopping", service)
        own = math.inf
        if service.stop_timeout is not None:
            own = anyio.current_time() + service.stop_timeout
        if own <= self.shutdown_deadline:
            record.stop_limit = f"its stop_timeout of {service.stop_timeout}s"
            record.stop_deadline = own
            return own
        record.stop_deadline = self.shutdown_deadline
        # What is left of the shutdown budget, part of it perhaps spent on its dependents.
        record.stop_limit = f"the shutdown_timeout of {self.kernel.shutdown_timeout}s"
        record.stop_late = anyio.current_time() >= self.shutdown_deadline
        return self.shutdown_deadline

    def _stopped(self, record: _Record, *, timed_out: bool = False, overran: bool = False) -> None:
        """Record the end of a stop and log it.

        ``timed_out``: the deadline cut the cleanup off. ``overran``: the cleanup shielded
        itself and ran past the deadline.
        """
        service = record.service
        if record.abandoned:
            return  # shutdown went on without it; what it reported then stands
        record.stop_ended = self.now()
        took = record.stop_ended - (record.stop_began or record.stop_ended)
        if timed_out and record.stop_error is None and record.stop_late:
            # Its own cleanup did not overrun: the budget was gone before its turn came.
            record.stop_error = TimeoutError(
                f"Service {service.name!r} had no time left to clean up: {record.stop_limit} "
                f"had run out before its turn came, spent on the services that depend on it, "
                f"so its cleanup was cut off at its first await."
            )
        elif timed_out and record.stop_error is None:
            record.stop_error = TimeoutError(
                f"Service {service.name!r} did not finish its cleanup within "
                f"{record.stop_limit}; it was cut off."
            )
            self._held_the_loop_note(record, record.stop_error)
        elif (
            overran
            and record.stop_error is None
            and not record.stop_late
            and self._blocked_by_others(record) < anyio.current_time() - record.stop_deadline
        ):
            record.stop_error = TimeoutError(
                f"Service {service.name!r} took {took:.2f}s to clean up, past "
                f"{record.stop_limit}: its cleanup shields itself from cancellation, so it "
                f"could not be cut off."
            )
        if self.kernel.observers:
            self.kernel.observers.call("service_stopped", service, record.stop_error)
        if record.stop_error is None:
            record.state = ServiceState.STOPPED
            logger.debug(
                "Service %r stopped in %.1fms",
                service.name,
                took * 1000,
                extra={"service": service.name, "phase": "stop", "duration": took},
            )
            return
        record.state = ServiceState.FAILED
        logger.error(
            "Service %r failed to stop cleanly: %s",
            service.name,
            describe(record.stop_error),
            exc_info=record.stop_error,
            extra={"service": service.name, "phase": "stop", "duration": took},
        )

    async def stop(self) -> dict[str, BaseException]:
        """Stop every started service in reverse dependency order; return the failures."""
        shutdown_timeout = self.kernel.shutdown_timeout
        began = self.now()
        if shutdown_timeout is not None:
            self.shutdown_deadline = anyio.current_time() + shutdown_timeout
        self.stopping = True
        started = [record for record in self.records.values() if record.started]
        observers = self.kernel.observers
        if observers:
            observers.call("run_stopping", self.kernel)
        with anyio.CancelScope(shield=True):
            self.stop_requested.set()
            for record in started:
                if record.wake is not None:
                    record.wake.set()
            if self.hosts_alive:
                self.hosts_done = anyio.Event()
                with anyio.move_on_at(self.abandon_at):
                    await self.hosts_done.wait()
        if self.hosts_alive:
            self._abandon(started)
        errors: dict[str, BaseException] = {}
        for record in started:
            error = record.stop_error or record.crash
            if error is not None:
                errors[record.service.name] = error
        took = self.now() - began
        logger.info(
            "Stopped %d services in %.1fms%s",
            len(started),
            took * 1000,
            f"; {len(errors)} failed: {', '.join(sorted(errors))}" if errors else "",
            extra={"phase": "shutdown", "duration": took},
        )
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "Timeline of the run:\n%s",
                self.timeline().gantt(),
                extra={"phase": "shutdown"},
            )
        if observers:
            observers.call("run_stopped", self.kernel, errors)
        return errors

    def _fatal(self, exc: BaseException, record: _Record) -> None:
        """A running service raised what no host catches (SystemExit, KeyboardInterrupt...).

        It must not wait for the end of the run: the body of ``lc.run()`` (or startup, if it
        is still going on) is cancelled at once, and `Kernel.run` raises it after stopping.
        """
        error = _unwrap(exc)
        if isinstance(error, anyio.get_cancelled_exc_class()) or self.fatal is not None:
            return
        self.fatal = error
        record.crash = error
        record.state = ServiceState.FAILED
        logger.error(
            "Service %r raised %s while running: stopping every service.",
            record.service.name,
            type(error).__name__,
            extra={"service": record.service.name, "phase": "run"},
        )
        self.aborting = True
        if not self.starters_done.is_set():
            self.abort.cancel()
        if self.body is not None:
            self.body.cancel()

    @property
    def abandon_at(self) -> float:
        """When shutdown stops waiting for hosts that have not finished (loop clock)."""
        return self.shutdown_deadline + ABANDON_GRACE

    def _abandon(self, started: list[_Record]) -> None:
        """Give up on the hosts still running past `abandon_at`, naming each of them."""
        for record in started:
            if not record.hosting:
                continue
            record.abandoned = True
            record.state = ServiceState.FAILED
            record.stop_ended = self.now()
            limit = f"{ABANDON_GRACE}s past the shutdown_timeout of {self.kernel.shutdown_timeout}s"
            if record.stop_began is None:
                waited_for = [
                    name
                    for name in self.plan.dependents[record.service.name]
                    if self.records[name].hosting
                ]
                record.stop_error = TimeoutError(
                    f"Service {record.service.name!r} never began its cleanup: shutdown went on "
                    f"without it {limit}, while it still waited for "
                    f"{', '.join(map(repr, waited_for)) or 'its dependents'} to finish theirs. "
                    f"It is left to the process's exit."
                )
            else:
                record.stop_error = TimeoutError(
                    f"Service {record.service.name!r} was still running its cleanup {limit}, "
                    f"so shutdown went on without it: the cleanup shields itself from "
                    f"cancellation, blocks, or waits for a thread, which nothing can cut off. "
                    f"It is left to the process's exit."
                )
            logger.error(
                "Service %r abandoned: %s",
                record.service.name,
                describe(record.stop_error),
                extra={"service": record.service.name, "phase": "stop"},
            )

    async def _rollback(self) -> dict[str, BaseException]:
        if not any(record.started for record in self.records.values()):
            return {}
        return await self.stop()

    # -- timeline -------------------------------------------------------------------------

    def timeline(self) -> Timeline:
        entries = []
        for name, record in self.records.items():
            error = record.error or record.crash or record.stop_error
            entries.append(
                TimelineEntry(
                    service=name,
                    state=record.state,
                    started=record.started,
                    start_began=record.start_began,
                    start_ended=record.start_ended,
                    stop_began=record.stop_began,
                    stop_ended=record.stop_ended,
                    error=describe(error) if error is not None else None,
                )
            )
        return Timeline(tuple(entries), self._slowest_chain())

    def _slowest_chain(self) -> tuple[str, ...]:
        started = {n: r for n, r in self.records.items() if r.started}
        if not started:
            return ()
        chain = [max(started, key=lambda n: started[n].start_ended or 0.0)]
        while True:
            deps = [t for t in started[chain[-1]].service.depends.values() if t in started]
            if not deps:
                break
            chain.append(max(deps, key=lambda n: started[n].start_ended or 0.0))
        return tuple(reversed(chain))


@types.coroutine
def _metered(step: Any, run: _Run, record: _Record) -> Generator[Any, Any, Any]:
    """Drive the awaitable ``step`` of a service's own code, timing each of its steps.

    What it yields goes straight to the event loop, and what the loop sends (or throws) goes
    straight back: only the time spent inside the service's code is added up, on the record
    and on the run. That is how a start or cleanup that overran its deadline because another
    service blocked the event loop is told from the one that blocked it.
    """
    send: Any = None
    error: BaseException | None = None
    clock = time.perf_counter
    while True:
        began = clock()
        try:
            yielded = step.send(send) if error is None else step.throw(error)
        except StopIteration as stop:
            spent = clock() - began
            record.busy += spent
            run.busy += spent
            return stop.value
        except BaseException:
            spent = clock() - began
            record.busy += spent
            run.busy += spent
            raise
        spent = clock() - began
        record.busy += spent
        run.busy += spent
        try:
            send, error = (yield yielded), None
        except BaseException as exc:  # delivered into the service's code, which decides
            send, error = None, exc


ABANDON_GRACE = 1.0
"""Seconds past the shutdown deadline that shutdown still waits for a host to finish."""


class _HostGroup:
    """The task group the hosts run in, owned by a task of its own.

    It is a task group like any other: `Kernel.run` waits for every host in it to finish.
    The one exception is a host still running `ABANDON_GRACE` seconds past the shutdown
    deadline, whose cleanup shields itself, blocks or waits for a thread: nothing can cut
    that off, and a shutdown that waited for it would never end (an orchestrator would then
    kill the process in the middle of every other cleanup). `Kernel.run` stops waiting and
    leaves it to the process's exit; the group lives in a task of its own so that run's own
    task can go on without it.
    """

    def __init__(self) -> None:
        self.group: TaskGroup | None = None
        self.opened = anyio.Event()
        self.closing = anyio.Event()
        self.done = anyio.Event()
        self.error: BaseException | None = None

    async def open(self) -> TaskGroup:
        _spawn_owned(self._own)
        await self.opened.wait()
        assert self.group is not None
        return self.group

    async def close(self, abandon_at: float) -> BaseException | None:
        """Wait for every host (until ``abandon_at``); return what the group raised, if any."""
        self.closing.set()
        with anyio.CancelScope(shield=True, deadline=abandon_at):
            await self.done.wait()
        return None if self.error is None else _unwrap(self.error)

    async def _own(self) -> None:
        try:
            async with anyio.create_task_group() as group:
                self.group = group
                self.opened.set()
                await self.closing.wait()
        except BaseException as exc:  # reported by close(), in the task that runs the kernel
            self.error = exc
        finally:
            self.opened.set()
            self.done.set()


_owned: set[Any] = set()  # strong references to the asyncio tasks of host groups


def _spawn_owned(fn: Callable[[], Any]) -> None:
    """Run ``fn`` in a task of its own on the running event loop (see `_HostGroup`)."""
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            pass  # trio is imported, but this loop is asyncio's
        else:
            trio.lowlevel.spawn_system_task(fn)
            return
    import asyncio

    task = asyncio.get_running_loop().create_task(fn())
    _owned.add(task)
    task.add_done_callback(_owned.discard)


class _StartedReporter:
    """Forwards ``task_status.started`` and remembers whether the service called it."""

    def __init__(
        self, task_status: TaskStatus[Any], on_ready: Callable[[], None] | None = None
    ) -> None:
        self._task_status = task_status
        self._on_ready = on_ready
        self.reported = False

    def started(self, value: Any = None) -> None:
        self._task_status.started(value)
        self.reported = True
        if self._on_ready is not None:
            self._on_ready()  # in the service's own task, before it runs on


class _StartAborted(Exception):
    """A start cancelled because startup is being abandoned (never leaves this module)."""


def _unwrap(exc: BaseException) -> BaseException:
    """The single leaf of a task group's exception group, or the group itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _sentence(text: str) -> str:
    """``text`` ended with a full stop, unless the error message it ends with has one."""
    return text if text.endswith((".", "!", "?")) else f"{text}."


def _startup_error(
    failures: dict[str, BaseException],
    cancelled: list[str],
    rolled_back: list[str],
    rollback_errors: dict[str, BaseException],
    *,
    interrupted_by: str | None = None,
) -> StartupError:
    if interrupted_by is not None:
        parts = [f"Startup interrupted by {interrupted_by}."]
    else:
        parts = [
            _sentence(
                "Startup failed: "
                + "; ".join(
                    f"service {name!r} {_what_failed(exc)}" for name, exc in failures.items()
                )
            )
        ]
    if cancelled:
        parts.append("Cancelled while starting: " + ", ".join(repr(n) for n in cancelled) + ".")
    if rolled_back:
        parts.append("Rolled back: " + ", ".join(repr(n) for n in rolled_back) + ".")
    else:
        parts.append("Nothing had started, so nothing was rolled back.")
    if rollback_errors:
        parts.append(
            _sentence(
                "Rollback cleanups that failed: "
                + "; ".join(f"{n!r}: {describe(e)}" for n, e in rollback_errors.items())
            )
        )
    error = StartupError(
        " ".join(parts),
        failures=failures,
        cancelled=cancelled,
        rolled_back=rolled_back,
        rollback_errors=rollback_errors,
        interrupted_by=interrupted_by,
    )
    originals = list(failures.values())
    if len(originals) == 1:
        error.__cause__ = originals[0]
    elif originals:  # none when a signal interrupted the startup
        error.__cause__ = BaseExceptionGroup("services that failed to start", originals)
    return error


def _what_failed(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"timed out ({describe(exc).removeprefix('TimeoutError: ').rstrip('.')})"
    return f"raised {describe(exc)}"


def _shutdown_error(errors: dict[str, BaseException], run: _Run) -> ShutdownError:
    details = []
    for name, exc in errors.items():
        record = run.records[name]
        if record.crash is exc:
            details.append(f"{name!r} crashed while running ({describe(exc)})")
        elif isinstance(exc, TimeoutError):
            details.append(f"{name!r} timed out ({exc})")
        else:
            details.append(f"{name!r} raised {describe(exc)}")
    error = ShutdownError(
        "Shutdown finished with errors (every cleanup was attempted): " + "; ".join(details) + ".",
        errors=errors,
    )
    originals = list(errors.values())
    error.__cause__ = (
        originals[0]
        if len(originals) == 1
        else BaseExceptionGroup("services that failed to stop", originals)
    )
    return error
