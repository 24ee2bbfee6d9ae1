"""The toolkit: bounded_map, as_completed, gather, race, first_completed, retry, shield."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import math
import time
from collections.abc import AsyncIterator, Iterator

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio.testing import MockClock

import lifecycle
from lifecycle import as_completed, bounded_map, first_completed, gather, race, retry, shield

pytestmark = pytest.mark.anyio

# The anyio_backend fixture is function-scoped but holds no per-example state.
property_settings = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def trio_mock_clock() -> pytest.MarkDecorator:
    """Run a test on trio only, under a clock that jumps ahead whenever every task sleeps."""
    return pytest.mark.parametrize(
        "anyio_backend", [pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}))]
    )


class Peak:
    """Counts calls in flight and remembers the most there ever were at once."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0

    def __enter__(self) -> None:
        self.now += 1
        self.most = max(self.most, self.now)

    def __exit__(self, *exc: object) -> None:
        self.now -= 1


async def checkpoints(n: int) -> None:
    for _ in range(n):
        await anyio.lowlevel.checkpoint()


# -- exports ---------------------------------------------------------------------------------


def test_the_toolkit_and_anyio_primitives_are_public_names() -> None:
    for name in (
        "bounded_map",
        "as_completed",
        "gather",
        "race",
        "first_completed",
        "retry",
        "shield",
        "PriorityQueue",
        "LeakTracker",
        "QueueFull",
        "QueueEmpty",
    ):
        assert hasattr(lifecycle, name), name
    # Re-exported, not wrapped: the very same objects as anyio's.
    for name in (
        "CancelScope",
        "CapacityLimiter",
        "CapacityLimiterStatistics",
        "Condition",
        "Event",
        "Lock",
        "Semaphore",
        "TaskHandle",
        "create_memory_object_stream",
        "create_task_group",
        "current_effective_deadline",
        "fail_after",
        "fail_at",
        "move_on_after",
        "move_on_at",
        "to_thread",
        "to_process",
        "from_thread",
        "EndOfStream",
        "ClosedResourceError",
    ):
        assert getattr(lifecycle, name) is getattr(anyio, name), name
    assert lifecycle.TaskGroup is anyio.abc.TaskGroup
    assert lifecycle.TaskStatus is anyio.abc.TaskStatus


# -- bounded_map -----------------------------------------------------------------------------


async def test_bounded_map_returns_results_in_input_order_whatever_order_calls_finish() -> None:
    done = [anyio.Event() for _ in range(5)]
    finished: list[int] = []

    async def double(x: int) -> int:
        if x < 4:
            await done[x + 1].wait()  # each call waits for the next one: the last ends first
        finished.append(x)
        done[x].set()
        return 2 * x

    assert await bounded_map(double, range(5), limit=5) == [0, 2, 4, 6, 8]
    assert finished == [4, 3, 2, 1, 0]


async def test_bounded_map_runs_at_most_limit_calls_at_once_and_uses_them_all() -> None:
    peak = Peak()

    async def work(x: int) -> int:
        with peak:
            await checkpoints(3)
        return x

    assert await bounded_map(work, range(20), limit=3) == list(range(20))
    assert peak.most == 3


async def test_bounded_map_over_20000_items_keeps_live_tasks_near_the_limit() -> None:
    # Regression: implementations spawning a task per item up front hold 20,000 tasks.
    baseline = len(anyio.get_running_tasks())
    live: list[int] = []

    async def work(x: int) -> int:
        if x % 50 == 0:
            live.append(len(anyio.get_running_tasks()) - baseline)
        await anyio.lowlevel.checkpoint()
        return x

    results = await bounded_map(work, range(20_000), limit=10)
    assert results == list(range(20_000))
    assert max(live) <= 10
    assert max(live) >= 9  # the work did run concurrently


async def test_bounded_map_takes_items_lazily_and_none_after_a_failure() -> None:
    pulled = 0
    finished = 0
    ahead: list[int] = []
    pulled_at_failure = -1

    def items() -> Iterator[int]:
        nonlocal pulled
        for x in range(10**9):  # practically endless: an eager map never gets anywhere
            pulled += 1
            yield x

    async def work(x: int) -> int:
        nonlocal finished, pulled_at_failure
        ahead.append(pulled - finished)
        await checkpoints(x % 3)
        if x == 200:
            pulled_at_failure = pulled
            raise LookupError("stop here")
        finished += 1
        return x

    with pytest.raises(LookupError, match="stop here"):
        await bounded_map(work, items(), limit=4)
    assert max(ahead) <= 4
    assert pulled == pulled_at_failure


