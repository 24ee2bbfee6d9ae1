"""Worker pools, supervised tasks and periodic jobs."""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import pytest
from anyio import wait_all_tasks_blocked

from lifecycle import (
    JobAbandoned,
    Lifecycle,
    PeriodicState,
    PoolClosed,
    PoolState,
    QueueFull,
    SupervisorState,
    WorkerPool,
)
from lifecycle.testing import assert_stopped_before

pytestmark = pytest.mark.anyio

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def cpu_square(n: int) -> tuple[int, int]:
    """Runs in a worker process."""
    return n * n, os.getpid()


async def test_jobs_run_with_injected_services_and_results() -> None:
    lc = Lifecycle()

    @lc.service
    async def prefix() -> AsyncIterator[str]:
        yield "done:"

    @lc.worker(concurrency=2, queue_size=10)
    async def handle(job: int, prefix: str) -> str:
        await anyio.lowlevel.checkpoint()
        return f"{prefix}{job}"

    async with lc.run():
        assert await handle.call(7) == "done:7"
        await handle.submit(1)
        handle.submit_nowait(2)
    stats = handle.statistics()
    assert (stats.accepted, stats.completed, stats.failed, stats.abandoned) == (3, 3, 0, 0)
    assert (stats.queued, stats.running) == (0, 0)


async def test_backpressure_submit_waits_and_submit_nowait_raises() -> None:
    lc = Lifecycle()
    release = anyio.Event()
    started = anyio.Event()

    @lc.worker(concurrency=1, queue_size=2)
    async def handle(job: int) -> None:
        started.set()
        await release.wait()

    async with lc.run():
        await handle.submit(0)  # taken by the worker
        await started.wait()
        await handle.submit(1)
        await handle.submit(2)  # queue is now full
        with pytest.raises(QueueFull, match="'handle' is full"):
            handle.submit_nowait(3)
        assert handle.statistics().rejected == 1

        done = anyio.Event()

        async def blocked_submit() -> None:
            await handle.submit(4)
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(blocked_submit)
            await anyio.sleep(0.05)
            assert not done.is_set()  # waiting for room: backpressure
            release.set()
            with anyio.fail_after(5):
                await done.wait()
    stats = handle.statistics()
    assert stats.accepted == stats.completed == 4


async def test_reject_overflow_raises_queue_full_from_submit() -> None:
    lc = Lifecycle()
    release = anyio.Event()

    @lc.worker(concurrency=1, queue_size=1, overflow="reject")
    async def handle(job: int) -> None:
        await release.wait()

    async with lc.run():
        await handle.submit(0)
        await anyio.sleep(0.01)
        await handle.submit(1)
        with pytest.raises(QueueFull):
            await handle.submit(2)
        release.set()


async def test_concurrency_never_exceeds_its_bound() -> None:
    lc = Lifecycle()
    running = peak = 0

    @lc.worker(concurrency=3, queue_size=5)
    async def handle(job: int) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.001)
        running -= 1

    async with lc.run():
        for i in range(60):
            await handle.submit(i)
    assert peak == 3
    assert handle.statistics().completed == 60


async def test_a_failing_handler_never_kills_the_pool(caplog: pytest.LogCaptureFixture) -> None:
    lc = Lifecycle()

    @lc.worker(concurrency=1, queue_size=10)
    async def handle(job: int) -> int:
        if job % 2:
            raise ValueError(f"odd job {job}")
        return job

    async with lc.run():
        for i in range(6):
            await handle.submit(i)
        with pytest.raises(ValueError, match="odd job 7"):
            await handle.call(7)
        assert await handle.call(8) == 8
    stats = handle.statistics()
    assert (stats.completed, stats.failed) == (4, 4)
    assert any("job 3 failed: odd job 3" in r.getMessage() for r in caplog.records)


async def test_job_timeout_fails_the_job() -> None:
    lc = Lifecycle()

    @lc.worker(concurrency=1, job_timeout=0.05)
    async def handle(job: float) -> None:
        await anyio.sleep(job)

    async with lc.run():
        with pytest.raises(TimeoutError, match="ran out of time"):
            await handle.call(10)
        await handle.call(0)
    assert handle.statistics().failed == 1


