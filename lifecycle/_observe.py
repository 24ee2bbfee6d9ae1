"""The observer hook through which metrics and tracing watch a `Lifecycle`.

The core calls an `Observer` at each step of a run (startup, each service's start and stop,
shutdown) and asks it, when a worker pool, supervised task or periodic job starts, for a
per-component observer (`JobObserver`, `TaskObserver`). With nothing attached every hook site
costs one ``is not None`` test; the per-job hooks of a worker pool are the only ones on a hot
path, so they stay few and take plain floats.

`lifecycle._metrics` and `lifecycle._tracing` implement observers and `attach` them; several
attached observers are called in turn through a fan-out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Coroutine, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from ._graph import Lifecycle, Service
    from ._health import HealthCheck
    from ._workers import BackgroundTask, PeriodicJob, WorkerPool

__all__ = ["JobObserver", "Observer", "TaskObserver", "attach", "detach"]

R = TypeVar("R")


class JobObserver:
    """Watches the jobs of one worker pool; every method runs once per job."""

    def started(self, waited: float) -> None:
        """A job left the queue after waiting ``waited`` seconds and is about to run."""

    def finished(self, waited: float, ran: float) -> None:
        """A job completed or failed, after waiting ``waited`` seconds and running ``ran``.

        It is called in the worker task that called `started` for the job, once the pool has
        counted its outcome; not for a job the pool abandons (its run was cut off).
        """

    def wrap(self, payload: Any, job: Coroutine[Any, Any, R]) -> Coroutine[Any, Any, R]:
        """Wrap the coroutine running one job; it runs in the submitter's context."""
        return job


class TaskObserver:
    """Watches one supervised background task, periodic job or health check."""

    def wrap(self, run: Awaitable[R]) -> Awaitable[R]:
        """Wrap the awaitable of one run of a periodic job or health check."""
        return run

    def restarting(
        self, restart: int, delay: float, error: str | None
    ) -> AbstractContextManager[object]:
        """Return a context manager around the backoff before a supervised task restarts."""
        return contextlib.nullcontext()


class Observer:
    """Watches the runs of a `Lifecycle`; every method is a no-op unless overridden.

    Each service's ``service_*`` calls but `service_ready` happen in that service's host task,
    so an observer may set context variables in ``service_starting`` and reset them in
    ``service_started`` or ``service_start_failed`` (likewise from ``service_stopping`` to
    ``service_stopped``). Tasks the service spawns meanwhile copy those variables and keep
    them after the host task resets its own.
    """

    def run_starting(self, lifecycle: Lifecycle) -> None:
        """Startup begins (the graph is valid)."""

    def run_started(self, lifecycle: Lifecycle, error: BaseException | None) -> None:
        """Startup ended: every service runs (``error`` is ``None``) or it was rolled back."""

    def run_stopping(self, lifecycle: Lifecycle) -> None:
        """Shutdown (or a startup's rollback) begins."""

    def run_stopped(self, lifecycle: Lifecycle, errors: Mapping[str, BaseException]) -> None:
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

    def worker_pool(self, pool: WorkerPool[Any, Any]) -> JobObserver | None:
        """A worker pool starts; return what watches its jobs, if anything."""
        return None

    def background_task(self, task: BackgroundTask) -> TaskObserver | None:
        """A supervised background task starts; return what watches it, if anything."""
        return None

    def periodic_job(self, job: PeriodicJob) -> TaskObserver | None:
        """A periodic job starts; return what watches its runs, if anything."""
        return None

    def health_check(self, check: HealthCheck) -> TaskObserver | None:
        """A health check's loop starts; return what watches its runs, if anything."""
        return None


# -- attaching ----------------------------------------------------------------------------


def check_attachable(
    lifecycle: object,
    observer_type: type[Observer],
    *,
    api: str,
    what: str,
    verb: str,
    handle: str,
) -> None:
    """Refuse to instrument what is not an idle Lifecycle, or one instrumented already.

    Shared by `instrument_metrics` (``what="metrics"``) and `instrument_tracing`.
    """
    from ._graph import Lifecycle
    from ._timeline import LifecycleState

    if not isinstance(lifecycle, Lifecycle):
        raise TypeError(f"{api}() {verb} a Lifecycle, not {lifecycle!r}.")
    if lifecycle.state in (
        LifecycleState.STARTING,
        LifecycleState.RUNNING,
        LifecycleState.STOPPING,
    ):
        raise RuntimeError(
            f"Cannot enable {what} while the Lifecycle is {lifecycle.state.value}; call "
            f"{api}() before the app starts (next to the service declarations)."
        )
    if any(isinstance(o, observer_type) for o in attached(lifecycle)):
        are = "are" if what.endswith("s") else "is"
        raise RuntimeError(
            f"{what.capitalize()} {are} already enabled on this Lifecycle; keep the {handle} "
            f"that {api}() returned the first time, or close() it before calling again."
        )


