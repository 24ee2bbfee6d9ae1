"""The service graph: declaration, validation, ordered startup, rollback, shutdown."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import TaskStatus

from lifecycle import (
    GraphError,
    Lifecycle,
    LifecycleState,
    ServiceNotRunning,
    ServiceState,
    ShutdownError,
    StartupError,
)
from lifecycle.testing import assert_started_before, assert_stopped_before

pytestmark = pytest.mark.anyio


class Log:
    """Records what services do, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def __call__(self, what: str, service: str) -> None:
        self.events.append((what, service))

    def of(self, what: str) -> list[str]:
        return [service for kind, service in self.events if kind == what]

    def index(self, what: str, service: str) -> int:
        return self.events.index((what, service))


def simple(lc: Lifecycle, log: Log, name: str, *deps: str, **options: Any) -> None:
    """Declare a generator service ``name`` depending on ``deps`` that logs start/stop."""

    async def service(**values: Any) -> AsyncIterator[str]:
        log("start", name)
        await anyio.lowlevel.checkpoint()
        try:
            yield f"{name}-value"
        finally:
            log("stop", name)

    service.__signature__ = _signature(deps)  # type: ignore[attr-defined]
    lc.service(name=name, **options)(service)


def _signature(deps: tuple[str, ...]) -> Any:
    import inspect

    return inspect.Signature([inspect.Parameter(d, inspect.Parameter.KEYWORD_ONLY) for d in deps])


# -- declaring --------------------------------------------------------------------------


async def test_both_forms_receive_their_dependencies_values() -> None:
    lc = Lifecycle()

    @lc.service
    async def settings() -> AsyncIterator[dict[str, str]]:
        yield {"url": "sqlite://"}

    @lc.service
    async def db(settings: dict[str, str]) -> AsyncIterator[str]:
        yield f"db at {settings['url']}"

    @lc.service(depends={"database": db})
    async def listener(database: str, *, task_status: TaskStatus[str]) -> None:
        task_status.started(f"listening with {database}")
        await anyio.sleep_forever()

    @lc.service(name="api", depends={"conn": "db", "lsn": listener})
    async def api_service(conn: str, lsn: str) -> AsyncIterator[tuple[str, str]]:
        yield (conn, lsn)

    async with lc.run() as services:
        assert services["db"] == "db at sqlite://"
        assert services[db] == "db at sqlite://"
        assert services["listener"] == "listening with db at sqlite://"
        assert services["api"] == ("db at sqlite://", "listening with db at sqlite://")
        assert lc.get(db) == "db at sqlite://"
        assert set(services) == {"settings", "db", "listener", "api"}
        assert lc.state is LifecycleState.RUNNING
    assert lc.state is LifecycleState.STOPPED
    assert lc.service_state("listener") is ServiceState.STOPPED


def test_duplicate_name_is_a_graph_error() -> None:
    lc = Lifecycle()

    @lc.service
    async def db() -> AsyncIterator[int]:
        yield 1

    with pytest.raises(GraphError, match=r"'db' is already declared.*name=\.\.\."):

        @lc.service(name="db")
        async def other() -> AsyncIterator[int]:
            yield 2


@pytest.mark.parametrize(
    ("source", "error", "message"),
    [
        ("def svc():\n    return 1", TypeError, r"plain function; make it an async generator"),
        (
            "def svc():\n    yield 1",
            TypeError,
            r"plain generator \(def \.\.\. yield\); make it `async",
        ),
        ("async def svc():\n    return 1", TypeError, "without task_status"),
        ("async def svc(*, task_status):\n    yield 1", TypeError, "use one form"),
        ("async def svc(*deps):\n    yield 1", GraphError, r"takes \*deps"),
        ("async def svc(**deps):\n    yield 1", GraphError, r"takes \*\*deps"),
        ("async def svc(db, /):\n    yield 1", GraphError, "positional-only"),
    ],
)
def test_bad_declarations_are_rejected_with_the_fix(
    source: str, error: type[Exception], message: str
) -> None:
    namespace: dict[str, Any] = {}
    exec(source, namespace)
    with pytest.raises(error, match=message) as info:
        Lifecycle().service(namespace["svc"])
    assert "'svc'" in str(info.value)


def test_depends_must_name_a_parameter() -> None:
    lc = Lifecycle()
    with pytest.raises(
        GraphError, match=r"depends=\{'database': \.\.\.\}.*parameters are \['db'\]"
    ):

        @lc.service(depends={"database": "db"})
        async def api(db: str) -> AsyncIterator[str]:
            yield db


def test_depends_on_a_service_of_another_lifecycle_is_rejected() -> None:
    other = Lifecycle()

    @other.service
    async def db() -> AsyncIterator[int]:
        yield 1

    with pytest.raises(GraphError, match="another Lifecycle"):

        @Lifecycle().service(depends={"database": db})
        async def api(database: int) -> AsyncIterator[int]:
            yield database


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan")])
def test_timeouts_must_be_positive_and_finite(bad: float) -> None:
    with pytest.raises(ValueError, match="start_timeout must be a positive, finite number"):
        Lifecycle().service(start_timeout=bad)
    with pytest.raises(ValueError, match="shutdown_timeout must be a positive"):
        Lifecycle(shutdown_timeout=bad)


def test_timeout_of_the_wrong_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="stop_timeout must be a number of seconds"):
        Lifecycle().service(stop_timeout="5")  # type: ignore[call-overload]


# -- validation before anything runs ----------------------------------------------------


async def test_cycle_shows_its_path_and_nothing_starts() -> None:
    lc, log = Lifecycle(), Log()
    simple(lc, log, "root")
    simple(lc, log, "a", "root", "b")
    simple(lc, log, "b", "a")
    with pytest.raises(GraphError, match=r"cycle: 'a' -> 'b' -> 'a'") as info:
        async with lc.run():
            pass
    assert isinstance(info.value, ValueError)
    assert log.events == []
    assert lc.state is LifecycleState.IDLE


def test_self_dependency_is_a_cycle() -> None:
    lc, log = Lifecycle(), Log()
    simple(lc, log, "a", "a")
    with pytest.raises(GraphError, match=r"cycle: 'a' -> 'a'"):
        lc.validate()


def test_unknown_dependency_names_service_parameter_and_fix() -> None:
    lc = Lifecycle()

    @lc.service
    async def database() -> AsyncIterator[int]:
        yield 1

    @lc.service
    async def cache(databse: int) -> AsyncIterator[int]:
        yield databse

    with pytest.raises(GraphError) as info:
        lc.validate()
    message = str(info.value)
    assert "Service 'cache' depends on unknown service 'databse'" in message
    assert "did you mean 'database'?" in message
    assert "depends={'databse': <service>}" in message


