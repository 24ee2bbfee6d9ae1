"""The structured-concurrency toolkit: bounded fan-out, completion streams, racing, retrying.

Every function here runs its calls as tasks of a task group it owns for the duration of the
call, so nothing it starts outlives it. The same rules hold throughout:

* Functions are passed uncalled (``fn, *args``), so each call is made inside its own task; a
  coroutine object passed by mistake is closed and rejected with a `TypeError`.
* The first failure cancels the calls still running, waits for them, and is then raised as
  itself, not wrapped in an exception group. It carries a note saying which call raised it.
  (`race` is the exception: when every candidate fails there is no single error to raise.)
* A `BaseException` that is not a cancellation (`KeyboardInterrupt`, `SystemExit`, a user's
  own) is never a result, not even with ``return_exceptions``: it cancels the other calls
  and is raised as itself, taking precedence over any ordinary failure.
* Cancellation from outside is never caught, stored as a result or retried: it cancels the
  calls in flight and reaches the caller.

`PriorityQueue` lives in ``_queue.py`` and `LeakTracker` in ``_leaks.py``. The primitives anyio
already provides (task groups, cancel scopes, timeouts, locks, limiters, memory streams, thread
and process offloading) are re-exported from `lifecycle` unchanged rather than wrapped here.
"""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar, TypeVarTuple, Unpack, final, overload

import anyio
from anyio.abc import TaskGroup
from anyio.lowlevel import checkpoint_if_cancelled
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = [
    "as_completed",
    "bounded_map",
    "first_completed",
    "gather",
    "race",
    "retry",
    "shield",
]

T = TypeVar("T")
R = TypeVar("R")
T1 = TypeVar("T1")
T2 = TypeVar("T2")
T3 = TypeVar("T3")
T4 = TypeVar("T4")
PosArgsT = TypeVarTuple("PosArgsT")

RetryOn = type[Exception] | tuple[type[Exception], ...] | Callable[[Exception], bool]


# -- shared checks and failure handling ----------------------------------------------------


def _describe(fn: object) -> str:
    name = getattr(fn, "__qualname__", None)
    return name if isinstance(name, str) else repr(fn)


# anyio (4.16 and later) exports functions of the same names that take coroutine objects where
# lifecycle's take functions; a coroutine passed here by mistake gets an error naming them.
_ANYIO_TWINS = {
    "gather": "anyio.gather(*coroutines)",
    "as_completed": "anyio.as_completed(*awaitables)",
}


def _is_cancellation(error: BaseException) -> bool:
    """Whether ``error`` is (or carries) the running backend's cancellation exception."""
    cancelled = anyio.get_cancelled_exc_class()
    if isinstance(error, cancelled):
        return True
    return isinstance(error, BaseExceptionGroup) and error.subgroup(cancelled) is not None


def _check_fns(api: str, fns: Iterable[object]) -> None:
    """Reject anything that is not callable, closing coroutine objects so none goes unawaited."""
    fns = list(fns)
    offender = next((fn for fn in fns if not callable(fn)), None)
    if offender is None:
        return
    for fn in fns:
        if inspect.iscoroutine(fn):
            fn.close()
    if inspect.iscoroutine(offender):
        twin = _ANYIO_TWINS.get(api)
        raise TypeError(
            f"lifecycle.{api}() takes async functions to call, not coroutine objects: got "
            f"{offender.__qualname__}(...) already called. Pass the function itself (its "
            f"arguments bound with functools.partial or a lambda)"
            + (f", or call {twin}, which is the one that takes coroutine objects." if twin else ".")
        )
    raise TypeError(
        f"{api}() takes async functions to call; {offender!r} is not callable. Pass an async "
        f"function (its arguments bound with functools.partial or a lambda)."
    )


