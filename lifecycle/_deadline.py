"""Per-request deadlines: one time budget bounds everything done for a request.

`DeadlineMiddleware` turns the budget a client sends (``x-request-timeout-ms`` and the common
headers of gRPC, Envoy and Connect) or a server default into an anyio cancel scope around the
request. Inside the request, the deadline is what anyio sees
(`anyio.current_effective_deadline`), what `remaining` reports, and what
`lifecycle.httpx.DeadlineTransport` uses to cap outbound timeouts and forward the rest of the
budget upstream.

How a request's deadline is built::

    budget   = smallest valid budget header          (absent: default_timeout)
    budget   = min(budget, max_timeout)               (a client only shortens it)
    deadline = arrival + budget - reserve             (time kept back to write the 504)

A budget of 0 is already spent: the request is answered 504 at once. With no budget at all (no
header, no default) the request passes straight through: no scope, no timer, nothing
allocated for it.

When the deadline passes before the response has started, the request is cancelled and answered
``504`` with a ``application/problem+json`` body (RFC 9457) of type `DEADLINE_EXPIRED_TYPE`
and the marker header ``x-deadline-expired: 1`` (`DEADLINE_EXPIRED_HEADER`): the caller's
budget is spent, so it should not retry. When the response had already started (a stream), the
response is aborted: the connection is closed without the final chunk, so the client sees a
truncated response rather than a complete one.

Speed: on asyncio, a request's scope is `_LeanScope`, anyio's asyncio cancel scope with a
short path for the case a server creates (the root scope of a task anyio did not create) and
its deadline on one timer heap per loop instead of a loop timer each. It leans on anyio's
internals, so a behavioural self-test runs at import and plain `anyio.CancelScope` is used if
it fails: same behaviour, slower. On trio, trio's own cancel scope is used.
``benchmarks/deadline.py`` measures what is left.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import heapq
import inspect
import itertools
import logging
import math
import re
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import BuiltinFunctionType, ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, Final, ParamSpec, Protocol, Self, TypeVar, overload

import anyio
import anyio.lowlevel
import anyio.to_thread

from ._problem import DEADLINE_EXPIRED_TYPE, MALFORMED_BUDGET_TYPE, send_problem
from ._validate import seconds
from .exceptions import DeadlineExceeded

__all__ = [
    "DEADLINE_EXPIRED_HEADER",
    "DEADLINE_EXPIRED_TYPE",
    "DEFAULT_BUDGET_HEADERS",
    "DEFAULT_EXEMPT_PATHS",
    "MALFORMED_BUDGET_TYPE",
    "DeadlineExceeded",
    "DeadlineMiddleware",
    "DeadlineStatistics",
    "current_deadline",
    "deadline_scope",
    "remaining",
    "request_timeout",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_P = ParamSpec("_P")
_T = TypeVar("_T")

_LOG = logging.getLogger("lifecycle.deadline")

DEFAULT_BUDGET_HEADERS: Final[tuple[str, ...]] = (
    "x-request-timeout-ms",
    "grpc-timeout",
    "x-envoy-expected-rq-timeout-ms",
    "connect-timeout-ms",
)
"""Headers read for an inbound budget, in no particular order: the smallest valid one wins."""

DEFAULT_EXEMPT_PATHS: Final[tuple[str, ...]] = (
    "/livez",
    "/readyz",
    "/startupz",
    "/healthz",
    "/metrics",
    "/drain",
)
"""Paths that pass through the deadline and admission middlewares untouched: probes, metrics
and the preStop drain hook must answer even when the service is saturated or the caller's
budget is tiny (and the drain hook waits out the drain delay)."""

DEADLINE_EXPIRED_HEADER: Final = "x-deadline-expired"
"""Header set to ``1`` on every 504 answered because a deadline expired (here or upstream)."""

_MAX_MS_DIGITS: Final = 10  # Connect's limit; 10 digits of milliseconds is about 115 days
_GRPC_UNITS: Final[dict[int, float]] = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")


class _DeadlineObserver(Protocol):
    """What metrics and tracing watch of each request that runs under a deadline."""

    def request_started(
        self, scope: Scope, budget: float, client_budget: float | None
    ) -> _RequestObserver | None:
        """The request starts with ``budget`` seconds (after clamping).

        Called in the request's context, before the application: a server instrumentation's
        span is the current one here. Returns what watches this one request, or ``None`` to
        let it go unwatched.
        """


class _RequestObserver(Protocol):
    """What watches one request's deadline; see `_DeadlineObserver.request_started`."""

    def response_started(self, remaining: float, outcome: str) -> None:
        """The response is about to start, with ``remaining`` seconds left.

        Called just before ``http.response.start`` reaches the server, the middleware's own
        504 included: the last moment at which a server instrumentation's span surely still
        records (instrumentations end it on the response's final message, before the
        middleware returns). ``outcome`` is ``"expired"`` for that 504, else ``"completed"``
        (so far: the response may still be aborted).
        """

    def request_finished(self, remaining: float, outcome: str) -> None:
        """The request ended with ``remaining`` seconds left (negative: overran).

        ``remaining`` is measured against the deadline in force at the end: its route's own
        (`request_timeout`) if it set one. Not called when the route lifted the deadline
        (``request_timeout(None)``). ``outcome`` is ``"completed"``, ``"expired"`` (answered
        504) or ``"aborted"`` (the deadline passed after the response started).
        """