def test_unknown_dependency_through_depends_names_the_parameter() -> None:
    lc = Lifecycle()

    @lc.service(depends={"conn": "redis"})
    async def cache(conn: int) -> AsyncIterator[int]:
        yield conn

    with pytest.raises(GraphError, match=r"unknown service 'redis' \(parameter 'conn'\)"):
        lc.validate()


async def test_generator_that_never_yields_is_named() -> None:
    lc = Lifecycle()

    @lc.service
    async def empty() -> AsyncIterator[int]:
        if False:
            yield 1

    with pytest.raises(StartupError, match="'empty'") as info:
        async with lc.run():
            pass
    cause = info.value.failures["empty"]
    assert isinstance(cause, RuntimeError)
    assert "finished without yielding its value" in str(cause)


async def test_generator_that_yields_twice_is_named_at_shutdown() -> None:
    lc = Lifecycle()
    closed = []

    @lc.service
    async def twice() -> AsyncIterator[int]:
        try:
            yield 1
            yield 2
        finally:
            closed.append(True)

    with pytest.raises(ShutdownError, match="'twice' raised RuntimeError") as info:
        async with lc.run():
            pass
    assert "yielded more than once" in str(info.value.errors["twice"])
    assert closed == [True]  # the generator was closed, so its finally still ran


async def test_long_running_service_that_never_reports_started_is_named() -> None:
    lc = Lifecycle()

    @lc.service
    async def quiet(*, task_status: TaskStatus[int]) -> None:
        return

    with pytest.raises(StartupError) as info:
        async with lc.run():
            pass
    assert "returned without calling task_status.started()" in str(info.value.failures["quiet"])


# -- startup ------------------------------------------------------------------------------


async def test_diamond_starts_in_order_with_independent_branches_concurrent() -> None:
    lc, log = Lifecycle(), Log()
    simple(lc, log, "a")
    left_started, right_started = anyio.Event(), anyio.Event()

    @lc.service
    async def left(a: str) -> AsyncIterator[str]:
        log("start", "left")
        left_started.set()
        with anyio.fail_after(5):  # fails if the branches start one after the other
            await right_started.wait()
        yield "left"
        log("stop", "left")

    @lc.service
    async def right(a: str) -> AsyncIterator[str]:
        log("start", "right")
        right_started.set()
        with anyio.fail_after(5):
            await left_started.wait()
        yield "right"
        log("stop", "right")

    simple(lc, log, "d", "left", "right")
    async with lc.run():
        pass
    assert log.of("start")[0] == "a"
    assert set(log.of("start")[1:3]) == {"left", "right"}
    assert log.of("start")[3] == "d"
    for first, then in [("a", "left"), ("a", "right"), ("left", "d"), ("right", "d")]:
        assert_started_before(lc, first, then)
        assert_stopped_before(lc, then, first)
    assert log.of("stop")[0] == "d"
    assert log.of("stop")[-1] == "a"


async def test_a_service_starts_as_soon_as_its_own_dependencies_run() -> None:
    lc, log = Lifecycle(), Log()
    fast_running = anyio.Event()

    @lc.service
    async def slow() -> AsyncIterator[str]:
        # Holds its start until `fast_follower` runs: a starter that waited for every
        # earlier service (or started in waves) would never get there.
        with anyio.fail_after(5):
            await fast_running.wait()
        yield "slow"

    simple(lc, log, "fast")

    @lc.service
    async def fast_follower(fast: str) -> AsyncIterator[str]:
        fast_running.set()
        yield "follower"

    simple(lc, log, "last", "slow", "fast_follower")
    async with lc.run():
        pass
    assert_started_before(lc, "fast_follower", "last")
    assert_started_before(lc, "slow", "last")


async def test_hanging_start_is_cut_at_its_start_timeout() -> None:
    lc, log = Lifecycle(), Log()
    simple(lc, log, "base")

    @lc.service(start_timeout=0.05)
    async def hangs(base: str) -> AsyncIterator[str]:
        await anyio.sleep_forever()
        yield "never"

    simple(lc, log, "after", "hangs")
    began = anyio.current_time()
    with pytest.raises(StartupError) as info:
        async with lc.run():
            pytest.fail("startup should have failed")
    assert anyio.current_time() - began < 2
    error = info.value.failures["hangs"]
    assert isinstance(error, TimeoutError)
    assert "did not start within its start_timeout of 0.05s" in str(error)
    assert info.value.rolled_back == ("base",)
    assert "after" not in log.of("start")
    assert log.of("stop") == ["base"]
    assert lc.service_state("hangs") is ServiceState.FAILED
    assert lc.service_state("after") is ServiceState.PENDING


async def test_startup_timeout_bounds_the_whole_startup() -> None:
    lc = Lifecycle(startup_timeout=0.1)

    @lc.service(start_timeout=10)
    async def slow() -> AsyncIterator[str]:
        await anyio.sleep(0.06)
        yield "slow"

    @lc.service(start_timeout=10)
    async def slower(slow: str) -> AsyncIterator[str]:
        await anyio.sleep(0.06)
        yield "slower"

    with pytest.raises(StartupError, match=r"startup_timeout of 0\.1s ran out") as info:
        async with lc.run():
            pass
    assert set(info.value.failures) == {"slower"}
    assert info.value.rolled_back == ("slow",)


# -- rollback ---------------------------------------------------------------------------


async def test_failure_mid_chain_rolls_back_exactly_what_started_in_reverse() -> None:
    lc, log = Lifecycle(), Log()
    simple(lc, log, "a")
    simple(lc, log, "b", "a")
    boom = ConnectionError("database is down")

    @lc.service
    async def c(b: str) -> AsyncIterator[str]:
        log("start", "c")
        try:
            raise boom
            yield "never"  # pragma: no cover
        finally:
            log("finally", "c")

    simple(lc, log, "d", "c")
    simple(lc, log, "independent")

    with pytest.raises(StartupError) as info:
        async with lc.run():
            pytest.fail("startup should have failed")
    error = info.value
    assert error.failures == {"c": boom}
    assert error.__cause__ is boom
    assert set(error.rolled_back) == {"a", "b", "independent"}
    assert error.rolled_back.index("b") < error.rolled_back.index("a")
    assert log.index("stop", "b") < log.index("stop", "a")
    assert "d" not in log.of("start")
    assert log.of("stop").count("c") == 0  # never started, so never cleaned up
    message = str(error)
    assert "service 'c' raised ConnectionError: database is down" in message
    assert "Rolled back:" in message
    assert "'a'" in message
    assert "'b'" in message
    assert lc.state is LifecycleState.FAILED
    assert lc.service_state("c") is ServiceState.FAILED
    assert lc.service_state("d") is ServiceState.PENDING
    assert lc.service_state("a") is ServiceState.STOPPED