async def test_bounded_map_accepts_an_async_iterable_and_takes_it_lazily() -> None:
    pulled = 0
    peak = Peak()
    ahead: list[int] = []
    finished = 0

    async def items() -> AsyncIterator[int]:
        nonlocal pulled
        for x in range(30):
            await anyio.lowlevel.checkpoint()
            pulled += 1
            yield x

    async def work(x: int) -> int:
        nonlocal finished
        ahead.append(pulled - finished)
        with peak:
            await checkpoints(3 + x % 4)  # slower than the items arrive
        finished += 1
        return x * x

    assert await bounded_map(work, items(), limit=3) == [x * x for x in range(30)]
    assert peak.most == 3
    assert max(ahead) <= 3


async def test_bounded_map_raises_the_first_failure_as_itself_after_cancelling_the_rest() -> None:
    started = 0
    all_started = anyio.Event()
    cancelled: list[int] = []

    async def work(x: int) -> int:
        nonlocal started
        started += 1
        if started == 5:
            all_started.set()
        if x == 3:
            await all_started.wait()
            raise ValueError("item 3 is bad")
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.append(x)
        return x

    with pytest.raises(ValueError, match="item 3 is bad") as info:
        await bounded_map(work, range(5), limit=5)
    assert type(info.value) is ValueError
    assert sorted(cancelled) == [0, 1, 2, 4]  # cancelled and awaited before the raise
    assert any("item 3" in note for note in info.value.__notes__)


async def test_bounded_map_starts_no_call_after_a_failure() -> None:
    # Item 1's call is woken by item 0's failure and finishes normally; the calls after it
    # never reach a checkpoint, so only bounded_map itself can stop its worker from running
    # through every remaining item.
    called: list[int] = []
    failing = anyio.Event()

    async def work(x: int) -> int:
        called.append(x)
        if x == 0:
            await anyio.wait_all_tasks_blocked()  # until item 1 waits
            failing.set()
            raise ValueError("first item fails")
        if x == 1:
            await failing.wait()
        return x

    with pytest.raises(ValueError, match="first item fails"):
        await bounded_map(work, range(1000), limit=2)
    assert sorted(called) == [0, 1]


async def test_bounded_map_raises_an_error_from_the_items_as_itself() -> None:
    def items() -> Iterator[int]:
        yield 1
        yield 2
        raise OSError("disk gone")

    async def work(x: int) -> int:
        await anyio.sleep_forever()
        return x

    with pytest.raises(OSError, match="disk gone") as info:
        await bounded_map(work, items(), limit=10)
    assert type(info.value) is OSError


async def test_bounded_map_lets_an_outer_cancellation_through() -> None:
    started = 0
    cancelled = 0
    reached = False

    async def work(x: int) -> int:
        nonlocal started, cancelled
        started += 1
        if started == 3:
            scope.cancel()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled += 1
        return x

    with anyio.CancelScope() as scope:
        await bounded_map(work, range(100), limit=3)
        reached = True
    assert not reached
    assert scope.cancelled_caught
    assert (started, cancelled) == (3, 3)


async def test_bounded_map_of_nothing_is_empty() -> None:
    async def work(x: int) -> int:
        raise AssertionError("never called")

    assert await bounded_map(work, [], limit=3) == []


async def test_bounded_map_rejects_bad_arguments_clearly() -> None:
    async def work(x: int) -> int:
        return x

    coroutine = work(1)
    with pytest.raises(TypeError, match="not coroutine objects"):
        await bounded_map(coroutine, [1], limit=1)  # type: ignore[arg-type]
    assert inspect.getcoroutinestate(coroutine) == "CORO_CLOSED"  # no "never awaited"
    with pytest.raises(ValueError, match="at least 1"):
        await bounded_map(work, [1], limit=0)
    with pytest.raises(TypeError, match="must be an int"):
        await bounded_map(work, [1], limit=2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="iterable"):
        await bounded_map(work, 5, limit=1)  # type: ignore[arg-type]


