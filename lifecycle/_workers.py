"""App-scoped background work: bounded worker pools, supervised tasks, periodic jobs.

Each of them runs as an internal service of the `Lifecycle` graph: it starts after the
services its handler uses, lives in the lifespan's task group, and stops (draining first)
before them. Nothing outlives the app and nothing is fire-and-forget.

A worker pool is a fixed set of long-lived worker tasks reading one bounded anyio memory
stream: handing a job over costs a stream hand-off, not a task spawn.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import importlib
import inspect
import logging
import math
import random
import sys
import time
import types
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_process
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._deadline import current_request as _request_deadline
from ._health import CheckResult, HealthMonitor, HealthStatus
from ._kernel import Kernel, Service, parameters
from ._observe import JobObserver, TaskObserver, job_observer, task_observer
from ._servers import stop_whole_server
from ._toolkit import backoff_ceiling
from ._validate import count, seconds
from .exceptions import GraphError, JobAbandoned, PoolClosed, QueueFull

__all__ = [
    "BackgroundStatistics",
    "BackgroundTask",
    "PeriodicJob",
    "PeriodicState",
    "PeriodicStatistics",
    "PoolState",
    "SupervisorState",
    "WorkerPool",
    "WorkerStatistics",
]

J = TypeVar("J")
R = TypeVar("R")

logger = logging.getLogger("lifecycle.workers")

Overflow = Literal["wait", "reject"]


_SAMPLE = 5  # abandoned jobs named in the one line that reports them


def _short_repr(payload: object) -> str:
    try:
        text = repr(payload)
    except Exception:
        text = f"<{type(payload).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


class PoolState(enum.Enum):
    """Where a worker pool is: ``PENDING -> RUNNING -> DRAINING -> STOPPED``, then again.

    Only a ``RUNNING`` pool accepts jobs; submitting in any other state raises `PoolClosed`
    saying why.
    """

    PENDING = "pending"  # declared; the app's lifespan has not started it
    RUNNING = "running"  # accepting and running jobs
    DRAINING = "draining"  # intake closed: the queue drains within the drain deadline
    STOPPED = "stopped"  # every accepted job completed, failed or was reported abandoned


_CLOSED_BECAUSE = {
    PoolState.PENDING: "it has not started: the app's lifespan starts it",
    PoolState.DRAINING: "it is draining because the app is shutting down",
    PoolState.STOPPED: "the app has stopped",
}

_POOL_MOVES: dict[PoolState, dict[PoolState, str]] = {
    # For each state, the states it may not move to, with why.
    PoolState.PENDING: {
        PoolState.DRAINING: "cannot drain: it never started",
        PoolState.PENDING: "is already pending",
    },
    PoolState.RUNNING: {
        PoolState.RUNNING: "cannot start: it is running already (one run at a time)",
        PoolState.PENDING: "cannot be reset while it runs",
    },
    PoolState.DRAINING: {
        PoolState.RUNNING: "cannot start while it drains",
        PoolState.DRAINING: "is draining already",
        PoolState.PENDING: "cannot be reset while it drains",
    },
    PoolState.STOPPED: {
        PoolState.DRAINING: "cannot drain: it has stopped",
        PoolState.STOPPED: "has stopped already",
    },
}


class PeriodicState(enum.Enum):
    """Where a periodic job is: ``PENDING -> WAITING <-> RUNNING -> STOPPING -> STOPPED``."""

    PENDING = "pending"  # declared; the app's lifespan has not started it
    WAITING = "waiting"  # between runs
    RUNNING = "running"  # a run is in progress
    STOPPING = "stopping"  # the app stops: a run in progress may finish, no new one starts
    STOPPED = "stopped"


_PERIODIC_MOVES: dict[PeriodicState, set[PeriodicState]] = {
    # For each state, the states it may move to.
    PeriodicState.PENDING: {PeriodicState.WAITING, PeriodicState.STOPPED},
    PeriodicState.WAITING: {PeriodicState.RUNNING, PeriodicState.STOPPING},
    PeriodicState.RUNNING: {PeriodicState.WAITING, PeriodicState.STOPPING},
    PeriodicState.STOPPING: {PeriodicState.STOPPED},
    PeriodicState.STOPPED: {PeriodicState.WAITING},
}
# At most this much of the pool's stop deadline is kept for jobs cancelled at the end of
# the drain to unwind (a tenth of the time left, when that is less).
_UNWIND_MARGIN = 1.0


_JOB_NAMES = frozenset({"job", "jobs", "item", "items", "task", "payload", "message", "msg"})


def _check_job_first(
    name: str,
    handler: Callable[..., Any],
    job: str,
    targets: Mapping[str, str],
    services: Mapping[str, Service[Any]],
) -> None:
    """Refuse a handler whose job parameter is not first (it would receive a job as a service)."""
    # A job-like name that depends= maps to a service, or that names one, is a service.
    misplaced = [
        param
        for param, target in targets.items()
        if param in _JOB_NAMES and target == param and param not in services
    ]
    if misplaced:
        first = misplaced[0]
        why = f"{first!r} looks like the job, but the job is the first parameter ({job!r})"
    elif job in services:
        first = "job"
        why = f"its first parameter, {job!r}, receives the job, not the service {job!r}"
    else:
        return
    rest = [param for param in targets if param != first]
    raise GraphError(
        f"Worker handler {name!r}: {why}; put the job parameter first: "
        f"def {getattr(handler, '__name__', name)}({', '.join([first, job, *rest])})."
    )


def _service_function(
    body: Callable[[dict[str, Any]], AsyncIterator[Any]], params: list[str]
) -> Callable[..., AsyncIterator[Any]]:
    """An async generator service taking ``params`` by keyword and delegating to ``body``."""

    async def service(**deps: Any) -> AsyncIterator[Any]:
        async for value in body(deps):
            yield value

    service.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY) for name in params]
    )
    return service


@types.coroutine
def _in_context(
    context: contextvars.Context, coro: Coroutine[Any, Any, R]
) -> Generator[Any, Any, R]:
    """Drive ``coro`` with every step running inside ``context``.

    This is how a job keeps the submitter's context variables (request ids, the tracing
    context) while running in a long-lived worker task: each step of the coroutine runs in
    the submitter's copied context, and whatever it yields (a future, a trio trap) goes
    straight to the event loop.
    """
    send: Any = None
    error: BaseException | None = None
    while True:
        try:
            if error is None:
                yielded = context.run(coro.send, send)
            else:
                yielded = context.run(coro.throw, error)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        try:
            send, error = (yield yielded), None
        except BaseException as exc:  # delivered into the job, which decides what to do
            send, error = None, exc


def _task_is_cancelled() -> bool:
    """Whether the cancellation exception being handled means this task is being cancelled.

    On trio, `Cancelled` only ever comes from a cancel scope. On asyncio, code can raise
    `CancelledError` without being cancelled: it awaited a future or a task that something
    else cancelled. Such a stray error must not end a worker, a supervisor or a schedule as
    if the app were stopping them: it is a failure like any other.
    """
    if anyio.current_effective_deadline() == -math.inf:
        return True  # an enclosing cancel scope was cancelled
    if anyio.get_cancelled_exc_class() is not asyncio.CancelledError:
        return True
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0  # a plain Task.cancel()


def _stray_cancellation(what: str, exc: BaseException) -> RuntimeError:
    """The failure to record for a `CancelledError` that did not come from cancelling us."""
    error = RuntimeError(
        f"{what} raised {type(exc).__name__} although nothing was cancelling it: it awaited "
        f"something that another task cancelled. Catch that error where it is awaited."
    )
    error.__cause__ = exc
    return error


# -- worker pools -------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerStatistics:
    """A snapshot of a worker pool, from `WorkerPool.statistics`.

    ``accepted == completed + failed + abandoned + queued + running`` at any time; once the
    pool has stopped, ``queued`` and ``running`` are zero.

    Attributes:
        name: The pool's name.
        state: Where the pool is (only a running pool accepts jobs).
        concurrency: How many jobs may run at once.
        queue_size: How many accepted jobs may wait.
        queued: Jobs accepted and waiting.
        running: Jobs running now.
        accepted: Jobs accepted since the pool started.
        completed: Jobs whose handler returned.
        failed: Jobs whose handler raised (or timed out).
        rejected: Submissions refused because the queue was full.
        abandoned: Accepted jobs that never finished because the pool stopped.
        wait_time_total: Seconds the started jobs (completed, failed or running) spent
            queued, summed.
        wait_time_max: The longest time one job spent queued.
        run_time_total: Seconds the finished jobs (completed or failed) ran, summed.
        run_time_max: The longest run of one finished job.
    """

    name: str
    state: PoolState
    concurrency: int
    queue_size: int
    queued: int
    running: int
    accepted: int
    completed: int
    failed: int
    rejected: int
    abandoned: int
    wait_time_total: float
    wait_time_max: float
    run_time_total: float
    run_time_max: float

    @property
    def mean_wait_time(self) -> float:
        """Mean seconds a started job had waited in the queue."""
        started = self.completed + self.failed + self.running
        return self.wait_time_total / started if started else 0.0

    @property
    def mean_run_time(self) -> float:
        """Mean seconds a finished job ran."""
        finished = self.completed + self.failed
        return self.run_time_total / finished if finished else 0.0


class _Result:
    """Where `WorkerPool.call` waits for its job's outcome."""

    __slots__ = ("error", "event", "value")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class _Job:
    __slots__ = ("context", "counted", "deadline", "enqueued", "payload", "result")

    def __init__(
        self,
        payload: Any,
        context: contextvars.Context,
        deadline: float,
        result: _Result | None,
    ) -> None:
        self.payload = payload
        self.context = context
        self.deadline = deadline
        self.result = result
        self.enqueued = time.perf_counter()
        self.counted = False