async def test_failure_cancels_starts_in_progress() -> None:
    lc = Lifecycle()
    cancelled = []

    @lc.service
    async def slow() -> AsyncIterator[str]:
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.append("slow")
        yield "never"  # pragma: no cover

    @lc.service
    async def broken() -> AsyncIterator[str]:
        await anyio.lowlevel.checkpoint()
        raise ValueError("bad config")
        yield "never"  # pragma: no cover

    with pytest.raises(StartupError) as info:
        async with lc.run():
            pass
    assert cancelled == ["slow"]
    assert info.value.cancelled == ("slow",)
    assert set(info.value.failures) == {"broken"}
    assert "Cancelled while starting: 'slow'" in str(info.value)
    assert lc.service_state("slow") is ServiceState.CANCELLED


async def test_outside_cancellation_during_startup_rolls_back_and_propagates() -> None:
    lc, log = Lifecycle(), Log()
    simple(lc, log, "a")
    reached = anyio.Event()

    @lc.service
    async def b(a: str) -> AsyncIterator[str]:
        reached.set()
        await anyio.sleep_forever()
        yield "never"

    async with anyio.create_task_group() as tg:

        async def run() -> None:
            async with lc.run():
                pytest.fail("startup should not complete")

        tg.start_soon(run)
        await reached.wait()
        tg.cancel_scope.cancel()
    assert log.of("stop") == ["a"]
    assert lc.state is LifecycleState.FAILED
    assert lc.service_state("b") is ServiceState.CANCELLED  # it never ran


# A start that completes without a checkpoint while startup is being abandoned: the service
# has reported started (and is shielded from then on) as the wait for it is cancelled. The
# rollback must stop it, not wait for it forever.


def no_checkpoint_to_yield(
    lc: Lifecycle, cleaned: list[str], name: str, *deps: str, before: Any = None
) -> None:
    """Declare a generator service ``name`` that reaches its yield without a checkpoint
    (after calling ``before``, if given) and records its cleanup in ``cleaned``."""

    async def service(**values: Any) -> AsyncIterator[str]:
        if before is not None:
            before()
        try:
            yield name
        finally:
            cleaned.append(name)

    service.__signature__ = _signature(deps)  # type: ignore[attr-defined]
    lc.service(name=name)(service)


def blocking_connect() -> None:
    time.sleep(0.1)  # past the deadlines below, with no checkpoint


async def test_a_failure_as_another_service_reports_started_rolls_it_back() -> None:
    lc = Lifecycle()
    cleaned: list[str] = []
    go = anyio.Event()

    @lc.service
    async def failing() -> AsyncIterator[str]:
        await go.wait()
        raise RuntimeError("failing failed")
        yield "never"  # pragma: no cover

    no_checkpoint_to_yield(lc, cleaned, "quick", before=go.set)  # wakes `failing`
    no_checkpoint_to_yield(lc, cleaned, "after", "quick")

    with anyio.fail_after(5), pytest.raises(StartupError) as info:
        async with lc.run():
            pytest.fail("startup should not complete")
    assert set(info.value.failures) == {"failing"}
    assert "quick" in info.value.rolled_back
    assert set(cleaned) == set(info.value.rolled_back)
    assert lc.state is LifecycleState.FAILED


async def test_startup_timeout_passing_in_a_blocking_start_rolls_back() -> None:
    lc = Lifecycle(startup_timeout=0.05)
    cleaned: list[str] = []
    no_checkpoint_to_yield(lc, cleaned, "blocking", before=blocking_connect)
    no_checkpoint_to_yield(lc, cleaned, "after", "blocking")

    # The start that overran the budget is the one that failed, not its innocent dependent,
    # which never starts; what the blocking start opened is cleaned up all the same.
    with anyio.fail_after(5), pytest.raises(StartupError) as info:
        async with lc.run():
            pytest.fail("startup should not complete")
    assert set(info.value.failures) == {"blocking"}
    assert re.search(
        r"'blocking' took 0\.\d\ds to start, past the startup_timeout of 0\.05s", str(info.value)
    )
    assert "'after'" not in str(info.value)
    assert lc.service_state("after") is ServiceState.PENDING
    assert lc.service_state("blocking") is ServiceState.FAILED
    assert cleaned == ["blocking"]


async def test_outside_cancellation_as_a_service_reports_started_rolls_it_back() -> None:
    lc = Lifecycle()
    cleaned: list[str] = []
    no_checkpoint_to_yield(lc, cleaned, "blocking", before=blocking_connect)
    no_checkpoint_to_yield(lc, cleaned, "after", "blocking")

    with anyio.fail_after(5):
        with anyio.move_on_after(0.05) as outside:
            async with lc.run():
                await anyio.sleep_forever()
    assert outside.cancelled_caught
    assert "blocking" in cleaned
    assert lc.service_state("blocking") is ServiceState.STOPPED


async def test_a_start_completing_as_startup_is_abandoned_is_rolled_back_like_the_rest() -> None:
    """It holds a task group across its yield (as every worker pool does): its cleanup must
    run once, in its own scopes, as a rollback."""
    lc = Lifecycle()
    cleaned: list[str] = []

    @lc.service
    async def failing() -> AsyncIterator[str]:
        await anyio.sleep(0.05)
        raise RuntimeError("boom")
        yield "never"  # pragma: no cover

    @lc.service
    async def holder() -> AsyncIterator[str]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.sleep_forever)
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.2)  # a connect that shields itself past the failure
            try:
                yield "holder"
            finally:
                cleaned.append("holder")
                tg.cancel_scope.cancel()

    with anyio.fail_after(5), pytest.raises(StartupError) as info:
        async with lc.run():
            pytest.fail("startup should not complete")
    assert list(info.value.failures) == ["failing"]
    assert info.value.rolled_back == ("holder",)
    assert info.value.cancelled == ()
    assert cleaned == ["holder"]
    assert lc.service_state("holder") is ServiceState.STOPPED


async def test_starts_cancelled_by_a_failure_stay_so_when_unwinding_outlasts_the_budget() -> None:
    lc = Lifecycle(startup_timeout=0.3)
    simple(lc, Log(), "base")

    @lc.service
    async def failing(base: str) -> AsyncIterator[str]:
        await anyio.sleep(0.05)
        raise RuntimeError("boom")
        yield "never"  # pragma: no cover

    @lc.service
    async def slow() -> AsyncIterator[str]:
        try:
            await anyio.sleep(10)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.4)  # closing a half-open connection, past the budget
        yield "never"  # pragma: no cover

    @lc.service
    async def later(base: str) -> AsyncIterator[str]:
        await anyio.sleep(0.1)
        yield "later"  # pragma: no cover

    with anyio.fail_after(5), pytest.raises(StartupError) as info:
        async with lc.run():
            pytest.fail("startup should not complete")
    assert list(info.value.failures) == ["failing"]
    assert set(info.value.cancelled) == {"slow", "later"}
    assert info.value.rolled_back == ("base",)