@property_settings
@given(
    delays=st.lists(st.integers(min_value=0, max_value=3), max_size=40),
    limit=st.integers(min_value=1, max_value=8),
    asynchronous=st.booleans(),
)
async def test_property_bounded_map_keeps_order_and_limit(
    delays: list[int], limit: int, asynchronous: bool
) -> None:
    peak = Peak()

    async def work(i: int) -> tuple[int, int]:
        with peak:
            await checkpoints(delays[i])
        return i, delays[i]

    async def async_items() -> AsyncIterator[int]:
        for i in range(len(delays)):
            yield i

    items = async_items() if asynchronous else iter(range(len(delays)))
    assert await bounded_map(work, items, limit=limit) == list(enumerate(delays))
    assert peak.most <= limit


# -- as_completed ----------------------------------------------------------------------------


async def test_as_completed_yields_index_and_result_in_the_order_calls_finish() -> None:
    release = {0: anyio.Event(), 1: anyio.Event()}
    order: list[tuple[int, str]] = []

    async def work(x: int) -> str:
        if x in release:
            await release[x].wait()
        return f"r{x}"

    async with as_completed(work, range(3), limit=3) as results:
        async for index, result in results:
            order.append((index, result))
            if index == 2:
                release[0].set()
            elif index == 0:
                release[1].set()
    assert order == [(2, "r2"), (0, "r0"), (1, "r1")]


async def test_as_completed_cancels_pending_work_at_once_when_left_early() -> None:
    # Regression: breaking out after the first of [10 ms, 500 ms, 500 ms] must not wait for the
    # other two.
    cancelled: list[int] = []

    async def work(delay: float) -> float:
        try:
            await anyio.sleep(delay)
        except anyio.get_cancelled_exc_class():
            cancelled.append(int(delay * 1000))
            raise
        return delay

    start = time.monotonic()
    async with as_completed(work, [0.01, 0.5, 0.5], limit=3) as results:
        async for _, value in results:
            first = value
            break
    elapsed = time.monotonic() - start
    assert first == 0.01
    assert elapsed < 0.3
    assert cancelled == [500, 500]


async def test_as_completed_yields_earlier_results_then_raises_the_failure_as_itself() -> None:
    got_first = anyio.Event()
    cancelled: list[int] = []
    seen: list[int] = []

    async def work(x: int) -> int:
        if x == 1:
            await got_first.wait()
            raise KeyError("item 1")
        if x == 2:
            try:
                await anyio.sleep_forever()
            finally:
                cancelled.append(x)
        return x

    async def consume() -> None:
        async with as_completed(work, range(3), limit=3) as results:
            async for index, _ in results:
                seen.append(index)
                got_first.set()

    with pytest.raises(KeyError, match="item 1") as info:
        await consume()
    assert type(info.value) is KeyError
    assert seen == [0]
    assert cancelled == [2]


async def test_as_completed_lets_an_error_in_the_block_out_as_itself() -> None:
    cancelled = anyio.Event()

    async def work(x: int) -> int:
        if x == 0:
            return 0
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()
        return x

    async def consume() -> None:
        async with as_completed(work, range(2), limit=2) as results:
            async for _ in results:
                1 / 0  # noqa: B018 - the block fails while work is pending

    with pytest.raises(ZeroDivisionError) as info:
        await consume()
    assert type(info.value) is ZeroDivisionError
    assert cancelled.is_set()


async def test_as_completed_lets_an_outer_cancellation_through() -> None:
    reached = False

    async def work(x: int) -> int:
        if x == 0:
            return 0
        await anyio.sleep_forever()
        return x

    with anyio.CancelScope() as scope:
        async with as_completed(work, range(3), limit=3) as results:
            async for _ in results:
                scope.cancel()
            reached = True
    assert not reached
    assert scope.cancelled_caught


async def test_as_completed_slows_the_work_down_to_the_reader() -> None:
    started = 0

    async def work(x: int) -> int:
        nonlocal started
        started += 1
        return x

    async with as_completed(work, range(1000), limit=3) as results:
        await anyio.wait_all_tasks_blocked()
        # limit results waiting to be read, limit more held by blocked workers; no more.
        assert 3 <= started <= 6
        indices = [index async for index, _ in results]
    assert sorted(indices) == list(range(1000))