def _check_limit(api: str, limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(
            f"{api}(limit={limit!r}): limit must be an int, the most calls to run at once."
        )
    if limit < 1:
        raise ValueError(
            f"{api}(limit={limit!r}): limit must be at least 1; it is the most calls to run at "
            f"once."
        )
    return limit


def _check_items(api: str, items: object) -> None:
    if not isinstance(items, Iterable | AsyncIterable):
        raise TypeError(
            f"{api}() takes an iterable or async iterable of items; got {type(items).__name__!r}."
        )


@final
class _FirstFailure:
    """Keeps the first error of a group of calls and cancels the others when it arrives."""

    __slots__ = ("_scope", "error")

    def __init__(self, scope: anyio.CancelScope | None = None) -> None:
        # Set by bind() once the task group is entered (trio's has no scope before that), so
        # that the failure exists, for the except clause around the task group, before it.
        self._scope = scope
        self.error: BaseException | None = None

    def bind(self, scope: anyio.CancelScope) -> None:
        """Cancel ``scope`` when the first failure arrives."""
        self._scope = scope

    def record(self, error: BaseException, origin: str) -> None:
        first = self.error
        if first is None:
            error.add_note(origin)
            self.error = error
            assert self._scope is not None, "bind() the task group's scope first"
            self._scope.cancel()
        elif isinstance(first, Exception) and not isinstance(error, Exception):
            # A KeyboardInterrupt (say) while cancelling after an ordinary failure must still
            # reach the caller: it takes the first failure's place, which travels as a note.
            error.add_note(origin)
            error.add_note(f"It arrived after another call had failed: {first!r}")
            self.error = error
        elif error is not first:
            # Dropping it silently would hide a second bug; raising a group would break the
            # "raised as itself" contract, so it travels as a note on the first.
            first.add_note(
                f"While cancelling the other calls, another failed: {error!r} ({origin})"
            )

    def reraise_interrupt(self) -> None:
        """Raise a recorded `BaseException` that is not an `Exception`, if there is one.

        Called while the calls' task group ends with a cancellation from outside: an ordinary
        failure gives way to the cancellation, a KeyboardInterrupt or SystemExit does not.
        """
        if self.error is not None and not isinstance(self.error, Exception):
            self.reraise()

    def reraise(self) -> None:
        error = self.error
        if error is None:
            return
        self.error = None  # no reference cycle through this frame's traceback
        try:
            raise error
        finally:
            del error


# -- bounded_map and as_completed ----------------------------------------------------------


@final
class _Pool(Generic[T, R]):
    """Calls ``fn`` on items pulled lazily from one iterator, by at most ``limit`` workers.

    A worker is spawned for each of the first ``limit`` items; after that, each worker pulls the
    next item itself when its call finishes, so the number of tasks never exceeds ``limit``
    however many items there are, and the iterator is never more than ``limit`` items ahead of
    the finished calls. Reusing workers instead of spawning a task per item also makes the
    per-item cost that of a function call rather than a task.
    """

    __slots__ = (
        "_aiter",
        "_api",
        "_count",
        "_deliver",
        "_exhausted",
        "_failure",
        "_fn",
        "_iter",
        "_limit",
        "_lock",
        "_name",
        "_scope",
    )

    def __init__(
        self,
        api: str,
        fn: Callable[[T], Awaitable[R]],
        items: Iterable[T] | AsyncIterable[T],
        limit: int,
        deliver: Callable[[int, R], Awaitable[None]],
    ) -> None:
        self._api = api
        self._fn = fn
        self._name = f"{api}:{_describe(fn)}"
        self._limit = limit
        self._deliver = deliver
        self._count = 0
        self._exhausted = False
        self._iter: Iterator[T] | None = None
        self._aiter: AsyncIterator[T] | None = None
        self._lock: anyio.Lock | None = None
        if isinstance(items, AsyncIterable):
            self._aiter = aiter(items)
            # Two workers must never be inside the same async iterator's __anext__ at once (an
            # async generator raises if they are), and indices must follow the pull order.
            self._lock = anyio.Lock(fast_acquire=True)
        else:
            self._iter = iter(items)

    async def run(self) -> None:
        """Call ``fn`` on every item; raise the first failure as itself once all have ended."""
        self._failure = _FirstFailure()
        try:
            async with anyio.create_task_group() as tg:
                self._scope = tg.cancel_scope
                self._failure.bind(tg.cancel_scope)
                for _ in range(self._limit):
                    pulled = await self._pull()
                    if pulled is None:
                        break
                    tg.start_soon(self._work, *pulled, name=self._name)
        except BaseException:
            self._failure.reraise_interrupt()
            raise
        self._failure.reraise()

    async def _pull(self) -> tuple[int, T] | None:
        """The next item with its index, or ``None`` once the items are used up (or failed)."""
        try:
            if self._aiter is None:
                assert self._iter is not None
                if self._exhausted:
                    return None
                item = next(self._iter)
                index = self._count
                self._count += 1
                return index, item
            assert self._lock is not None
            async with self._lock:
                if self._exhausted:  # checked under the lock: another worker may have ended it
                    return None
                item = await anext(self._aiter)
                index = self._count
                self._count += 1
                return index, item
        except (StopIteration, StopAsyncIteration):
            self._exhausted = True
            return None
        except BaseException as error:
            if _is_cancellation(error):
                raise
            self._exhausted = True
            self._failure.record(
                error, f"{self._api}(): raised while taking item {self._count} from the items"
            )
            return None

    async def _work(self, index: int, item: T) -> None:
        fn = self._fn
        deliver = self._deliver
        scope = self._scope
        while True:
            try:
                value = await fn(item)
            except BaseException as error:
                if _is_cancellation(error):
                    raise
                self._failure.record(
                    error, f"{self._api}(): raised by {_describe(fn)} for item {index}"
                )
                return
            await deliver(index, value)
            if scope.cancel_called:
                # Another call failed while this one ran past its last checkpoint; start no more.
                # (An outer cancellation reaches the next call at its first checkpoint; checking
                # for it here too would cost a third of the per-item overhead on asyncio.)
                return
            pulled = await self._pull()
            if pulled is None:
                return
            index, item = pulled


_MISSING: Any = object()


async def bounded_map(
    fn: Callable[[T], Awaitable[R]],
    items: Iterable[T] | AsyncIterable[T],
    *,
    limit: int,
) -> list[R]:
    """Call ``fn`` on every item, at most ``limit`` calls at once; results in input order.

    Items are taken from ``items`` lazily, one as each call finishes, so a generator of a
    million items (or an async iterator reading a socket) never has more than ``limit`` items
    taken but not yet done, and no more than ``limit`` tasks exist at any moment. No call
    starts after one has failed. The iterator is not
    closed if the map stops early; wrap an async generator in `contextlib.aclosing` if it needs
    closing.

    Args:
        fn: An async function taking one item.
        items: An iterable or async iterable of items.
        limit: The most calls to run at once, at least 1.

    Returns:
        ``fn``'s result for each item, in the order the items came.

    Raises:
        Exception: The first exception raised by ``fn`` (or by iterating ``items``), raised as
            itself once every other call has been cancelled and has finished. A note on it
            names the item's index. A `BaseException` that is not a cancellation
            (`KeyboardInterrupt`, `SystemExit`) is raised the same way, as itself.
        TypeError: ``fn`` is not callable (a coroutine object, say), ``items`` is not iterable,
            or ``limit`` is not an int.
        ValueError: ``limit`` is below 1.
    """
    _check_fns("bounded_map", (fn,))
    _check_limit("bounded_map", limit)
    _check_items("bounded_map", items)
    results: list[R] = []

    async def store(index: int, value: R) -> None:
        if index >= len(results):
            results.extend([_MISSING] * (index + 1 - len(results)))
        results[index] = value

    await _Pool("bounded_map", fn, items, limit, store).run()
    return results


@overload
def as_completed(
    fn: Callable[[T], Awaitable[R]], items: Iterable[T], /, *, limit: int
) -> AbstractAsyncContextManager[AsyncIterator[tuple[int, R]]]: ...


@overload
def as_completed(
    fn: Callable[[T], Awaitable[R]], items: AsyncIterable[T], /, *, limit: int
) -> AbstractAsyncContextManager[AsyncIterator[tuple[int, R]]]: ...


# The implementation takes any arguments so that a call written for anyio.as_completed
# (several coroutine objects, no limit) gets an error saying so, with its coroutines closed,
# rather than Python's bare "takes 2 positional arguments" and "never awaited" warnings.
def as_completed(
    fn: Any, items: Any = _MISSING, /, *more: Any, limit: Any = _MISSING
) -> AbstractAsyncContextManager[AsyncIterator[tuple[int, R]]]:
    """Call ``fn`` on every item, at most ``limit`` at once, yielding results as they finish.

    Use it as an async context manager; it yields an async iterator of ``(index, result)``
    pairs, where ``index`` is the item's position in ``items``::

        async with lifecycle.as_completed(fetch, urls, limit=10) as results:
            async for index, page in results:
                ...

    Leaving the ``async with`` block before the results run out (after a ``break``, by an
    exception or by cancellation) cancels every call still pending at once, and waits for
    them to finish before the block is left. Items are taken lazily, as for `bounded_map`, and
    a finished call waits while ``limit`` results are ready but not yet read, so a slow reader
    slows the work down instead of piling results up.

    If a call raises, the calls still running are cancelled, the results already waiting to
    be read are yielded, and then iterating raises the error as itself. An error that happens
    after you stop reading (by leaving the block) is discarded with the unread results,
    except a `BaseException` such as `KeyboardInterrupt`, which leaving the block raises.

    Unlike ``anyio.as_completed(*awaitables)``, which takes coroutine objects and yields task
    handles, this takes the function and its items, bounds the calls, and yields results: a
    call written for anyio's (coroutine objects passed) raises a `TypeError` saying so, and
    closes the coroutines so none is left never awaited.

    Args:
        fn: An async function taking one item.
        items: An iterable or async iterable of items.
        *more: Refused: more positional arguments mean a call written for anyio's form.
        limit: The most calls to run at once, at least 1.

    Returns:
        An async context manager yielding the async iterator of ``(index, result)`` pairs.

    Raises:
        TypeError: An awaitable was passed (anyio's form), ``fn`` is not callable, ``items``
            is not iterable, ``limit`` is missing or is not an int.
        ValueError: ``limit`` is below 1.
    """
    passed = (fn, items, *more)
    if any(inspect.isawaitable(arg) for arg in passed):
        for arg in passed:
            if inspect.iscoroutine(arg):
                arg.close()
        raise TypeError(
            "lifecycle.as_completed() takes an async function and the items to call it on, "
            "as_completed(fn, items, limit=...), not awaitables: anyio.as_completed(*awaitables) "
            "is the one that takes coroutine objects. Pass the function and its arguments "
            "instead, or call anyio.as_completed."
        )
    if items is _MISSING or more or limit is _MISSING:
        raise TypeError(
            f"lifecycle.as_completed() takes an async function, the items to call it on and a "
            f"limit: as_completed(fn, items, limit=...); got {len(passed) - (items is _MISSING)}"
            f" positional argument(s){'' if limit is not _MISSING else ' and no limit'}."
        )
    _check_fns("as_completed", (fn,))
    _check_limit("as_completed", limit)
    _check_items("as_completed", items)
    return _Completions(fn, items, limit)


@final
class _Completions(Generic[T, R]):
    """The context manager `as_completed` returns; it owns the task group of the calls.

    The task group is entered in ``__aenter__`` and left in ``__aexit__`` rather than around a
    ``yield``, so that an exception from the caller's block is not wrapped into an exception
    group on its way out, and so that a failing call never cancels the caller's block.
    """

    def __init__(
        self,
        fn: Callable[[T], Awaitable[R]],
        items: Iterable[T] | AsyncIterable[T],
        limit: int,
    ) -> None:
        self._fn = fn
        self._items = items
        self._limit = limit
        self._tg: TaskGroup | None = None
        self._receive: MemoryObjectReceiveStream[tuple[int, R]] | None = None
        self.error: BaseException | None = None

    async def __aenter__(self) -> AsyncIterator[tuple[int, R]]:
        if self._tg is not None:
            raise RuntimeError(
                "This as_completed() context manager was already used; call as_completed() "
                "again for a new run."
            )
        send, receive = anyio.create_memory_object_stream[tuple[int, R]](self._limit)

        async def deliver(index: int, value: R) -> None:
            await send.send((index, value))

        pool = _Pool("as_completed", self._fn, self._items, self._limit, deliver)
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        self._receive = receive
        tg.start_soon(self._produce, pool, send, name=f"as_completed:{_describe(self._fn)}")
        return _CompletionStream(receive, self)

    async def _produce(
        self, pool: _Pool[T, R], send: MemoryObjectSendStream[tuple[int, R]]
    ) -> None:
        with send:
            try:
                await pool.run()
            except BaseException as error:
                # The pool has already unwrapped it; a cancellation passes on through.
                if _is_cancellation(error):
                    raise
                self.error = error

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._tg is not None
        assert self._receive is not None
        self._tg.cancel_scope.cancel()
        try:
            # The block's own exception (if any) is not handed to the task group: it would come
            # out wrapped in an exception group. It propagates by itself once this returns.
            await self._tg.__aexit__(None, None, None)
        finally:
            self._receive.close()
        error = self.error
        if error is not None and not isinstance(error, Exception):
            # An unread ordinary error is discarded with the unread results, but a
            # KeyboardInterrupt or SystemExit is never dropped.
            self.error = None
            try:
                raise error
            finally:
                del error


@final
class _CompletionStream(AsyncIterator[tuple[int, R]]):
    """The ``(index, result)`` pairs of an `as_completed` run, in the order they finish."""

    def __init__(
        self, receive: MemoryObjectReceiveStream[tuple[int, R]], owner: _Completions[Any, R]
    ) -> None:
        self._receive = receive
        self._owner = owner

    async def __anext__(self) -> tuple[int, R]:
        try:
            return await self._receive.receive()
        except anyio.EndOfStream:
            pass
        # Raised outside the except block so the error does not gain EndOfStream as context.
        error = self._owner.error
        if error is not None:
            self._owner.error = None
            try:
                raise error
            finally:
                del error
        raise StopAsyncIteration


# -- gather, race, first_completed ---------------------------------------------------------


@overload
async def gather(
    fn1: Callable[[], Awaitable[T1]], /, *, return_exceptions: Literal[False] = False
) -> tuple[T1]: ...


@overload
async def gather(
    fn1: Callable[[], Awaitable[T1]],
    fn2: Callable[[], Awaitable[T2]],
    /,
    *,
    return_exceptions: Literal[False] = False,
) -> tuple[T1, T2]: ...


@overload
async def gather(
    fn1: Callable[[], Awaitable[T1]],
    fn2: Callable[[], Awaitable[T2]],
    fn3: Callable[[], Awaitable[T3]],
    /,
    *,
    return_exceptions: Literal[False] = False,
) -> tuple[T1, T2, T3]: ...


@overload
async def gather(
    fn1: Callable[[], Awaitable[T1]],
    fn2: Callable[[], Awaitable[T2]],
    fn3: Callable[[], Awaitable[T3]],
    fn4: Callable[[], Awaitable[T4]],
    /,
    *,
    return_exceptions: Literal[False] = False,
) -> tuple[T1, T2, T3, T4]: ...


@overload
async def gather(
    *fns: Callable[[], Awaitable[T]], return_exceptions: Literal[False] = False
) -> tuple[T, ...]: ...


@overload
async def gather(
    fn1: Callable[[], Awaitable[T1]], /, *, return_exceptions: Literal[True]
) -> tuple[T1 | Exception]: ...


@overload
async def gather(
    fn1: Callable[[], Awaitable[T1]],
    fn2: Callable[[], Awaitable[T2]],
    /,
    *,
    return_exceptions: Literal[True],
) -> tuple[T1 | Exception, T2 | Exception]: ...


@overload
async def gather(
    fn1: Callable[[], Awaitable[T1]],
    fn2: Callable[[], Awaitable[T2]],
    fn3: Callable[[], Awaitable[T3]],
    /,
    *,
    return_exceptions: Literal[True],
) -> tuple[T1 | Exception, T2 | Exception, T3 | Exception]: ...


@overload
async def gather(
    fn1: Callable[[], Awaitable[T1]],
    fn2: Callable[[], Awaitable[T2]],
    fn3: Callable[[], Awaitable[T3]],
    fn4: Callable[[], Awaitable[T4]],
    /,
    *,
    return_exceptions: Literal[True],
) -> tuple[T1 | Exception, T2 | Exception, T3 | Exception, T4 | Exception]: ...


@overload
async def gather(
    *fns: Callable[[], Awaitable[T]], return_exceptions: Literal[True]
) -> tuple[T | Exception, ...]: ...


@overload
async def gather(
    *fns: Callable[[], Awaitable[Any]], return_exceptions: bool
) -> tuple[Any, ...]: ...


async def gather(
    *fns: Callable[[], Awaitable[Any]], return_exceptions: bool = False
) -> tuple[Any, ...]:
    """Call every function concurrently and return their results in the order given.

    Pass functions, not coroutines: ``gather(fetch_user, partial(fetch_orders, user_id))``.
    (``anyio.gather``, since anyio 4.16, takes coroutine objects instead; a coroutine passed
    here is closed and refused with a `TypeError` naming it.)

    Args:
        *fns: Async functions taking no arguments.
        return_exceptions: If ``False`` (the default), the first exception cancels the other
            calls and is raised as itself once they have finished. If ``True``, each call's
            exception is returned in its place among the results, and the others run on: the
            caller sees partial success and decides. Only `Exception` is ever returned this
            way: a cancellation from outside still cancels every call and propagates to the
            caller, and a `BaseException` such as `KeyboardInterrupt` cancels the other calls
            and is raised as itself.

    Returns:
        A tuple with each function's result (or, with ``return_exceptions``, its exception)
        in the order the functions were given.

    Raises:
        Exception: Without ``return_exceptions``, the first exception a call raised, with a
            note naming the function.
        BaseException: A call raised one that is not a cancellation (`KeyboardInterrupt`,
            `SystemExit`), in either mode: raised as itself, never wrapped in a group.
        TypeError: Something passed is not callable: a coroutine object, say, which is what
            ``anyio.gather`` takes; the message says so.
    """
    _check_fns("gather", fns)
    results: list[Any] = [None] * len(fns)

    async def run(index: int, fn: Callable[[], Awaitable[Any]]) -> None:
        try:
            results[index] = await fn()
        except Exception as error:
            if return_exceptions:
                results[index] = error
            else:
                failure.record(error, f"gather(): raised by {_describe(fn)} (function {index})")
        except BaseException as error:
            if _is_cancellation(error):
                raise
            failure.record(error, f"gather(): raised by {_describe(fn)} (function {index})")

    failure = _FirstFailure()
    try:
        async with anyio.create_task_group() as tg:
            failure.bind(tg.cancel_scope)
            for index, fn in enumerate(fns):
                tg.start_soon(run, index, fn, name=f"gather:{_describe(fn)}")
    except BaseException:
        failure.reraise_interrupt()
        raise
    failure.reraise()
    return tuple(results)


async def race(*fns: Callable[[], Awaitable[T]]) -> T:
    """Call every function concurrently; the first to succeed wins and the rest are cancelled.

    Failures do not end the race while another candidate is still running: a hedged request
    to two replicas succeeds if either does. When a winner returns, the others are cancelled
    and awaited before `race` returns. A candidate that succeeds after the winner (because it
    did not reach a checkpoint in time) has its result discarded, so candidates should not
    return resources that need closing.

    Args:
        *fns: Async functions taking no arguments; at least one.

    Returns:
        The result of the first function to return.

    Raises:
        ExceptionGroup: Every function failed; it holds their exceptions in the order the
            functions were given.
        BaseException: A function raised one that is not a cancellation
            (`KeyboardInterrupt`, `SystemExit`): it ends the race at once and is raised as
            itself.
        TypeError: Something passed is not callable (a coroutine object, say).
        ValueError: No functions were given.
    """
    if not fns:
        raise ValueError("race() needs at least one function to run.")
    _check_fns("race", fns)
    errors: list[Exception | None] = [None] * len(fns)
    winner: list[T] = []

    async def run(index: int, fn: Callable[[], Awaitable[T]]) -> None:
        try:
            value = await fn()
        except Exception as error:
            errors[index] = error
            return
        except BaseException as error:
            if _is_cancellation(error):
                raise
            # Not a failed candidate: it ends the race and reaches the caller as itself.
            interrupt.record(error, f"race(): raised by {_describe(fn)}")
            return
        if not winner:
            winner.append(value)
            tg.cancel_scope.cancel()

    interrupt = _FirstFailure()
    try:
        async with anyio.create_task_group() as tg:
            interrupt.bind(tg.cancel_scope)
            for index, fn in enumerate(fns):
                tg.start_soon(run, index, fn, name=f"race:{_describe(fn)}")
    except BaseException:
        interrupt.reraise_interrupt()
        raise
    interrupt.reraise()
    if winner:
        return winner[0]
    raise ExceptionGroup(
        f"race(): all {len(fns)} functions failed",
        [error for error in errors if error is not None],
    )


async def first_completed(*fns: Callable[[], Awaitable[T]]) -> T:
    """Call every function concurrently; the first to finish, succeeding or failing, decides.

    The others are cancelled and awaited before `first_completed` returns or raises. Use it
    to stop work at the first of several events (``first_completed(shutdown.wait, serve)``),
    and `race` when only a success should end the wait.

    Args:
        *fns: Async functions taking no arguments; at least one.

    Returns:
        The result of the first function to finish, if it returned.

    Raises:
        Exception: The exception of the first function to finish, if it raised, as itself.
        BaseException: A function raised one that is not a cancellation
            (`KeyboardInterrupt`, `SystemExit`), even after another finished: raised as
            itself.
        TypeError: Something passed is not callable (a coroutine object, say).
        ValueError: No functions were given.
    """
    if not fns:
        raise ValueError("first_completed() needs at least one function to run.")
    _check_fns("first_completed", fns)
    outcome: list[T] = []

    async def run(fn: Callable[[], Awaitable[T]]) -> None:
        try:
            value = await fn()
        except Exception as error:
            if failure.error is None and not outcome:
                failure.record(error, f"first_completed(): raised by {_describe(fn)}")
            return
        except BaseException as error:
            if _is_cancellation(error):
                raise
            failure.record(error, f"first_completed(): raised by {_describe(fn)}")
            return
        if failure.error is None and not outcome:
            outcome.append(value)
            tg.cancel_scope.cancel()

    failure = _FirstFailure()
    try:
        async with anyio.create_task_group() as tg:
            failure.bind(tg.cancel_scope)
            for fn in fns:
                tg.start_soon(run, fn, name=f"first_completed:{_describe(fn)}")
    except BaseException:
        failure.reraise_interrupt()
        raise
    failure.reraise()
    return outcome[0]


# -- retry and shield ----------------------------------------------------------------------


def _check_delay(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"retry({name}={value!r}): {name} must be a number of seconds.")
    if not 0 <= value < math.inf:
        raise ValueError(
            f"retry({name}={value!r}): {name} must be a finite number of seconds, 0 or more."
        )
    return float(value)


def _retry_predicate(retry_on: RetryOn) -> Callable[[Exception], bool]:
    if isinstance(retry_on, type | tuple):
        classes = retry_on if isinstance(retry_on, tuple) else (retry_on,)
        for cls in classes:
            if not (isinstance(cls, type) and issubclass(cls, Exception)):
                raise TypeError(
                    f"retry(retry_on=...): {cls!r} is not an Exception subclass. Name the "
                    f"exceptions worth retrying (cancellation and other BaseExceptions are "
                    f"never retried), or pass a function deciding from the exception."
                )
        return lambda error: isinstance(error, classes)
    if callable(retry_on):
        return retry_on
    raise TypeError(
        f"retry(retry_on={retry_on!r}): pass an Exception subclass, a tuple of them, or a "
        f"function taking the exception and returning whether to retry."
    )


def backoff_ceiling(base_delay: float, max_delay: float, failures: int) -> float:
    """``base_delay * 2 ** (failures - 1)``, capped at ``max_delay`` without overflowing."""
    try:
        return min(max_delay, math.ldexp(base_delay, failures - 1))
    except OverflowError:
        return max_delay


def _wait_would_not_fit(ceiling: float) -> str | None:
    """Why a wait of up to ``ceiling`` seconds does not fit before the deadline, if it does not."""
    left = anyio.current_effective_deadline() - anyio.current_time()
    if ceiling < left:
        return None
    return (
        f"the next wait (up to {ceiling:.3g} s) would not fit in the {max(left, 0.0):.3g} s "
        f"left before the deadline."
    )


async def retry(
    fn: Callable[[Unpack[PosArgsT]], Awaitable[T]],
    *args: *PosArgsT,
    attempts: int = 3,
    base_delay: float = 0.1,
    max_delay: float = 10.0,
    jitter: bool = True,
    retry_on: RetryOn = Exception,
    on_retry: Callable[[Exception, int, float], object] | None = None,
) -> T:
    """Call ``fn(*args)`` until it succeeds, backing off exponentially between attempts.

    After the n-th failure the backoff ceiling is ``base_delay * 2 ** (n - 1)``, capped at
    ``max_delay``; with ``jitter`` the delay is drawn uniformly between 0 and that ceiling
    ("full jitter", so the cap holds after jitter), without it the delay is the ceiling.

    Deadlines are respected: before waiting, `retry` compares the ceiling with the time left
    in the current effective deadline (`anyio.current_effective_deadline`, so a request's
    deadline or an enclosing `fail_after` counts), and again after ``on_retry``, which may take
    time of its own. If the ceiling would not fit, it gives up at once and raises the last
    error instead of sleeping into a timeout. The decision uses the ceiling, not the jittered
    delay, so whether a call is retried under a deadline does not depend on a random draw.

    Cancellation is never retried, whatever ``retry_on`` says: only `Exception` subclasses are
    caught.

    Args:
        fn: The async function to call.
        *args: Positional arguments for ``fn``.
        attempts: The most calls to make, at least 1.
        base_delay: Seconds of backoff ceiling after the first failure.
        max_delay: The most seconds to wait between two attempts; at least ``base_delay``.
        jitter: Draw each delay uniformly between 0 and its ceiling.
        retry_on: The exceptions worth retrying: an `Exception` subclass, a tuple of them, or a
            function taking the exception and returning whether to retry. Others are raised at
            once.
        on_retry: Called before each wait as ``on_retry(error, attempt, delay)``, with the
            error, the number of the attempt that failed (from 1) and the seconds about to be
            waited. It may be async.

    Returns:
        What ``fn`` returned on the first attempt that succeeded.

    Raises:
        Exception: The last error, as itself, when it is not worth retrying, when the attempts
            are used up, or when the next wait would not fit in the deadline; a note on it
            says why `retry` gave up.
        TypeError: An argument has the wrong type.
        ValueError: An argument is out of range.
    """
    _check_fns("retry", (fn,))
    if isinstance(attempts, bool) or not isinstance(attempts, int):
        raise TypeError(f"retry(attempts={attempts!r}): attempts must be an int.")
    if attempts < 1:
        raise ValueError(
            f"retry(attempts={attempts!r}): attempts counts every call, the first included; "
            f"pass 1 or more."
        )
    base = _check_delay("base_delay", base_delay)
    cap = _check_delay("max_delay", max_delay)
    if cap < base:
        raise ValueError(
            f"retry(base_delay={base_delay!r}, max_delay={max_delay!r}): max_delay is below "
            f"base_delay; raise max_delay or lower base_delay."
        )
    if on_retry is not None and not callable(on_retry):
        raise TypeError(f"retry(on_retry={on_retry!r}): on_retry must be callable or None.")
    worth_retrying = _retry_predicate(retry_on)

    attempt = 1
    while True:
        try:
            return await fn(*args)
        except Exception as error:
            if not worth_retrying(error):
                raise
            if attempt >= attempts:
                error.add_note(f"retry(): gave up after {attempt} attempts of {_describe(fn)}.")
                raise
            ceiling = backoff_ceiling(base, cap, attempt)
            too_late = _wait_would_not_fit(ceiling)
            if too_late:
                error.add_note(
                    f"retry(): gave up after attempt {attempt} of {attempts} of "
                    f"{_describe(fn)}: {too_late}"
                )
                raise
            delay = random.uniform(0.0, ceiling) if jitter else ceiling  # noqa: S311 - not crypto
            if on_retry is not None:
                outcome = on_retry(error, attempt, delay)
                if inspect.isawaitable(outcome):
                    await outcome
                # on_retry took time of its own: the wait may not fit any more.
                too_late = _wait_would_not_fit(ceiling)
                if too_late:
                    error.add_note(
                        f"retry(): gave up after attempt {attempt} of {attempts} of "
                        f"{_describe(fn)} and its on_retry: {too_late}"
                    )
                    raise
        await anyio.sleep(delay)
        attempt += 1


async def shield(
    fn: Callable[[Unpack[PosArgsT]], Awaitable[T]],
    *args: *PosArgsT,
    # A shielded call ignores its caller's cancel scopes, so its own deadline is given here.
    timeout: float,  # noqa: ASYNC109
) -> T:
    """Run ``fn(*args)`` to completion even if the caller is cancelled, within ``timeout``.

    This is how cleanup that must not be interrupted halfway (closing a connection, flushing
    a buffer, releasing a lease) is run: it is shielded from outside cancellation, so outer
    deadlines do not cut it short, but it has its own hard deadline, so a cleanup that hangs
    cannot hang shutdown. It is ``with anyio.move_on_after(timeout, shield=True)``, plus two
    guarantees: a timeout is an error naming the function, and a cancellation that arrived
    while it ran is delivered as soon as it returns rather than at some later checkpoint.

    Args:
        fn: The async function to run.
        *args: Positional arguments for ``fn``.
        timeout: Seconds ``fn`` may take; finite and above 0.

    Returns:
        What ``fn`` returned, if the caller was not cancelled meanwhile.

    Raises:
        TimeoutError: ``fn`` did not finish within ``timeout``; it was cancelled.
        TypeError: ``fn`` is not callable or ``timeout`` is not a number.
        ValueError: ``timeout`` is not finite and above 0.
    """
    _check_fns("shield", (fn,))
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"shield(timeout={timeout!r}): timeout must be a number of seconds.")
    if not 0 < timeout < math.inf:
        raise ValueError(
            f"shield(timeout={timeout!r}): a shielded call needs a finite timeout above 0, so "
            f"that a hung cleanup cannot hang its caller; use anyio.CancelScope(shield=True) "
            f"directly if it really must be unbounded."
        )
    with anyio.move_on_after(timeout, shield=True) as scope:
        result = await fn(*args)
    if scope.cancelled_caught:
        raise TimeoutError(
            f"shield(): {_describe(fn)} did not finish within its {timeout} s timeout and was "
            f"cancelled; give it a longer timeout or make it faster."
        )
    await checkpoint_if_cancelled()
    return result