async def test_drain_finishes_queued_jobs_before_dependencies_stop() -> None:
    lc = Lifecycle()
    log: list[str] = []

    @lc.service
    async def db() -> AsyncIterator[list[str]]:
        yield log
        log.append("db closed")

    @lc.worker(concurrency=1, queue_size=20, drain_timeout=5)
    async def handle(job: int, db: list[str]) -> None:
        await anyio.sleep(0.001)
        db.append(f"job {job}")

    async with lc.run():
        for i in range(10):
            handle.submit_nowait(i)
    assert log == [f"job {i}" for i in range(10)] + ["db closed"]
    assert_stopped_before(lc, "worker:handle", "db")
    with pytest.raises(PoolClosed, match="the app has stopped"):
        await handle.submit(99)


async def test_submitting_before_start_is_a_clear_error() -> None:
    lc = Lifecycle()

    @lc.worker
    async def handle(job: int) -> None:
        pass

    with pytest.raises(PoolClosed, match="not accepting jobs: it has not started"):
        handle.submit_nowait(1)


async def test_drain_deadline_abandons_and_accounts_for_every_job() -> None:
    lc = Lifecycle()
    abandoned: list[tuple[int, str]] = []
    waiter_errors: list[BaseException] = []

    @lc.worker(
        concurrency=2,
        queue_size=10,
        drain_timeout=0.1,
        on_abandoned=lambda job, why: abandoned.append((job, why)),
    )
    async def handle(job: int) -> None:
        await anyio.sleep_forever()

    async def call_and_record() -> None:
        try:
            await handle.call(100)
        except JobAbandoned as exc:
            waiter_errors.append(exc)

    async with anyio.create_task_group() as tg, lc.run():
        for i in range(5):
            await handle.submit(i)
        tg.start_soon(call_and_record)
        await anyio.sleep(0.02)
    stats = handle.statistics()
    assert stats.accepted == 6
    assert stats.abandoned == 6
    assert stats.accepted == stats.completed + stats.failed + stats.abandoned
    assert sorted(job for job, _ in abandoned) == [0, 1, 2, 3, 4, 100]
    assert {why for _, why in abandoned} == {
        "it was cancelled when the drain_timeout ran out",
        "the drain_timeout ran out before it started",
    }
    assert len(waiter_errors) == 1
    assert "was abandoned" in str(waiter_errors[0])


@pytest.mark.parametrize("drain_timeout", [0.2, 30.0, None])
async def test_a_shutdown_budget_shorter_than_the_drain_still_accounts_for_every_job(
    drain_timeout: float | None,
) -> None:
    # Regression: the app's shutdown budget (here as long as, or shorter than, the drain
    # timeout, as with the defaults of 30 s each) cut the drain off before the pool could
    # abandon what was still queued: those jobs vanished, and a `call` waiting on one of
    # them never returned.
    lc = Lifecycle(shutdown_timeout=0.2)
    abandoned: list[tuple[int, str]] = []
    waiter_errors: list[BaseException] = []
    answered = anyio.Event()
    started = anyio.Event()

    @lc.worker(
        concurrency=1,
        queue_size=10,
        drain_timeout=drain_timeout,
        on_abandoned=lambda job, why: abandoned.append((job, why)),
    )
    async def handle(job: int) -> None:
        started.set()
        await anyio.sleep_forever()

    async def call_and_record() -> None:
        try:
            await handle.call(100)
        except JobAbandoned as exc:
            waiter_errors.append(exc)
        answered.set()

    async with anyio.create_task_group() as tg:
        # The pool gives up early enough to stop within the budget: no ShutdownError.
        async with lc.run():
            for i in range(3):
                handle.submit_nowait(i)
            tg.start_soon(call_and_record)
            await started.wait()
        with anyio.fail_after(5):
            await answered.wait()
    stats = handle.statistics()
    assert (stats.accepted, stats.abandoned, stats.queued, stats.running) == (4, 4, 0, 0)
    assert sorted(job for job, _ in abandoned) == [0, 1, 2, 100]
    assert {why for _, why in abandoned} == {
        "it was cancelled when the app's shutdown_timeout ran out",
        "the app's shutdown_timeout ran out before it started",
    }
    assert len(waiter_errors) == 1


async def test_submitters_waiting_for_room_get_pool_closed_at_drain() -> None:
    lc = Lifecycle()
    errors: list[BaseException] = []

    @lc.worker(concurrency=1, queue_size=1, drain_timeout=0.05)
    async def handle(job: int) -> None:
        await anyio.sleep_forever()

    async def submit_blocked() -> None:
        try:
            await handle.submit(3)
        except PoolClosed as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg, lc.run():
        await handle.submit(1)
        await anyio.sleep(0.01)
        await handle.submit(2)
        tg.start_soon(submit_blocked)
        await anyio.sleep(0.01)
    assert len(errors) == 1
    assert "stopped accepting jobs while this one waited" in str(errors[0])
    stats = handle.statistics()
    assert stats.accepted == 2 == stats.abandoned


