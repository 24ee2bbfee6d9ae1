"""Property-based tests of the service graph: random DAGs with random faults.

The faults include user code that does not cooperate: a start or cleanup that blocks the
event loop past its timeout (asyncio; under trio's virtual clock blocking takes no time, so
it shields itself instead), shields itself past its timeout, or swallows one cancellation.

Invariants, whatever the graph and the faults:
- every start happens after all of the service's dependencies finished starting;
- every service whose start completed is cleaned up exactly once, and only after every
  service that depends on it (and had started) finished stopping;
- a service that never started is never cleaned up;
- the errors name exactly the services that failed;
- the whole run takes a bounded time, and leaves no task behind.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lifecycle import Lifecycle, ShutdownError, StartupError

# Blocking the loop is measured exactly (the kernel times each service's own code), but
# when one service blocks while another shields itself past its deadline, the blocked time
# may excuse the shielder too; so each backend gets one kind of overrun. Under trio's virtual
# clock blocking takes no time at all, so trio gets the shields.
COMMON = ["none", "none", "none", "none", "fail", "hang", "ignore"]
ASYNCIO_FAULTS = [*COMMON, "block"]
TRIO_FAULTS = [*COMMON, "shield"]
HELD_THE_LOOP = "Other services' own code held the event loop"


@dataclass
class Spec:
    deps: dict[int, list[int]]
    start_fault: dict[int, str]
    stop_fault: dict[int, str]


@st.composite
def graphs(draw: st.DrawFn, faults: list[str]) -> Spec:
    size = draw(st.integers(min_value=1, max_value=30))
    deps = {
        i: sorted(set(draw(st.lists(st.integers(0, i - 1), max_size=3)))) if i else []
        for i in range(size)
    }
    start_fault = {i: draw(st.sampled_from(faults)) for i in range(size)}
    stop_fault = {i: draw(st.sampled_from(faults)) for i in range(size)}
    return Spec(deps, start_fault, stop_fault)


async def misbehave(fault: str, budget: float, *, blocking: bool) -> None:
    """Do what ``fault`` says, past ``budget``; return only if the fault lets the code go on."""
    if fault == "fail":
        raise RuntimeError("failed")
    if fault == "hang":
        await anyio.sleep_forever()
    if fault == "block":
        assert blocking, "blocking takes no virtual time: use 'shield' under a mock clock"
        time.sleep(budget * 1.5)  # noqa: ASYNC251 - the fault under test
    elif fault == "shield":
        with anyio.CancelScope(shield=True):
            await anyio.sleep(budget * 1.5)
    elif fault == "ignore":
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            pass  # swallowed: the scope cancels it again at its next await
        await anyio.sleep_forever()


def build(spec: Spec, timeout: float, *, blocking: bool) -> tuple[Lifecycle, list[tuple[str, str]]]:
    lc = Lifecycle(startup_timeout=None, shutdown_timeout=None)
    events: list[tuple[str, str]] = []

    def declare(i: int) -> None:
        name = f"s{i}"

        async def service(**values: Any) -> AsyncIterator[str]:
            events.append(("start-begin", name))
            await anyio.lowlevel.checkpoint()
            await misbehave(spec.start_fault[i], timeout, blocking=blocking)
            events.append(("start-end", name))
            try:
                yield name
            finally:
                events.append(("stop-begin", name))
                try:
                    await anyio.lowlevel.checkpoint()
                    await misbehave(spec.stop_fault[i], timeout, blocking=blocking)
                finally:
                    events.append(("stop-end", name))

        service.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter(f"s{d}", inspect.Parameter.KEYWORD_ONLY) for d in spec.deps[i]]
        )
        lc.service(name=name, start_timeout=timeout, stop_timeout=timeout)(service)

    for i in spec.deps:
        declare(i)
    return lc, events


def tasks_alive(backend: str) -> int:
    if backend == "trio":
        import trio

        return trio.lowlevel.current_statistics().tasks_living
    import asyncio

    return len(asyncio.all_tasks())


async def exercise(spec: Spec, service_timeout: float, backend: str) -> None:
    lc, events = build(spec, service_timeout, blocking=backend == "asyncio")
    startup_error: StartupError | None = None
    shutdown_error: ShutdownError | None = None
    tasks_before = tasks_alive(backend)
    began = anyio.current_time()
    try:
        async with lc.run():
            pass
    except StartupError as exc:
        startup_error = exc
    except ShutdownError as exc:
        shutdown_error = exc
    took = anyio.current_time() - began
    await anyio.lowlevel.checkpoint()  # let the hosts' task group finish unwinding
    assert tasks_alive(backend) == tasks_before, "a task was left running"

    # Every start and every cleanup is bounded by its timeout, or by its fault's 1.5 times
    # the timeout when it cannot be cut off; starts and stops run along dependency chains.
    steps = 2 * len(spec.deps)
    assert took <= steps * (2 * service_timeout) + 1.0, (took, spec)

    position = {event: n for n, event in enumerate(events)}
    started = {name for kind, name in events if kind == "start-end"}
    names = {f"s{i}": i for i in spec.deps}

    # Starts respect dependencies.
    for name, i in names.items():
        if ("start-begin", name) in position:
            for d in spec.deps[i]:
                assert ("start-end", f"s{d}") in position
                assert position[("start-end", f"s{d}")] < position[("start-begin", name)]

    # Started services are cleaned up exactly once; the others never.
    for name in names:
        stops = sum(1 for kind, n in events if kind == "stop-begin" and n == name)
        assert stops == (1 if name in started else 0), (name, events)

    # A service stops only after every started dependent finished stopping.
    for name, i in names.items():
        for d in spec.deps[i]:
            dependency = f"s{d}"
            if name in started:
                assert position[("stop-end", name)] < position[("stop-begin", dependency)]

    # The errors name the right services.
    start_faulty = {f"s{i}" for i, fault in spec.start_fault.items() if fault != "none"}
    stop_faulty = {f"s{i}" for i, fault in spec.stop_fault.items() if fault != "none"}

    def innocent(errors: dict[str, BaseException]) -> set[str]:
        """Services whose deadline passed only while another service blocked the loop."""
        return {
            name
            for name, exc in errors.items()
            if any(HELD_THE_LOOP in note for note in getattr(exc, "__notes__", ()))
        }

    if startup_error is not None:
        failed = set(startup_error.failures)
        assert failed
        blamed = failed - innocent(startup_error.failures) - start_faulty
        assert not blamed, {name: repr(startup_error.failures[name]) for name in blamed}
        assert not failed & set(startup_error.cancelled)
        # Exactly the faulty starts failed: a faulty start that began either failed or was
        # cancelled because another one failed first.
        began_faulty = {n for kind, n in events if kind == "start-begin"} & start_faulty
        assert began_faulty <= failed | set(startup_error.cancelled), (startup_error, events)
        # A start that overran (it blocked or shielded itself) failed although it completed;
        # it was cleaned up as part of its failure, the others that started were rolled back.
        assert set(startup_error.rolled_back) == started - failed
        rollback_errors = dict(startup_error.rollback_errors)
        assert (started - failed) & stop_faulty <= set(rollback_errors)
        assert set(rollback_errors) - innocent(rollback_errors) <= stop_faulty
        for name in startup_error.failures:
            assert repr(name) in str(startup_error)
    else:
        assert started == set(names)
        assert not (start_faulty & started)
        expected = started & stop_faulty
        errors = dict(shutdown_error.errors) if shutdown_error is not None else {}
        assert expected <= set(errors)
        assert set(errors) - innocent(errors) <= expected
        for name in errors:
            assert repr(name) in str(shutdown_error)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=graphs(TRIO_FAULTS))
def test_random_graphs_on_trio_with_a_mock_clock(spec: Spec) -> None:
    trio_testing = pytest.importorskip("trio.testing")
    anyio.run(
        exercise,
        spec,
        1.0,
        "trio",
        backend="trio",
        backend_options={"clock": trio_testing.MockClock(autojump_threshold=0)},
    )


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=graphs(ASYNCIO_FAULTS))
def test_random_graphs_on_asyncio(spec: Spec) -> None:
    anyio.run(exercise, spec, 0.1, "asyncio", backend="asyncio")