@pytest.mark.parametrize("form", ["generator", "task"])
@pytest.mark.parametrize("how", ["blocks the loop", "shields itself"])
async def test_a_start_that_overruns_its_start_timeout_fails_and_is_cleaned_up(
    form: str, how: str
) -> None:
    """Neither backend can cut a start that blocks or shields itself; once it completes, it
    fails with its measured duration instead of counting as started (its host scope may
    already be cancelled), and what it started is cleaned up, awaiting included."""
    lc = Lifecycle()
    cleaned: list[str] = []

    async def overrun() -> None:
        if how == "blocks the loop":
            time.sleep(0.1)  # noqa: ASYNC251
        else:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.1)

    if form == "generator":

        @lc.service(start_timeout=0.05)
        async def service() -> AsyncIterator[str]:
            await overrun()
            try:
                yield "ready"
            finally:
                await anyio.lowlevel.checkpoint()  # the cleanup can await: not cut at once
                cleaned.append("service")

    else:

        @lc.service(start_timeout=0.05)
        async def service(*, task_status: TaskStatus[str]) -> None:
            await overrun()
            task_status.started("ready")
            try:
                await anyio.sleep_forever()
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.lowlevel.checkpoint()
                cleaned.append("service")

    with anyio.fail_after(5), pytest.raises(StartupError) as info:
        async with lc.run():
            pytest.fail("startup should not complete")
    assert list(info.value.failures) == ["service"]
    assert re.search(
        r"'service' took 0\.1\ds to start, past its start_timeout of 0\.05s", str(info.value)
    )
    assert cleaned == ["service"]
    assert lc.service_state(service) is ServiceState.FAILED


async def test_startup_error_keeps_rollback_failures() -> None:
    lc = Lifecycle()

    @lc.service
    async def a() -> AsyncIterator[str]:
        yield "a"
        raise OSError("close failed")

    @lc.service
    async def b(a: str) -> AsyncIterator[str]:
        raise KeyError("missing")
        yield "never"  # pragma: no cover

    with pytest.raises(StartupError) as info:
        async with lc.run():
            pass
    assert isinstance(info.value.rollback_errors["a"], OSError)
    assert "Rollback cleanups that failed: 'a': OSError: close failed" in str(info.value)


# -- shutdown -----------------------------------------------------------------------------


async def test_independent_stops_run_concurrently() -> None:
    lc, log = Lifecycle(), Log()
    simple(lc, log, "base")
    left_stopping, right_stopping = anyio.Event(), anyio.Event()

    @lc.service
    async def left(base: str) -> AsyncIterator[str]:
        yield "left"
        left_stopping.set()
        with anyio.fail_after(5):  # fails if the stops run one after the other
            await right_stopping.wait()

    @lc.service
    async def right(base: str) -> AsyncIterator[str]:
        yield "right"
        right_stopping.set()
        with anyio.fail_after(5):
            await left_stopping.wait()

    async with lc.run():
        pass
    assert_stopped_before(lc, "left", "base")
    assert_stopped_before(lc, "right", "base")


async def test_hanging_cleanup_is_cut_off_and_every_other_cleanup_runs() -> None:
    lc, log = Lifecycle(), Log()
    simple(lc, log, "base")

    @lc.service(stop_timeout=0.05)
    async def stuck(base: str) -> AsyncIterator[str]:
        yield "stuck"
        log("stop", "stuck")
        await anyio.sleep_forever()

    simple(lc, log, "top", "stuck")
    simple(lc, log, "sibling", "base")
    with pytest.raises(ShutdownError) as info:
        async with lc.run():
            pass
    assert set(info.value.errors) == {"stuck"}
    error = info.value.errors["stuck"]
    assert isinstance(error, TimeoutError)
    assert "stop_timeout of 0.05s" in str(error)
    assert "'stuck' timed out" in str(info.value)
    assert sorted(log.of("stop")) == ["base", "sibling", "stuck", "top"]
    assert log.of("stop")[-1] == "base"  # still after its dependents, the stuck one included
    assert_stopped_before(lc, "stuck", "base")
    assert lc.service_state("stuck") is ServiceState.FAILED
    assert lc.service_state("base") is ServiceState.STOPPED


async def test_raising_cleanup_never_prevents_the_others(caplog: pytest.LogCaptureFixture) -> None:
    lc, log = Lifecycle(), Log()
    simple(lc, log, "base")
    oops = RuntimeError("flush failed")

    @lc.service
    async def flaky(base: str) -> AsyncIterator[str]:
        yield "flaky"
        raise oops

    simple(lc, log, "top", "flaky")
    with pytest.raises(ShutdownError) as info:
        async with lc.run():
            pass
    assert info.value.errors == {"flaky": oops}
    assert info.value.__cause__ is oops
    assert log.of("stop") == ["top", "base"]
    assert any("Service 'flaky' failed to stop cleanly" in r.getMessage() for r in caplog.records)


async def test_cleanup_completes_while_the_surrounding_scope_is_cancelled() -> None:
    lc = Lifecycle()
    finished = []

    @lc.service
    async def db() -> AsyncIterator[str]:
        yield "db"
        await anyio.sleep(0.01)  # would raise Cancelled without the shield
        await anyio.sleep(0.01)
        finished.append("db")

    with anyio.CancelScope() as outer:
        async with lc.run():
            outer.cancel()
            await anyio.sleep_forever()
    assert outer.cancelled_caught
    assert finished == ["db"]
    assert lc.state is LifecycleState.STOPPED


async def test_services_owned_tasks_survive_outside_cancellation_until_their_turn() -> None:
    lc = Lifecycle()
    seen_alive = []

    @lc.service
    async def pump() -> AsyncIterator[list[str]]:
        alive = ["yes"]

        async def heartbeat() -> None:
            try:
                await anyio.sleep_forever()
            finally:
                alive[0] = "no"

        async with anyio.create_task_group() as tg:
            tg.start_soon(heartbeat)
            yield alive
            tg.cancel_scope.cancel()

    @lc.service
    async def consumer(pump: list[str]) -> AsyncIterator[None]:
        yield None
        seen_alive.append(pump[0])

    with anyio.CancelScope() as outer:
        async with lc.run():
            outer.cancel()
            await anyio.sleep_forever()
    assert seen_alive == ["yes"]