def _pool_reference(handler: Callable[..., Any]) -> tuple[str, str] | None:
    """The module and qualified name of a cpu_bound handler that its pool's name now hides.

    pickle sends a function as a reference (its module and qualified name) and refuses when
    that name no longer leads to the function, as ``@lc.worker(cpu_bound=True)`` rebinds it
    to the `WorkerPool`. For such a handler the worker process is sent the reference, which
    it resolves and unwraps with `_resolve_and_call`; for any other, ``None``.
    """
    module = getattr(handler, "__module__", None)
    qualname = getattr(handler, "__qualname__", "")
    if not isinstance(module, str) or "<locals>" in qualname:
        return None
    found = _resolve(module, qualname)
    if isinstance(found, WorkerPool) and found.handler is handler:
        return module, qualname
    return None


def _resolve(module: str, qualname: str) -> object:
    target: object = sys.modules.get(module)
    for part in qualname.split("."):
        target = getattr(target, part, None)
    return target


def _resolve_and_call(module: str, qualname: str, payload: object) -> object:
    """Run, in a worker process, the handler a `WorkerPool` named ``module.qualname`` wraps."""
    importlib.import_module(module)
    found = _resolve(module, qualname)
    handler = found.handler if isinstance(found, WorkerPool) else found
    if not callable(handler):
        raise TypeError(
            f"The worker process found no handler at {module}.{qualname}; define cpu_bound "
            f"handlers at the top level of an importable module."
        )
    return handler(payload)


