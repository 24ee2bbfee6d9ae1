"""A bounded async priority queue that can be closed.

The queue keeps every item in one heap; tasks blocked in `PriorityQueue.get` or
`PriorityQueue.put` wait in FIFO order and are woken one at a time, each woken task holding a
*reservation* (an item for a getter, a free slot for a putter) until it runs. That is what
keeps the queue from losing wakeups, the usual way bounded priority queues built on a condition
variable deadlock with several producers and consumers:

* A task is only woken when there is something for it, and what it was woken for cannot be
  taken by a task that did not wait (a ``get_nowait`` or ``put_nowait`` sees reserved items and
  slots as taken).
* A woken task that is cancelled before it runs hands its reservation on to the next waiter,
  so the wakeup is never lost, and it has not put or taken anything: a cancelled `put` never
  enqueued its item and a cancelled `get` never removed one.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar, final

import anyio
from anyio.lowlevel import checkpoint

from .exceptions import QueueEmpty, QueueFull

__all__ = ["PriorityQueue", "PriorityQueueStatistics"]

T = TypeVar("T")


@dataclass(frozen=True)
class PriorityQueueStatistics:
    """A snapshot of a `PriorityQueue`, from `PriorityQueue.statistics`.

    Attributes:
        size: Items in the queue.
        maxsize: The most items it holds.
        tasks_waiting_put: Tasks blocked in `PriorityQueue.put`, waiting for room.
        tasks_waiting_get: Tasks blocked in `PriorityQueue.get`, waiting for an item.
        closed: Whether `PriorityQueue.close` has been called.
    """

    size: int
    maxsize: int
    tasks_waiting_put: int
    tasks_waiting_get: int
    closed: bool


class _Wake(enum.Enum):
    WAITING = "waiting"
    READY = "ready"  # woken with a reservation: an item (getter) or a free slot (putter)
    CLOSED = "closed"  # woken because the queue closed


@final
class _Waiter:
    __slots__ = ("event", "state")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.state = _Wake.WAITING


def _check_priority(priority: object) -> None:
    if not isinstance(priority, int | float):
        raise TypeError(
            f"PriorityQueue priority must be an int or a float; got {priority!r}. Map your "
            f"priorities to numbers (lower is served first)."
        )
    if math.isnan(priority):
        raise ValueError(
            "PriorityQueue priority is NaN, which compares unequal to everything and would "
            "scramble the queue's order; pass a real number."
        )


@final
class PriorityQueue(Generic[T]):
    """A bounded queue that serves the lowest priority first and is FIFO among equals.

    Items need not be comparable: only priorities are compared. When the queue is full,
    `put` waits for room and `put_nowait` raises `lifecycle.QueueFull`; when it is empty,
    `get` waits for an item and `get_nowait` raises `lifecycle.QueueEmpty`. Waiting tasks are
    served in the order they started waiting.

    `close` ends the queue: puts fail from then on with `anyio.ClosedResourceError`, while the
    items already in it can still be taken; once they are gone, `get` raises
    `anyio.EndOfStream`. ``async for item in queue`` takes items until then::

        queue: PriorityQueue[Job] = PriorityQueue(maxsize=100)
        await queue.put(job, priority=0)    # urgent
        await queue.put(report, priority=10)
        queue.close()
        async for item in queue:            # job first, then report, then the loop ends
            ...

    Args:
        maxsize: The most items the queue holds, at least 1.
    """

    def __init__(self, maxsize: int) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int):
            raise TypeError(f"PriorityQueue(maxsize={maxsize!r}): maxsize must be an int.")
        if maxsize < 1:
            raise ValueError(
                f"PriorityQueue(maxsize={maxsize!r}): the queue must be bounded; pass a "
                f"maxsize of 1 or more (an unbounded queue turns overload into memory growth)."
            )
        self._maxsize = maxsize
        self._heap: list[tuple[float, int, T]] = []
        self._sequence = itertools.count()  # FIFO among equal priorities; items never compared
        self._getters: deque[_Waiter] = deque()
        self._putters: deque[_Waiter] = deque()
        self._reserved_items = 0  # items set aside for woken getters that have not run yet
        self._reserved_slots = 0  # slots set aside for woken putters that have not run yet
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<PriorityQueue {state} size={len(self._heap)} maxsize={self._maxsize}>"

    @property
    def maxsize(self) -> int:
        """The most items the queue holds."""
        return self._maxsize

    def statistics(self) -> PriorityQueueStatistics:
        """Return a snapshot of the queue's size, waiting tasks and state."""
        return PriorityQueueStatistics(
            size=len(self._heap),
            maxsize=self._maxsize,
            tasks_waiting_put=len(self._putters) + self._reserved_slots,
            tasks_waiting_get=len(self._getters) + self._reserved_items,
            closed=self._closed,
        )

    # -- putting --------------------------------------------------------------------------

    def put_nowait(self, item: T, priority: float = 0) -> None:
        """Add ``item`` with ``priority`` if there is room, without waiting.

        Args:
            item: The item; it need not be comparable or hashable.
            priority: Lower is served first; equal priorities are served in order of arrival.

        Raises:
            lifecycle.QueueFull: The queue is full.
            anyio.ClosedResourceError: The queue is closed.
            TypeError: ``priority`` is not an int or a float.
            ValueError: ``priority`` is NaN.
        """
        self._check_open()
        _check_priority(priority)
        if len(self._heap) + self._reserved_slots >= self._maxsize:
            raise QueueFull(
                f"The priority queue is full ({self._maxsize} items); wait for room with "
                f"`await queue.put(...)`, or shed the item."
            )
        self._push(item, priority)

    async def put(self, item: T, priority: float = 0) -> None:
        """Add ``item`` with ``priority``, waiting for room if the queue is full.

        If the call is cancelled, the item was not added.

        Args:
            item: The item; it need not be comparable or hashable.
            priority: Lower is served first; equal priorities are served in order of arrival.

        Raises:
            anyio.ClosedResourceError: The queue is closed, or was closed while waiting.
            TypeError: ``priority`` is not an int or a float.
            ValueError: ``priority`` is NaN.
        """
        await checkpoint()
        self._check_open()
        _check_priority(priority)
        if len(self._heap) + self._reserved_slots < self._maxsize:
            self._push(item, priority)
            return
        waiter = _Waiter()
        self._putters.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            self._abandon(waiter, self._putters)
            raise
        if waiter.state is _Wake.READY:
            self._reserved_slots -= 1
        self._check_open()
        self._push(item, priority)

    def _push(self, item: T, priority: float) -> None:
        heapq.heappush(self._heap, (priority, next(self._sequence), item))
        self._wake_getters()

    def _check_open(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError(
                "The priority queue is closed; nothing more can be put in it. Stop producing "
                "once it is closed, or put before closing it."
            )

    # -- getting --------------------------------------------------------------------------

    def get_nowait(self) -> T:
        """Remove and return the item served next, without waiting.

        Raises:
            lifecycle.QueueEmpty: The queue is empty (but not closed).
            anyio.EndOfStream: The queue is closed and empty.
        """
        if len(self._heap) <= self._reserved_items:
            if self._closed:
                raise self._end()
            raise QueueEmpty(
                "The priority queue is empty; wait for an item with `await queue.get()`."
            )
        return self._pop()

    async def get(self) -> T:
        """Remove and return the item served next, waiting for one if the queue is empty.

        If the call is cancelled, no item was removed.

        Raises:
            anyio.EndOfStream: The queue is closed and empty.
        """
        await checkpoint()
        if len(self._heap) > self._reserved_items:
            return self._pop()
        if self._closed:
            raise self._end()
        waiter = _Waiter()
        self._getters.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            self._abandon(waiter, self._getters)
            raise
        if waiter.state is _Wake.CLOSED:
            raise self._end()
        self._reserved_items -= 1
        return self._pop()

    def _pop(self) -> T:
        item = heapq.heappop(self._heap)[2]
        self._wake_putters()
        return item

    @staticmethod
    def _end() -> anyio.EndOfStream:
        return anyio.EndOfStream("The priority queue is closed and every item has been taken.")

    def __aiter__(self) -> PriorityQueue[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self.get()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    # -- waiting and closing --------------------------------------------------------------

    def _abandon(self, waiter: _Waiter, queue: deque[_Waiter]) -> None:
        """Undo a wait that was cancelled, passing on a reservation it had been given."""
        if waiter.state is _Wake.WAITING:
            queue.remove(waiter)
        elif waiter.state is _Wake.READY:
            if queue is self._getters:
                self._reserved_items -= 1
                self._wake_getters()
            else:
                self._reserved_slots -= 1
                self._wake_putters()

    def _wake_getters(self) -> None:
        """Wake waiting getters while there are items not yet set aside for one."""
        getters = self._getters
        while getters and len(self._heap) > self._reserved_items:
            waiter = getters.popleft()
            waiter.state = _Wake.READY
            self._reserved_items += 1
            waiter.event.set()

    def _wake_putters(self) -> None:
        """Wake waiting putters while there are free slots not yet set aside for one."""
        putters = self._putters
        while putters and len(self._heap) + self._reserved_slots < self._maxsize:
            waiter = putters.popleft()
            waiter.state = _Wake.READY
            self._reserved_slots += 1
            waiter.event.set()

    def close(self) -> None:
        """Close the queue; calling it again does nothing.

        Tasks waiting in `put` fail with `anyio.ClosedResourceError`, as does every put from
        now on. The items already in the queue can still be taken; tasks waiting in `get` when
        there are none left get `anyio.EndOfStream`.
        """
        if self._closed:
            return
        self._closed = True
        for waiters in (self._putters, self._getters):
            while waiters:
                waiter = waiters.popleft()
                waiter.state = _Wake.CLOSED
                waiter.event.set()