async def test_as_completed_takes_an_async_iterable() -> None:
    async def items() -> AsyncIterator[str]:
        for word in ("a", "bb", "ccc"):
            await anyio.lowlevel.checkpoint()
            yield word

    async def size(word: str) -> int:
        return len(word)

    async with as_completed(size, items(), limit=2) as results:
        got = {index: value async for index, value in results}
    assert got == {0: 1, 1: 2, 2: 3}


async def test_as_completed_cannot_be_entered_twice() -> None:
    async def work(x: int) -> int:
        return x

    completions = as_completed(work, [1], limit=1)
    async with completions as results:
        assert [pair async for pair in results] == [(0, 1)]
    with pytest.raises(RuntimeError, match="already used"):
        async with completions:
            pass


@property_settings
@given(
    delays=st.lists(st.integers(min_value=0, max_value=3), max_size=30),
    limit=st.integers(min_value=1, max_value=6),
)
async def test_property_as_completed_yields_each_index_once_within_the_limit(
    delays: list[int], limit: int
) -> None:
    peak = Peak()

    async def work(i: int) -> int:
        with peak:
            await checkpoints(delays[i])
        return delays[i]

    async with as_completed(work, range(len(delays)), limit=limit) as results:
        got = [pair async for pair in results]
    assert sorted(got) == list(enumerate(delays))
    assert peak.most <= limit


# -- gather ----------------------------------------------------------------------------------


async def test_gather_returns_results_in_the_order_given() -> None:
    second_done = anyio.Event()

    async def first() -> str:
        await second_done.wait()
        return "first"

    async def second() -> int:
        second_done.set()
        return 2

    assert await gather(first, second) == ("first", 2)
    assert await gather() == ()


async def test_gather_with_return_exceptions_puts_errors_in_place_and_lets_others_finish() -> None:
    async def ok() -> str:
        await anyio.lowlevel.checkpoint()
        return "ok"

    async def bad() -> str:
        raise ValueError("bad")

    results = await gather(ok, bad, ok, return_exceptions=True)
    assert results[0] == "ok"
    assert isinstance(results[1], ValueError)
    assert results[2] == "ok"


async def test_gather_raises_the_first_failure_as_itself_and_cancels_the_rest() -> None:
    started = anyio.Event()
    cancelled = anyio.Event()

    async def slow() -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    async def bad() -> None:
        await started.wait()
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad") as info:
        await gather(slow, bad)
    assert type(info.value) is ValueError
    assert cancelled.is_set()


async def test_gather_with_return_exceptions_never_stores_an_outer_cancellation() -> None:
    # Regression: asyncio.gather(..., return_exceptions=True) used to return the children's
    # cancellations as results, so the caller carried on as if it had not been cancelled.
    started = 0
    cancelled = 0
    reached = False

    async def child() -> str:
        nonlocal started, cancelled
        started += 1
        if started == 2:
            scope.cancel()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled += 1
        return "never"

    with anyio.CancelScope() as scope:
        await gather(child, child, return_exceptions=True)
        reached = True
    assert not reached
    assert scope.cancelled_caught
    assert cancelled == 2


async def test_gather_with_return_exceptions_lets_a_deadline_through() -> None:
    reached = False

    async def child() -> None:
        await anyio.sleep_forever()

    with anyio.move_on_after(0.01) as scope:
        await gather(child, child, return_exceptions=True)
        reached = True
    assert not reached
    assert scope.cancelled_caught


async def test_gather_rejects_coroutine_objects_and_closes_them_all() -> None:
    async def work() -> int:
        return 1

    one, two = work(), work()
    with pytest.raises(TypeError, match="not coroutine objects"):
        await gather(one, two)  # type: ignore[call-overload]
    assert inspect.getcoroutinestate(one) == "CORO_CLOSED"
    assert inspect.getcoroutinestate(two) == "CORO_CLOSED"


# -- race and first_completed ----------------------------------------------------------------


async def test_race_returns_the_first_success_and_cancels_and_awaits_the_others() -> None:
    cancelled = False

    async def slow() -> str:
        nonlocal cancelled
        try:
            await anyio.sleep_forever()
        finally:
            await anyio.lowlevel.cancel_shielded_checkpoint()  # cleanup that takes a moment
            cancelled = True
        return "slow"

    async def fast() -> str:
        await anyio.lowlevel.checkpoint()
        return "fast"

    assert await race(slow, fast) == "fast"
    assert cancelled


