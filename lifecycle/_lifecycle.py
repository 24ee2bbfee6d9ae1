"""The `Lifecycle` facade: the kernel with health, background work and the drain composed.

Users declare everything on a `Lifecycle`: services (the kernel's), health checks
(`lifecycle._health`), worker pools, supervised tasks and periodic jobs
(`lifecycle._workers`), and the graceful drain (`lifecycle._drain`). Each extension is built
on the kernel's seam (`Kernel.declare`, `Kernel.observers`, `Kernel.crashed`); this module
only composes them behind the decorators.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Concatenate, Literal, Protocol, TypeVar, cast, overload

from ._drain import Drain
from ._health import CheckSpec, HealthCheck, HealthMonitor
from ._kernel import Kernel, Service
from ._validate import seconds
from ._workers import BackgroundTask, PeriodicJob, WorkerPool

__all__ = ["Lifecycle"]

T = TypeVar("T")
J = TypeVar("J")
R = TypeVar("R")


class _ServiceDecorator(Protocol):
    @overload
    def __call__(self, fn: Callable[..., AsyncIterator[T]], /) -> Service[T]: ...

    @overload
    def __call__(self, fn: Callable[..., Awaitable[None]], /) -> Service[Any]: ...


class _WorkerDecorator(Protocol):
    @overload
    def __call__(self, fn: Callable[Concatenate[J, ...], Awaitable[R]], /) -> WorkerPool[J, R]: ...

    @overload
    def __call__(self, fn: Callable[Concatenate[J, ...], R], /) -> WorkerPool[J, R]: ...


class Lifecycle(Kernel):
    """Declares an app's services and governs their life: start, run, stop.

    Use `service` to declare services, then hand `lifespan` to Starlette or FastAPI
    (``FastAPI(lifespan=lc.lifespan)``), or use `run` directly in scripts and tests.

    Args:
        startup_timeout: Seconds all of startup may take, or ``None`` for no limit.
        shutdown_timeout: Seconds all of shutdown (or a rollback) may take, or ``None`` for no
            limit. Every cleanup's own deadline is cut to fit in it.
        drain_delay: Seconds to keep serving, with readiness failing, between the first
            SIGTERM/SIGINT and the server's own graceful shutdown (see the README's "Graceful
            drain"). ``0`` (the default) leaves signals to the server alone.
    """

    def __init__(
        self,
        *,
        startup_timeout: float | None = 30.0,
        shutdown_timeout: float | None = 30.0,
        drain_delay: float = 0.0,
    ) -> None:
        super().__init__(startup_timeout=startup_timeout, shutdown_timeout=shutdown_timeout)
        self._drain = Drain(self, delay=drain_delay)
        # Created on first use: a Lifecycle that never uses health runs no watchdog and no
        # check.
        self._health_monitor: HealthMonitor | None = None

    @property
    def health_monitor(self) -> HealthMonitor | None:
        """The `HealthMonitor` if health is in use, without creating one (unlike `health`)."""
        return self._health_monitor

    @property
    def drain_delay(self) -> float:
        """Seconds the drain keeps serving before the server's own shutdown (0: no drain)."""
        return self._drain.delay

    # -- declaring ------------------------------------------------------------------------

    @overload
    def service(self, fn: Callable[..., AsyncIterator[T]], /) -> Service[T]: ...

    @overload
    def service(self, fn: Callable[..., Awaitable[None]], /) -> Service[Any]: ...

    @overload
    def service(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        depends: Mapping[str, Service[Any] | str] | None = None,
        start_timeout: float | None = None,
        stop_timeout: float | None = None,
        health: Callable[..., Any] | CheckSpec | None = None,
    ) -> _ServiceDecorator: ...

    def service(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        depends: Mapping[str, Service[Any] | str] | None = None,
        start_timeout: float | None = None,
        stop_timeout: float | None = None,
        health: Callable[..., Any] | CheckSpec | None = None,
    ) -> Service[Any] | _ServiceDecorator:
        """Declare a service; use as ``@lc.service`` or ``@lc.service(...)``.

        A service is either an async generator function that yields its value once (the code
        after the ``yield`` is its cleanup, run shielded from cancellation under its
        ``stop_timeout``), or a long-running async function taking a keyword ``task_status``
        that calls ``task_status.started(value)`` once ready and is cancelled at stop.

        Every other parameter is a dependency: it receives the value of the service named
        after it, or of the service ``depends`` maps it to.

        Args:
            fn: The service function (when used without parentheses).
            name: The service's name; defaults to the function's name.
            depends: Maps parameter names to the `Service` (or service name) whose value they
                receive, for parameters not named after their service.
            start_timeout: Seconds the start may take, or ``None`` for no limit of its own.
            stop_timeout: Seconds the cleanup may take, or ``None`` for no limit of its own.
            health: The service's own health check, run in the background while the service
                runs (see `health_check`).

        Returns:
            The declared `Service` (or, with arguments only, a decorator returning it).

        Raises:
            GraphError: The name is taken, or the parameters cannot be wired.
            TypeError: ``fn`` is neither of the two supported kinds of function.
            ValueError: A timeout is not a positive number of seconds.
        """
        seconds("start_timeout", start_timeout, optional=True)  # refused before decorating
        seconds("stop_timeout", stop_timeout, optional=True)

        def decorate(fn: Callable[..., Any]) -> Service[Any]:
            service = self.declare(
                fn,
                name=name,
                depends=depends,
                start_timeout=start_timeout,
                stop_timeout=stop_timeout,
                health=health,
            )
            if health is not None:
                self.health.add_service_check(service)  # runs it in the background
            return service

        if fn is not None:
            return decorate(fn)
        return cast(_ServiceDecorator, decorate)

    # -- health (lifecycle/_health.py) ------------------------------------------------------

    @property
    def health(self) -> HealthMonitor:
        """This Lifecycle's `HealthMonitor`: its checks, components and probes.

        Created on first use, which must come before the Lifecycle starts; declaring a check,
        a ``health=`` service or health routes does it.

        Raises:
            RuntimeError: It is first used while the Lifecycle is running.
        """
        if self._health_monitor is None:
            self._health_monitor = HealthMonitor(self, self._drain)
        return self._health_monitor

    @overload
    def health_check(self, fn: Callable[..., Any], /) -> HealthCheck: ...

    @overload
    def health_check(
        self,
        name: str | None = None,
        /,
        *,
        interval: float = 5.0,
        timeout: float = 2.0,
        critical: bool = True,
        failure_threshold: int = 3,
        success_threshold: int = 1,
        liveness: bool = False,
        depends: Mapping[str, Service[Any] | str] | None = None,
    ) -> Callable[[Callable[..., Any]], HealthCheck]: ...

    def health_check(
        self,
        fn: Callable[..., Any] | str | None = None,
        /,
        *,
        name: str | None = None,
        interval: float = 5.0,
        timeout: float = 2.0,
        critical: bool = True,
        failure_threshold: int = 3,
        success_threshold: int = 1,
        liveness: bool = False,
        depends: Mapping[str, Service[Any] | str] | None = None,
    ) -> HealthCheck | Callable[[Callable[..., Any]], HealthCheck]:
        """Declare a health check run in the background; ``@lc.health_check`` or with options.

        The check's parameters are services, injected like a service's dependencies (or as
        ``depends`` maps them). It passes by returning ``None`` or ``True``, fails by raising
        or returning ``False``, and returns a `lifecycle.CheckResult` to report a degraded
        (``warn``) state with a reason, or an observed value::

            @lc.health_check(timeout=1.0)
            async def database(db: Database) -> None:
                await db.execute("SELECT 1")

        It runs every ``interval`` seconds in a loop of its own (an internal service named
        ``health:<name>``, started after its services and stopped before them), each run cut
        off after ``timeout``. Probes read its cached status: ``failure_threshold``
        consecutive failures make a passing check fail, ``success_threshold`` consecutive
        successes make a failing check pass; its first result is taken as it is, and startup
        waits for it (at most ``timeout``). A plain (non-async) function runs on the event
        loop, where nothing can cut it off: keep those to in-memory checks.

        A service's own ping is shorter to declare with ``@lc.service(health=ping)``: ``ping``
        receives the service's value as its only argument (``async def ping(db: Database) ->
        None``, or ``health=lambda db: db.ping()``) and runs as a check named after the service,
        with these defaults.

        Args:
            fn: The check (when used without parentheses), or its name.
            name: The check's name in reports; defaults to the function's name.
            interval: Seconds between the starts of two runs.
            timeout: Seconds one run may take; a run cut off is a failure.
            critical: Readiness fails while it fails; a non-critical check only degrades the
                full report (``/healthz``) to ``warn``.
            failure_threshold: Consecutive failures before a passing check fails.
            success_threshold: Consecutive successes before a failing check passes.
            liveness: Liveness fails while it fails, too. Only for what a restart fixes:
                a check that takes services is logged as a mistake at startup.
            depends: Maps parameters to the `Service` (or name) whose value they receive.

        Returns:
            The `lifecycle.HealthCheck` (or, with options only, a decorator returning it);
            its ``statistics()`` show the cached result and the counters.

        Raises:
            GraphError: The name is taken, or the parameters cannot be wired.
            TypeError: ``fn`` is not callable.
            ValueError: An option is out of range.
        """
        if isinstance(fn, str):
            if name is not None:
                raise TypeError(
                    f"health_check() got the name twice ({fn!r} and name={name!r}); pass one."
                )
            fn, name = None, fn

        def decorate(check: Callable[..., Any]) -> HealthCheck:
            return HealthCheck(
                self.health,
                check,
                name=name,
                interval=interval,
                timeout=timeout,
                critical=critical,
                liveness=liveness,
                failure_threshold=failure_threshold,
                success_threshold=success_threshold,
                depends=depends,
            )

        return decorate(fn) if fn is not None else decorate

    # -- background work (lifecycle/_workers.py) ----------------------------------------------

    @overload
    def worker(
        self,
        fn: Callable[Concatenate[J, ...], Awaitable[R]],
        /,
        *,
        name: str | None = None,
        concurrency: int = 1,
        queue_size: int = 100,
        overflow: Literal["wait", "reject"] = "wait",
        drain_timeout: float | None = 30.0,
        job_timeout: float | None = None,
        inherit_deadline: bool = False,
        cpu_bound: bool = False,
        on_abandoned: Callable[[Any, str], object] | None = None,
        depends: Mapping[str, Service[Any] | str] | None = None,
    ) -> WorkerPool[J, R]: ...

    @overload
    def worker(
        self,
        fn: Callable[Concatenate[J, ...], R],
        /,
        *,
        name: str | None = None,
        concurrency: int = 1,
        queue_size: int = 100,
        overflow: Literal["wait", "reject"] = "wait",
        drain_timeout: float | None = 30.0,
        job_timeout: float | None = None,
        inherit_deadline: bool = False,
        cpu_bound: bool = False,
        on_abandoned: Callable[[Any, str], object] | None = None,
        depends: Mapping[str, Service[Any] | str] | None = None,
    ) -> WorkerPool[J, R]: ...

    @overload
    def worker(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        concurrency: int = 1,
        queue_size: int = 100,
        overflow: Literal["wait", "reject"] = "wait",
        drain_timeout: float | None = 30.0,
        job_timeout: float | None = None,
        inherit_deadline: bool = False,
        cpu_bound: bool = False,
        on_abandoned: Callable[[Any, str], object] | None = None,
        depends: Mapping[str, Service[Any] | str] | None = None,
    ) -> _WorkerDecorator: ...

    def worker(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        concurrency: int = 1,
        queue_size: int = 100,
        overflow: Literal["wait", "reject"] = "wait",
        drain_timeout: float | None = 30.0,
        job_timeout: float | None = None,
        inherit_deadline: bool = False,
        cpu_bound: bool = False,
        on_abandoned: Callable[[Any, str], object] | None = None,
        depends: Mapping[str, Service[Any] | str] | None = None,
    ) -> Any:
        """Declare a bounded worker pool running the decorated handler on submitted jobs.

        The handler's first parameter is the job; its other parameters are services,
        injected like a service's dependencies. The pool starts after those services and
        drains and stops before them. Async handlers run on the event loop, plain functions
        in worker threads (at most ``concurrency`` at once), and with ``cpu_bound=True`` in
        worker processes.

        Returns a `WorkerPool`: ``await pool.submit(job)`` waits for room,
        ``pool.submit_nowait(job)`` raises `QueueFull`, ``await pool.call(job)`` returns the
        handler's result, ``pool.statistics()`` counts everything.

        Args:
            fn: The handler (when used without parentheses).
            name: The pool's name; defaults to the handler's name.
            concurrency: How many jobs run at once.
            queue_size: How many accepted jobs may wait.
            overflow: What a full queue does to `WorkerPool.submit`: ``"wait"`` for room
                (backpressure), or ``"reject"`` with `QueueFull`.
            drain_timeout: Seconds the queue may take to drain at shutdown before running
                jobs are cancelled and queued ones abandoned; ``None`` waits for all. Cut
                short, when need be, so that the drain ends within ``shutdown_timeout``.
            job_timeout: Seconds one job may run; a job past it fails with `TimeoutError`.
                Async and ``cpu_bound`` handlers only: a thread cannot be cancelled.
            inherit_deadline: Run each job under the deadline of the code that submitted it
                (a request's); by default jobs are app-scoped and do not inherit it.
            cpu_bound: Run a plain handler that takes only the job in worker processes.
            on_abandoned: Called with each abandoned job and the reason.
            depends: Maps handler parameters to the services they receive.
        """

        def decorate(handler: Callable[..., Any]) -> WorkerPool[Any, Any]:
            return WorkerPool(
                self,
                handler,
                name=name or handler.__name__,
                concurrency=concurrency,
                queue_size=queue_size,
                overflow=overflow,
                drain_timeout=drain_timeout,
                job_timeout=job_timeout,
                inherit_deadline=inherit_deadline,
                cpu_bound=cpu_bound,
                on_abandoned=on_abandoned,
                depends=depends,
            )

        return decorate(fn) if fn is not None else decorate

    @overload
    def background(
        self,
        fn: Callable[..., Awaitable[Any]],
        /,
        *,
        name: str | None = None,
        restart: Literal["always", "on_failure", "never"] = "on_failure",
        max_restarts: int = 5,
        within: float = 60.0,
        backoff_base: float = 0.1,
        backoff_max: float = 30.0,
        on_give_up: Literal["fail_health", "shutdown"] = "fail_health",
        stop_timeout: float | None = 10.0,
        depends: Mapping[str, Service[Any] | str] | None = None,
    ) -> BackgroundTask: ...

    @overload
    def background(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        restart: Literal["always", "on_failure", "never"] = "on_failure",
        max_restarts: int = 5,
        within: float = 60.0,
        backoff_base: float = 0.1,
        backoff_max: float = 30.0,
        on_give_up: Literal["fail_health", "shutdown"] = "fail_health",
        stop_timeout: float | None = 10.0,
        depends: Mapping[str, Service[Any] | str] | None = None,
    ) -> Callable[[Callable[..., Awaitable[Any]]], BackgroundTask]: ...

    def background(
        self,
        fn: Callable[..., Awaitable[Any]] | None = None,
        /,
        *,
        name: str | None = None,
        restart: Literal["always", "on_failure", "never"] = "on_failure",
        max_restarts: int = 5,
        within: float = 60.0,
        backoff_base: float = 0.1,
        backoff_max: float = 30.0,
        on_give_up: Literal["fail_health", "shutdown"] = "fail_health",
        stop_timeout: float | None = 10.0,
        depends: Mapping[str, Service[Any] | str] | None = None,
    ) -> Any:
        """Declare a supervised long-running task (its parameters are services).

        The supervisor restarts it by ``restart`` policy, waiting an exponential backoff
        with full jitter (a random delay up to ``min(backoff_max, backoff_base * 2**n)``)
        before restart ``n``. More than ``max_restarts`` restarts within ``within`` seconds
        make it give up and escalate: by default (``on_give_up="fail_health"``) readiness and
        liveness fail, so an orchestrator replaces the process; ``"shutdown"`` asks the
        server to shut down gracefully (SIGTERM to this process). At stop it is cancelled.

        Returns a `BackgroundTask` whose `statistics()` shows its state and restarts.
        """

        def decorate(task: Callable[..., Awaitable[Any]]) -> BackgroundTask:
            return BackgroundTask(
                self,
                self.health,
                task,
                name=name or task.__name__,
                restart=restart,
                max_restarts=max_restarts,
                within=within,
                backoff_base=backoff_base,
                backoff_max=backoff_max,
                on_give_up=on_give_up,
                stop_timeout=stop_timeout,
                depends=depends,
            )

        return decorate(fn) if fn is not None else decorate

    @overload
    def periodic(
        self,
        fn: Callable[..., Awaitable[Any]],
        /,
        *,
        every: float,
        name: str | None = None,
        jitter: float = 0.0,
        timeout: float | None = None,
        first_run: Literal["now", "after_period"] = "after_period",
        stop_timeout: float | None = 10.0,
        depends: Mapping[str, Service[Any] | str] | None = None,
    ) -> PeriodicJob: ...

    @overload
    def periodic(
        self,
        fn: None = None,
        /,
        *,
        every: float,
        name: str | None = None,
        jitter: float = 0.0,
        timeout: float | None = None,
        first_run: Literal["now", "after_period"] = "after_period",
        stop_timeout: float | None = 10.0,
        depends: Mapping[str, Service[Any] | str] | None = None,
    ) -> Callable[[Callable[..., Awaitable[Any]]], PeriodicJob]: ...

    def periodic(
        self,
        fn: Callable[..., Awaitable[Any]] | None = None,
        /,
        *,
        every: float,
        name: str | None = None,
        jitter: float = 0.0,
        timeout: float | None = None,
        first_run: Literal["now", "after_period"] = "after_period",
        stop_timeout: float | None = 10.0,
        depends: Mapping[str, Service[Any] | str] | None = None,
    ) -> Any:
        """Declare a job run every ``every`` seconds (its parameters are services).

        Runs never overlap: a run longer than the period delays the next one, and missed
        periods are skipped. Each run waits an extra random delay up to ``jitter`` seconds,
        is cut off after ``timeout``, and a failure is logged and counted while the schedule
        goes on. The first run happens at once (``first_run="now"``) or after one period. At
        stop, a run in progress may finish within ``stop_timeout``.

        Returns a `PeriodicJob` whose `statistics()` counts runs and failures.
        """

        def decorate(job: Callable[..., Awaitable[Any]]) -> PeriodicJob:
            return PeriodicJob(
                self,
                job,
                name=name or job.__name__,
                every=every,
                jitter=jitter,
                timeout=timeout,
                first_run=first_run,
                stop_timeout=stop_timeout,
                depends=depends,
            )

        return decorate(fn) if fn is not None else decorate

    # -- draining -------------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        """Whether a drain has begun in the current run (readiness fails for good)."""
        return self._drain.draining

    @property
    def drain_began(self) -> float | None:
        """When the drain began (``time.monotonic()``), or ``None``."""
        return self._drain.began

    def begin_drain(self) -> None:
        """Mark the app as draining: from now on readiness fails, while liveness holds.

        The graceful-drain protocol calls this on the first SIGTERM; calling it again does
        nothing. It is reset when the next run starts.
        """
        self._drain.begin()