class _Watched:
    """The observers of one request, made only when there are observers.

    Its `send` wraps the server's, to tell them when the response starts.
    """

    __slots__ = ("expired", "loop", "observers", "server_send", "state")

    def __init__(
        self,
        observers: list[_RequestObserver],
        server_send: Send,
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        self.observers = observers
        self.server_send = server_send
        self.loop = loop
        self.state: _RequestState | None = None
        self.expired = False  # set before the middleware answers its own 504

    def remaining(self) -> float | None:
        state = self.state
        given = None if state is None else state.given_deadline
        if given is None:
            return None
        loop = self.loop
        return given - (loop.time() if loop is not None else _trio_time())

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            left = self.remaining()
            if left is not None:
                outcome = "expired" if self.expired else "completed"
                for observer in self.observers:
                    observer.response_started(left, outcome)
        await self.server_send(message)


# Process-wide, like the middleware itself (which knows no Lifecycle): added to by
# `instrument_metrics` and `instrument_tracing`; empty, it costs one test per request.
observers: list[_DeadlineObserver] = []
"""What watches every request's deadline (metrics and tracing append to it); each is called
as a request with a deadline starts. Empty by default: nothing per request then."""


@dataclass(frozen=True, slots=True)
class DeadlineStatistics:
    """A snapshot of what a `DeadlineMiddleware` has done since it was created.

    Attributes:
        received: Requests that carried a valid budget header.
        clamped: Budgets cut down to ``max_timeout``.
        malformed: Requests whose budget headers were malformed (ignored, or answered 400 in
            strict mode).
        expired: Requests answered 504 because the deadline passed (or an upstream reported
            it expired) before the response started.
        rejected_early: Requests answered 504 on arrival: their budget was 0 (already spent)
            or, after ``reserve``, below ``min_budget``.
        aborted: Responses aborted mid-stream because the deadline passed after they started.
        overran: Requests that kept running longer than ``reserve`` past their deadline (past
            their arrival, or their route's timeout being applied, when the deadline was
            already past then), the sign of code that cannot be cancelled (a sync endpoint in
            a worker thread).
        in_flight: Requests whose application call is running now.
    """

    received: int
    clamped: int
    malformed: int
    expired: int
    rejected_early: int
    aborted: int
    overran: int
    in_flight: int


# -- budget headers -----------------------------------------------------------------------


class _MalformedBudget(ValueError):
    """A budget header value that cannot be used; the message says what was expected."""


def _parse_milliseconds(value: bytes) -> float:
    """Parse a relative budget in integer milliseconds (``x-request-timeout-ms`` and kin).

    ``0`` is a valid budget: one already spent.
    """
    digits = value.strip(b" \t")
    # bytes.isdigit() only accepts ASCII digits, so signs, dots, exponents, "inf", "nan" and
    # non-ASCII digits are all refused here.
    if not digits.isdigit() or len(digits) > _MAX_MS_DIGITS:
        raise _MalformedBudget(
            f"a non-negative integer number of milliseconds of at most {_MAX_MS_DIGITS} digits"
        )
    return int(digits) / 1000


def _parse_grpc_timeout(value: bytes) -> float:
    """Parse gRPC's ``grpc-timeout``: 1 to 8 ASCII digits and a unit among ``HMSmun``.

    A timeout of ``0`` (any unit) is a deadline already past.
    """
    text = value.strip(b" \t")
    digits, unit = text[:-1], text[-1:]
    scale = _GRPC_UNITS.get(unit[0]) if unit else None
    if scale is None or not digits.isdigit() or len(digits) > 8:
        raise _MalformedBudget("1 to 8 digits followed by one unit among H, M, S, m, u, n")
    return int(digits) * scale


def _parser_for(name: str) -> Callable[[bytes], float]:
    return _parse_grpc_timeout if name == "grpc-timeout" else _parse_milliseconds


def _read_budget(
    found: Iterable[tuple[bytes, bytes]],
    parsers: Mapping[bytes, Callable[[bytes], float]] | None = None,
) -> tuple[float | None, tuple[str, bytes, str] | None]:
    """Return the smallest valid budget among the header fields found, and the first problem.

    A client can only shorten its budget: a header repeated, or several schemes, give the
    smallest of their valid values, and a malformed value is only ever ignored (it never
    stands in for a longer budget).
    """
    budget: float | None = None
    problem: tuple[str, bytes, str] | None = None
    for name, value in found:
        parse = parsers[name] if parsers is not None else _parser_for(name.decode("latin-1"))
        try:
            seconds = parse(value)
        except _MalformedBudget as exc:
            if problem is None:
                problem = (name.decode("latin-1"), value, str(exc))
            continue
        if budget is None or seconds < budget:
            budget = seconds
    return budget, problem


# -- cancel scopes ------------------------------------------------------------------------


class _Scope(Protocol):
    """The part of a cancel scope (anyio's or trio's) the middleware uses."""

    deadline: float

    @property
    def cancel_called(self) -> bool: ...

    @property
    def cancelled_caught(self) -> bool: ...

    def cancel(self) -> None: ...

    def __enter__(self) -> Any: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool | None: ...


class _TimerEntry:
    """One deadline registered with a `_SharedTimer`; quacks like an `asyncio.TimerHandle`."""

    __slots__ = ("scope", "timer")

    def __init__(self, timer: _SharedTimer, scope: _LeanScope) -> None:
        self.timer = timer
        self.scope: _LeanScope | None = scope

    def cancel(self) -> None:
        if self.scope is not None:
            self.scope = None
            timer = self.timer
            timer.dead += 1
            if timer.dead > 64 and timer.dead * 2 > len(timer.heap):
                timer.compact()


class _SharedTimer:
    """Every request deadline on one asyncio loop, behind a single loop timer.

    A heap of ``(deadline, sequence, entry)`` with lazy deletion: a finished request only marks
    its entry dead, and the heap is compacted when dead entries outnumber live ones, so memory
    stays proportional to the requests in flight. Only the earliest deadline arms a loop timer,
    and with a constant default timeout each new deadline is later than the armed one, so most
    requests arm nothing at all.
    """

    __slots__ = ("_armed_at", "_handle", "_loop_ref", "_sequence", "dead", "heap")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop_ref = weakref.ref(loop)
        self.heap: list[tuple[float, int, _TimerEntry]] = []
        self.dead = 0  # entries in the heap whose request is gone
        self._sequence = itertools.count()
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at = math.inf

    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop_ref()

    def add(self, deadline: float, scope: _LeanScope) -> _TimerEntry:
        entry = _TimerEntry(self, scope)
        heapq.heappush(self.heap, (deadline, next(self._sequence), entry))
        if deadline < self._armed_at:
            self._arm(deadline)
        return entry

    def compact(self) -> None:
        """Drop the dead entries (called once they outnumber the live ones)."""
        self.heap = [item for item in self.heap if item[2].scope is not None]
        heapq.heapify(self.heap)
        self.dead = 0

    def _arm(self, when: float) -> None:
        loop = self._loop_ref()
        if loop is None:  # pragma: no cover - the loop is gone, and its requests with it
            return
        if self._handle is not None:
            self._handle.cancel()
        self._armed_at = when
        self._handle = loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._armed_at = math.inf
        loop = self._loop_ref()
        if loop is None:  # pragma: no cover - the loop is gone, and its requests with it
            return
        now = loop.time()
        while self.heap:
            deadline, _, entry = self.heap[0]
            scope = entry.scope
            if scope is None:
                heapq.heappop(self.heap)
                self.dead -= 1
            elif deadline <= now:
                heapq.heappop(self.heap)
                entry.scope = None
                scope.expire()  # may register again, if the clock fired a hair early
            else:
                self._arm(deadline)
                return


_timers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _SharedTimer] = (
    weakref.WeakKeyDictionary()
)
_last_timer: _SharedTimer | None = None


def _timer_for(loop: asyncio.AbstractEventLoop) -> _SharedTimer:
    global _last_timer  # a one-entry cache in front of the weak mapping
    timer = _last_timer
    if timer is None or timer.loop() is not loop:
        timer = _timers.get(loop)
        if timer is None:
            timer = _timers[loop] = _SharedTimer(loop)
        _last_timer = timer
    return timer


try:
    from anyio._backends._asyncio import CancelScope as _AsyncioCancelScope
    from anyio._backends._asyncio import TaskState as _TaskState
    from anyio._backends._asyncio import _task_states

    # The plain dict behind anyio's weak mapping of task states, and its removal callback:
    # WeakKeyDictionary's own methods cost a Python call each.
    _task_data = _task_states.data  # type: ignore[attr-defined]
    _drop_task_state = _task_states._remove  # type: ignore[attr-defined]
except (ImportError, AttributeError):  # pragma: no cover - anyio reorganised its backends
    _LEAN_SCOPE_IMPORTABLE = False  # the self-test fails and plain scopes are used
else:
    _LEAN_SCOPE_IMPORTABLE = True

# The task a loop is running, in one C call: `asyncio.current_task` is C from Python 3.12 on;
# on 3.11 it is a Python function over the dict its C tasks keep up to date.
_task_of: Callable[[asyncio.AbstractEventLoop], asyncio.Task[Any] | None] = (
    asyncio.current_task
    if isinstance(asyncio.current_task, BuiltinFunctionType)
    else getattr(asyncio.tasks, "_current_tasks", {}).get
)
_new_object = object.__new__