async def test_race_is_not_lost_by_a_failure_while_another_candidate_runs() -> None:
    failed = anyio.Event()

    async def fails() -> str:
        failed.set()
        raise ConnectionError("replica down")

    async def succeeds() -> str:
        await failed.wait()
        return "primary"

    assert await race(fails, succeeds) == "primary"


async def test_race_raises_every_error_in_the_order_given_when_all_fail() -> None:
    first_failed = anyio.Event()

    async def one() -> None:
        await first_failed.wait()
        raise ValueError("one")

    async def two() -> None:
        first_failed.set()
        raise KeyError("two")

    with pytest.raises(ExceptionGroup) as info:
        await race(one, two)
    assert [type(error) for error in info.value.exceptions] == [ValueError, KeyError]
    assert "all 2 functions failed" in str(info.value)


async def test_race_and_first_completed_need_something_to_run() -> None:
    with pytest.raises(ValueError, match="at least one"):
        await race()
    with pytest.raises(ValueError, match="at least one"):
        await first_completed()


async def test_race_lets_an_outer_cancellation_through() -> None:
    reached = False

    async def forever() -> None:
        await anyio.sleep_forever()

    with anyio.move_on_after(0.01) as scope:
        await race(forever, forever)
        reached = True
    assert not reached
    assert scope.cancelled_caught


async def test_first_completed_raises_a_first_failure_as_itself() -> None:
    cancelled = anyio.Event()

    async def fails() -> str:
        raise TimeoutError("upstream")

    async def slow() -> str:
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()
        return "slow"

    with pytest.raises(TimeoutError, match="upstream") as info:
        await first_completed(slow, fails)
    assert type(info.value) is TimeoutError
    assert cancelled.is_set()


async def test_first_completed_returns_a_first_success() -> None:
    stop = anyio.Event()

    async def serve() -> str:
        await stop.wait()
        return "served"

    async def shutdown() -> str:
        return "shutdown"

    assert await first_completed(serve, shutdown) == "shutdown"


# -- retry -----------------------------------------------------------------------------------


class Flaky:
    """Fails ``failures`` times with a fresh ConnectionError, then returns ``"ok"``."""

    def __init__(self, failures: int, error: type[Exception] = ConnectionError) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0
        self.errors: list[Exception] = []

    async def __call__(self, value: str = "ok") -> str:
        self.calls += 1
        await anyio.lowlevel.checkpoint()
        if self.calls <= self.failures:
            error = self.error(f"failure {self.calls}")
            self.errors.append(error)
            raise error
        return value


async def test_retry_retries_until_success_and_reports_each_retry() -> None:
    flaky = Flaky(failures=2)
    reports: list[tuple[Exception, int, float]] = []

    async def on_retry(error: Exception, attempt: int, delay: float) -> None:
        reports.append((error, attempt, delay))

    result = await retry(flaky, "done", attempts=3, base_delay=0, on_retry=on_retry)
    assert result == "done"
    assert flaky.calls == 3
    assert [(error, attempt) for error, attempt, _ in reports] == [
        (flaky.errors[0], 1),
        (flaky.errors[1], 2),
    ]


async def test_retry_raises_the_last_error_when_attempts_run_out() -> None:
    flaky = Flaky(failures=10)
    with pytest.raises(ConnectionError) as info:
        await retry(flaky, attempts=3, base_delay=0)
    assert info.value is flaky.errors[-1]
    assert flaky.calls == 3
    assert any("gave up after 3 attempts" in note for note in info.value.__notes__)


async def test_retry_raises_errors_not_worth_retrying_at_once() -> None:
    flaky = Flaky(failures=10, error=PermissionError)
    with pytest.raises(PermissionError):
        await retry(flaky, attempts=5, base_delay=0, retry_on=(ConnectionError, TimeoutError))
    assert flaky.calls == 1

    flaky = Flaky(failures=10)
    with pytest.raises(ConnectionError):
        await retry(flaky, attempts=5, base_delay=0, retry_on=lambda e: "failure 1" in str(e))
    assert flaky.calls == 2


async def test_retry_never_retries_cancellation() -> None:
    calls = 0
    reached = False

    async def cancelled() -> None:
        nonlocal calls
        calls += 1
        scope.cancel()
        await anyio.lowlevel.checkpoint()

    with anyio.CancelScope() as scope:
        await retry(cancelled, attempts=5, base_delay=0, retry_on=Exception)
        reached = True
    assert not reached
    assert calls == 1