async def test_shutdown_timeout_bounds_the_whole_shutdown() -> None:
    lc, log = Lifecycle(shutdown_timeout=0.1), Log()

    @lc.service(stop_timeout=10)
    async def first() -> AsyncIterator[str]:
        yield "first"
        await anyio.sleep(0.06)
        log("stop", "first")

    @lc.service(stop_timeout=10)
    async def second(first: str) -> AsyncIterator[str]:
        yield "second"
        await anyio.sleep(0.06)
        log("stop", "second")

    began = anyio.current_time()
    with pytest.raises(ShutdownError, match=r"shutdown_timeout of 0\.1s") as info:
        async with lc.run():
            began = anyio.current_time()
    assert anyio.current_time() - began < 1
    assert log.of("stop") == ["second"]
    assert set(info.value.errors) == {"first"}


async def test_body_exception_wins_and_services_still_stop() -> None:
    lc, log = Lifecycle(), Log()
    simple(lc, log, "a")

    @lc.service
    async def b(a: str) -> AsyncIterator[str]:
        yield "b"
        raise OSError("close failed")

    with pytest.raises(ZeroDivisionError) as info:
        async with lc.run():
            1 / 0  # noqa: B018
    assert log.of("stop") == ["a"]
    assert any("'b' raised OSError: close failed" in note for note in info.value.__notes__)


async def test_crash_while_running_is_reported_at_shutdown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lc, log = Lifecycle(), Log()
    simple(lc, log, "base")
    crash = anyio.Event()

    @lc.service
    async def worker(base: str, *, task_status: TaskStatus[str]) -> None:
        task_status.started("worker")
        await crash.wait()
        raise RuntimeError("lost connection")

    simple(lc, log, "top", "worker")

    async def crash_and_wait_for_it() -> None:
        crash.set()
        with anyio.fail_after(5):
            # No event announces the state change; poll it.
            while lc.service_state("worker") is not ServiceState.FAILED:  # noqa: ASYNC110
                await anyio.sleep(0.001)

    with pytest.raises(ShutdownError, match="'worker' crashed while running") as info:
        async with lc.run():
            await crash_and_wait_for_it()
    assert isinstance(info.value.errors["worker"], RuntimeError)
    assert log.of("stop") == ["top", "base"]
    assert any("crashed while running" in r.getMessage() for r in caplog.records)


async def test_long_running_service_is_cancelled_at_stop_in_order() -> None:
    lc, log = Lifecycle(), Log()
    simple(lc, log, "base")

    @lc.service
    async def listener(base: str, *, task_status: TaskStatus[str]) -> None:
        task_status.started("listener")
        try:
            await anyio.sleep_forever()
        finally:
            log("stop", "listener")

    simple(lc, log, "top", "listener")
    async with lc.run():
        pass
    assert log.of("stop") == ["top", "listener", "base"]


async def test_no_task_is_left_running_after_exit() -> None:
    before = len(anyio.get_running_tasks())
    lc, log = Lifecycle(), Log()
    simple(lc, log, "a")

    @lc.service
    async def loop(a: str, *, task_status: TaskStatus[None]) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.sleep_forever)
            task_status.started()
            await anyio.sleep_forever()

    async with lc.run():
        assert len(anyio.get_running_tasks()) > before
    assert len(anyio.get_running_tasks()) == before

    simple(lc, log, "broken", "loop", start_timeout=0.01)

    @lc.service
    async def broken2(broken: str) -> AsyncIterator[None]:
        yield None

    lc2 = Lifecycle()

    @lc2.service
    async def ok() -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.sleep_forever)
            yield None
            tg.cancel_scope.cancel()

    @lc2.service
    async def fails(ok: None) -> AsyncIterator[None]:
        raise RuntimeError("no")
        yield None  # pragma: no cover

    with pytest.raises(StartupError):
        async with lc2.run():
            pass
    assert len(anyio.get_running_tasks()) == before


# -- state, timeline, access ------------------------------------------------------------