if TYPE_CHECKING or _LEAN_SCOPE_IMPORTABLE:

    class _LeanScope(_AsyncioCancelScope):
        """anyio's asyncio cancel scope, made cheap where a request opens it: at the root.

        A request task that uvicorn (not anyio) created has no anyio task state, or one
        whose cancel scope is ``None``; a scope entered there has no parent. For that case
        entering and a clean exit (nothing cancelled) skip the general bookkeeping, which
        is all about parents; any other case (a parent scope, a cancellation) goes through
        anyio's own ``__enter__``/``__exit__``. A task state the scope created is removed
        again on a clean exit, as anyio removes the states of the tasks it runs, so the task
        ends with nothing to clean up. Its deadline is kept by the loop's `_SharedTimer`
        rather than by a loop timer of its own: anyio arms a timer in ``_timeout()`` and
        cancels ``_timeout_handle`` when the scope exits, is cancelled or gets a new
        deadline; registering with the shared timer instead, and handing back an entry whose
        ``cancel()`` marks it dead, keeps every other behaviour of the scope.

        All of this leans on anyio's internals: `_lean_scope_works` checks the behaviour at
        import and the middleware falls back to `anyio.CancelScope` if it is not right.
        """

        __slots__ = ("_lean_key", "_lean_state", "_loop", "_opened_at", "_shared_timer")

        _lean_key: weakref.ref[asyncio.Task[Any]] | None
        _lean_state: _TaskState | None
        _loop: asyncio.AbstractEventLoop
        _opened_at: float
        _shared_timer: _SharedTimer

        def __new__(
            cls, loop: asyncio.AbstractEventLoop, deadline: float, now: float = -math.inf
        ) -> Self:
            return _new_object(cls)

        def __init__(
            self, loop: asyncio.AbstractEventLoop, deadline: float, now: float = -math.inf
        ) -> None:
            # What anyio's __init__ sets (less its NaN check: deadlines here are computed),
            # and ``now``, the loop's time when the deadline was computed.
            self._deadline = deadline
            self._shield = False
            self._parent_scope = None
            self._child_scopes = set()
            self._cancel_called = False
            self._cancel_reason = None
            self._cancelled_caught = False
            self._active = False
            self._timeout_handle = None
            self._cancel_handle = None
            self._tasks = set()
            self._host_task = None
            self._cancelling_at_enter = 0
            self._pending_uncancellations = 0
            self._loop = loop
            self._opened_at = now
            self._lean_state = None
            self._lean_key = None
            timer = _last_timer
            self._shared_timer = (
                timer if timer is not None and timer.loop() is loop else _timer_for(loop)
            )

        def __enter__(self) -> _LeanScope:
            task = _task_of(self._loop)
            if task is None or self._active:
                return super().__enter__()
            key = weakref.ref(task)
            state = _task_data.get(key)
            if state is None:
                key = weakref.ref(task, _drop_task_state)
                state = _task_data[key] = _TaskState(None, self)
                self._lean_key = key
            elif state.cancel_scope is None:
                state.cancel_scope = self
            else:  # a scope is open in this task: this one is its child
                return super().__enter__()
            self._lean_state = state
            self._host_task = task
            self._tasks.add(task)
            deadline = self._deadline
            if deadline != math.inf:
                if deadline > self._opened_at:
                    self._timeout_handle = self._shared_timer.add(deadline, self)  # type: ignore[assignment]
                else:
                    self._timeout()  # already due: cancelled at once, as anyio would
            self._active = True
            self._cancelling_at_enter = task.cancelling()
            if self._cancel_called:
                self._deliver_cancellation(self)
            return self

        def __exit__(
            self,
            exc_type: type[BaseException] | None,
            exc_val: BaseException | None,
            exc_tb: TracebackType | None,
        ) -> bool:
            state = self._lean_state
            if (
                state is None  # entered through anyio's own __enter__
                or self._cancel_called
                or state.cancel_scope is not self
                or self._child_scopes
            ):
                self._lean_state = self._lean_key = None
                return super().__exit__(exc_type, exc_val, exc_tb)
            # Not cancelled, no parent, nothing nested left open: nothing to uncancel,
            # swallow or restart elsewhere. Only the middleware enters this scope and it exits
            # it in the same task, so anyio's checks for misuse are left to its own __exit__.
            self._active = False
            handle = self._timeout_handle
            if handle is not None:
                handle.cancel()
                self._timeout_handle = None
            self._tasks.discard(self._host_task)
            key = self._lean_key
            if key is not None:  # the state is ours: the task is left as it came
                _task_data.pop(key, None)
                self._lean_key = None
            else:
                state.cancel_scope = None
            self._lean_state = None
            self._host_task = None
            return False

        @property
        def deadline(self) -> float:
            return self._deadline

        @deadline.setter
        def deadline(self, value: float) -> None:
            # anyio's setter, less its float() and NaN checks: deadlines here are computed.
            self._deadline = value
            handle = self._timeout_handle
            if handle is not None:
                handle.cancel()
                self._timeout_handle = None
            if self._active and not self._cancel_called:
                self._timeout()

        def _timeout(self) -> None:
            deadline = self._deadline
            if deadline != math.inf:
                if self._loop.time() >= deadline:
                    self.cancel("deadline exceeded")
                else:
                    # The entry quacks like the TimerHandle anyio expects here.
                    self._timeout_handle = self._shared_timer.add(deadline, self)  # type: ignore[assignment]

        def expire(self) -> None:
            """Called by the shared timer when the deadline this scope registered has come."""
            self._timeout_handle = None
            self._timeout()


def _expect(condition: bool, promise: str) -> None:
    if not condition:
        raise AssertionError(f"the fast request scope broke a promise: {promise}")