async def test_retry_gives_up_at_once_when_the_next_wait_would_not_fit_the_deadline() -> None:
    # Regression: published retry helpers sleep the full second into a 0.3 s deadline and the
    # caller gets a timeout instead of the operation's own error, 0.3 s later.
    flaky = Flaky(failures=10)
    start = anyio.current_time()
    with anyio.fail_after(0.3), pytest.raises(ConnectionError) as info:
        await retry(flaky, attempts=5, base_delay=1.0)
    assert anyio.current_time() - start < 0.2
    assert info.value is flaky.errors[0]
    assert flaky.calls == 1
    assert any("would not fit" in note for note in info.value.__notes__)


async def test_retry_checks_the_deadline_again_after_on_retry() -> None:
    # Regression: the time left was measured before on_retry ran, so an on_retry that used
    # up the time made retry sleep into the deadline, and the caller got a TimeoutError
    # instead of the operation's own error.
    flaky = Flaky(failures=10)

    with anyio.fail_after(10) as deadline:

        async def on_retry(error: Exception, attempt: int, delay: float) -> None:
            await anyio.lowlevel.checkpoint()
            deadline.deadline = anyio.current_time() + 0.05  # as if on_retry took 9.95 s

        with pytest.raises(ConnectionError) as info:
            await retry(flaky, attempts=5, base_delay=1.0, jitter=False, on_retry=on_retry)
    assert info.value is flaky.errors[0]
    assert flaky.calls == 1
    assert any("on_retry" in note and "would not fit" in note for note in info.value.__notes__)


@trio_mock_clock()
async def test_retry_backs_off_exponentially_up_to_the_cap() -> None:
    flaky = Flaky(failures=4)
    times: list[float] = []

    async def timed() -> str:
        times.append(anyio.current_time())
        return await flaky()

    await retry(timed, attempts=5, base_delay=0.1, max_delay=0.3, jitter=False)
    waits = [round(b - a, 9) for a, b in itertools.pairwise(times)]
    assert waits == [0.1, 0.2, 0.3, 0.3]


@trio_mock_clock()
async def test_retry_jitter_stays_within_the_capped_ceiling() -> None:
    flaky = Flaky(failures=11)
    delays: list[float] = []
    times: list[float] = []

    async def timed() -> str:
        times.append(anyio.current_time())
        return await flaky()

    await retry(
        timed,
        attempts=12,
        base_delay=0.01,
        max_delay=0.05,
        on_retry=lambda error, attempt, delay: delays.append(delay),
    )
    ceilings = [min(0.05, 0.01 * 2**n) for n in range(11)]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) > 1  # jittered, not the same fixed delay
    waits = [b - a for a, b in itertools.pairwise(times)]
    assert waits == pytest.approx(delays)


@trio_mock_clock()
async def test_retry_does_not_overflow_with_many_attempts() -> None:
    flaky = Flaky(failures=1500)
    with pytest.raises(ConnectionError):
        await retry(flaky, attempts=1200, base_delay=0.001, max_delay=0.002, jitter=False)
    assert flaky.calls == 1200


@trio_mock_clock()
@property_settings
@given(
    failures=st.integers(min_value=0, max_value=20),
    base_delay=st.floats(min_value=0.001, max_value=2.0),
    cap_factor=st.floats(min_value=1.0, max_value=20.0),
    budget=st.floats(min_value=0.01, max_value=10.0),
)
async def test_property_retry_under_a_deadline_raises_its_own_error_never_a_timeout(
    failures: int, base_delay: float, cap_factor: float, budget: float
) -> None:
    flaky = Flaky(failures=failures)
    start = anyio.current_time()
    outcome: str | Exception
    with anyio.fail_after(budget):
        try:
            outcome = await retry(
                flaky, attempts=25, base_delay=base_delay, max_delay=base_delay * cap_factor
            )
        except ConnectionError as error:
            outcome = error
    assert outcome == "ok" or outcome is flaky.errors[-1]
    assert anyio.current_time() - start < budget


