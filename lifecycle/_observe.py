"""What metrics and tracing use to watch the extensions' work, beside the kernel's `Observer`.

The kernel calls each attached `lifecycle._kernel.Observer` at each step of a run. The
extensions ask the same observers, through `Observers.collect`, for a per-component observer
when a worker pool (``worker_pool``), supervised task (``background_task``), periodic job
(``periodic_job``) or health check (``health_check``) starts: a `JobObserver` or a
`TaskObserver`. With nothing attached every hook site costs one truth test; the per-job hooks
of a worker pool are the only ones on a hot path, so they stay few and take plain floats.

Like the kernel's, these observers are isolated: one that raises is logged and left out from
then on, and the job or run it watched goes on.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Coroutine, Iterator
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from ._kernel import Kernel, Observer
from ._timeline import LifecycleState
from ._validate import describe

__all__ = [
    "JobObserver",
    "TaskObserver",
    "attach",
    "attached",
    "check_attachable",
    "detach",
    "job_observer",
    "task_observer",
]

R = TypeVar("R")

logger = logging.getLogger("lifecycle.observers")


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
    if not isinstance(lifecycle, Kernel):
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


def attach(kernel: Kernel, observer: Observer) -> None:
    """Attach ``observer`` to ``kernel``, after any observer already attached."""
    kernel.observers.add(observer)


def detach(kernel: Kernel, observer: Observer) -> None:
    """Detach ``observer`` from ``kernel`` (a no-op if it is not attached)."""
    kernel.observers.remove(observer)


def attached(kernel: Kernel) -> Iterator[Any]:
    """The observers attached to ``kernel``."""
    return iter(kernel.observers)


def job_observer(kernel: Kernel, component: object) -> JobObserver | None:
    """What watches the jobs of the worker pool ``component``, or ``None``."""
    if not kernel.observers:
        return None
    found = kernel.observers.collect("worker_pool", component)
    return _JobFanout(found) if found else None


def task_observer(kernel: Kernel, hook: str, component: object) -> TaskObserver | None:
    """What watches the runs of ``component``, asked of each observer by ``hook``, or ``None``."""
    if not kernel.observers:
        return None
    found = kernel.observers.collect(hook, component)
    return _TaskFanout(found) if found else None


def _left_out(observers: list[Any], observer: object, hook: str, exc: Exception) -> None:
    observers[:] = [o for o in observers if o is not observer]
    logger.error(
        "Observer %r raised %s from %s(); it is left out from now on, and what it watched "
        "goes on unobserved.",
        observer,
        describe(exc),
        hook,
        exc_info=exc,
        extra={"phase": "observe"},
    )


class _JobFanout(JobObserver):
    """The job observers of one pool, called in turn; one that raises is left out."""

    def __init__(self, observers: list[JobObserver]) -> None:
        self.observers = observers

    def started(self, waited: float) -> None:
        for observer in tuple(self.observers):
            try:
                observer.started(waited)
            except Exception as exc:
                _left_out(self.observers, observer, "started", exc)

    def finished(self, waited: float, ran: float) -> None:
        for observer in tuple(self.observers):
            try:
                observer.finished(waited, ran)
            except Exception as exc:
                _left_out(self.observers, observer, "finished", exc)

    def wrap(self, payload: Any, job: Coroutine[Any, Any, R]) -> Coroutine[Any, Any, R]:
        for observer in tuple(self.observers):
            try:
                job = observer.wrap(payload, job)
            except Exception as exc:
                _left_out(self.observers, observer, "wrap", exc)
        return job


class _TaskFanout(TaskObserver):
    """The observers of one task, job or check, called in turn; one that raises is left out."""

    def __init__(self, observers: list[TaskObserver]) -> None:
        self.observers = observers

    def wrap(self, run: Awaitable[R]) -> Awaitable[R]:
        for observer in tuple(self.observers):
            try:
                run = observer.wrap(run)
            except Exception as exc:
                _left_out(self.observers, observer, "wrap", exc)
        return run

    @contextlib.contextmanager
    def restarting(self, restart: int, delay: float, error: str | None) -> Iterator[object]:
        with contextlib.ExitStack() as stack:
            for observer in tuple(self.observers):
                try:
                    stack.enter_context(observer.restarting(restart, delay, error))
                except Exception as exc:
                    _left_out(self.observers, observer, "restarting", exc)
            yield None