class WorkerPool(Generic[J, R]):
    """A bounded pool of workers running a handler on submitted jobs; see `Lifecycle.worker`.

    The pool runs while the app does: submitting before it starts or once it has begun to
    drain raises `PoolClosed`.
    """

    def __init__(
        self,
        lifecycle: Kernel,
        handler: Callable[..., Any],
        *,
        name: str,
        concurrency: int,
        queue_size: int,
        overflow: Overflow,
        drain_timeout: float | None,
        job_timeout: float | None,
        inherit_deadline: bool,
        cpu_bound: bool,
        on_abandoned: Callable[[J, str], object] | None,
        depends: Mapping[str, Service[Any] | str] | None,
    ) -> None:
        count("concurrency", concurrency)
        count("queue_size", queue_size)
        if overflow not in ("wait", "reject"):
            raise ValueError(
                f"overflow must be 'wait' (block until there is room) or 'reject' (raise "
                f"QueueFull), not {overflow!r}."
            )
        seconds("drain_timeout", drain_timeout, optional=True)
        seconds("job_timeout", job_timeout, optional=True)
        targets = parameters(
            lifecycle, handler, kind="Worker handler", name=name, depends=depends, job=True
        )
        params = list(targets)
        job = next(iter(inspect.signature(handler).parameters))
        is_async = inspect.iscoroutinefunction(handler)
        if cpu_bound and (is_async or params):
            raise TypeError(
                f"A cpu_bound worker runs its handler in another process, so {name!r} must be "
                f"a plain (not async) function taking only the job (and no services)."
            )
        if job_timeout is not None and not (is_async or cpu_bound):
            # A worker process can be killed; a thread cannot, so the timeout could not stop
            # the job, only stop waiting for it while it went on using a thread.
            raise ValueError(
                f"Worker pool {name!r} runs its plain handler in a thread, which cannot be "
                f"cancelled, so job_timeout={job_timeout!r} could not stop a job; make the "
                f"handler async, or drop job_timeout."
            )
        self.name = name
        self.handler = handler
        self.concurrency = concurrency
        self.queue_size = queue_size
        self.overflow = overflow
        self.drain_timeout = drain_timeout
        self.job_timeout = job_timeout
        self.inherit_deadline = inherit_deadline
        self.cpu_bound = cpu_bound
        self.on_abandoned = on_abandoned
        self._is_async = is_async
        self._deps: dict[str, Any] = {}
        self._send: MemoryObjectSendStream[_Job] | None = None
        self._receive: MemoryObjectReceiveStream[_Job] | None = None
        self.state = PoolState.PENDING
        # What ends the drain early, for the abandoned jobs' reasons: set when it begins.
        self._cut_off = "the drain_timeout ran out"
        self._blocked: set[anyio.CancelScope] = set()
        self._limiter: anyio.CapacityLimiter | None = None
        # Metrics and tracing (lifecycle/_observe.py): per-job hooks, None when off.
        self._observer: JobObserver | None = None
        self._reset_counters()
        stop_timeout = None if drain_timeout is None else drain_timeout + 5.0
        self.service = lifecycle.declare(
            _service_function(self._serve, params),
            name=f"worker:{name}",
            depends=targets,
            stop_timeout=stop_timeout,
            internal=True,
            kind="worker",
            check=lambda services: _check_job_first(name, handler, job, targets, services),
        )

    def __repr__(self) -> str:
        return f"<WorkerPool {self.name!r} concurrency={self.concurrency}>"

    def _reset_counters(self) -> None:
        self._abandoned_sample: list[str] = []
        self._running = 0
        self._accepted = 0
        self._completed = 0
        self._failed = 0
        self._rejected = 0
        self._abandoned = 0
        self._wait_total = 0.0
        self._wait_max = 0.0
        self._run_total = 0.0
        self._run_max = 0.0

    # -- submitting -----------------------------------------------------------------------

    def _intake(self) -> MemoryObjectSendStream[_Job]:
        if self._send is None:
            raise PoolClosed(
                f"Worker pool {self.name!r} is not accepting jobs: "
                f"{_CLOSED_BECAUSE.get(self.state, 'it is not running')}."
            )
        return self._send

    def _job(self, payload: J, result: _Result | None) -> _Job:
        context = contextvars.copy_context()
        if self.inherit_deadline:
            deadline = anyio.current_effective_deadline()
        else:
            deadline = math.inf
            # The job keeps the submitter's context variables, except the request's deadline
            # that `lifecycle.remaining()` reads in worker threads.
            if context.get(_request_deadline) is not None:
                context.run(_request_deadline.set, None)
        return _Job(payload, context, deadline, result)

    def submit_nowait(self, job: J) -> None:
        """Queue ``job`` if there is room right now.

        Raises:
            QueueFull: The queue is full.
            PoolClosed: The pool is not running (not started yet, or draining).
        """
        send = self._intake()
        item = self._job(job, None)
        try:
            send.send_nowait(item)
        except anyio.WouldBlock:
            self._rejected += 1
            raise QueueFull(
                f"Worker pool {self.name!r} is full ({self.queue_size} jobs queued, "
                f"{self.concurrency} running); retry later or use `await submit(...)`."
            ) from None
        self._count(item)

    async def submit(self, job: J) -> None:
        """Queue ``job``, waiting for room if the queue is full (``overflow="wait"``).

        With ``overflow="reject"`` a full queue raises `QueueFull` at once.

        Raises:
            QueueFull: The queue is full and the pool rejects on overflow.
            PoolClosed: The pool is not running, or began to drain while we waited.
        """
        await self._submit(self._job(job, None))

    async def call(self, job: J) -> R:
        """Queue ``job`` like `submit`, then wait for and return the handler's result.

        The job is app-scoped: if the caller stops waiting (a request's deadline, say), the
        job still runs.

        Raises:
            Exception: Whatever the handler raised, as itself.
            JobAbandoned: The pool stopped before the job finished.
        """
        result = _Result()
        await self._submit(self._job(job, result))
        await result.event.wait()
        if result.error is not None:
            raise result.error
        return result.value  # type: ignore[no-any-return]

    async def _submit(self, item: _Job) -> None:
        await anyio.lowlevel.checkpoint()
        send = self._intake()
        try:
            send.send_nowait(item)
        except anyio.WouldBlock:
            if self.overflow == "reject":
                self._rejected += 1
                raise QueueFull(
                    f"Worker pool {self.name!r} is full ({self.queue_size} jobs queued); "
                    f"retry later."
                ) from None
        else:
            self._count(item)
            return
        with anyio.CancelScope() as scope:
            self._blocked.add(scope)
            try:
                await send.send(item)
            except anyio.ClosedResourceError:
                pass
            else:
                self._count(item)
                return
            finally:
                self._blocked.discard(scope)
        raise PoolClosed(
            f"Worker pool {self.name!r} stopped accepting jobs while this one waited for "
            f"room: {_CLOSED_BECAUSE.get(self.state, 'it is not running')}."
        )

    def _count(self, item: _Job) -> None:
        if not item.counted:
            item.counted = True
            self._accepted += 1

    # -- running --------------------------------------------------------------------------

    async def _serve(self, deps: dict[str, Any]) -> AsyncIterator[WorkerPool[J, R]]:
        self._reset_counters()
        self._cut_off = "the drain_timeout ran out"
        self._observer = job_observer(self.service.lifecycle, self)
        self._deps = deps
        self._limiter = anyio.CapacityLimiter(self.concurrency) if not self._is_async else None
        send, receive = anyio.create_memory_object_stream[_Job](self.queue_size)
        self._receive = receive
        began = 0.0
        abandoned_before = 0
        drained = False
        try:
            with anyio.CancelScope() as drain:
                async with anyio.create_task_group() as workers:
                    for _ in range(self.concurrency):
                        workers.start_soon(self._worker, receive.clone())
                    self._send = send
                    self._enter(PoolState.RUNNING)
                    try:
                        yield self
                    finally:
                        # Intake stops first: new submissions, and those waiting for room,
                        # get PoolClosed. Then the workers drain the queue and end on their
                        # own (the task group waits for them) unless the drain deadline
                        # passes.
                        self._enter(PoolState.DRAINING)
                        self._send = None
                        for scope in list(self._blocked):
                            scope.cancel()
                        send.close()
                        began = time.perf_counter()
                        abandoned_before = self._abandoned
                        queued = receive.statistics().current_buffer_used
                        if queued or self._running:
                            logger.info(
                                "Worker pool %r draining: %d queued, %d running",
                                self.name,
                                queued,
                                self._running,
                                extra={"pool": self.name, "phase": "drain"},
                            )
                        drain.deadline = self._drain_deadline()
            drained = not drain.cancelled_caught
        finally:
            # Whatever ended the drain, its deadline or the app's shutdown deadline cutting
            # the pool off, what is still queued is abandoned and reported. This runs without
            # awaiting anything, so that no cancellation can skip it.
            leftover = self._abandon_queued(receive)
            self._enter(PoolState.STOPPED)
            sample = self._abandoned_sample
            count = self._abandoned - abandoned_before
            more = count - len(sample)
            jobs = (
                f"; the first: {', '.join(sample)}{f' (and {more} more)' if more > 0 else ''}"
                if sample
                else ""
            )
            self._receive = None
            if drained:
                logger.debug(
                    "Worker pool %r drained in %.1fms",
                    self.name,
                    (time.perf_counter() - began) * 1000,
                    extra={"pool": self.name, "phase": "drain"},
                )
            elif self._is_async or self.cpu_bound:
                logger.warning(
                    "Worker pool %r stopped draining when %s: %d running jobs were cancelled "
                    "and %d queued jobs abandoned%s",
                    self.name,
                    self._cut_off,
                    count - leftover,
                    leftover,
                    jobs,
                    extra={"pool": self.name, "phase": "drain", "abandoned": count},
                )
            else:
                logger.warning(
                    "Worker pool %r stopped draining when %s: it waited for the running jobs, "
                    "as a thread cannot be cancelled, and abandoned %d queued jobs%s",
                    self.name,
                    self._cut_off,
                    leftover,
                    jobs,
                    extra={"pool": self.name, "phase": "drain", "abandoned": count},
                )

    def _drain_deadline(self) -> float:
        """When the drain gives up, cancelling the running jobs and abandoning the rest.

        That is ``drain_timeout`` from now, unless the pool's own stop deadline (the app's
        shutdown budget) comes first: then a little before it, so that the cancelled jobs
        unwind and every job is accounted for before the app cuts the pool off.
        """
        now = anyio.current_time()
        deadline = math.inf if self.drain_timeout is None else now + self.drain_timeout
        outer = anyio.current_effective_deadline()
        if outer < math.inf:
            margin = min(_UNWIND_MARGIN, max(0.0, (outer - now) / 10))
            if outer - margin < deadline:
                self._cut_off = "the app's shutdown_timeout ran out"
                return outer - margin
        return deadline

    def _abandon_queued(self, receive: MemoryObjectReceiveStream[_Job]) -> int:
        """Abandon every job still queued; return how many there were."""
        leftover: list[_Job] = []
        with receive, contextlib.suppress(anyio.WouldBlock, anyio.EndOfStream):
            while True:
                leftover.append(receive.receive_nowait())
        for item in leftover:
            self._abandon(item, f"{self._cut_off} before it started")
        return len(leftover)

    async def _worker(self, receive: MemoryObjectReceiveStream[_Job]) -> None:
        async with receive:
            async for item in receive:
                self._count(item)
                await self._run(item)

    async def _run(self, item: _Job) -> None:
        began = time.perf_counter()
        waited = began - item.enqueued
        self._wait_total += waited
        if waited > self._wait_max:
            self._wait_max = waited
        observer = self._observer
        if observer is not None:
            observer.started(waited)
        self._running += 1
        try:
            try:
                value = await self._invoke(item)
            finally:
                self._running -= 1
                ran = time.perf_counter() - began
        except anyio.get_cancelled_exc_class() as exc:
            if _task_is_cancelled():
                # The drain deadline passed while the job ran. Only started jobs that are
                # running or finished count in the wait and run times.
                self._wait_total -= waited
                self._abandon(item, f"it was cancelled when {self._cut_off}")
                raise
            what = f"Job {item.payload!r} of worker pool {self.name!r}"
            self._fail(item, _stray_cancellation(what, exc), ran)
        except Exception as exc:
            self._fail(item, exc, ran)
        except BaseException as exc:
            self._wait_total -= waited
            self._abandon(item, f"it raised {type(exc).__name__}")
            raise
        else:
            self._ran(ran)
            self._completed += 1
            if item.result is not None:
                item.result.value = value
                item.result.event.set()
        if observer is not None:  # completed or failed; not for a job the pool abandons
            observer.finished(waited, ran)

    def _ran(self, seconds: float) -> None:
        self._run_total += seconds
        if seconds > self._run_max:
            self._run_max = seconds

    def _fail(self, item: _Job, exc: Exception, ran: float) -> None:
        self._ran(ran)
        self._failed += 1
        logger.error(
            "Worker pool %r: job %r failed: %s",
            self.name,
            item.payload,
            exc,
            exc_info=exc,
            extra={"pool": self.name, "job": repr(item.payload)},
        )
        if item.result is not None:
            item.result.error = exc
            item.result.event.set()

    async def _invoke(self, item: _Job) -> Any:
        deadline = item.deadline
        if self.job_timeout is not None:
            deadline = min(deadline, anyio.current_time() + self.job_timeout)
        job = self._call(item.payload)
        if self._observer is not None:
            job = self._observer.wrap(item.payload, job)  # a span, run in the job's context
        if deadline == math.inf:
            return await _in_context(item.context, job)
        with anyio.CancelScope(deadline=deadline) as scope:
            return await _in_context(item.context, job)
        raise TimeoutError(
            f"Job {item.payload!r} of worker pool {self.name!r} ran out of time "
            f"({'its job_timeout' if self.job_timeout else 'the deadline it inherited'})."
            if scope.cancelled_caught
            else f"Job {item.payload!r} was cancelled."
        )

    def _call(self, payload: Any) -> Coroutine[Any, Any, Any]:
        if self._is_async:
            return self.handler(payload, **self._deps)  # type: ignore[no-any-return]
        if self.cpu_bound:
            reference = _pool_reference(self.handler)
            if reference is None:  # the call form: pickle sends the function as usual
                return anyio.to_process.run_sync(self.handler, payload, cancellable=True)
            module, qualname = reference
            return anyio.to_process.run_sync(
                _resolve_and_call, module, qualname, payload, cancellable=True
            )
        handler = self.handler
        deps = self._deps
        return anyio.to_thread.run_sync(lambda: handler(payload, **deps), limiter=self._limiter)

    def _abandon(self, item: _Job, why: str) -> None:
        self._count(item)
        self._abandoned += 1
        if item.result is not None:
            item.result.error = JobAbandoned(
                f"Job {item.payload!r} of worker pool {self.name!r} was abandoned: {why}."
            )
            item.result.event.set()
        if self.on_abandoned is not None:
            try:
                self.on_abandoned(item.payload, why)
            except Exception:
                logger.exception("on_abandoned of worker pool %r raised", self.name)
        elif len(self._abandoned_sample) < _SAMPLE:
            # Reported once, with the count, when the pool stops: one line, not one per job.
            self._abandoned_sample.append(_short_repr(item.payload))

    # -- inspecting -----------------------------------------------------------------------

    def _enter(self, state: PoolState) -> None:
        why = _POOL_MOVES[self.state].get(state)
        if why is not None:
            raise RuntimeError(f"Worker pool {self.name!r} {why}.")
        self.state = state

    def statistics(self) -> WorkerStatistics:
        """A frozen snapshot of the pool's state and counters."""
        receive = self._receive
        queued = 0 if receive is None else receive.statistics().current_buffer_used
        return WorkerStatistics(
            name=self.name,
            state=self.state,
            concurrency=self.concurrency,
            queue_size=self.queue_size,
            queued=queued,
            running=self._running,
            accepted=self._accepted,
            completed=self._completed,
            failed=self._failed,
            rejected=self._rejected,
            abandoned=self._abandoned,
            wait_time_total=self._wait_total,
            wait_time_max=self._wait_max,
            run_time_total=self._run_total,
            run_time_max=self._run_max,
        )