async def test_retry_rejects_bad_arguments_clearly() -> None:
    flaky = Flaky(failures=0)
    with pytest.raises(ValueError, match="pass 1 or more"):
        await retry(flaky, attempts=0)
    with pytest.raises(ValueError, match="max_delay is below base_delay"):
        await retry(flaky, base_delay=2.0, max_delay=1.0)
    with pytest.raises(ValueError, match="finite"):
        await retry(flaky, base_delay=-1)
    with pytest.raises(TypeError, match="not an Exception subclass"):
        await retry(flaky, retry_on=asyncio.CancelledError)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not an Exception subclass"):
        await retry(flaky, retry_on=(ValueError, BaseException))  # type: ignore[arg-type]
    assert flaky.calls == 0


# -- shield ----------------------------------------------------------------------------------


async def test_shield_finishes_its_work_then_delivers_the_cancellation() -> None:
    flushed = False
    reached = False
    started = anyio.Event()

    async def flush(what: str) -> str:
        nonlocal flushed
        started.set()
        await anyio.sleep(0.05)
        flushed = True
        return what

    async with anyio.create_task_group() as tg:

        async def caller() -> None:
            nonlocal reached
            await shield(flush, "buffers", timeout=5)
            reached = True

        tg.start_soon(caller)
        await started.wait()
        tg.cancel_scope.cancel()
    assert flushed
    assert not reached


async def test_shield_runs_past_an_outer_deadline_and_returns_when_not_cancelled() -> None:
    closed = 0
    reached = False

    async def close() -> str:
        nonlocal closed
        await anyio.sleep(0.02)
        closed += 1
        return "closed"

    with anyio.move_on_after(0.001) as scope:
        await shield(close, timeout=5)
        reached = True
    assert closed == 1
    assert not reached
    assert scope.cancelled_caught
    assert await shield(close, timeout=5) == "closed"


async def test_shield_cuts_a_hung_call_off_at_its_own_timeout() -> None:
    cancelled = False

    async def hang() -> None:
        nonlocal cancelled
        try:
            await anyio.sleep_forever()
        finally:
            cancelled = True

    with pytest.raises(TimeoutError, match=r"hang did not finish within its 0.01 s timeout"):
        await shield(hang, timeout=0.01)
    assert cancelled


async def test_shield_needs_a_finite_timeout() -> None:
    async def close() -> None:
        pass

    for bad in (0, -1, math.inf):
        with pytest.raises(ValueError, match="finite timeout above 0"):
            await shield(close, timeout=bad)
    with pytest.raises(TypeError, match="number of seconds"):
        await shield(close, timeout=None)  # type: ignore[arg-type]


# -- a BaseException that is not a cancellation is raised as itself -------------------------


class Interrupt(BaseException):
    """A user's own BaseException, standing for KeyboardInterrupt and SystemExit."""


async def interrupts(*_: object) -> int:
    await anyio.lowlevel.checkpoint()
    raise Interrupt("stop")


async def sleeps_until_cancelled(*_: object) -> int:
    try:
        await anyio.sleep_forever()
    finally:
        cancelled_calls.append("cancelled")
    raise AssertionError("unreachable")  # pragma: no cover


cancelled_calls: list[str] = []


@pytest.fixture(autouse=True)
def _no_cancelled_calls_yet() -> None:
    cancelled_calls.clear()


@pytest.mark.parametrize("error_type", [Interrupt, KeyboardInterrupt, SystemExit])
@pytest.mark.parametrize("return_exceptions", [False, True])
async def test_gather_raises_a_base_exception_as_itself(
    error_type: type[BaseException], return_exceptions: bool
) -> None:
    async def raises() -> int:
        await anyio.lowlevel.checkpoint()
        raise error_type("stop")

    with pytest.raises(error_type) as info:
        await gather(raises, sleeps_until_cancelled, return_exceptions=return_exceptions)
    assert type(info.value) is error_type  # not a BaseExceptionGroup around it
    assert cancelled_calls == ["cancelled"]
    assert any("gather(): raised by" in note for note in info.value.__notes__)


async def test_a_base_exception_takes_precedence_over_an_earlier_failure() -> None:
    async def fails() -> int:
        raise ValueError("first")

    async def interrupted_while_cancelled() -> int:
        try:
            await anyio.sleep_forever()
        finally:
            raise Interrupt("while cancelling")

    with pytest.raises(Interrupt) as info:
        await gather(fails, interrupted_while_cancelled)
    assert any("ValueError('first')" in note for note in info.value.__notes__)