async def _lean_scope_behaves() -> None:
    """Raise `AssertionError` unless `_LeanScope` keeps every promise of an anyio scope.

    Run at import on a private event loop, in a task anyio did not create (as uvicorn's are).
    Not ``assert`` statements: ``python -O`` would strip them.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    _expect(task is not None, "a task")
    assert task is not None  # for the type checker

    # Seen by anyio, composes with nested scopes, leaves nothing behind: in a task anyio has
    # never seen, then in one it has (its scopes leave a state behind).
    for _ in range(2):
        deadline = loop.time() + 60
        with _LeanScope(loop, deadline, loop.time()) as scope:
            _expect(anyio.current_effective_deadline() == deadline, "the deadline anyio sees")
            with anyio.move_on_after(30) as inner:
                _expect(
                    anyio.current_effective_deadline() == inner.deadline, "nested scopes compose"
                )
                await anyio.lowlevel.checkpoint()
            _expect(anyio.current_effective_deadline() == deadline, "the deadline anyio sees")
            scope.deadline = deadline + 1  # a route's own timeout
            _expect(anyio.current_effective_deadline() == deadline + 1, "the deadline anyio sees")
        _expect(anyio.current_effective_deadline() == math.inf, "the deadline anyio sees")
        _expect(not scope.cancelled_caught, "cancelled_caught")
        with anyio.CancelScope():  # leaves the task's state behind for the second round
            await anyio.lowlevel.checkpoint()

    # A deadline already past when the scope is entered cancels at once, as anyio's does.
    with _LeanScope(loop, loop.time() - 1, loop.time()) as scope:
        _expect(anyio.current_effective_deadline() == -math.inf, "an expired scope is cancelled")
        await anyio.lowlevel.checkpoint()
        raise AssertionError("the scope entered past its deadline did not cancel")
    _expect(scope.cancelled_caught, "the scope catches its expiry")

    # Expiry cancels, is caught by the scope, and a shielded block inside is not interrupted.
    shielded_done = False
    with _LeanScope(loop, loop.time() + 0.001) as scope:
        with anyio.CancelScope(shield=True):
            await anyio.sleep(0.005)
            shielded_done = True
        await anyio.sleep(1)
        raise AssertionError("the expired scope did not cancel")
    _expect(shielded_done, "a shielded block is not interrupted")
    _expect(scope.cancelled_caught, "the scope catches its expiry")

    # A task group inside: the cancellation is absorbed, no ExceptionGroup.
    with _LeanScope(loop, loop.time() + 0.001) as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.sleep, 1)
            await anyio.sleep(1)
    _expect(scope.cancelled_caught, "cancelled_caught")

    # Level-triggered: a swallowed cancellation comes back at the next await.
    swallowed = 0
    with _LeanScope(loop, loop.time() + 0.001) as scope:
        for _ in range(2):
            try:
                await anyio.sleep(1)
            except anyio.get_cancelled_exc_class():
                swallowed += 1
        await anyio.sleep(1)
    _expect(swallowed == 2, "cancellation is level-triggered")
    _expect(scope.cancelled_caught, "the scope catches its expiry")

    # Nothing is left for what runs next in the same task (keep-alive, next request).
    _expect(task.cancelling() == 0, "no cancellation left behind")
    _expect(anyio.current_effective_deadline() == math.inf, "the deadline anyio sees")
    await anyio.sleep(0.002)

    # Nested under an anyio scope, it is a plain child scope.
    with anyio.CancelScope() as outer, _LeanScope(loop, loop.time() + 60):
        outer.cancel()
        await anyio.sleep(1)
        raise AssertionError("the outer cancellation did not reach the lean scope")
    _expect(outer.cancelled_caught, "an outer scope catches its own cancellation")
    _expect(task.cancelling() == 0, "no cancellation left behind")

    # A native cancellation (not ours) is not swallowed.
    async def cancelled_natively() -> None:
        with _LeanScope(loop, loop.time() + 60):
            await asyncio.sleep(1)

    victim = asyncio.ensure_future(cancelled_natively())
    await asyncio.sleep(0)
    victim.cancel()
    try:
        await victim
    except asyncio.CancelledError:
        pass
    else:
        raise AssertionError("a native cancellation was swallowed")


def _anyio_version() -> str:  # pragma: no cover - only for the fallback's warning
    from importlib.metadata import version

    return version("anyio")


def _lean_scope_works() -> bool:
    """Run `_lean_scope_behaves` on a private loop in a thread of its own; report the outcome."""
    if not _LEAN_SCOPE_IMPORTABLE:  # pragma: no cover - depends on the installed anyio
        return False
    outcome: list[BaseException | None] = []

    def run() -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(asyncio.wait_for(_lean_scope_behaves(), 5))
            outcome.append(None)
        except BaseException as exc:  # any failure means: do not use it
            outcome.append(exc)
        finally:
            loop.close()

    # A thread of its own, so that importing from inside a running loop works too.
    thread = threading.Thread(target=run, name="lifecycle-deadline-self-test")
    thread.start()
    thread.join()
    if outcome and outcome[0] is None:
        return True
    _LOG.warning(  # pragma: no cover - depends on the installed anyio
        "anyio %s does not behave as lifecycle's fast request scope expects (%r); using "
        "anyio.CancelScope instead: the same behaviour, a few microseconds slower per request.",
        _anyio_version(),
        outcome[0] if outcome else None,
    )
    return False  # pragma: no cover


_LEAN_SCOPE_WORKS: Final = _lean_scope_works()
_use_lean_scope = _LEAN_SCOPE_WORKS  # tests switch it off to run on the public scope


def _open_scope(loop: asyncio.AbstractEventLoop | None, deadline: float, now: float) -> _Scope:
    """A cancel scope with ``deadline``, computed at ``now``, for the running loop.

    ``loop`` is the running asyncio loop, or ``None`` under trio.
    """
    if loop is None:
        scope: _Scope = (_trio_module or _trio()).CancelScope(deadline=deadline)
        return scope
    if _use_lean_scope:
        # What calling the class does, less a call of its trivial __new__.
        lean: _LeanScope = _new_object(_LeanScope)
        lean.__init__(loop, deadline, now)  # type: ignore[misc]
        return lean
    return anyio.CancelScope(deadline=deadline)


_trio_module: ModuleType | None = None


def _trio() -> Any:
    """The trio module, once trio is running (it is an optional dependency)."""
    global _trio_module  # imported once, on first use
    if _trio_module is None:
        if "trio" not in sys.modules:
            raise RuntimeError(
                "lifecycle's deadlines need a running asyncio or trio event loop; none is "
                "running in this thread."
            )
        import trio  # trio is optional: imported only when it is the running loop

        _trio_module = trio
    return _trio_module


def _trio_time() -> float:
    return float(_trio().current_time())


def _in_event_loop() -> bool:
    if asyncio._get_running_loop() is not None:
        return True
    trio = sys.modules.get("trio")
    return trio is not None and bool(trio.lowlevel.in_trio_run())


# -- what code inside a request sees -------------------------------------------------------


class _DeadlineView:
    """The deadline as seen from worker threads, which cannot ask the event loop.

    ``deadline`` is on the event loop's clock; ``clock_offset`` converts it to
    `time.monotonic`, which threads can read.
    """

    __slots__ = ("clock_offset", "deadline")

    def __init__(self, deadline: float | None, clock_offset: float) -> None:
        self.deadline = deadline
        self.clock_offset = clock_offset

    def thread_remaining(self) -> float | None:
        deadline = self.deadline
        if deadline is None:
            return None
        return max(0.0, deadline + self.clock_offset - time.monotonic())


class _RequestState(_DeadlineView):
    """Everything the middleware tracks for one request, and the ``send`` it gives the app.

    The small per-request responder (as Starlette's ``GZipResponder``): `send` wraps the
    server's ``send`` to see when the response starts and completes. ``deadline`` is what the
    request's code sees now, ``None`` once the deadline is lifted; ``given_deadline`` is the
    deadline the request was given (by the middleware, or by its route), kept when it is
    lifted after the response, and ``given_at`` when it was given.
    """

    __slots__ = (
        "arrival",
        "client_budget",
        "completed",
        "given_at",
        "given_deadline",
        "keep_for_background",
        "reserve",
        "scope",
        "server_send",
        "started",
        "trailers",
        "upstream_expiry",
    )

    def __init__(
        self,
        scope: _Scope,
        deadline: float | None,
        arrival: float,
        client_budget: float | None,
        reserve: float,
        server_send: Send | None,
    ) -> None:
        self.deadline = deadline
        self.clock_offset = time.monotonic() - arrival
        self.scope = scope
        self.arrival = arrival
        self.given_deadline = deadline
        self.given_at = arrival
        self.client_budget = client_budget
        self.reserve = reserve
        self.server_send = server_send
        self.started = False
        self.completed = False
        self.trailers = False
        self.keep_for_background = False
        self.upstream_expiry: str | None = None

    def give(self, deadline: float | None, now: float) -> None:
        """Replace the request's deadline (``None``: no deadline) at time ``now``."""
        self.deadline = self.given_deadline = deadline
        self.given_at = now
        self.scope.deadline = math.inf if deadline is None else deadline

    async def send(self, message: Message) -> None:
        """The ``send`` the application gets: the server's, watching the response's progress."""
        server_send = self.server_send
        assert server_send is not None  # only the middleware's states hand out `send`
        kind = message["type"]
        if kind == "http.response.body":
            await server_send(message)
            if not message.get("more_body", False) and not self.trailers:
                self._complete()
        elif kind == "http.response.start":
            if self.scope.cancel_called:
                # The deadline passed while nothing checkpointed (a sync endpoint in a
                # worker thread): deliver the cancellation before anything is sent.
                await anyio.lowlevel.checkpoint()
            self.started = True
            self.trailers = bool(message.get("trailers", False))
            await server_send(message)
        else:
            await server_send(message)
            if (
                kind == "http.response.trailers" and not message.get("more_trailers", False)
            ) or kind == "http.response.pathsend":
                self._complete()

    def _complete(self) -> None:
        self.completed = True
        if not self.keep_for_background:
            # The deadline is lifted: what still runs belongs to no caller's budget.
            self.deadline = None
            self.scope.deadline = math.inf

    def end(self) -> None:
        """The request is over: drop its deadline, and what it holds of the request.

        Copies of the request's context outlive it (a worker thread, a task, and the
        server's keep-alive timer: uvicorn arms it in the last ``send``, and asyncio keeps
        a cancelled timer, with its context, until it cleans its timer heap up). Through
        them this state outlives the request too; holding the server's ``send`` and the
        cancel scope, it would keep the request's objects alive for the collector to
        promote and sweep again and again.
        """
        self.deadline = None
        self.server_send = None
        self.scope = _ENDED_SCOPE


class _EndedScope:
    """What an ended request's state holds instead of its cancel scope: changes nothing."""

    __slots__ = ()

    @property
    def deadline(self) -> float:
        return math.inf

    @deadline.setter
    def deadline(self, value: float) -> None:
        pass

    @property
    def cancel_called(self) -> bool:
        return False

    @property
    def cancelled_caught(self) -> bool:
        return False

    def cancel(self) -> None:
        pass

    def __enter__(self) -> Any:
        raise RuntimeError("The request has ended; its cancel scope cannot be entered.")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        return None


_ENDED_SCOPE: Final = _EndedScope()


class _PassThrough(_DeadlineView):
    """What code sees of a request that `DeadlineMiddleware` passed through: no deadline.

    One per middleware, shared by its requests (nothing is allocated per request); a route
    timeout (`request_timeout`) applied in such a request opens its own scope.
    """

    __slots__ = ("reserve",)

    def __init__(self, reserve: float) -> None:
        super().__init__(None, 0.0)
        self.reserve = reserve


current_request: contextvars.ContextVar[_DeadlineView | None] = contextvars.ContextVar(
    "lifecycle_deadline", default=None
)
"""The deadline of the request the current task (or worker thread) serves, or ``None``: read
by `remaining`, by `lifecycle.httpx.DeadlineTransport` and by worker pools (for
``inherit_deadline``)."""

# Set once a route timeout exists that must find its request's scope already open (the
# FastAPI dependency, or keep_for_background): from then on no request passes straight through.
_route_timeouts_need_scope = False

# Set once any route timeout exists (`request_timeout`, when routes are declared): from then on
# requests passed through are marked in `current_request`, for a route timeout to find.
_route_timeouts_exist = False


def route_timeouts_need_scope() -> None:
    """Make every `DeadlineMiddleware` open a scope for every request, deadline or not.

    Called by route timeouts that cannot open their own scope lazily.
    """
    global _route_timeouts_need_scope  # a process-wide switch, like the observers
    _route_timeouts_need_scope = True


def remaining() -> float | None:
    """Return the seconds left before the current deadline, or ``None`` when there is none.

    In async code this is the effective deadline anyio sees
    (`anyio.current_effective_deadline`): the request's deadline set by `DeadlineMiddleware`,
    or any shorter deadline opened inside it (`anyio.fail_after`, `deadline_scope`). It never
    returns less than ``0.0``.

    In a worker thread started from a request (a sync endpoint, `anyio.to_thread.run_sync`),
    it reports the request's deadline, which threads inherit through their context. Such code
    cannot be cancelled: it should check `remaining` and stop on its own when it reaches 0.

    Returns:
        The seconds left, or ``None`` when nothing bounds the current code.
    """
    if _in_event_loop():
        deadline = anyio.current_effective_deadline()
        if deadline == math.inf:
            return None
        return max(0.0, deadline - anyio.current_time())
    view = current_request.get()
    return None if view is None else view.thread_remaining()


def current_deadline() -> float | None:
    """Return the current deadline on the event loop's clock, or ``None`` when there is none.

    Capture it where the deadline applies (a request) to apply it later elsewhere (a job run by
    a worker) with `deadline_scope`. In async code it is `anyio.current_effective_deadline`
    (``-inf`` when the current scope is already cancelled); in a worker thread, the deadline of
    the request that started the thread.

    Returns:
        The absolute deadline (comparable with `anyio.current_time`), or ``None``.
    """
    if _in_event_loop():
        deadline = anyio.current_effective_deadline()
        return None if deadline == math.inf else deadline
    view = current_request.get()
    return None if view is None else view.deadline


@contextmanager
def deadline_scope(deadline: float | None) -> Iterator[anyio.CancelScope]:
    """Run a block under an absolute deadline captured earlier, instead of the request's.

    Work handed from a request to somewhere else (a worker pool, a task group owned by the
    lifespan) does not inherit the request's deadline: it runs in other tasks, outside the
    request's cancel scope. This is how such work opts in, or makes sure it stays out::

        deadline = lifecycle.current_deadline()      # in the request: capture
        ...
        with lifecycle.deadline_scope(deadline):     # in the worker: apply
            await handle(job)

        with lifecycle.deadline_scope(None):         # no deadline for what starts in here
            tg.start_soon(job)

    Inside the block, the deadline bounds the code (as a cancel scope) and is what threads
    started in it see through `remaining`. ``None`` adds no deadline and hides the request's
    deadline from threads and tasks started in the block; it cannot lift the request's cancel
    scope from code that still runs inside it.

    Args:
        deadline: An absolute deadline on the event loop's clock (from `current_deadline` or
            `anyio.current_time`), or ``None`` for none.

    Yields:
        The cancel scope of the block.

    Raises:
        DeadlineExceeded: The deadline passed before the block finished.
    """
    if deadline is not None and math.isnan(deadline):
        raise ValueError("deadline_scope() got a NaN deadline; pass a number or None.")
    now = anyio.current_time()
    token = current_request.set(_DeadlineView(deadline, time.monotonic() - now))
    try:
        with anyio.CancelScope(deadline=math.inf if deadline is None else deadline) as scope:
            yield scope
    finally:
        current_request.reset(token)
    if scope.cancelled_caught and deadline is not None and anyio.current_time() >= deadline:
        raise DeadlineExceeded(
            f"The deadline passed {anyio.current_time() - deadline:.3f} s ago; the work in "
            "deadline_scope() was cancelled."
        )


def expire_request(deadline: float, reason: str) -> None:
    """End the current request as expired, when ``deadline`` is the request's own deadline.

    Called when an outbound call finds the budget spent or hears that it expired upstream.
    Cancelling the request's scope (rather than only raising) makes the request answer 504
    with the marker even when the exception is caught on the way, or when a framework's error
    middleware between here and `DeadlineMiddleware` would turn it into a 500: the
    cancellation is delivered at the next checkpoint, at the latest when a response starts.
    A shorter deadline opened inside the request (`anyio.fail_after`) is left to its owner.
    ``reason`` goes to the logs, never to the caller.
    """
    state = current_request.get()
    if (
        isinstance(state, _RequestState)
        and deadline == state.deadline  # the request's own deadline is the binding one
        and not state.started
    ):
        state.upstream_expiry = reason
        state.scope.cancel()


def apply_route_timeout(timeout: float | None, keep_for_background: bool) -> _PassThrough | None:
    """Give the current request a route's own timeout (``None``: no deadline).

    Returns the `_PassThrough` of a request the middleware passed through: then the caller
    opens the route's scope itself (`_run_route_lazily`).
    """
    state = current_request.get()
    if isinstance(state, _PassThrough):
        return state
    if not isinstance(state, _RequestState):
        raise RuntimeError(  # noqa: TRY004 - no request in progress, not a wrong argument
            "A per-route request timeout was applied outside a request handled by "
            "DeadlineMiddleware; wrap the app with lifecycle.DeadlineMiddleware, and keep this "
            "route's path out of exempt_paths."
        )
    state.keep_for_background = keep_for_background
    if timeout is None:
        state.give(None, anyio.current_time())
        return None
    budget = timeout if state.client_budget is None else min(timeout, state.client_budget)
    state.give(state.arrival + budget - state.reserve, anyio.current_time())
    return None


class _RouteExpired(DeadlineExceeded):
    """A route timeout opened lazily expired before its endpoint returned (nothing sent)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def _run_route_lazily(
    passed: _PassThrough, seconds: float, call: Callable[[], Awaitable[_T]]
) -> _T:
    """Run an endpoint under its route's timeout in a request that had no deadline.

    The scope is opened here, around the endpoint call, so the timeout counts from the call
    and bounds the endpoint, not the sending of its response (which starts after it returns).
    """
    loop = asyncio._get_running_loop()
    now = loop.time() if loop is not None else _trio_time()
    deadline = now + seconds - passed.reserve
    cancel_scope = _open_scope(loop, deadline, now)
    state = _RequestState(cancel_scope, deadline, now, None, passed.reserve, None)
    token = current_request.set(state)
    raised: BaseException | None = None
    try:
        with cancel_scope:
            result = await call()
            if cancel_scope.cancel_called:
                # The deadline passed where nothing could be cancelled (a sync endpoint in a
                # worker thread): deliver the cancellation now.
                await anyio.lowlevel.checkpoint()
            return result
    except DeadlineExceeded as exc:
        raised = exc
    except BaseExceptionGroup as group:
        matched, rest = group.split(DeadlineExceeded)
        if rest is not None or matched is None:
            raise
        raised = _first_leaf(matched)
    finally:
        current_request.reset(token)
        state.end()
        if cancel_scope.cancelled_caught or raised is not None:
            reason = state.upstream_expiry or (
                str(raised) if raised is not None else f"the route's {seconds:g} s timeout"
            )
            raise _RouteExpired(reason) from raised
    raise AssertionError("unreachable")  # pragma: no cover - the scope caught a cancellation


class _RouteTimeout:
    """The decorator returned by `request_timeout`."""

    def __init__(self, timeout: float | None, keep_for_background: bool) -> None:
        global _route_timeouts_exist  # a process-wide switch, like the observers
        _route_timeouts_exist = True
        self.timeout = timeout
        self.keep_for_background = keep_for_background
        if keep_for_background:
            # Bounding background tasks needs the middleware's scope, around the response.
            route_timeouts_need_scope()

    @overload
    def __call__(self, endpoint: Callable[_P, Awaitable[_T]]) -> Callable[_P, Awaitable[_T]]: ...

    @overload
    def __call__(self, endpoint: Callable[_P, _T]) -> Callable[_P, Awaitable[_T]]: ...

    def __call__(self, endpoint: Callable[_P, Any]) -> Callable[_P, Awaitable[Any]]:
        timeout, keep = self.timeout, self.keep_for_background
        if inspect.iscoroutinefunction(endpoint):

            @functools.wraps(endpoint)
            async def run_async(*args: _P.args, **kwargs: _P.kwargs) -> Any:
                passed = apply_route_timeout(timeout, keep)
                if passed is None or timeout is None:
                    return await endpoint(*args, **kwargs)
                return await _run_route_lazily(
                    passed, timeout, functools.partial(endpoint, *args, **kwargs)
                )

            return run_async

        if not callable(endpoint):
            raise TypeError(f"request_timeout() decorates endpoints; got {endpoint!r}.")

        @functools.wraps(endpoint)
        async def run_in_thread(*args: _P.args, **kwargs: _P.kwargs) -> Any:
            # The deadline is changed here, on the event loop; the sync endpoint then runs in
            # a worker thread as the framework would have run it, seeing it via remaining().
            call = functools.partial(
                anyio.to_thread.run_sync, functools.partial(endpoint, *args, **kwargs)
            )
            passed = apply_route_timeout(timeout, keep)
            if passed is None or timeout is None:
                return await call()
            return await _run_route_lazily(passed, timeout, call)

        return run_in_thread


def request_timeout(timeout: float | None, *, keep_for_background: bool = False) -> _RouteTimeout:
    """Decorate an endpoint to give its route its own timeout, or none at all.

    The route's timeout replaces ``default_timeout`` and ``max_timeout`` of
    `DeadlineMiddleware` for that route (it may be longer than both: the server decides); a
    client's shorter budget still wins, and ``reserve`` is still kept back. The new deadline
    counts from the request's arrival. In a request the middleware passed through (no budget
    header, no default), the route opens its own scope around the endpoint call: the timeout
    then counts from the call and bounds the endpoint, not the sending of its response.
    ``None`` opts the route out: the request runs without a
    deadline whatever the client sent.

    It applies when the endpoint is called, after the framework has resolved its dependencies
    (those ran under the middleware's deadline). With FastAPI, the dependency
    ``lifecycle.fastapi.request_timeout`` applies before the other dependencies. A sync
    endpoint keeps running in a worker thread, as the framework would run it.

    Args:
        timeout: Seconds, counted from the request's arrival; ``None`` for no deadline.
        keep_for_background: Keep the deadline after the response is complete, so that
            background tasks (Starlette's ``BackgroundTasks``) are bounded by it too. By
            default the deadline is lifted once the last byte of the response is sent.

    Returns:
        A decorator for async or sync endpoints.

    Raises:
        TypeError: ``timeout`` is not a number or ``None``.
        ValueError: ``timeout`` is not positive and finite.
    """
    return _RouteTimeout(seconds("timeout", timeout, optional=True), keep_for_background)


# -- the middleware -----------------------------------------------------------------------


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


_EXPIRED_HEADERS: Final = ((DEADLINE_EXPIRED_HEADER.encode("ascii"), b"1"),)


def route_path(scope: Scope) -> str:
    """Return the request's path below the application's ``root_path``.

    Servers behind a proxy (``uvicorn --root-path /api``) put the root path in the ASGI
    ``path`` too; exempt paths, like Starlette's routes, are matched without it.
    """
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(f"{root_path}/"):
        return path[len(root_path) :]
    return path


def validate_exempt_paths(exempt_paths: Iterable[str]) -> frozenset[str]:
    """Check a collection of exempt paths and return it as a set."""
    if isinstance(exempt_paths, str | bytes):
        raise TypeError(
            f"exempt_paths must be a collection of paths, not a single string {exempt_paths!r}; "
            f"use exempt_paths=[{exempt_paths!r}]."
        )
    paths = frozenset(exempt_paths)
    for path in paths:
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"Exempt path {path!r} must be a string starting with '/'.")
    return paths


class DeadlineMiddleware:
    """Pure ASGI middleware that bounds each HTTP request by a deadline.

    The budget comes from the budget ``headers`` the client sends (the smallest valid one),
    else from ``default_timeout``; it is clamped to ``max_timeout`` and ``reserve`` is kept
    back to write the error. The application runs in a cancel scope with
    that deadline: `anyio.current_effective_deadline` and `remaining` see it anywhere in the
    request, and `lifecycle.httpx.DeadlineTransport` forwards what is left upstream.

    Expiry before the response starts: the request is cancelled and answered ``504`` with an
    ``application/problem+json`` body of type `DEADLINE_EXPIRED_TYPE` and the header
    ``x-deadline-expired: 1``, telling callers not to retry with the same budget. The same
    answer is given when `lifecycle.httpx.DeadlineTransport` finds the request's budget spent
    or hears that it expired upstream, and when a `DeadlineExceeded` escapes the application.
    (Starlette and FastAPI answer 500 to any exception in their outermost error middleware;
    install this middleware with ``app.add_middleware`` to sit inside it, so that exceptions
    reach it first. The transport's expiries end the request through its cancel scope and
    give the 504 wherever the middleware sits.) Expiry after the response started (streaming):
    the response is aborted by returning without its final message, so the server closes the
    connection and the client sees a truncated response; it is logged and counted, with no
    second ``http.response.start`` and no 500. (uvicorn logs one line of its own for it.)

    Code that cannot be cancelled, sync endpoints and any blocking call in a worker thread,
    keeps running past the deadline: it can read `remaining` from its thread and should stop on
    its own. The middleware answers once it returns, and logs how long it overran.

    Once the response is complete the deadline is lifted, so Starlette's ``BackgroundTasks``
    (which run inside the application call, after the response) are not bound by the caller's
    budget, unless the route asked to keep it (`request_timeout`).

    A client can only shorten its budget: a header sent twice, or several budget headers,
    give the smallest valid value; a budget of 0 (``grpc-timeout: 0S`` included) is already
    spent and answered 504 at once. Bad budget headers (not a non-negative integer, more than
    10 digits, a gRPC timeout with an unknown unit...) are ignored and counted, or answered
    ``400`` with a problem body when ``strict`` is set; never a 500, and never more budget
    than the default.

    A request no deadline applies to (no valid budget header and no ``default_timeout``)
    passes straight through, unless a route timeout that needs the request's scope exists
    (`request_timeout` with ``keep_for_background``, ``lifecycle.fastapi.request_timeout``).

    WebSocket and lifespan scopes, and HTTP requests to ``exempt_paths``, pass through.

    Args:
        app: The ASGI application to wrap.
        default_timeout: Budget in seconds of requests that send no valid budget header;
            ``None`` for no deadline.
        max_timeout: Largest budget in seconds a client may ask for; longer ones are clamped.
            ``None`` for no limit.
        headers: Request headers to read a budget from. ``grpc-timeout`` is read in gRPC's
            format (digits and a unit, ``250m``); every other header as a relative integer
            number of milliseconds.
        reserve: Seconds kept back from every budget to answer the 504 in time.
        min_budget: When set, a request whose budget after ``reserve`` is below this many
            seconds is answered 504 at once, without running the application.
        strict: Answer malformed budget headers with 400 instead of ignoring them.
        exempt_paths: Request paths that bypass the middleware (exact matches on the ASGI
            ``path`` below ``root_path``, as routes match); health probes and metrics by
            default.

    Raises:
        TypeError: An option has the wrong type.
        ValueError: An option is out of range or inconsistent with another one.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        default_timeout: float | None = None,
        max_timeout: float | None = None,
        headers: Iterable[str] = DEFAULT_BUDGET_HEADERS,
        reserve: float = 0.01,
        min_budget: float | None = None,
        strict: bool = False,
        exempt_paths: Iterable[str] = DEFAULT_EXEMPT_PATHS,
    ) -> None:
        self.app = app
        self._default_timeout = seconds("default_timeout", default_timeout, optional=True)
        self._max_timeout = seconds("max_timeout", max_timeout, optional=True)
        self._min_budget = seconds("min_budget", min_budget, optional=True)
        self._reserve = seconds("reserve", reserve, zero=True)
        if (
            self._default_timeout is not None
            and self._max_timeout is not None
            and self._default_timeout > self._max_timeout
        ):
            raise ValueError(
                f"default_timeout={default_timeout!r} is longer than max_timeout={max_timeout!r}; "
                "lower default_timeout or raise max_timeout."
            )
        for name, value in (("default_timeout", default_timeout), ("max_timeout", max_timeout)):
            if value is not None and value <= self._reserve:
                raise ValueError(
                    f"{name}={value!r} leaves nothing after reserve={reserve!r}; every request "
                    f"would expire on arrival. Raise {name} or lower reserve."
                )
        if isinstance(headers, str | bytes):
            raise TypeError(
                f"headers must be a collection of header names, not the single string "
                f"{headers!r}; use headers=[{headers!r}]."
            )
        self._parsers: dict[bytes, Callable[[bytes], float]] = {}
        for name in headers:
            if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name.lower()):
                raise ValueError(f"Budget header {name!r} is not a valid HTTP header name.")
            key = name.lower().encode("ascii")
            if key in self._parsers:
                raise ValueError(f"Budget header {name!r} is listed twice in headers.")
            self._parsers[key] = _parser_for(name.lower())
        self._strict = bool(strict)
        self._exempt_paths = validate_exempt_paths(exempt_paths)
        self._pass_through = _PassThrough(self._reserve)
        self._received = 0
        self._clamped = 0
        self._malformed = 0
        self._expired = 0
        self._rejected_early = 0
        self._aborted = 0
        self._overran = 0
        self._in_flight = 0

    def statistics(self) -> DeadlineStatistics:
        """Return counters of what the middleware has done so far.

        Returns:
            A frozen snapshot; see `DeadlineStatistics`.
        """
        return DeadlineStatistics(
            received=self._received,
            clamped=self._clamped,
            malformed=self._malformed,
            expired=self._expired,
            rejected_early=self._rejected_early,
            aborted=self._aborted,
            overran=self._overran,
            in_flight=self._in_flight,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exempt = self._exempt_paths
        if exempt:
            path: str = scope["path"]
            root_path = scope.get("root_path")
            if (
                root_path
                and path.startswith(root_path)
                and path[len(root_path) : len(root_path) + 1] == "/"
            ):
                path = path[len(root_path) :]
            if path in exempt:
                await self.app(scope, receive, send)
                return

        # One pass over the headers: parse each budget header as it is found.
        budget: float | None = None
        parsers = self._parsers
        if parsers:
            problem: tuple[bytes, bytes, str] | None = None
            for name, value in scope["headers"]:
                if name in parsers:
                    try:
                        seconds = parsers[name](value)
                    except _MalformedBudget as exc:
                        if problem is None:
                            problem = (name, value, str(exc))
                        continue
                    if budget is None or seconds < budget:
                        budget = seconds
            if problem is not None:
                self._malformed += 1
                header, raw, expected = problem
                if self._strict:
                    await self._reject_malformed(send, header.decode("latin-1"), raw, expected)
                    return
                _LOG.debug("Ignored budget header %s=%r: expected %s.", header, raw[:64], expected)

        client_budget = budget
        if budget is None:
            budget = self._default_timeout
            if budget is None and not _route_timeouts_need_scope:
                # No deadline applies: no scope, no timer, nothing allocated for the request.
                # Only a route timeout (`request_timeout`) needs to know it runs in a request
                # passed through, to open its own scope: marked only if one exists.
                token = current_request.set(self._pass_through) if _route_timeouts_exist else None
                self._in_flight += 1
                try:
                    await self.app(scope, receive, send)
                except _RouteExpired as exc:
                    # Raised by an endpoint's lazily opened route timeout, before it returned
                    # a response: nothing was sent yet.
                    self._expired += 1
                    await self._send_expired(scope, send, exc.reason)
                finally:
                    self._in_flight -= 1
                    if token is not None:
                        current_request.reset(token)
                return
        else:
            self._received += 1
            if budget <= 0.0:  # a budget of 0 (or a gRPC timeout of 0): already spent
                await self._reject_early(send, budget)
                return
            max_timeout = self._max_timeout
            if max_timeout is not None and budget > max_timeout:
                budget = max_timeout
                self._clamped += 1

        loop = asyncio._get_running_loop()
        now = loop.time() if loop is not None else (_trio_module or _trio()).current_time()
        deadline: float | None = None
        if budget is not None:
            usable = budget - self._reserve
            if self._min_budget is not None and usable < self._min_budget:
                await self._reject_early(send, budget)
                return
            deadline = now + usable
            cancel_scope = _open_scope(loop, deadline, now)
        else:  # no deadline, but route timeouts need the scope (`route_timeouts_need_scope`)
            cancel_scope = _open_scope(loop, math.inf, now)
        watched: _Watched | None = None
        if observers and budget is not None:
            watched = self._watch(scope, budget, client_budget, send, loop)
            if watched is not None:
                send = watched.send
        state = _RequestState(cancel_scope, deadline, now, client_budget, self._reserve, send)
        if watched is not None:
            watched.state = state

        raised: BaseException | None = None
        token = current_request.set(state)
        self._in_flight += 1
        try:
            with cancel_scope:
                await self.app(scope, receive, state.send)
        except DeadlineExceeded as exc:
            if state.completed:  # raised by background work: not the request's to answer
                raise
            raised = exc
        except BaseExceptionGroup as group:
            # A task group in the handler may wrap it, possibly with cancellations of its own
            # siblings that its cancel scope already absorbed.
            matched, rest = group.split(DeadlineExceeded)
            if rest is not None or matched is None or state.completed:
                raise
            raised = _first_leaf(matched)
        finally:
            self._in_flight -= 1
            current_request.reset(token)

        try:
            if raised is not None or cancel_scope.cancelled_caught:
                if watched is not None:
                    watched.expired = True
                await self._expired_response(scope, send, state, cancel_scope, loop, raised)
        finally:
            if watched is not None:
                self._finished(watched, state)
            # Work that outlives the request with a copy of its context (threads, tasks) no
            # longer sees its deadline, nor keeps the request alive.
            state.end()

    @staticmethod
    def _watch(
        scope: Scope,
        budget: float,
        client_budget: float | None,
        send: Send,
        loop: asyncio.AbstractEventLoop | None,
    ) -> _Watched | None:
        """Tell the observers the request starts; what watches it, if any observer does."""
        watching = [
            watch
            for observer in observers
            if (watch := observer.request_started(scope, budget, client_budget)) is not None
        ]
        return _Watched(watching, send, loop) if watching else None

    @staticmethod
    def _finished(watched: _Watched, state: _RequestState) -> None:
        # The deadline in force at the end: the route's own, if it set one; none at all
        # (nothing to report) if the route lifted it.
        left = watched.remaining()
        if left is None:
            return
        outcome = (
            "completed"
            if not watched.expired or state.completed
            else "aborted"
            if state.started
            else "expired"
        )
        for observer in watched.observers:
            observer.request_finished(left, outcome)

    async def _reject_early(self, send: Send, budget: float) -> None:
        self._rejected_early += 1
        await send_problem(
            send,
            504,
            type_=DEADLINE_EXPIRED_TYPE,
            title="Deadline expired",
            detail=(
                "The request's budget was already spent when it arrived; it was not started."
                if budget <= 0.0
                else "The request's budget is shorter than this service needs; it was not started."
            ),
            headers=_EXPIRED_HEADERS,
        )

    async def _send_expired(self, scope: Scope, send: Send, reason: str | None) -> None:
        """Answer the 504; what caused it goes to the log, under the body's ``instance``."""
        instance = await send_problem(
            send,
            504,
            type_=DEADLINE_EXPIRED_TYPE,
            title="Deadline expired",
            detail=(
                "The request's deadline expired before the response started."
                if reason is None
                else "The request's deadline expired while waiting on a dependency."
            ),
            headers=_EXPIRED_HEADERS,
        )
        if reason is not None:
            _LOG.info(
                "Answered 504 to %s %s (%s): the deadline expired: %s",
                scope.get("method", "?"),
                scope["path"],
                instance,
                reason,
            )

    async def _expired_response(
        self,
        scope: Scope,
        send: Send,
        state: _RequestState,
        cancel_scope: _Scope,
        loop: asyncio.AbstractEventLoop | None,
        raised: BaseException | None,
    ) -> None:
        request = f"{scope.get('method', '?')} {scope['path']}"
        if cancel_scope.cancel_called and state.deadline is not None:
            now = loop.time() if loop is not None else _trio_time()
            # A deadline already past when it was given (a budget below the reserve, a route
            # timeout applied late) is delivered at the next checkpoint, not before.
            overrun = now - max(state.deadline, state.given_at)
            if overrun > max(self._reserve, 0.001):
                self._overran += 1
                _LOG.warning(
                    "%s kept running %.3f s past its deadline: code that cannot be cancelled "
                    "(a sync endpoint or a blocking call in a worker thread) ignored it. Check "
                    "lifecycle.remaining() in such code and stop when it reaches 0.",
                    request,
                    overrun,
                )
        if not state.started:
            self._expired += 1
            reason = state.upstream_expiry if raised is None else str(raised)
            await self._send_expired(scope, send, reason)
        elif not state.completed:
            self._aborted += 1
            _LOG.warning(
                "The deadline of %s expired after its response started; the response was "
                "aborted and the connection will be closed.",
                request,
            )
            # Returning without the final body message is how ASGI aborts a response.
        else:
            _LOG.info(
                "Work that ran after the response to %s (background tasks) was cancelled by the "
                "request's deadline.",
                request,
            )

    async def _reject_malformed(self, send: Send, header: str, value: bytes, expected: str) -> None:
        shown = value[:64].decode("latin-1")
        await send_problem(
            send,
            400,
            type_=MALFORMED_BUDGET_TYPE,
            title="Malformed request budget",
            detail=f"Header {header!r} must be {expected}; got {shown!r}.",
        )