# -- supervised tasks ---------------------------------------------------------------------


class SupervisorState(enum.Enum):
    """Where a supervised background task is."""

    PENDING = "pending"
    RUNNING = "running"
    BACKOFF = "backoff"  # waiting before a restart
    EXITED = "exited"  # returned or failed, and its policy does not restart it
    GAVE_UP = "gave up"  # restarted too often within the window; escalated
    STOPPED = "stopped"


Restart = Literal["always", "on_failure", "never"]
Escalation = Literal["fail_health", "shutdown"]


@dataclass(frozen=True)
class BackgroundStatistics:
    """A snapshot of a supervised task, from `BackgroundTask.statistics`.

    Attributes:
        name: The task's name.
        state: Where it is.
        starts: How many times it has been started (1 + restarts).
        restarts: How many times it was restarted.
        failures: How many of its runs raised.
        last_error: A one-line description of its last failure, if any.
        next_restart_in: Seconds until the next restart while in backoff, else ``None``.
    """

    name: str
    state: SupervisorState
    starts: int
    restarts: int
    failures: int
    last_error: str | None
    next_restart_in: float | None


class BackgroundTask:
    """A supervised long-running task; see `Lifecycle.background`."""

    def __init__(
        self,
        lifecycle: Kernel,
        health: HealthMonitor,
        fn: Callable[..., Awaitable[Any]],
        *,
        name: str,
        restart: Restart,
        max_restarts: int,
        within: float,
        backoff_base: float,
        backoff_max: float,
        on_give_up: Escalation,
        stop_timeout: float | None,
        depends: Mapping[str, Service[Any] | str] | None,
    ) -> None:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"@lc.background needs an async function; {name!r} is not one.")
        if restart not in ("always", "on_failure", "never"):
            raise ValueError(f"restart must be 'always', 'on_failure' or 'never', not {restart!r}.")
        if on_give_up not in ("fail_health", "shutdown"):
            raise ValueError(
                f"on_give_up must be 'fail_health' (readiness and liveness fail) or "
                f"'shutdown' (the server is asked to stop), not {on_give_up!r}."
            )
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
            raise ValueError(f"max_restarts must be an integer >= 0, not {max_restarts!r}.")
        seconds("within", within)
        seconds("backoff_base", backoff_base)
        seconds("backoff_max", backoff_max)
        if backoff_max < backoff_base:
            raise ValueError(
                f"Background task {name!r}: backoff_max={backoff_max!r} is below "
                f"backoff_base={backoff_base!r}; raise backoff_max or lower backoff_base."
            )
        targets = parameters(lifecycle, fn, kind="Background task", name=name, depends=depends)
        self.name = name
        self.fn = fn
        self.restart = restart
        self.max_restarts = max_restarts
        self.within = within
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.on_give_up = on_give_up
        self._observer: TaskObserver | None = None  # metrics and tracing (_observe.py)
        self._reset()
        self.service = lifecycle.declare(
            _service_function(self._serve, list(targets)),
            name=f"background:{name}",
            depends=targets,
            stop_timeout=stop_timeout,
            internal=True,
            kind="background",
        )
        # Readiness (and, with on_give_up="fail_health", liveness) reflect the supervisor:
        # warn while it backs off, fail once it has given up.
        health.register_component(
            f"background:{name}",
            self._health,
            affects_readiness=True,
            affects_liveness=on_give_up == "fail_health",
        )

    def __repr__(self) -> str:
        return f"<BackgroundTask {self.name!r} {self.state.value}>"

    def _reset(self) -> None:
        self.state = SupervisorState.PENDING
        self._starts = 0
        self._failures = 0
        self._last_error: str | None = None
        self._restart_times: deque[float] = deque()
        self._next_restart_at: float | None = None

    @property
    def gave_up(self) -> bool:
        """Whether it was restarted too often and its supervisor gave up."""
        return self.state is SupervisorState.GAVE_UP

    def _health(self) -> CheckResult:
        if self.state is SupervisorState.GAVE_UP:
            return CheckResult(
                HealthStatus.FAIL,
                f"Background task {self.name!r} restarted {self.max_restarts} times within "
                f"{self.within}s and was given up; last error: {self._last_error}",
            )
        if self.state is SupervisorState.BACKOFF:
            return CheckResult(
                HealthStatus.WARN,
                f"Background task {self.name!r} is restarting after: {self._last_error}",
            )
        return CheckResult(HealthStatus.PASS)

    def delay(self, attempt: int) -> float:
        """The backoff before restart number ``attempt`` (1-based): full jitter under a cap."""
        # The ceiling is capped without computing 2 ** (attempt - 1), which overflows a float
        # past about a thousand restarts within the window.
        ceiling = backoff_ceiling(self.backoff_base, self.backoff_max, attempt)
        return random.uniform(0, ceiling)  # noqa: S311 - jitter, not cryptography

    async def _serve(self, deps: dict[str, Any]) -> AsyncIterator[BackgroundTask]:
        self._reset()
        self._observer = task_observer(self.service.lifecycle, "background_task", self)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._supervise, deps)
            yield self
            tg.cancel_scope.cancel()
        if self.state not in (SupervisorState.GAVE_UP, SupervisorState.EXITED):
            self.state = SupervisorState.STOPPED

    async def _supervise(self, deps: dict[str, Any]) -> None:
        while True:
            self.state = SupervisorState.RUNNING
            self._starts += 1
            failed = True
            try:
                await self.fn(**deps)
            except anyio.get_cancelled_exc_class() as exc:
                if _task_is_cancelled():
                    raise
                self._failed(_stray_cancellation(f"Background task {self.name!r}", exc))
            except Exception as exc:
                self._failed(exc)
            else:
                failed = False
                logger.warning("Background task %r returned", self.name, extra={"task": self.name})
            if self.restart == "never" or (self.restart == "on_failure" and not failed):
                self.state = SupervisorState.EXITED
                return
            now = anyio.current_time()
            while self._restart_times and self._restart_times[0] <= now - self.within:
                self._restart_times.popleft()
            if len(self._restart_times) >= self.max_restarts:
                self._give_up()
                return
            self._restart_times.append(now)
            delay = self.delay(len(self._restart_times))
            self.state = SupervisorState.BACKOFF
            self._next_restart_at = now + delay
            logger.info(
                "Background task %r restarts in %.3fs (restart %d within %ss)",
                self.name,
                delay,
                len(self._restart_times),
                self.within,
                extra={"task": self.name, "phase": "restart"},
            )
            if self._observer is None:
                await anyio.sleep(delay)
            else:
                restart = len(self._restart_times)
                error = self._last_error if failed else None
                with self._observer.restarting(restart, delay, error):
                    await anyio.sleep(delay)
            self._next_restart_at = None

    def _failed(self, exc: Exception) -> None:
        self._failures += 1
        self._last_error = f"{type(exc).__name__}: {exc}"
        logger.error(
            "Background task %r failed: %s",
            self.name,
            exc,
            exc_info=exc,
            extra={"task": self.name, "phase": "run"},
        )

    def _give_up(self) -> None:
        self.state = SupervisorState.GAVE_UP
        logger.error(
            "Background task %r restarted %d times within %ss; giving up (%s)",
            self.name,
            self.max_restarts,
            self.within,
            "readiness and liveness fail"
            if self.on_give_up == "fail_health"
            else "asking the server to shut down",
            extra={"task": self.name, "phase": "give-up"},
        )
        if self.on_give_up == "shutdown":
            # SIGTERM, which every server takes as "shut down gracefully", to the server's
            # supervisor when this process is one of its workers: a worker that stopped only
            # itself would be started again, and fail again.
            stop_whole_server()

    def statistics(self) -> BackgroundStatistics:
        """A frozen snapshot of the supervisor's state."""
        next_in = None
        if self._next_restart_at is not None:
            with contextlib.suppress(Exception):  # no event loop: no countdown
                next_in = max(0.0, self._next_restart_at - anyio.current_time())
        return BackgroundStatistics(
            name=self.name,
            state=self.state,
            starts=self._starts,
            restarts=max(0, self._starts - 1),
            failures=self._failures,
            last_error=self._last_error,
            next_restart_in=next_in,
        )