async def test_race_raises_a_base_exception_as_itself_even_if_another_would_win() -> None:
    with pytest.raises(Interrupt):
        await race(interrupts, sleeps_until_cancelled)
    assert cancelled_calls == ["cancelled"]


async def test_first_completed_raises_a_base_exception_as_itself() -> None:
    with pytest.raises(Interrupt) as info:
        await first_completed(interrupts, sleeps_until_cancelled)
    assert type(info.value) is Interrupt
    assert cancelled_calls == ["cancelled"]


async def test_bounded_map_raises_a_base_exception_as_itself() -> None:
    async def work(n: int) -> int:
        if n == 1:
            return await interrupts()
        return await sleeps_until_cancelled()

    with pytest.raises(Interrupt) as info:
        await bounded_map(work, [0, 1, 2], limit=3)
    assert type(info.value) is Interrupt
    assert cancelled_calls == ["cancelled", "cancelled"]


async def test_bounded_map_raises_a_base_exception_from_the_items_as_itself() -> None:
    def items() -> Iterator[int]:
        yield 1
        raise Interrupt("from the items")

    with pytest.raises(Interrupt, match="from the items"):
        await bounded_map(sleeps_until_cancelled, items(), limit=2)


async def test_as_completed_raises_a_base_exception_as_itself_once() -> None:
    async def work(n: int) -> int:
        if n == 1:
            return await interrupts()
        return await sleeps_until_cancelled()

    async def read_all() -> None:
        async with as_completed(work, [0, 1], limit=2) as results:
            async for _ in results:
                pytest.fail("nothing succeeds")  # pragma: no cover

    with pytest.raises(Interrupt) as info:
        await read_all()
    assert type(info.value) is Interrupt  # neither wrapped once nor twice
    assert cancelled_calls == ["cancelled"]


async def test_as_completed_raises_an_unread_base_exception_on_leaving_the_block() -> None:
    reported = anyio.Event()

    async def work(n: int) -> int:
        reported.set()
        raise Interrupt("unread")

    with pytest.raises(Interrupt, match="unread"):
        async with as_completed(work, [0], limit=1):
            await reported.wait()


async def test_cancellation_still_passes_through_untouched() -> None:
    with anyio.CancelScope() as scope:
        scope.cancel()
        await gather(sleeps_until_cancelled, return_exceptions=True)
    assert scope.cancelled_caught


# -- anyio's gather and as_completed take coroutine objects; these take functions ------------


async def test_gather_given_coroutines_names_anyio_gather() -> None:
    one, two = sleeps_until_cancelled(), sleeps_until_cancelled()
    with pytest.raises(TypeError, match=r"anyio\.gather\(\*coroutines\), which is the one"):
        await gather(one, two)  # type: ignore[arg-type]
    assert inspect.getcoroutinestate(one) == inspect.getcoroutinestate(two) == "CORO_CLOSED"


@pytest.mark.parametrize("count", [1, 2, 3])
def test_as_completed_given_coroutines_names_anyio_as_completed(count: int) -> None:
    coroutines = [sleeps_until_cancelled() for _ in range(count)]
    with pytest.raises(TypeError, match=r"anyio\.as_completed\(\*awaitables\) is the one"):
        as_completed(*coroutines)  # type: ignore[call-overload]
    assert {inspect.getcoroutinestate(c) for c in coroutines} == {"CORO_CLOSED"}


def test_as_completed_without_its_items_or_limit_shows_the_call() -> None:
    with pytest.raises(TypeError, match=r"as_completed\(fn, items, limit=\.\.\.\).*and no limit"):
        as_completed(sleeps_until_cancelled, [1])  # type: ignore[call-overload]
    with pytest.raises(TypeError, match=r"got 1 positional argument"):
        as_completed(sleeps_until_cancelled, limit=1)  # type: ignore[call-overload]


async def test_the_anyio_twins_really_take_coroutines() -> None:
    # The premise of the errors above: should anyio change its side, they must change too.
    async def two() -> int:
        await anyio.lowlevel.checkpoint()
        return 2

    assert await anyio.gather(two(), two()) == (2, 2)
    async with anyio.as_completed(two()) as handles:
        assert [handle.return_value async for handle in handles] == [2]
    assert await anyio.amap(lambda n: two(), [1]) == [2]
