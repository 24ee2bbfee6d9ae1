"""Property-based test of worker pools: random jobs, failures and shutdown moments.

Invariants: accepted == completed + failed + abandoned once the pool has stopped; the number
of jobs running never exceeds the concurrency bound; no job runs after the app has exited.
"""

from __future__ import annotations

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lifecycle import Lifecycle, QueueFull

jobs = st.lists(
    st.tuples(st.floats(min_value=0, max_value=2), st.booleans()), min_size=0, max_size=60
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    work=jobs,
    concurrency=st.integers(1, 6),
    queue_size=st.integers(1, 20),
    drain_timeout=st.floats(min_value=0.1, max_value=3),
    stop_after=st.floats(min_value=0, max_value=5),
    submit_gap=st.floats(min_value=0, max_value=0.3),
)
def test_every_accepted_job_is_accounted_for(
    work: list[tuple[float, bool]],
    concurrency: int,
    queue_size: int,
    drain_timeout: float,
    stop_after: float,
    submit_gap: float,
) -> None:
    trio_testing = pytest.importorskip("trio.testing")
    lc = Lifecycle(shutdown_timeout=None)
    running = peak = 0
    after_exit: list[int] = []
    exited = False

    @lc.worker(concurrency=concurrency, queue_size=queue_size, drain_timeout=drain_timeout)
    async def handle(job: int) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            duration, fails = work[job]
            await anyio.sleep(duration)
            if exited:
                after_exit.append(job)
            if fails:
                raise RuntimeError(f"job {job} fails")
        finally:
            running -= 1

    async def main() -> None:
        nonlocal exited
        async with lc.run():
            with anyio.move_on_after(stop_after):
                for job in range(len(work)):
                    try:
                        handle.submit_nowait(job)
                    except QueueFull:
                        await handle.submit(job)
                    await anyio.sleep(submit_gap)
        exited = True
        await anyio.sleep(10)  # anything still running would show up now

    anyio.run(
        main,
        backend="trio",
        backend_options={"clock": trio_testing.MockClock(autojump_threshold=0)},
    )
    stats = handle.statistics()
    assert stats.accepted == stats.completed + stats.failed + stats.abandoned
    assert stats.queued == stats.running == 0
    assert peak <= concurrency
    assert after_exit == []
    assert stats.failed <= sum(1 for _, fails in work if fails)