# -- periodic jobs ------------------------------------------------------------------------


@dataclass(frozen=True)
class PeriodicStatistics:
    """A snapshot of a periodic job, from `PeriodicJob.statistics`.

    Attributes:
        name: The job's name.
        state: Where the job is.
        runs: Runs started.
        failures: Runs that raised.
        timeouts: Runs cut off by the job's timeout.
        running: Whether a run is in progress.
        last_duration: Seconds the last finished run took, if any.
        last_error: A one-line description of the last failure, if any.
    """

    name: str
    state: PeriodicState
    runs: int
    failures: int
    timeouts: int
    running: bool
    last_duration: float | None
    last_error: str | None


class PeriodicJob:
    """A job run every period, never overlapping itself; see `Lifecycle.periodic`."""

    def __init__(
        self,
        lifecycle: Kernel,
        fn: Callable[..., Awaitable[Any]],
        *,
        name: str,
        every: float,
        jitter: float,
        timeout: float | None,
        first_run: Literal["now", "after_period"],
        stop_timeout: float | None,
        depends: Mapping[str, Service[Any] | str] | None,
    ) -> None:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"@lc.periodic needs an async function; {name!r} is not one.")
        seconds("every", every)
        seconds("jitter", jitter, zero=True)
        seconds("timeout", timeout, optional=True)
        if first_run not in ("now", "after_period"):
            raise ValueError(f"first_run must be 'now' or 'after_period', not {first_run!r}.")
        targets = parameters(lifecycle, fn, kind="Periodic job", name=name, depends=depends)
        self.name = name
        self.fn = fn
        self.every = every
        self.jitter = jitter
        self.timeout = timeout
        self.first_run = first_run
        self._observer: TaskObserver | None = None  # metrics and tracing (_observe.py)
        self.state = PeriodicState.PENDING
        self._reset()
        self.service = lifecycle.declare(
            _service_function(self._serve, list(targets)),
            name=f"periodic:{name}",
            depends=targets,
            stop_timeout=stop_timeout,
            internal=True,
            kind="periodic",
        )

    def __repr__(self) -> str:
        return f"<PeriodicJob {self.name!r} every {self.every}s>"

    def _reset(self) -> None:
        self._runs = 0
        self._failures = 0
        self._timeouts = 0
        self._running = False
        self._last_duration: float | None = None
        self._last_error: str | None = None
        self._idle: anyio.Event | None = None

    def _enter(self, state: PeriodicState) -> None:
        if state not in _PERIODIC_MOVES[self.state]:
            raise RuntimeError(
                f"Periodic job {self.name!r} cannot go from {self.state.value} to {state.value}."
            )
        self.state = state

    async def _serve(self, deps: dict[str, Any]) -> AsyncIterator[PeriodicJob]:
        self._reset()
        self._observer = task_observer(self.service.lifecycle, "periodic_job", self)
        try:
            async with anyio.create_task_group() as tg:
                self._enter(PeriodicState.WAITING)
                tg.start_soon(self._loop, deps)
                yield self
                # Let a run in progress finish (within the service's stop deadline), then
                # stop; the loop starts no new run meanwhile.
                self._enter(PeriodicState.STOPPING)
                if self._running:
                    self._idle = anyio.Event()
                    await self._idle.wait()
                tg.cancel_scope.cancel()
        finally:
            if self.state in (PeriodicState.WAITING, PeriodicState.RUNNING):
                self._enter(PeriodicState.STOPPING)  # cut short (a failure, a cancellation)
            self._enter(PeriodicState.STOPPED)

    async def _loop(self, deps: dict[str, Any]) -> None:
        next_at = anyio.current_time() + (0.0 if self.first_run == "now" else self.every)
        while True:
            wait = next_at - anyio.current_time()
            if self.jitter:
                wait += random.uniform(0, self.jitter)  # noqa: S311 - jitter
            await anyio.sleep(max(0.0, wait))
            if self.state is not PeriodicState.WAITING:
                return  # stopping
            await self._run_once(deps)
            # Missed periods (a run longer than the period) are skipped, never bunched up.
            next_at = max(next_at + self.every, anyio.current_time())

    async def _run_once(self, deps: dict[str, Any]) -> None:
        self._runs += 1
        self._running = True
        self._enter(PeriodicState.RUNNING)
        began = anyio.current_time()
        try:
            # A scope of its own, so that only its cancellation counts as the job's timeout,
            # not a TimeoutError the job raised.
            with anyio.move_on_after(self.timeout) as scope:
                run = self.fn(**deps)
                await (run if self._observer is None else self._observer.wrap(run))
        except anyio.get_cancelled_exc_class() as exc:
            if _task_is_cancelled():
                raise
            self._failed(_stray_cancellation(f"Periodic job {self.name!r}", exc))
        except Exception as exc:
            self._failed(exc)
        else:
            if scope.cancelled_caught:
                self._timeouts += 1
                self._last_error = f"timed out after {self.timeout}s"
                logger.error(
                    "Periodic job %r timed out after %ss",
                    self.name,
                    self.timeout,
                    extra={"job": self.name},
                )
        finally:
            self._running = False
            if self.state is PeriodicState.RUNNING:
                self._enter(PeriodicState.WAITING)
            self._last_duration = anyio.current_time() - began
            if self._idle is not None:
                self._idle.set()

    def _failed(self, exc: Exception) -> None:
        self._failures += 1
        self._last_error = f"{type(exc).__name__}: {exc}"
        logger.error(
            "Periodic job %r failed: %s",
            self.name,
            exc,
            exc_info=exc,
            extra={"job": self.name},
        )

    def statistics(self) -> PeriodicStatistics:
        """A frozen snapshot of the job's counters."""
        return PeriodicStatistics(
            name=self.name,
            state=self.state,
            runs=self._runs,
            failures=self._failures,
            timeouts=self._timeouts,
            running=self._running,
            last_duration=self._last_duration,
            last_error=self._last_error,
        )
