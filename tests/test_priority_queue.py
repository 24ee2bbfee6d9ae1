"""PriorityQueue: order, bounds, blocking, cancellation, closing, statistics."""

from __future__ import annotations

import random
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lifecycle import PriorityQueue, PriorityQueueStatistics, QueueEmpty, QueueFull

pytestmark = pytest.mark.anyio


class Unorderable:
    """A payload that refuses to be compared, as most real payloads (dicts, objects) do."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __lt__(self, other: object) -> bool:
        raise AssertionError("payloads must never be compared")


def drain(queue: PriorityQueue[Any]) -> list[Any]:
    items = []
    while True:
        try:
            items.append(queue.get_nowait())
        except (QueueEmpty, anyio.EndOfStream):
            return items


# -- order and bounds ------------------------------------------------------------------------


def test_lowest_priority_first_and_fifo_among_equals_without_comparing_payloads() -> None:
    queue: PriorityQueue[Unorderable] = PriorityQueue(maxsize=10)
    for name, priority in [("a", 5), ("b", 1), ("c", 5), ("d", 1), ("e", -2), ("f", 1.5)]:
        queue.put_nowait(Unorderable(name), priority=priority)
    assert [item.name for item in drain(queue)] == ["e", "b", "d", "f", "a", "c"]


def test_nowait_calls_raise_queue_full_and_queue_empty() -> None:
    queue: PriorityQueue[str] = PriorityQueue(maxsize=2)
    with pytest.raises(QueueEmpty, match="empty"):
        queue.get_nowait()
    queue.put_nowait("a")
    queue.put_nowait("b")
    with pytest.raises(QueueFull, match=r"full \(2 items\)"):
        queue.put_nowait("c")
    assert drain(queue) == ["a", "b"]


def test_bad_sizes_and_priorities_are_rejected_with_the_fix() -> None:
    with pytest.raises(ValueError, match="must be bounded"):
        PriorityQueue(maxsize=0)
    with pytest.raises(TypeError, match="must be an int"):
        PriorityQueue(maxsize=2.5)  # type: ignore[arg-type]
    queue: PriorityQueue[str] = PriorityQueue(maxsize=2)
    with pytest.raises(ValueError, match="NaN"):
        queue.put_nowait("a", priority=float("nan"))
    with pytest.raises(TypeError, match="int or a float"):
        queue.put_nowait("a", priority="high")  # type: ignore[arg-type]
    assert queue.statistics().size == 0


@settings(max_examples=200, deadline=None)
@given(
    maxsize=st.integers(min_value=1, max_value=6),
    operations=st.lists(st.one_of(st.none(), st.integers(min_value=-3, max_value=3)), max_size=60),
)
def test_property_matches_a_stable_sorted_model(maxsize: int, operations: list[int | None]) -> None:
    # None is a get; an int is a put with that priority.
    queue: PriorityQueue[object] = PriorityQueue(maxsize=maxsize)
    model: list[tuple[int, int, object]] = []
    for sequence, operation in enumerate(operations):
        if operation is None:
            if not model:
                with pytest.raises(QueueEmpty):
                    queue.get_nowait()
            else:
                model.sort(key=lambda entry: entry[:2])
                assert queue.get_nowait() is model.pop(0)[2]
        elif len(model) == maxsize:
            with pytest.raises(QueueFull):
                queue.put_nowait(object(), priority=operation)
        else:
            payload = object()
            queue.put_nowait(payload, priority=operation)
            model.append((operation, sequence, payload))
        assert queue.statistics().size == len(model)


# -- blocking --------------------------------------------------------------------------------


async def test_get_waits_for_an_item_and_put_waits_for_room() -> None:
    queue: PriorityQueue[str] = PriorityQueue(maxsize=1)
    got: list[str] = []

    async with anyio.create_task_group() as tg:

        async def consume() -> None:
            got.append(await queue.get())
            got.append(await queue.get())

        tg.start_soon(consume)
        await anyio.wait_all_tasks_blocked()
        assert queue.statistics().tasks_waiting_get == 1
        await queue.put("first")
        await queue.put("second")
        await queue.put("third")  # waits until the consumer makes room
    assert got == ["first", "second"]
    assert drain(queue) == ["third"]


async def test_waiting_tasks_are_served_in_the_order_they_came() -> None:
    queue: PriorityQueue[int] = PriorityQueue(maxsize=1)
    queue.put_nowait(0)
    order: list[int] = []

    async def put(value: int) -> None:
        await queue.put(value, priority=-value)  # later putters have higher urgency...
        order.append(value)

    async with anyio.create_task_group() as tg:
        for value in (1, 2, 3):
            tg.start_soon(put, value)
            await anyio.wait_all_tasks_blocked()
        for _ in range(3):
            queue.get_nowait()
            await anyio.wait_all_tasks_blocked()
    assert order == [1, 2, 3]  # ...but room goes to the putter who waited longest


async def test_statistics_describe_the_queue() -> None:
    queue: PriorityQueue[str] = PriorityQueue(maxsize=1)
    queue.put_nowait("a")
    async with anyio.create_task_group() as tg:
        tg.start_soon(queue.put, "b")
        await anyio.wait_all_tasks_blocked()
        assert queue.statistics() == PriorityQueueStatistics(
            size=1, maxsize=1, tasks_waiting_put=1, tasks_waiting_get=0, closed=False
        )
        tg.cancel_scope.cancel()
    queue.close()
    assert queue.statistics() == PriorityQueueStatistics(
        size=1, maxsize=1, tasks_waiting_put=0, tasks_waiting_get=0, closed=True
    )
    assert queue.maxsize == 1


# -- cancellation ----------------------------------------------------------------------------


async def test_a_getter_cancelled_after_being_woken_passes_the_item_on() -> None:
    # The lost-wakeup deadlock: getter A is cancelled, an item arrives and wakes A before A
    # gets to run, A leaves with its cancellation, and getter B sleeps forever next to an item
    # nobody will take.
    queue: PriorityQueue[str] = PriorityQueue(maxsize=1)
    got: list[str] = []
    scope_a = anyio.CancelScope()

    async def getter_a() -> None:
        with scope_a:
            got.append(await queue.get())

    async def getter_b() -> None:
        got.append(await queue.get())

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(getter_a)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(getter_b)
            await anyio.wait_all_tasks_blocked()
            scope_a.cancel()
            queue.put_nowait("x")  # wakes A, which is first in line but already cancelled
    assert got == ["x"]
    assert scope_a.cancelled_caught
    assert queue.statistics().tasks_waiting_get == 0


async def test_a_putter_cancelled_after_being_woken_passes_the_room_on() -> None:
    queue: PriorityQueue[str] = PriorityQueue(maxsize=1)
    queue.put_nowait("first")
    scope_a = anyio.CancelScope()

    async def putter_a() -> None:
        with scope_a:
            await queue.put("from a")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(putter_a)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(queue.put, "from b")
            await anyio.wait_all_tasks_blocked()
            scope_a.cancel()
            assert queue.get_nowait() == "first"  # room for A, first in line but cancelled
    assert scope_a.cancelled_caught
    assert drain(queue) == ["from b"]  # a cancelled put put nothing


async def test_cancelled_waits_leave_nothing_behind() -> None:
    queue: PriorityQueue[str] = PriorityQueue(maxsize=1)
    with anyio.move_on_after(0.01):
        await queue.get()
    queue.put_nowait("a")
    with anyio.move_on_after(0.01):
        await queue.put("b")
    assert queue.statistics() == PriorityQueueStatistics(
        size=1, maxsize=1, tasks_waiting_put=0, tasks_waiting_get=0, closed=False
    )
    assert drain(queue) == ["a"]


async def run_producers_and_consumers(seed: int, chaos: bool) -> None:
    """3 producers and 3 consumers over a queue of 2; with chaos, waits are cancelled at random.

    Every item put must be taken exactly once, and the run must end.
    """
    rng = random.Random(seed)
    queue: PriorityQueue[tuple[int, int]] = PriorityQueue(maxsize=2)
    taken: list[tuple[int, int]] = []
    scopes: list[anyio.CancelScope] = []

    async def produce(producer: int) -> None:
        for n in range(15):
            while True:  # a cancelled put put nothing: put the same item again
                with anyio.CancelScope() as scope:
                    scopes.append(scope)
                    await queue.put((producer, n), priority=rng.randint(0, 3))
                scopes.remove(scope)
                if not scope.cancelled_caught:
                    break

    async def consume() -> None:
        while True:
            with anyio.CancelScope() as scope:
                scopes.append(scope)
                try:
                    item = await queue.get()
                except anyio.EndOfStream:
                    return
                finally:
                    scopes.remove(scope)
                taken.append(item)

    chaos_scope = anyio.CancelScope()
    stranded: list[int] = []

    async def cancel_at_random() -> None:
        with chaos_scope:
            while True:
                await anyio.lowlevel.checkpoint()
                if scopes and rng.random() < 0.3:
                    rng.choice(scopes).cancel()

    async def produce_then_close() -> None:
        async with anyio.create_task_group() as producers:
            for producer in range(3):
                producers.start_soon(produce, producer)
        chaos_scope.cancel()
        # Once everyone has settled, no item may sit in the queue while consumers wait.
        await anyio.wait_all_tasks_blocked()
        stranded.append(queue.statistics().size)
        queue.close()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as work:
            if chaos:
                work.start_soon(cancel_at_random)
            for _ in range(3):
                work.start_soon(consume)
            work.start_soon(produce_then_close)
    assert stranded == [0]
    assert sorted(taken) == [(p, n) for p in range(3) for n in range(15)]


async def test_three_producers_and_three_consumers_never_deadlock() -> None:
    # Regression: bounded priority queues built on a condition variable lose wakeups and hang
    # with several producers and consumers.
    for seed in range(150):
        await run_producers_and_consumers(seed, chaos=False)


async def test_three_producers_and_three_consumers_survive_random_cancellation() -> None:
    for seed in range(150):
        await run_producers_and_consumers(seed, chaos=True)


# -- closing ---------------------------------------------------------------------------------


async def test_after_close_buffered_items_can_be_taken_then_the_queue_ends() -> None:
    queue: PriorityQueue[str] = PriorityQueue(maxsize=5)
    await queue.put("low", priority=9)
    await queue.put("high", priority=0)
    queue.close()
    queue.close()  # idempotent
    with pytest.raises(anyio.ClosedResourceError, match="closed"):
        await queue.put("late")
    with pytest.raises(anyio.ClosedResourceError):
        queue.put_nowait("late")
    assert await queue.get() == "high"
    assert queue.get_nowait() == "low"
    with pytest.raises(anyio.EndOfStream, match="closed and every item has been taken"):
        await queue.get()
    with pytest.raises(anyio.EndOfStream):
        queue.get_nowait()


async def test_close_wakes_every_waiting_task() -> None:
    full: PriorityQueue[str] = PriorityQueue(maxsize=1)
    full.put_nowait("kept")
    empty: PriorityQueue[str] = PriorityQueue(maxsize=1)
    outcomes: list[str] = []

    async def put() -> None:
        try:
            await full.put("refused")
        except anyio.ClosedResourceError:
            outcomes.append("put refused")

    async def get() -> None:
        try:
            await empty.get()
        except anyio.EndOfStream:
            outcomes.append("get ended")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(put)
            tg.start_soon(get)
            await anyio.wait_all_tasks_blocked()
            full.close()
            empty.close()
    assert sorted(outcomes) == ["get ended", "put refused"]
    assert drain(full) == ["kept"]


async def test_async_for_takes_items_until_the_queue_is_closed_and_empty() -> None:
    queue: PriorityQueue[int] = PriorityQueue(maxsize=2)
    got: list[int] = []

    async with anyio.create_task_group() as tg:

        async def consume() -> None:
            async for item in queue:
                got.append(item)

        tg.start_soon(consume)
        for item in range(10):
            await queue.put(item)
        queue.close()
    assert got == list(range(10))