async def test_sync_handlers_run_in_threads_under_the_concurrency_limit() -> None:
    lc = Lifecycle()
    threads: set[int] = set()
    running = peak = 0
    lock = threading.Lock()

    @lc.worker(concurrency=3, queue_size=20)
    def handle(job: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        threads.add(threading.get_ident())
        threading.Event().wait(0.01)
        with lock:
            running -= 1
        return job * 2

    async with lc.run():
        results = []
        async with anyio.create_task_group() as tg:

            async def call(i: int) -> None:
                results.append(await handle.call(i))

            for i in range(12):
                tg.start_soon(call, i)
    assert sorted(results) == [i * 2 for i in range(12)]
    assert threading.get_ident() not in threads
    assert peak == 3


def test_job_timeout_is_refused_for_handlers_run_in_threads() -> None:
    # Regression: a thread cannot be cancelled, so job_timeout on a plain handler did nothing:
    # the job ran to its end and counted as completed.
    lc = Lifecycle()

    def blocking(job: float) -> None:
        time.sleep(job)

    with pytest.raises(ValueError, match=r"'blocking' runs its plain handler in a thread.*async"):
        lc.worker(blocking, job_timeout=0.2)
    lc.worker(blocking)  # without it, fine
    lc.worker(cpu_square, name="in_process", cpu_bound=True, job_timeout=0.2)  # processes die


async def test_thread_jobs_running_at_the_drain_deadline_finish(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Regression: the drain warning said running jobs were cancelled; a thread cannot be, so
    # the pool waits for it (and it completes), and only the queued jobs are abandoned.
    lc = Lifecycle()
    started = anyio.Event()
    abandoned: list[tuple[float, str]] = []

    @lc.worker(
        concurrency=1,
        queue_size=10,
        drain_timeout=0.05,
        on_abandoned=lambda job, why: abandoned.append((job, why)),
    )
    def blocking(job: float) -> None:
        anyio.from_thread.run_sync(started.set)
        time.sleep(job)  # longer than the drain_timeout

    async with lc.run():
        blocking.submit_nowait(0.3)
        blocking.submit_nowait(0.3)
        await started.wait()
    stats = blocking.statistics()
    assert (stats.completed, stats.abandoned) == (1, 1)
    assert abandoned == [(0.3, "the drain_timeout ran out before it started")]
    [warning] = [r.getMessage() for r in caplog.records if "stopped draining" in r.getMessage()]
    assert "waited for the running jobs, as a thread cannot be cancelled" in warning
    assert "cancelled and" not in warning


async def test_cpu_bound_handlers_run_in_processes() -> None:
    lc = Lifecycle()
    pool = lc.worker(cpu_square, concurrency=2, cpu_bound=True)
    async with lc.run():
        value, pid = await pool.call(12)
    assert value == 144
    assert pid != os.getpid()


async def test_cpu_bound_decorator_and_call_forms_run_in_processes() -> None:
    # Regression: the decorator rebinds the handler's module name to its pool, so pickle
    # refused to send the handler ("it's not the same object as ...crunch") and every job
    # failed; the call form, which leaves the name alone, worked.
    from tests.apps import cpu_jobs

    assert isinstance(cpu_jobs.crunch, WorkerPool)  # the name the decorator rebinds
    async with cpu_jobs.lc.run():
        results = [await cpu_jobs.crunch.call(n) for n in (10, 1000)]
        squared, square_pid = await cpu_jobs.squares.call(12)
    assert [value for value, _ in results] == [285, 332833500]
    assert all(pid != os.getpid() for _, pid in results)
    assert (squared, square_pid != os.getpid()) == (144, True)
    stats = cpu_jobs.crunch.statistics()
    assert (stats.completed, stats.failed) == (2, 0)


def test_cpu_bound_handler_must_be_plain_and_take_only_the_job() -> None:
    lc = Lifecycle()

    async def handle(job: int) -> int:
        return job

    with pytest.raises(TypeError, match="must be a plain"):
        lc.worker(handle, cpu_bound=True)


async def test_jobs_keep_context_variables_but_not_the_deadline() -> None:
    lc = Lifecycle()
    seen: list[tuple[str, float]] = []

    @lc.worker
    async def handle(job: int) -> None:
        seen.append((request_id.get(), anyio.current_effective_deadline()))

    @lc.worker(name="bounded", inherit_deadline=True)
    async def handle_bounded(job: int) -> None:
        seen.append((request_id.get(), anyio.current_effective_deadline()))

    async with lc.run():
        token = request_id.set("req-42")
        try:
            with anyio.move_on_after(30) as scope:
                await handle.call(1)
                await handle_bounded.call(2)
        finally:
            request_id.reset(token)
    assert seen[0] == ("req-42", float("inf"))
    assert seen[1] == ("req-42", scope.deadline)
    assert request_id.get() == "-"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # trio has no stray Cancelled
async def test_a_stray_cancelled_error_fails_the_job_and_keeps_the_worker() -> None:
    # Regression: a job that awaited a future something else cancelled raised CancelledError;
    # the pool took it for its own drain cancellation, reported the job abandoned and lost
    # the worker, so with one worker every later job waited until shutdown abandoned it.
    lc = Lifecycle()
    abandoned: list[str] = []

    @lc.worker(concurrency=1, on_abandoned=lambda job, why: abandoned.append(job))
    async def handle(job: str) -> str:
        if job == "bad":
            future = asyncio.get_running_loop().create_future()
            future.cancel()  # by some other component
            await future
        return job

    async with lc.run():
        with pytest.raises(RuntimeError, match="raised CancelledError although nothing"):
            await handle.call("bad")
        with anyio.fail_after(5):
            assert await handle.call("ok") == "ok"
    stats = handle.statistics()
    assert (stats.completed, stats.failed, stats.abandoned) == (1, 1, 0)
    assert abandoned == []


async def test_a_second_run_counts_queued_jobs() -> None:
    # Regression: after a first run the pool believed itself stopped, so `queued` stayed 0.
    lc = Lifecycle()
    started = anyio.Event()
    gate = anyio.Event()

    @lc.worker(concurrency=1, queue_size=10)
    async def handle(job: int) -> None:
        started.set()
        await gate.wait()

    for _ in range(2):
        started, gate = anyio.Event(), anyio.Event()
        async with lc.run():
            for i in range(4):
                handle.submit_nowait(i)
            await started.wait()
            stats = handle.statistics()
            assert (stats.accepted, stats.running, stats.queued) == (4, 1, 3)
            gate.set()
        assert handle.statistics().queued == 0


async def test_mean_times_leave_out_jobs_cut_off_by_the_drain() -> None:
    # Regression: a job cancelled at the drain deadline added its run time (and its wait) to
    # the totals but not to the counts they are divided by, inflating both means.
    lc = Lifecycle()
    gate = anyio.Event()
    started = anyio.Event()

    @lc.worker(concurrency=1, queue_size=10, drain_timeout=0.3, on_abandoned=lambda j, w: None)
    async def handle(job: str) -> None:
        if job == "hold":
            started.set()
            await gate.wait()
        else:
            await anyio.sleep_forever()  # cut off by the drain deadline after 0.3 s

    async with lc.run():
        handle.submit_nowait("hold")
        handle.submit_nowait("cut")  # waits in the queue while "hold" runs
        await started.wait()
        await anyio.sleep(0.1)  # so that the waits and runs are long enough to tell apart
        gate.set()
    stats = handle.statistics()
    assert (stats.completed, stats.abandoned) == (1, 1)
    assert 0.1 <= stats.mean_run_time == stats.run_time_total == stats.run_time_max < 0.3
    assert stats.mean_wait_time < 0.1


def test_bad_pool_options_are_rejected() -> None:
    lc = Lifecycle()

    async def handle(job: int) -> None:
        pass

    with pytest.raises(ValueError, match="concurrency must be a whole number >= 1, not 0"):
        lc.worker(handle, concurrency=0)
    with pytest.raises(ValueError, match="overflow must be 'wait'"):
        lc.worker(handle, overflow="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="drain_timeout must be a positive"):
        lc.worker(handle, drain_timeout=-1)


# -- supervised tasks ---------------------------------------------------------------------


def run_on_mock_clock(fn: Any) -> None:
    trio_testing = pytest.importorskip("trio.testing")
    anyio.run(
        fn, backend="trio", backend_options={"clock": trio_testing.MockClock(autojump_threshold=0)}
    )


def test_restarts_back_off_exponentially_with_full_jitter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    starts: list[float] = []
    caps: list[float] = []
    lc = Lifecycle()

    @lc.background(max_restarts=4, within=1000, backoff_base=1.0, backoff_max=5.0)
    async def flaky() -> None:
        starts.append(anyio.current_time())
        raise ConnectionError("lost")

    def full_delay(low: float, high: float) -> float:
        caps.append(high)
        return high  # the top of the jitter range, so the timing is predictable

    monkeypatch.setattr("lifecycle._workers.random.uniform", full_delay)

    async def main() -> None:
        async with lc.run():
            with anyio.fail_after(100):
                while not flaky.gave_up:  # noqa: ASYNC110 - virtual time
                    await anyio.sleep(0.5)

    run_on_mock_clock(main)
    assert caps == [1.0, 2.0, 4.0, 5.0]  # doubling, capped at backoff_max
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(starts)]
    assert gaps == [1.0, 2.0, 4.0, 5.0]
    stats = flaky.statistics()
    assert stats.state is SupervisorState.GAVE_UP
    assert (stats.starts, stats.restarts, stats.failures) == (5, 4, 5)
    assert stats.last_error == "ConnectionError: lost"


def test_jitter_spreads_restart_delays() -> None:
    lc = Lifecycle()

    @lc.background(backoff_base=1.0, backoff_max=8.0)
    async def task() -> None:
        pass

    delays = [task.delay(3) for _ in range(500)]
    assert all(0 <= d <= 4.0 for d in delays)
    assert min(delays) < 0.5
    assert max(delays) > 3.5


def test_restart_intensity_window_forgets_old_restarts() -> None:
    lc = Lifecycle()
    runs = 0

    @lc.background(max_restarts=2, within=10, backoff_base=0.01, backoff_max=0.01)
    async def sometimes() -> None:
        nonlocal runs
        runs += 1
        await anyio.sleep(6)  # each run lasts 6 s: never 3 restarts within 10 s
        raise RuntimeError("again")

    async def main() -> None:
        async with lc.run():
            await anyio.sleep(100)
            assert not sometimes.gave_up

    run_on_mock_clock(main)
    assert runs > 10


async def test_restart_policies() -> None:
    lc = Lifecycle()
    counts = {"always": 0, "on_failure": 0, "never": 0}
    all_done = anyio.Event()

    @lc.background(restart="always", backoff_base=0.001, backoff_max=0.001, max_restarts=100)
    async def always() -> None:
        counts["always"] += 1
        if counts["always"] >= 3:
            all_done.set()
            await anyio.sleep_forever()

    @lc.background(restart="on_failure", backoff_base=0.001, backoff_max=0.001)
    async def on_failure() -> None:
        counts["on_failure"] += 1

    @lc.background(restart="never")
    async def never() -> None:
        counts["never"] += 1
        raise RuntimeError("once")

    async with lc.run():
        with anyio.fail_after(5):
            await all_done.wait()
        await anyio.sleep(0.02)
        assert never.statistics().state is SupervisorState.EXITED
        assert on_failure.statistics().state is SupervisorState.EXITED
    assert counts == {"always": 3, "on_failure": 1, "never": 1}
    assert always.statistics().state is SupervisorState.STOPPED


async def test_give_up_with_shutdown_escalation_raises_sigterm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raised: list[int] = []
    monkeypatch.setattr("lifecycle._servers.signal.raise_signal", raised.append)
    lc = Lifecycle()

    @lc.background(max_restarts=1, backoff_base=0.001, backoff_max=0.001, on_give_up="shutdown")
    async def doomed() -> None:
        raise RuntimeError("no")

    async with lc.run():
        with anyio.fail_after(5):
            while not doomed.gave_up:  # noqa: ASYNC110 - no event to wait on
                await anyio.sleep(0.001)
    import signal

    assert raised == [signal.SIGTERM]


def test_backoff_never_overflows_and_its_bounds_must_be_ordered() -> None:
    # Regression: backoff_base * 2 ** (restart - 1) was computed before the cap and raised
    # OverflowError past about 1024 restarts within the window.
    lc = Lifecycle()

    @lc.background(max_restarts=5000, backoff_base=0.0001, backoff_max=0.0002)
    async def task() -> None:
        pass

    assert all(0 <= task.delay(n) <= 0.0002 for n in (1, 1024, 1100, 10**6))
    with pytest.raises(ValueError, match=r"'late': backoff_max=1.0 is below backoff_base=2.0"):
        lc.background(task.fn, name="late", backoff_base=2.0, backoff_max=1.0)


def test_a_supervisor_survives_more_than_a_thousand_restarts() -> None:
    lc = Lifecycle()

    @lc.background(
        restart="always", max_restarts=5000, within=1e6, backoff_base=0.0005, backoff_max=0.001
    )
    async def flaky() -> None:
        raise RuntimeError("boom")

    async def main() -> None:
        async with lc.run():
            with anyio.fail_after(1000):
                while flaky.statistics().starts < 1100:  # noqa: ASYNC110 - virtual time
                    await anyio.sleep(0.01)
            assert flaky.statistics().state is SupervisorState.BACKOFF

    logging.getLogger("lifecycle.workers").disabled = True  # 1100 failure tracebacks
    try:
        run_on_mock_clock(main)
    finally:
        logging.getLogger("lifecycle.workers").disabled = False


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # trio has no stray Cancelled
async def test_a_stray_cancelled_error_is_a_background_failure() -> None:
    # Regression: a CancelledError the task did not get from being cancelled (it awaited a
    # future something else cancelled) ended the supervisor silently, health still passing.
    lc = Lifecycle()
    second_start = anyio.Event()

    @lc.background(restart="on_failure", backoff_base=0.001, backoff_max=0.001)
    async def listener() -> None:
        if listener.statistics().starts == 1:
            future = asyncio.get_running_loop().create_future()
            future.cancel()
            await future
        second_start.set()
        await anyio.sleep_forever()

    async with lc.run():
        with anyio.fail_after(5):
            await second_start.wait()
        stats = listener.statistics()
    assert (stats.starts, stats.failures) == (2, 1)
    assert stats.last_error is not None
    assert "raised CancelledError although nothing" in stats.last_error


# -- periodic jobs ------------------------------------------------------------------------


def test_periodic_runs_on_schedule_without_overlap_and_survives_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lc = Lifecycle()
    starts: list[float] = []
    active = 0
    overlapped = False

    @lc.periodic(every=10, timeout=25)
    async def tick() -> None:
        nonlocal active, overlapped
        starts.append(anyio.current_time())
        active += 1
        overlapped = overlapped or active > 1
        try:
            if len(starts) == 2:
                raise RuntimeError("second run fails")
            if len(starts) == 3:
                await anyio.sleep(15)  # longer than the period
        finally:
            active -= 1

    async def main() -> None:
        origin = anyio.current_time()
        async with lc.run():
            await anyio.sleep(61)
        starts[:] = [round(t - origin, 6) for t in starts]

    run_on_mock_clock(main)
    assert not overlapped
    assert starts == [10.0, 20.0, 30.0, 45.0, 55.0]  # the long run delays, never bunches
    stats = tick.statistics()
    assert (stats.runs, stats.failures, stats.timeouts) == (5, 1, 0)
    assert any("second run fails" in r.getMessage() for r in caplog.records)


def test_periodic_first_run_now_and_timeout() -> None:
    lc = Lifecycle()
    starts: list[float] = []

    @lc.periodic(every=5, timeout=1, first_run="now")
    async def slow() -> None:
        starts.append(anyio.current_time())
        await anyio.sleep(3)

    async def main() -> None:
        origin = anyio.current_time()
        async with lc.run():
            await anyio.sleep(11.5)
        starts[:] = [round(t - origin, 6) for t in starts]

    run_on_mock_clock(main)
    assert starts == [0.0, 5.0, 10.0]
    assert slow.statistics().timeouts == 3


async def test_periodic_lets_a_run_in_progress_finish_at_stop() -> None:
    lc = Lifecycle()
    finished = []
    started = anyio.Event()

    @lc.periodic(every=0.01, first_run="now")
    async def job() -> None:
        started.set()
        await anyio.sleep(0.05)
        finished.append(True)

    async with lc.run():
        await started.wait()
    assert finished == [True]
    assert job.statistics().running is False


@pytest.mark.parametrize("run_timeout", [None, 5.0])
async def test_a_periodic_job_raising_timeout_error_has_failed_not_timed_out(
    run_timeout: float | None,
) -> None:
    # Regression: any TimeoutError counted as the job's own timeout, even with timeout=None
    # ("timed out after Nones").
    lc = Lifecycle()
    second_run = anyio.Event()

    @lc.periodic(every=0.001, timeout=run_timeout, first_run="now")
    async def poll() -> None:
        if poll.statistics().runs == 1:
            raise TimeoutError("upstream did not answer")
        second_run.set()

    async with lc.run():
        with anyio.fail_after(5):
            await second_run.wait()
        stats = poll.statistics()
    assert (stats.failures, stats.timeouts) == (1, 0)
    assert stats.last_error == "TimeoutError: upstream did not answer"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # trio has no stray Cancelled
async def test_a_stray_cancelled_error_is_a_periodic_failure() -> None:
    # Regression: it ended the schedule silently.
    lc = Lifecycle()
    second_run = anyio.Event()

    @lc.periodic(every=0.001, first_run="now")
    async def poll() -> None:
        if poll.statistics().runs == 1:
            future = asyncio.get_running_loop().create_future()
            future.cancel()
            await future
        second_run.set()

    async with lc.run():
        with anyio.fail_after(5):
            await second_run.wait()
        stats = poll.statistics()
    assert (stats.failures, stats.timeouts) == (1, 0)
    assert stats.last_error is not None
    assert "raised CancelledError although nothing" in stats.last_error


async def stop_while_overrunning() -> list[str]:
    """Stop a periodic job during a run longer than its period; return what its runs did."""
    lc = Lifecycle()
    events: list[str] = []
    started = anyio.Event()

    @lc.periodic(every=0.001, first_run="now")
    async def job() -> None:
        events.append("start")
        started.set()
        try:
            await anyio.sleep(0.005)  # longer than the period
        except BaseException:
            events.append("cancelled")
            raise
        events.append("end")

    async with lc.run():
        await started.wait()
    return events


async def test_stopping_a_periodic_job_starts_no_new_run() -> None:
    # Regression (trio): when the run in progress at stop had overrun its period, the loop
    # could start one more run as that run ended, which the stop then cancelled midway.
    # Which task trio wakes first is random, so several stops are tried.
    for _ in range(20):
        events = await stop_while_overrunning()
        assert events == ["start", "end"]


async def test_nothing_runs_after_exit() -> None:
    before = len(anyio.get_running_tasks())
    lc = Lifecycle()

    @lc.worker(concurrency=4)
    async def handle(job: int) -> None:
        await anyio.sleep(0.001)

    @lc.background
    async def forever() -> None:
        await anyio.sleep_forever()

    @lc.periodic(every=0.01)
    async def tick() -> None:
        pass

    async with lc.run():
        for i in range(10):
            await handle.submit(i)
        assert len(anyio.get_running_tasks()) > before
    assert len(anyio.get_running_tasks()) == before
    assert logging.getLogger("lifecycle.workers")  # the logger exists for configuration


# -- the HTTP edge ------------------------------------------------------------------------


async def test_queue_full_becomes_503_with_retry_after() -> None:
    from fastapi import FastAPI

    from lifecycle.starlette import exception_handlers
    from lifecycle.testing import lifespan_client

    lc = Lifecycle()
    release = anyio.Event()

    @lc.worker(concurrency=1, queue_size=1)
    async def handle(job: int) -> None:
        await release.wait()

    app = FastAPI(lifespan=lc.lifespan, exception_handlers=exception_handlers(retry_after=3))

    @app.post("/jobs/{job}", status_code=202)
    async def enqueue(job: int) -> dict[str, int]:
        handle.submit_nowait(job)
        return {"queued": job}

    async with lifespan_client(app) as client:
        statuses = [(await client.post("/jobs/0")).status_code]
        await anyio.sleep(0.01)  # the worker takes job 0 and holds it
        statuses.append((await client.post("/jobs/1")).status_code)  # fills the queue
        response = await client.post("/jobs/2")
        release.set()
    assert statuses == [202, 202]
    assert response.status_code == 503
    assert response.headers["retry-after"] == "3"
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 503


async def test_giving_up_fails_readiness_and_liveness() -> None:
    from starlette.applications import Starlette

    from lifecycle.starlette import health_routes
    from lifecycle.testing import lifespan_client

    lc = Lifecycle()

    @lc.background(max_restarts=1, backoff_base=0.001, backoff_max=0.001)
    async def doomed() -> None:
        raise ConnectionError("broker unreachable")

    app = Starlette(routes=health_routes(lc), lifespan=lc.lifespan)
    async with lifespan_client(app) as client:
        with anyio.fail_after(5):
            while not doomed.gave_up:  # noqa: ASYNC110 - no event to wait on
                await anyio.sleep(0.001)
        ready = await client.get("/readyz")
        live = await client.get("/livez")
    assert ready.status_code == 503
    assert live.status_code == 503
    assert "background:doomed" in ready.text


async def test_sync_jobs_submitted_in_a_request_do_not_see_its_deadline() -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    import lifecycle
    from lifecycle.testing import lifespan_client

    lc = Lifecycle()
    seen: dict[str, object] = {}

    @lc.worker
    def app_scoped(job: str) -> None:
        seen[job] = lifecycle.remaining()

    @lc.worker(name="bounded", inherit_deadline=True)
    def request_scoped(job: str) -> None:
        seen[job] = lifecycle.remaining()

    async def endpoint(request: Request) -> JSONResponse:
        await app_scoped.call("app")
        await request_scoped.call("request")
        return JSONResponse({"in request": lifecycle.remaining()})

    app = lifecycle.DeadlineMiddleware(
        Starlette(routes=[Route("/", endpoint)], lifespan=lc.lifespan), default_timeout=30
    )
    async with lifespan_client(app) as client:
        response = await client.get("/")
    assert response.json()["in request"] > 20
    assert seen["app"] is None
    assert isinstance(seen["request"], float)
    assert 20 < seen["request"] <= 30


async def test_a_pool_reports_each_state_of_its_life() -> None:
    lc = Lifecycle()
    release = anyio.Event()

    @lc.worker(concurrency=1)
    async def work(job: int) -> None:
        await release.wait()

    stopping = anyio.Event()

    class PoolStops:
        def service_stopping(self, service: Any) -> None:
            if service is work.service:
                stopping.set()  # its cleanup, which begins the drain, runs next

    lc.observers.add(PoolStops())

    async def release_once_draining() -> None:
        await stopping.wait()
        assert work.statistics().state is PoolState.DRAINING
        with pytest.raises(PoolClosed, match="it is draining"):
            work.submit_nowait(2)
        release.set()

    assert work.statistics().state is PoolState.PENDING
    with pytest.raises(PoolClosed, match="it has not started"):
        work.submit_nowait(1)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg, lc.run():
            assert work.statistics().state is PoolState.RUNNING
            await work.submit(1)
            tg.start_soon(release_once_draining)
            # Leaving the run drains the pool: the job finishes once released.
    assert work.statistics().state is PoolState.STOPPED
    assert work.statistics().completed == 1
    with pytest.raises(PoolClosed, match="the app has stopped"):
        work.submit_nowait(3)


def test_a_pool_refuses_an_illegal_move_with_a_reason() -> None:
    lc = Lifecycle()

    @lc.worker
    async def work(job: int) -> None:
        pass

    with pytest.raises(RuntimeError, match="Worker pool 'work' cannot drain: it never started"):
        work._enter(PoolState.DRAINING)


async def test_a_periodic_job_reports_each_state_of_its_life() -> None:
    lc = Lifecycle()
    running = anyio.Event()
    release = anyio.Event()

    @lc.periodic(every=0.01, first_run="now")
    async def tick() -> None:
        running.set()
        await release.wait()

    assert tick.statistics().state is PeriodicState.PENDING
    async with lc.run():
        await running.wait()
        assert tick.statistics().state is PeriodicState.RUNNING
        release.set()
        await wait_all_tasks_blocked()  # the run has ended; the job waits for the next
        assert tick.statistics().state is PeriodicState.WAITING
    assert tick.statistics().state is PeriodicState.STOPPED
    with pytest.raises(RuntimeError, match="cannot go from stopped to running"):
        tick._enter(PeriodicState.RUNNING)


async def test_abandoned_jobs_are_reported_in_one_line_with_the_first_few(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lc = Lifecycle(shutdown_timeout=5)
    started = anyio.Event()

    @lc.worker(concurrency=1, queue_size=100, drain_timeout=0.05)
    async def slow(job: int) -> None:
        started.set()
        await anyio.sleep_forever()

    with caplog.at_level(logging.WARNING, logger="lifecycle.workers"):
        async with lc.run():
            for n in range(50):
                slow.submit_nowait(n)
            await started.wait()
    lines = [r.getMessage() for r in caplog.records if r.name == "lifecycle.workers"]
    assert lines == [
        "Worker pool 'slow' stopped draining when the drain_timeout ran out: 1 running jobs "
        "were cancelled and 49 queued jobs abandoned; the first: 0, 1, 2, 3, 4 (and 45 more)"
    ]
    assert slow.statistics().abandoned == 50
