"""Property-based tests of the service graph: random DAGs with random faults.

Invariants, whatever the graph and the faults:
- every start happens after all of the service's dependencies finished starting;
- every service whose start completed is stopped exactly once, and only after every service
  that depends on it (and had started) finished stopping;
- a service that never started is never stopped;
- the errors name the right services.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lifecycle import Lifecycle, ShutdownError, StartupError

FAULTS = ["none", "none", "none", "fail", "hang"]


@dataclass
class Spec:
    deps: dict[int, list[int]]
    start_fault: dict[int, str]
    stop_fault: dict[int, str]


@st.composite
def graphs(draw: st.DrawFn) -> Spec:
    size = draw(st.integers(min_value=1, max_value=30))
    deps = {
        i: sorted(set(draw(st.lists(st.integers(0, i - 1), max_size=3)))) if i else []
        for i in range(size)
    }
    start_fault = {i: draw(st.sampled_from(FAULTS)) for i in range(size)}
    stop_fault = {i: draw(st.sampled_from(FAULTS)) for i in range(size)}
    return Spec(deps, start_fault, stop_fault)


def build(spec: Spec, timeout: float) -> tuple[Lifecycle, list[tuple[str, str]]]:
    lc = Lifecycle(startup_timeout=None, shutdown_timeout=None)
    events: list[tuple[str, str]] = []

    def declare(i: int) -> None:
        name = f"s{i}"

        async def service(**values: Any) -> AsyncIterator[str]:
            events.append(("start-begin", name))
            await anyio.lowlevel.checkpoint()
            if spec.start_fault[i] == "fail":
                raise RuntimeError(f"{name} failed to start")
            if spec.start_fault[i] == "hang":
                await anyio.sleep_forever()
            events.append(("start-end", name))
            try:
                yield name
            finally:
                events.append(("stop-begin", name))
                try:
                    await anyio.lowlevel.checkpoint()
                    if spec.stop_fault[i] == "fail":
                        raise RuntimeError(f"{name} failed to stop")
                    if spec.stop_fault[i] == "hang":
                        await anyio.sleep_forever()
                finally:
                    events.append(("stop-end", name))

        service.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter(f"s{d}", inspect.Parameter.KEYWORD_ONLY) for d in spec.deps[i]]
        )
        lc.service(name=name, start_timeout=timeout, stop_timeout=timeout)(service)

    for i in spec.deps:
        declare(i)
    return lc, events


async def exercise(spec: Spec, service_timeout: float) -> None:
    lc, events = build(spec, service_timeout)
    startup_error: StartupError | None = None
    shutdown_error: ShutdownError | None = None
    try:
        async with lc.run():
            pass
    except StartupError as exc:
        startup_error = exc
    except ShutdownError as exc:
        shutdown_error = exc

    position = {event: n for n, event in enumerate(events)}
    started = {name for kind, name in events if kind == "start-end"}
    names = {f"s{i}": i for i in spec.deps}

    # Starts respect dependencies.
    for name, i in names.items():
        if ("start-begin", name) in position:
            for d in spec.deps[i]:
                assert ("start-end", f"s{d}") in position
                assert position[("start-end", f"s{d}")] < position[("start-begin", name)]

    # Started services stop exactly once; the others never.
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
    if startup_error is not None:
        assert startup_error.failures
        assert set(startup_error.failures) <= start_faulty
        assert set(startup_error.rolled_back) == started
        assert set(startup_error.rollback_errors) == started & stop_faulty
        for name in startup_error.failures:
            assert repr(name) in str(startup_error)
    else:
        assert started == set(names)
        assert not (start_faulty & started)
        expected = started & stop_faulty
        if expected:
            assert shutdown_error is not None
            assert set(shutdown_error.errors) == expected
            for name in expected:
                assert repr(name) in str(shutdown_error)
        else:
            assert shutdown_error is None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=graphs())
def test_random_graphs_on_trio_with_a_mock_clock(spec: Spec) -> None:
    trio_testing = pytest.importorskip("trio.testing")
    anyio.run(
        exercise,
        spec,
        1.0,
        backend="trio",
        backend_options={"clock": trio_testing.MockClock(autojump_threshold=0)},
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=graphs())
def test_random_graphs_on_asyncio(spec: Spec) -> None:
    anyio.run(exercise, spec, 0.02, backend="asyncio")