async def test_states_timeline_and_summary(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lifecycle")
    lc, log = Lifecycle(), Log()
    simple(lc, log, "settings")

    @lc.service
    async def db(settings: str) -> AsyncIterator[str]:
        await anyio.sleep(0.02)
        yield "db"

    simple(lc, log, "api", "db")
    assert lc.service_state("db") is ServiceState.PENDING
    assert lc.state is LifecycleState.IDLE
    async with lc.run():
        assert {lc.service_state(n) for n in ("settings", "db", "api")} == {ServiceState.RUNNING}
    timeline = lc.timeline()
    assert timeline.start_order == ["settings", "db", "api"]
    assert timeline.stop_order == ["api", "db", "settings"]
    assert timeline.slowest_chain == ("settings", "db", "api")
    db_entry = timeline["db"]
    assert db_entry.start_duration is not None
    assert db_entry.start_duration >= 0.015
    table = str(timeline)
    assert table.splitlines()[0].split()[:3] == ["service", "state", "start"]
    assert "db        stopped" in table
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Started")]
    assert len(summary) == 1
    assert summary[0].startswith("Started 3 services in ")
    assert "slowest chain: settings (" in summary[0]
    assert "-> db (" in summary[0]
    assert "-> api (" in summary[0]


async def test_get_outside_a_run_explains_how_to_fix_it() -> None:
    lc = Lifecycle()

    @lc.service
    async def db() -> AsyncIterator[str]:
        yield "db"

    with pytest.raises(ServiceNotRunning, match=r"lifespan=lc\.lifespan") as info:
        lc.get(db)
    assert isinstance(info.value, LookupError)
    async with lc.run():
        assert lc.get("db") == "db"
    with pytest.raises(ServiceNotRunning, match="it is stopped"):
        lc.get(db)
    with pytest.raises(LookupError, match="No service named 'dv' is declared"):
        lc.get("dv")


async def test_a_lifecycle_runs_one_lifespan_at_a_time_and_can_run_again() -> None:
    lc, log = Lifecycle(), Log()
    simple(lc, log, "a")
    async with lc.run():
        with pytest.raises(RuntimeError, match="already running"):
            async with lc.run():
                pass
    async with lc.run():
        pass
    assert log.of("start") == ["a", "a"]
    assert log.of("stop") == ["a", "a"]


async def test_wait_started_from_another_task() -> None:
    lc, log = Lifecycle(), Log()
    simple(lc, log, "a")
    got: list[Any] = []

    async def waiter() -> None:
        got.append(await lc.wait_started())

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.lowlevel.checkpoint()
        async with lc.run():
            await anyio.sleep(0.01)
            assert got
            assert got[0]["a"] == "a-value"


async def test_wait_started_raises_the_startup_error() -> None:
    lc = Lifecycle()

    @lc.service
    async def broken() -> AsyncIterator[None]:
        await anyio.sleep(0.01)
        raise RuntimeError("nope")
        yield None  # pragma: no cover

    errors: list[BaseException] = []

    async def waiter() -> None:
        try:
            await lc.wait_started()
        except StartupError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.lowlevel.checkpoint()
        with pytest.raises(StartupError):
            async with lc.run():
                pass
    assert len(errors) == 1


# -- found in review ------------------------------------------------------------------------


@pytest.mark.parametrize("error", [KeyboardInterrupt(), SystemExit(3)], ids=repr)
async def test_keyboard_interrupt_and_system_exit_reach_the_caller_as_themselves(
    error: BaseException, anyio_backend: tuple[str, object]
) -> None:
    lc, log = Lifecycle(), Log()
    simple(lc, log, "a")

    with pytest.raises(type(error)) as info:
        async with lc.run():
            raise error
    assert info.value is error
    assert log.of("stop") == ["a"]

    if anyio_backend[0] == "asyncio":
        return  # asyncio lets these escape a task straight out of the event loop
    lc2 = Lifecycle()
    simple(lc2, log, "first")

    @lc2.service
    async def interrupted(first: str) -> AsyncIterator[str]:
        await anyio.lowlevel.checkpoint()
        raise error
        yield "never"  # pragma: no cover

    with pytest.raises(type(error)) as info:
        async with lc2.run():
            pytest.fail("startup should not complete")
    assert info.value is error
    assert "first" in log.of("stop")


async def test_wait_started_raises_when_the_run_is_refused_as_invalid() -> None:
    lc = Lifecycle()

    @lc.service
    async def a(missing: str) -> AsyncIterator[str]:
        yield "a"  # pragma: no cover

    outcome: list[BaseException] = []

    async def waiter() -> None:
        try:
            await lc.wait_started()
        except GraphError as exc:
            outcome.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(GraphError) as info:
                async with lc.run():
                    pass  # pragma: no cover
    assert outcome == [info.value]


async def test_a_cleanup_cut_by_the_shutdown_budget_names_that_budget() -> None:
    lc = Lifecycle(shutdown_timeout=0.4)

    @lc.service(stop_timeout=0.3)
    async def base() -> AsyncIterator[str]:
        yield "base"
        await anyio.sleep(0.2)  # fits its own stop_timeout, not what its dependent left

    @lc.service
    async def dependent(base: str) -> AsyncIterator[str]:
        yield "dependent"
        await anyio.sleep(0.35)

    with pytest.raises(ShutdownError) as info:
        async with lc.run():
            pass
    assert "'base' did not finish its cleanup within the shutdown_timeout of 0.4s" in str(
        info.value
    )


async def test_a_service_declared_after_a_run_is_pending_and_not_running() -> None:
    lc, log = Lifecycle(), Log()
    simple(lc, log, "a")
    async with lc.run():
        pass
    simple(lc, log, "b", "a")
    assert lc.service_state("b") is ServiceState.PENDING
    with pytest.raises(ServiceNotRunning, match="'b' is not running"):
        lc.get("b")


async def test_a_chain_of_thousands_of_services_validates_starts_and_stops() -> None:
    lc = Lifecycle()
    count = 3000
    for n in reversed(range(count)):  # dependents first: the deepest walk for validation
        deps = {"previous": f"s{n - 1}"} if n else {}

        async def service(**values: Any) -> AsyncIterator[int]:
            yield len(values)

        service.__signature__ = _signature(tuple(deps))  # type: ignore[attr-defined]
        lc.service(name=f"s{n}", depends=deps or None)(service)
    lc.validate()
    async with lc.run() as services:
        assert len(services) == count
    assert lc.timeline().stop_order[-1] == "s0"


async def test_a_cleanup_that_shields_itself_past_its_deadline_is_reported() -> None:
    lc = Lifecycle()

    @lc.service(stop_timeout=0.05)
    async def gen() -> AsyncIterator[str]:
        yield "gen"
        with anyio.CancelScope(shield=True):  # no deadline: nobody can cut this off
            await anyio.sleep(0.2)

    @lc.service(stop_timeout=0.05)
    async def listener(*, task_status: TaskStatus[str]) -> None:
        task_status.started("listener")
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.2)

    with pytest.raises(ShutdownError) as info:
        async with lc.run():
            pass
    for name in ("gen", "listener"):
        message = str(info.value.errors[name])
        assert message.startswith(f"Service {name!r} took 0.2")
        assert "past its stop_timeout of 0.05s" in message
        assert "could not be cut off" in message


def fails_once_set(lc: Lifecycle, go: anyio.Event) -> None:
    """Declare a service ``failing`` whose start raises once ``go`` is set."""

    @lc.service
    async def failing() -> AsyncIterator[str]:
        await go.wait()
        raise RuntimeError("boom")
        yield "never"  # pragma: no cover