def attach(lifecycle: Lifecycle, observer: Observer) -> None:
    """Attach ``observer`` to ``lifecycle``, beside any observer already attached."""
    current = lifecycle._observer
    if current is None:
        lifecycle._observer = observer
    elif isinstance(current, _Fanout):
        lifecycle._observer = _Fanout([*current.observers, observer])
    else:
        lifecycle._observer = _Fanout([current, observer])


def detach(lifecycle: Lifecycle, observer: Observer) -> None:
    """Detach ``observer`` from ``lifecycle`` (a no-op if it is not attached)."""
    current = lifecycle._observer
    if current is observer:
        lifecycle._observer = None
    elif isinstance(current, _Fanout) and observer in current.observers:
        rest = [o for o in current.observers if o is not observer]
        lifecycle._observer = rest[0] if len(rest) == 1 else _Fanout(rest)


def attached(lifecycle: Lifecycle) -> Iterator[Observer]:
    """The observers attached to ``lifecycle``."""
    current = lifecycle._observer
    if isinstance(current, _Fanout):
        yield from current.observers
    elif current is not None:
        yield current


class _Fanout(Observer):
    """Several observers, called in the order they were attached."""

    def __init__(self, observers: list[Observer]) -> None:
        self.observers = observers

    def run_starting(self, lifecycle: Lifecycle) -> None:
        for observer in self.observers:
            observer.run_starting(lifecycle)

    def run_started(self, lifecycle: Lifecycle, error: BaseException | None) -> None:
        for observer in self.observers:
            observer.run_started(lifecycle, error)

    def run_stopping(self, lifecycle: Lifecycle) -> None:
        for observer in self.observers:
            observer.run_stopping(lifecycle)

    def run_stopped(self, lifecycle: Lifecycle, errors: Mapping[str, BaseException]) -> None:
        for observer in self.observers:
            observer.run_stopped(lifecycle, errors)

    def service_starting(self, service: Service[Any]) -> None:
        for observer in self.observers:
            observer.service_starting(service)

    def service_ready(self, service: Service[Any]) -> None:
        for observer in self.observers:
            observer.service_ready(service)

    def service_started(self, service: Service[Any]) -> None:
        for observer in self.observers:
            observer.service_started(service)

    def service_start_failed(self, service: Service[Any], error: BaseException) -> None:
        for observer in self.observers:
            observer.service_start_failed(service, error)

    def service_stopping(self, service: Service[Any]) -> None:
        for observer in self.observers:
            observer.service_stopping(service)

    def service_stopped(self, service: Service[Any], error: BaseException | None) -> None:
        for observer in self.observers:
            observer.service_stopped(service, error)

    def worker_pool(self, pool: WorkerPool[Any, Any]) -> JobObserver | None:
        found = [o for o in (obs.worker_pool(pool) for obs in self.observers) if o is not None]
        return found[0] if len(found) == 1 else _JobFanout(found) if found else None

    def background_task(self, task: BackgroundTask) -> TaskObserver | None:
        found = [o for o in (obs.background_task(task) for obs in self.observers) if o is not None]
        return found[0] if len(found) == 1 else _TaskFanout(found) if found else None

    def periodic_job(self, job: PeriodicJob) -> TaskObserver | None:
        found = [o for o in (obs.periodic_job(job) for obs in self.observers) if o is not None]
        return found[0] if len(found) == 1 else _TaskFanout(found) if found else None

    def health_check(self, check: HealthCheck) -> TaskObserver | None:
        found = [o for o in (obs.health_check(check) for obs in self.observers) if o is not None]
        return found[0] if len(found) == 1 else _TaskFanout(found) if found else None


class _JobFanout(JobObserver):
    def __init__(self, observers: list[JobObserver]) -> None:
        self.observers = observers

    def started(self, waited: float) -> None:
        for observer in self.observers:
            observer.started(waited)

    def finished(self, waited: float, ran: float) -> None:
        for observer in self.observers:
            observer.finished(waited, ran)

    def wrap(self, payload: Any, job: Coroutine[Any, Any, R]) -> Coroutine[Any, Any, R]:
        for observer in self.observers:
            job = observer.wrap(payload, job)
        return job


class _TaskFanout(TaskObserver):
    def __init__(self, observers: list[TaskObserver]) -> None:
        self.observers = observers

    def wrap(self, run: Awaitable[R]) -> Awaitable[R]:
        for observer in self.observers:
            run = observer.wrap(run)
        return run

    @contextlib.contextmanager
    def restarting(self, restart: int, delay: float, error: str | None) -> Iterator[object]:
        with contextlib.ExitStack() as stack:
            for observer in self.observers:
                stack.enter_context(observer.restarting(restart, delay, error))
            yield None