@pytest.mark.parametrize("delay", [0, 1, 2, 3])
async def test_a_failure_racing_a_long_running_start_never_loses_the_service(
    delay: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Whichever way the race goes, the service is cancelled while starting or started and
    rolled back, never cancelled while it counts as running."""
    for _ in range(4):
        lc = Lifecycle()
        go, ready = anyio.Event(), anyio.Event()
        body: list[str] = []

        fails_once_set(lc, go)

        @lc.service
        async def svc(*, task_status: TaskStatus[str]) -> None:
            await ready.wait()  # noqa: B023
            task_status.started("svc")
            try:
                await anyio.sleep_forever()
            finally:
                body.append(lc.service_state("svc").value)  # noqa: B023

        async def release(go: anyio.Event = go, ready: anyio.Event = ready) -> None:
            await go.wait()
            for _ in range(delay):
                await anyio.lowlevel.checkpoint()
            ready.set()

        caplog.clear()
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(release)
                go.set()
                with pytest.raises(StartupError) as info:
                    async with lc.run():
                        pytest.fail("startup should not complete")
                ready.set()
        error = info.value
        assert ("svc" in error.cancelled) != ("svc" in error.rolled_back), error
        # Cut while starting (perhaps after it called started()), or stopped by the rollback.
        if "svc" in error.rolled_back:
            assert body == ["stopping"], (body, error)
        else:
            assert body in ([], ["starting"]), (body, error)
        assert "returned while running" not in caplog.text


@pytest.mark.parametrize("delay", [0, 1, 2])
async def test_no_start_begins_once_a_sibling_has_failed(delay: int) -> None:
    for _ in range(4):
        lc = Lifecycle()
        go = anyio.Event()
        seen: list[ServiceState] = []

        fails_once_set(lc, go)

        @lc.service
        async def first() -> AsyncIterator[str]:
            await go.wait()  # noqa: B023
            for _ in range(delay):
                await anyio.lowlevel.checkpoint()
            yield "first"

        @lc.service
        async def second(first: str) -> AsyncIterator[str]:
            seen.append(lc.service_state("failing"))  # noqa: B023
            yield "second"

        async def trigger(go: anyio.Event = go) -> None:
            await anyio.sleep(0.01)
            go.set()

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(trigger)
                with pytest.raises(StartupError):
                    async with lc.run():
                        pytest.fail("startup should not complete")
        assert ServiceState.FAILED not in seen


# -- user code that does not cooperate ------------------------------------------------------
#
# Each of these blocks, shields itself, or ignores a cancellation; every promise of the
# kernel (the shutdown bound, attribution, descriptions) holds anyway.

ABANDON_GRACE = 1.0  # lifecycle._kernel.ABANDON_GRACE, the documented bound


async def test_a_cleanup_shielded_for_good_is_abandoned_within_the_shutdown_bound() -> None:
    lc = Lifecycle(shutdown_timeout=0.2)
    release = anyio.Event()  # lets the abandoned cleanup end after the test has seen enough
    cleaned: list[str] = []

    @lc.service
    async def base() -> AsyncIterator[str]:
        yield "base"
        cleaned.append("base")  # never reached while 'stuck' holds on

    @lc.service
    async def stuck(base: str) -> AsyncIterator[str]:
        yield "stuck"
        with anyio.CancelScope(shield=True):
            await release.wait()

    @lc.service
    async def independent() -> AsyncIterator[str]:
        yield "independent"
        cleaned.append("independent")

    began = anyio.current_time()
    with anyio.fail_after(10), pytest.raises(ShutdownError) as info:
        async with lc.run():
            pass
    took = anyio.current_time() - began
    release.set()
    assert took < 0.2 + ABANDON_GRACE + 0.5
    assert set(info.value.errors) == {"stuck", "base"}
    assert "'stuck' was still running its cleanup" in str(info.value)
    assert "'base' never began its cleanup" in str(info.value)
    assert "left to the process's exit" in str(info.value)
    assert cleaned == ["independent"]
    assert lc.service_state("stuck") is ServiceState.FAILED
    await anyio.sleep(0.05)  # the abandoned host finishes on its own once released


async def test_a_rollback_is_bounded_by_the_shutdown_timeout_too() -> None:
    lc = Lifecycle(shutdown_timeout=0.2)
    release = anyio.Event()

    @lc.service
    async def stuck() -> AsyncIterator[str]:
        yield "stuck"
        with anyio.CancelScope(shield=True):
            await release.wait()

    @lc.service
    async def broken(stuck: str) -> AsyncIterator[str]:
        await anyio.lowlevel.checkpoint()
        raise ValueError("bad config")
        yield "never"  # pragma: no cover

    began = anyio.current_time()
    with anyio.fail_after(10), pytest.raises(StartupError) as info:
        async with lc.run():
            pytest.fail("startup should not complete")  # pragma: no cover
    took = anyio.current_time() - began
    release.set()
    assert took < 0.2 + ABANDON_GRACE + 0.5
    assert "'stuck' was still running its cleanup" in str(info.value.rollback_errors["stuck"])
    await anyio.sleep(0.05)


async def test_only_the_cleanup_that_overran_is_blamed() -> None:
    """A dependent shields its cleanup past the budget; its dependencies, whose turn came
    after the budget was gone, are not said to have overrun."""
    lc = Lifecycle(shutdown_timeout=0.1)

    @lc.service
    async def quick() -> AsyncIterator[str]:
        yield "quick"  # its cleanup does not await: it completes although the budget is gone

    @lc.service
    async def awaiting() -> AsyncIterator[str]:
        yield "awaiting"
        await anyio.sleep(1)  # cut off: no time was left for it

    @lc.service
    async def slow(quick: str, awaiting: str) -> AsyncIterator[str]:
        yield "slow"
        with anyio.CancelScope(shield=True):
            await anyio.sleep(0.3)

    with anyio.fail_after(10), pytest.raises(ShutdownError) as info:
        async with lc.run():
            pass
    assert set(info.value.errors) == {"slow", "awaiting"}
    assert re.search(
        r"'slow' took 0\.\d\ds to clean up, past the shutdown_timeout", str(info.value)
    )
    assert "'awaiting' had no time left to clean up" in str(info.value)
    assert "'awaiting' took" not in str(info.value)
    assert lc.service_state("quick") is ServiceState.STOPPED


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("postgresql://user:secret@db/app")


async def test_an_exception_whose_str_raises_is_still_described() -> None:
    lc = Lifecycle()

    @lc.service
    async def db() -> AsyncIterator[str]:
        raise Unprintable
        yield "never"  # pragma: no cover

    with pytest.raises(StartupError) as info:
        async with lc.run():
            pytest.fail("startup should not complete")  # pragma: no cover
    assert "service 'db' raised Unprintable (its message could not be read" in str(info.value)
    assert "secret" not in str(info.value)
    assert isinstance(info.value.failures["db"], Unprintable)


async def test_a_raising_observer_is_detached_and_never_fails_a_service(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lc = Lifecycle()
    seen: list[str] = []

    class Broken:
        def service_started(self, service: Any) -> None:
            raise RuntimeError("observer bug")

    class Fine:
        def service_started(self, service: Any) -> None:
            seen.append(service.name)

    broken, fine = Broken(), Fine()
    lc.observers.add(broken)
    lc.observers.add(fine)
    simple(lc, Log(), "a")
    simple(lc, Log(), "b", "a")

    with caplog.at_level(logging.ERROR, logger="lifecycle.observers"):
        async with lc.run() as services:
            assert set(services) == {"a", "b"}
    assert broken not in lc.observers
    assert fine in lc.observers
    assert seen == ["a", "b"]  # the others go on being called
    assert [r.getMessage() for r in caplog.records].count(
        f"Observer {broken!r} raised RuntimeError: observer bug from service_started(); it is "
        "detached; what it watched goes on unobserved."
    ) == 1


async def test_a_service_reporting_started_as_a_sibling_fails_is_rolled_back() -> None:
    """It reports started once startup is being abandoned (its own shield held the
    cancellation off): it ran, so it is rolled back, and what its cleanup raises is kept."""
    lc = Lifecycle()
    failing_now = anyio.Event()
    cleaned: list[str] = []

    @lc.service
    async def a() -> AsyncIterator[None]:
        await anyio.lowlevel.checkpoint()
        failing_now.set()
        raise ValueError("a failed")
        yield None  # pragma: no cover

    @lc.service
    async def b(*, task_status: TaskStatus[str]) -> None:
        with anyio.CancelScope(shield=True):
            await failing_now.wait()
            await anyio.sleep(0.05)  # startup is abandoned meanwhile
            task_status.started("b")
        try:
            await anyio.sleep_forever()
        finally:
            cleaned.append("b")
            raise RuntimeError("b's cleanup failed")

    with anyio.fail_after(5), pytest.raises(StartupError) as info:
        async with lc.run():
            pytest.fail("startup should not complete")  # pragma: no cover
    assert list(info.value.failures) == ["a"]
    assert info.value.cancelled == ()
    assert info.value.rolled_back == ("b",)
    assert isinstance(info.value.rollback_errors["b"], RuntimeError)
    assert cleaned == ["b"]
    assert lc.service_state("b") is ServiceState.FAILED


# -- the mistakes a newcomer makes, each with the message that fixes it ----------------------


def test_an_asynccontextmanager_on_a_service_says_remove_the_decorator() -> None:
    from contextlib import asynccontextmanager

    lc = Lifecycle()
    with pytest.raises(
        TypeError,
        match=r"'db' is wrapped by a decorator such as "
        r"@asynccontextmanager; remove it",
    ):

        @lc.service
        @asynccontextmanager
        async def db() -> AsyncIterator[str]:
            yield "db"


def test_a_service_that_yields_in_a_loop_is_warned_about_at_declaration() -> None:
    lc = Lifecycle()
    with pytest.warns(UserWarning, match=r"'poller' yields inside a loop.*take task_status") as w:

        @lc.service
        async def poller() -> AsyncIterator[int]:
            while True:
                yield 1

    assert w[0].filename == __file__  # pointed at the user's declaration


async def test_a_long_running_service_that_never_reports_started_is_told_to() -> None:
    lc = Lifecycle()

    @lc.service(start_timeout=0.05)
    async def listener(*, task_status: TaskStatus[str]) -> None:
        await anyio.sleep_forever()

    with pytest.raises(StartupError, match=r"has not called task_status\.started\(\) yet"):
        async with lc.run():
            pytest.fail("startup should not complete")  # pragma: no cover


@pytest.mark.parametrize(
    ("handler", "fix"),
    [
        ("async def index(db, job):\n    pass", r"'job' looks like the job.*def index\(job, db\)"),
        (
            "async def index(db):\n    pass",
            r"receives the job, not the service 'db'.*index\(job, db\)",
        ),
    ],
)
def test_a_worker_handler_with_its_job_parameter_misplaced_is_told_to_put_it_first(
    handler: str, fix: str
) -> None:
    lc = Lifecycle()
    simple(lc, Log(), "db")
    namespace: dict[str, Any] = {}
    exec(handler, namespace)
    lc.worker(namespace["index"])
    with pytest.raises(GraphError, match=fix):
        lc.validate()


def test_a_typo_in_depends_is_refused_for_every_kind_of_declaration() -> None:
    lc = Lifecycle()
    simple(lc, Log(), "db")

    async def handle(job: int, database: str) -> None:
        pass

    async def loop(database: str) -> None:
        pass

    for declare in (
        lambda: lc.worker(handle, depends={"databse": "db"}),
        lambda: lc.background(loop, depends={"databse": "db"}),
        lambda: lc.periodic(loop, every=1.0, depends={"databse": "db"}),
        lambda: lc.health_check(loop, depends={"databse": "db"}),
    ):
        with pytest.raises(
            GraphError, match=r"depends=\{'databse': \.\.\.\}.*did you mean 'database'"
        ):
            declare()


def test_calling_lifespan_instead_of_passing_it_says_how_to_pass_it() -> None:
    with pytest.raises(
        TypeError, match=r"FastAPI\(lifespan=lc\.lifespan\), not lifespan=lc\.lifespan\(\)"
    ):
        Lifecycle().lifespan()


# -- found by review: a fatal exception from a running service, a run cancelled at once -----


class Fatal(BaseException):
    """A user's own BaseException, like SystemExit or KeyboardInterrupt."""


@pytest.mark.parametrize("fatal", [SystemExit(3), Fatal("fatal")])
async def test_a_fatal_exception_from_a_running_service_ends_the_run_at_once(
    fatal: BaseException, anyio_backend: tuple[str, dict[str, object]]
) -> None:
    if isinstance(fatal, SystemExit) and anyio_backend[0] == "asyncio":
        pytest.skip("asyncio itself raises SystemExit out of its event loop, from any task")
    lc = Lifecycle()
    raised = anyio.Event()

    @lc.service
    async def listener(*, task_status: TaskStatus[str]) -> None:
        task_status.started("listening")
        await anyio.lowlevel.checkpoint()
        raised.set()
        raise fatal

    async def run_until_cut() -> None:
        async with lc.run():
            await raised.wait()
            await anyio.sleep_forever()  # the body is cut at once, not at its end

    with anyio.fail_after(5), pytest.raises(type(fatal)) as info:
        await run_until_cut()
    assert info.value is fatal
    assert lc.state is LifecycleState.STOPPED
    assert lc.service_state("listener") is ServiceState.FAILED


async def test_a_fatal_exception_wins_over_an_outside_cancellation() -> None:
    lc = Lifecycle()

    @lc.service
    async def listener(*, task_status: TaskStatus[str]) -> None:
        task_status.started("listening")
        await anyio.lowlevel.checkpoint()
        raise Fatal("fatal")

    async def run_cancelled_from_outside() -> None:
        with anyio.move_on_after(0.5):
            async with lc.run():
                await anyio.sleep_forever()

    with anyio.fail_after(5), pytest.raises(Fatal):
        await run_cancelled_from_outside()


async def test_a_run_cancelled_at_its_first_checkpoint_can_run_again() -> None:
    lc = Lifecycle()
    simple(lc, Log(), "db")
    with anyio.move_on_after(0):
        async with lc.run():
            pytest.fail("the run should be cancelled before it starts")  # pragma: no cover
    assert lc.state is LifecycleState.FAILED
    async with lc.run() as services:
        assert services["db"] == "db-value"


async def test_a_host_ending_after_it_was_abandoned_changes_nothing_reported() -> None:
    lc = Lifecycle(shutdown_timeout=0.1)
    release = anyio.Event()
    stops: list[str] = []

    class Stops:
        def service_stopping(self, service: Any) -> None:
            stops.append(service.name)

    lc.observers.add(Stops())
    simple(lc, Log(), "db")

    @lc.service
    async def app(db: str) -> AsyncIterator[str]:
        yield "app"
        with anyio.CancelScope(shield=True):
            await release.wait()

    with anyio.fail_after(10), pytest.raises(ShutdownError):
        async with lc.run():
            pass
    reported = (lc.service_state("db"), lc.service_state("app"), list(stops))
    release.set()
    await anyio.sleep(0.05)  # the abandoned hosts end now
    assert (lc.service_state("db"), lc.service_state("app"), stops) == reported
    assert reported[:2] == (ServiceState.FAILED, ServiceState.FAILED)


def test_a_job_like_parameter_that_depends_maps_to_a_service_is_not_taken_for_the_job() -> None:
    lc = Lifecycle()
    simple(lc, Log(), "blob_store")

    async def handle(order: int, message: str) -> None:
        pass

    lc.worker(handle, depends={"message": "blob_store"})
    lc.validate()  # no GraphError: 'order' is the job, 'message' a service
