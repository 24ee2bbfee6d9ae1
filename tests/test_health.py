"""Health: checks in the background, hysteresis, timeouts, the watchdog, probes and routes.

Time-dependent behaviour (intervals, hysteresis over time, timeouts) is tested on trio with a
mock clock; the same behaviour on asyncio is covered by real-time tests with small intervals.
The PostgreSQL and Redis tests run on asyncio only (asyncpg and redis.asyncio are
asyncio-only).
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.abc import TaskStatus
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import lifecycle
from lifecycle import (
    CheckResult,
    ConcurrencyLimitMiddleware,
    DeadlineMiddleware,
    GraphError,
    HealthStatus,
    Lifecycle,
    LifecycleState,
    ShutdownError,
)
from lifecycle.fastapi import health_router
from lifecycle.starlette import health_routes
from lifecycle.testing import assert_started_before, assert_stopped_before, lifespan_client

from .servers import require_postgres, require_redis

pytestmark = pytest.mark.anyio

PASS, WARN, FAIL = HealthStatus.PASS, HealthStatus.WARN, HealthStatus.FAIL
TOKEN = "s3cret-token-for-health-details"
SECRET = "postgresql://app:hunter2@db.internal:5432/prod"


def run_on_mock_clock(main: Callable[[], Awaitable[None]]) -> None:
    trio_testing = pytest.importorskip("trio.testing")
    anyio.run(
        main,
        backend="trio",
        backend_options={"clock": trio_testing.MockClock(autojump_threshold=0)},
    )


async def wait_until(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Poll cached state (there is no event to wait on) until ``condition`` holds."""
    with anyio.fail_after(within):
        while not condition():  # noqa: ASYNC110 - cached state has no event to wait on
            await anyio.sleep(0.005)


async def wait_for_status(
    client: httpx.AsyncClient, path: str, status_code: int, within: float = 5.0
) -> httpx.Response:
    with anyio.fail_after(within):
        while True:
            response = await client.get(path)
            if response.status_code == status_code:
                return response
            await anyio.sleep(0.01)


def entry(response: httpx.Response, name: str) -> dict[str, Any]:
    body = response.json()
    (item,) = body["checks"][name]
    assert isinstance(item, dict)
    return item


def app_for(lc: Lifecycle, *routes: Route, **options: Any) -> Starlette:
    return Starlette(lifespan=lc.lifespan, routes=[*health_routes(lc, **options), *routes])


# -- probes answer from the cache -----------------------------------------------------------


async def test_probe_answers_from_cache_while_a_check_hangs() -> None:
    lc = Lifecycle()
    hanging = anyio.Event()
    runs = 0

    @lc.health_check(interval=0.01, timeout=30.0)
    async def dependency() -> None:
        nonlocal runs
        runs += 1
        if runs > 1:
            hanging.set()
            await anyio.sleep_forever()  # a dependency that stopped answering

    async with lifespan_client(app_for(lc)) as client:
        await hanging.wait()
        with anyio.fail_after(1):  # far less than the check's 30 s timeout
            ready = await client.get("/readyz")
            report = await client.get("/healthz")
        assert dependency.statistics().running
    assert ready.status_code == 200
    assert ready.json()["status"] == "pass"
    assert entry(ready, "dependency")["status"] == "pass"  # the cached result
    assert report.status_code == 200


async def test_bodies_are_health_json_and_never_cached() -> None:
    lc = Lifecycle()

    @lc.health_check
    async def fine() -> None:
        pass

    async with lifespan_client(app_for(lc)) as client:
        responses = {path: await client.get(path) for path in ("/livez", "/readyz", "/startupz")}
        responses["/healthz"] = await client.get("/healthz")
        head = await client.head("/readyz")
        # While nothing changes, a probe reuses the same report and its rendered body.
        reused = lc.health.readiness() is lc.health.readiness()
        rendered_once = lc.health.readiness().to_json() is lc.health.readiness().to_json()
    assert reused
    assert rendered_once
    for path, response in responses.items():
        assert response.status_code == 200, path
        assert response.headers["content-type"] == "application/health+json"
        assert response.headers["cache-control"] == "no-store"
        assert response.json()["status"] == "pass"
    assert head.status_code == 200
    assert set(responses["/livez"].json()["checks"]) == {"event_loop"}
    assert set(responses["/readyz"].json()["checks"]) == {"lifecycle", "fine"}
    assert set(responses["/startupz"].json()["checks"]) == {"lifecycle"}
    assert set(responses["/healthz"].json()["checks"]) == {"lifecycle", "event_loop", "fine"}
    fine_entry = entry(responses["/readyz"], "fine")
    assert fine_entry["componentId"] == "fine"
    assert fine_entry["componentType"] == "component"
    assert fine_entry["time"].endswith("+00:00")


# -- hysteresis -----------------------------------------------------------------------------


async def test_hysteresis_needs_consecutive_failures_and_successes() -> None:
    lc = Lifecycle()
    send, receive = anyio.create_memory_object_stream[HealthStatus](1)
    send.send_nowait(PASS)  # the first result, awaited by startup

    @lc.health_check(interval=0.001, timeout=30.0, failure_threshold=3, success_threshold=2)
    async def scripted() -> CheckResult:
        return CheckResult(await receive.receive(), "scripted")

    # result of each run -> (reported status, HTTP status of /readyz)
    script = [
        (FAIL, PASS, 200),
        (FAIL, PASS, 200),
        (PASS, PASS, 200),  # a success resets the count of failures
        (FAIL, PASS, 200),
        (FAIL, PASS, 200),
        (FAIL, FAIL, 503),  # the third failure in a row
        (PASS, FAIL, 503),
        (FAIL, FAIL, 503),  # a failure resets the count of successes
        (PASS, FAIL, 503),
        (WARN, WARN, 200),  # the second success in a row (a warning counts as one)
        (PASS, PASS, 200),  # pass <-> warn needs no hysteresis: both serve
    ]
    async with send, receive, lifespan_client(app_for(lc)) as client:
        assert scripted.statistics().status is PASS
        changes = [scripted.statistics().changed_at]
        for run, (result, reported, code) in enumerate(script, start=2):
            await send.send(result)
            await wait_until(lambda run=run: scripted.statistics().runs == run)
            stats = scripted.statistics()
            assert (stats.last_result, stats.status) == (result, reported), run
            response = await client.get("/readyz")
            assert response.status_code == code, run
            assert entry(response, "scripted")["status"] == reported.value
            if stats.changed_at != changes[-1]:
                changes.append(stats.changed_at)
    # The time of the last transition moved at the three transitions, and only then.
    assert len(changes) == 4


def test_hysteresis_over_time_on_a_mock_clock() -> None:
    lc = Lifecycle()
    origin: list[float] = []
    seen: list[tuple[float, HealthStatus]] = []

    @lc.health_check(interval=10.0, timeout=1.0, failure_threshold=3, success_threshold=2)
    async def dependency() -> bool:
        now = anyio.current_time()
        origin.append(now)
        return not 15.0 <= now - origin[0] < 45.0  # the dependency is down from 15 to 45

    async def main() -> None:
        async with lc.run():
            await anyio.sleep(5.0)  # read between runs, never at the same instant
            for _ in range(9):
                when = round(anyio.current_time() - origin[0])
                seen.append((when, lc.health.readiness().status))
                await anyio.sleep(10.0)

    run_on_mock_clock(main)
    # Runs at 0, 10, 20, ...: failing from the third failing run (20, 30, 40) until the second
    # passing one (50, 60).
    assert seen == [
        (5, PASS),
        (15, PASS),
        (25, PASS),
        (35, PASS),
        (45, FAIL),
        (55, FAIL),
        (65, PASS),
        (75, PASS),
        (85, PASS),
    ]
    stats = dependency.statistics()
    assert (stats.runs, stats.failures) == (10, 3)  # 0, 10, ..., 90


# -- per-check timeouts ---------------------------------------------------------------------


def test_each_check_runs_under_its_own_timeout_on_a_mock_clock() -> None:
    lc = Lifecycle()
    starts: list[float] = []

    @lc.health_check(interval=2.0, timeout=0.5)
    async def hangs() -> None:
        starts.append(anyio.current_time())
        await anyio.sleep_forever()

    @lc.health_check(interval=2.0, timeout=0.5)
    async def quick() -> None:
        await anyio.sleep(0.1)

    async def main() -> None:
        async with lc.run():
            began = starts[0]
            assert anyio.current_time() - began == pytest.approx(0.5)  # waited for it, no more
            stats = hangs.statistics()
            assert (stats.status, stats.runs, stats.timeouts) == (FAIL, 1, 1)
            assert stats.output == "Did not answer within its timeout of 0.5s."
            assert stats.duration == 0.5
            assert quick.statistics().status is PASS
            assert quick.statistics().duration == pytest.approx(0.1)
            report = lc.health.readiness()
            assert report.status is FAIL
            assert report["hangs"].status is FAIL
            assert report["quick"].status is PASS
            await anyio.sleep(3.75)
            assert [round(t - began, 6) for t in starts] == [0.0, 2.0, 4.0]  # runs go on
            assert hangs.statistics().timeouts == 2  # at 0.5 and 2.5; the third is due at 4.5
            assert quick.statistics().runs == 3

    run_on_mock_clock(main)


def test_a_check_that_ignores_cancellation_still_times_out_on_time() -> None:
    lc = Lifecycle()

    @lc.health_check(interval=2.0, timeout=0.5)
    async def stubborn() -> None:
        with anyio.CancelScope(shield=True):  # like a blocking call in a thread
            await anyio.sleep(3.0)

    async def scenario() -> None:
        began = anyio.current_time()
        async with lc.run():
            assert anyio.current_time() - began == pytest.approx(0.5)
            stats = stubborn.statistics()
            assert (stats.status, stats.timeouts, stats.running) == (FAIL, 1, True)
            await anyio.sleep(2.75)
            # The run due at 2.0 finds it still hung: one more failure, so the failure
            # threshold trips as for a dependency that fails fast. Its late success (at 3.0)
            # is not a result; the next run starts then and hangs again.
            stats = stubborn.statistics()
            assert (stats.runs, stats.failures, stats.consecutive_failures) == (2, 2, 2)
            assert (stats.last_result, stats.running, stats.timeouts) == (FAIL, True, 1)
            assert stats.output == (
                "Still running 2.0s after it began, ignoring the cancellation at its "
                "timeout of 0.5s."
            )

    async def main() -> None:
        # Shutdown has to wait for it (it ignores cancellation), and names it.
        with pytest.raises(ShutdownError, match="'health:stubborn'"):
            await scenario()

    run_on_mock_clock(main)


async def test_a_check_hung_in_a_thread_trips_the_failure_threshold() -> None:
    """A blocking driver call stuck in a worker thread cannot be cancelled; readiness must
    still fail once the threshold's worth of runs have fallen due, not stay passing."""
    lc = Lifecycle()
    hang, release = threading.Event(), threading.Event()

    @lc.health_check(interval=0.05, timeout=0.05, failure_threshold=3)
    async def db_ping() -> None:
        if hang.is_set():
            await anyio.to_thread.run_sync(release.wait)

    try:
        async with lc.run():
            await wait_until(lambda: db_ping.statistics().status is PASS)
            hang.set()
            await wait_until(lambda: lc.health.readiness().status is FAIL)
            stats = db_ping.statistics()
            assert stats.timeouts == 1
            assert stats.consecutive_failures >= 3
            assert stats.running
            release.set()
            await wait_until(lambda: db_ping.statistics().status is PASS)
    finally:
        release.set()


async def test_timeouts_in_real_time() -> None:
    lc = Lifecycle()

    @lc.health_check(interval=0.02, timeout=0.05)
    async def hangs() -> None:
        await anyio.sleep_forever()

    @lc.health_check(interval=0.02, timeout=0.05)
    async def quick() -> None:
        await anyio.lowlevel.checkpoint()

    async with lifespan_client(app_for(lc, details_token=TOKEN)) as client:
        await wait_until(lambda: hangs.statistics().timeouts >= 2)
        response = await client.get("/readyz", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 503
    assert entry(response, "hangs")["output"] == "Did not answer within its timeout of 0.05s."
    assert entry(response, "quick")["status"] == "pass"


def test_startup_waits_for_first_results_but_never_fails_because_of_them() -> None:
    lc = Lifecycle(startup_timeout=4.0)

    @lc.health_check(timeout=10.0)
    async def slow() -> None:
        await anyio.sleep(9.0)

    async def main() -> None:
        began = anyio.current_time()
        async with lc.run():
            # Half of the startup budget at most, so a slow dependency never fails startup.
            assert anyio.current_time() - began == pytest.approx(2.0)
            report = lc.health.readiness()
            assert report["slow"].status is FAIL
            assert report["slow"].output == "Not checked yet."
            await anyio.sleep(7.5)
            assert lc.health.readiness().status is PASS

    run_on_mock_clock(main)


# -- details --------------------------------------------------------------------------------


async def test_details_are_hidden_by_default_and_shown_when_allowed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lc = Lifecycle()

    @lc.health_check
    async def database() -> None:
        raise ConnectionError(f"could not connect to {SECRET}")

    def from_admin(request: Request) -> bool:
        if request.headers.get("x-admin") == "crash":
            raise RuntimeError("predicate bug")
        return request.headers.get("x-admin") == "yes"

    async with lifespan_client(app_for(lc, details_token=TOKEN, show_details=from_admin)) as c:
        hidden = [await c.get(path) for path in ("/readyz", "/healthz", "/livez", "/startupz")]
        hidden.append(await c.get("/healthz", headers={"Authorization": "Bearer wrong-token"}))
        hidden.append(await c.get("/healthz", headers={"Authorization": TOKEN}))  # no scheme
        hidden.append(await c.get("/healthz", headers={"x-admin": "crash"}))
        with_token = await c.get("/healthz", headers={"Authorization": f"Bearer {TOKEN}"})
        with_predicate = await c.get("/readyz", headers={"x-admin": "yes"})

    for response in hidden:
        assert "hunter2" not in response.text
        assert "db.internal" not in response.text
        assert "output" not in response.text
        assert "observedValue" not in response.text
    assert hidden[0].status_code == 503
    assert entry(hidden[0], "database") == {
        "componentId": "database",
        "componentType": "component",
        "status": "fail",
        "time": entry(hidden[0], "database")["time"],
    }
    assert any("show_details raised" in r.getMessage() for r in caplog.records)
    for shown in (with_token, with_predicate):
        assert shown.status_code == 503
        detail = entry(shown, "database")
        assert detail["output"] == f"ConnectionError: could not connect to {SECRET}"
        assert detail["observedUnit"] == "ms"
        assert detail["observedValue"] >= 0


async def test_a_degraded_check_warns_with_its_reason_and_still_serves() -> None:
    lc = Lifecycle()

    @lc.health_check
    async def replica() -> CheckResult:
        return CheckResult(WARN, "replica is 4.2s behind", observed_value=4.2, observed_unit="s")

    @lc.health_check(critical=False)
    async def optional() -> bool:
        return False

    async with lifespan_client(app_for(lc, show_details=lambda request: True)) as client:
        ready = await client.get("/readyz")
        report = await client.get("/healthz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "warn"
    assert "optional" not in ready.json()["checks"]  # not critical: not a readiness matter
    assert entry(ready, "replica") == {
        "componentId": "replica",
        "componentType": "component",
        "status": "warn",
        "time": entry(ready, "replica")["time"],
        "observedValue": 4.2,
        "observedUnit": "s",
        "output": "replica is 4.2s behind",
    }
    assert report.status_code == 200
    assert report.json()["status"] == "warn"  # a failing non-critical check only degrades it
    assert entry(report, "optional")["status"] == "fail"
    assert entry(report, "optional")["output"] == "Returned False."


async def test_status_codes_are_configurable() -> None:
    lc = Lifecycle()

    @lc.health_check
    async def degraded() -> HealthStatus:
        return WARN

    codes = {WARN: 503, FAIL: 500}
    async with lifespan_client(app_for(lc, status_codes=codes)) as client:
        ready = await client.get("/readyz")
        lc.begin_drain()
        draining = await client.get("/readyz")
    assert (ready.status_code, ready.json()["status"]) == (503, "warn")
    assert (draining.status_code, draining.json()["status"]) == (500, "fail")


# -- the event-loop watchdog ----------------------------------------------------------------


async def test_watchdog_fails_liveness_after_a_blocked_loop_and_recovers() -> None:
    lc = Lifecycle()
    lc.health.configure(watchdog_interval=0.05, lag_warn=None, lag_fail=0.5, lag_recovery=0.5)
    blocking = anyio.Event()

    async def block(request: Request) -> Response:
        blocking.set()
        time.sleep(1.0)  # noqa: ASYNC251 - the point: a handler blocking the event loop
        return PlainTextResponse("done")

    app = app_for(lc, Route("/block", block), show_details=lambda request: True)
    async with lifespan_client(app) as client:
        before = await client.get("/livez")
        answers: dict[str, httpx.Response] = {}

        async def probe_during_the_block() -> None:
            await blocking.wait()
            answers["livez"] = await client.get("/livez")  # answered once the loop is free

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(probe_during_the_block)
            await client.get("/block")
        unblocked = anyio.current_time()
        ready = await client.get("/readyz")
        recovered = await wait_for_status(client, "/livez", 200)
        recovered_after = anyio.current_time() - unblocked

    assert before.status_code == 200
    during = answers["livez"]
    assert during.status_code == 503
    assert during.json()["status"] == "fail"
    loop = entry(during, "event_loop")
    assert loop["status"] == "fail"
    assert loop["componentType"] == "system"
    assert loop["observedValue"] >= 900  # ms: the lag it observed, the block itself
    assert "blocked for" in loop["output"]
    assert ready.status_code == 200  # readiness is not about the loop
    assert recovered.json()["status"] == "pass"
    assert recovered_after >= 0.4  # not before the quiet period


async def test_watchdog_warns_on_a_smaller_lag() -> None:
    lc = Lifecycle()
    lc.health.configure(watchdog_interval=0.02, lag_warn=0.1, lag_fail=5.0, lag_recovery=30.0)
    async with lifespan_client(app_for(lc)) as client:
        await anyio.sleep(0.05)  # let the watchdog arm
        time.sleep(0.3)  # noqa: ASYNC251 - block the loop on purpose
        await wait_until(lambda: lc.health.liveness().status is not PASS)
        response = await client.get("/livez")
    assert response.status_code == 200
    assert response.json()["status"] == "warn"


def test_watchdog_sees_no_lag_on_a_mock_clock() -> None:
    lc = Lifecycle()
    lc.health.configure(watchdog_interval=0.5)

    async def main() -> None:
        async with lc.run():
            await anyio.sleep(100.0)
            liveness = lc.health.liveness()
        assert liveness.status is PASS
        assert liveness["event_loop"].observed_value == 0.0

    run_on_mock_clock(main)


# -- lifecycle state --------------------------------------------------------------------------


async def test_startup_probe_and_readiness_follow_the_lifecycle_state() -> None:
    lc = Lifecycle()
    release = anyio.Event()
    stop = anyio.Event()

    @lc.service
    async def slow() -> AsyncIterator[str]:
        await release.wait()
        yield "slow"

    # Probe routes without the lifespan, so that they can be called while it starts.
    transport = httpx.ASGITransport(app=Starlette(routes=health_routes(lc)))
    async with httpx.AsyncClient(transport=transport, base_url="http://probe") as client:
        idle = await client.get("/startupz")

        async def run() -> None:
            async with lc.run():
                await stop.wait()

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(run)
            await wait_until(lambda: lc.state is LifecycleState.STARTING)
            starting = {p: await client.get(p) for p in ("/startupz", "/readyz", "/livez")}
            release.set()
            await lc.wait_started()
            running = {p: await client.get(p) for p in ("/startupz", "/readyz", "/livez")}
            stop.set()
        stopped = {p: await client.get(p) for p in ("/startupz", "/readyz", "/livez")}

    assert idle.status_code == 503
    codes = {p: r.status_code for p, r in starting.items()}
    assert codes == {"/startupz": 503, "/readyz": 503, "/livez": 200}
    assert {p: r.status_code for p, r in running.items()} == dict.fromkeys(running, 200)
    assert {p: r.status_code for p, r in stopped.items()} == codes


async def test_drain_fails_readiness_for_good_while_liveness_passes() -> None:
    lc = Lifecycle()
    async with lifespan_client(app_for(lc, details_token=TOKEN)) as client:
        assert (await client.get("/readyz")).status_code == 200
        lc.begin_drain()
        details = {"Authorization": f"Bearer {TOKEN}"}
        ready = [await client.get("/readyz", headers=details) for _ in range(3)]
        live = await client.get("/livez")
        started = await client.get("/startupz")
    assert [r.status_code for r in ready] == [503, 503, 503]
    assert entry(ready[0], "lifecycle")["output"].startswith("Draining")
    assert live.status_code == 200
    assert started.status_code == 200


async def test_a_service_that_crashed_fails_readiness() -> None:
    lc = Lifecycle()
    crash = anyio.Event()

    @lc.service
    async def listener(*, task_status: TaskStatus[str]) -> None:
        task_status.started("listener")
        await crash.wait()
        raise ConnectionResetError("lost the broker")

    answers: dict[str, httpx.Response] = {}

    async def scenario() -> None:
        async with lifespan_client(app_for(lc, show_details=lambda request: True)) as client:
            answers["before"] = await client.get("/readyz")
            crash.set()
            answers["ready"] = await wait_for_status(client, "/readyz", 503)
            answers["live"] = await client.get("/livez")

    with pytest.raises(ShutdownError, match="'listener' crashed"):
        await scenario()
    ready, live = answers["ready"], answers["live"]
    assert answers["before"].status_code == 200
    assert entry(ready, "lifecycle")["output"] == (
        "Crashed while running: 'listener'; see the logs."
    )
    assert live.status_code == 200


# -- components registered by other parts (supervised tasks) ----------------------------------


async def test_registered_components_decide_readiness_and_liveness(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lc = Lifecycle()
    gave_up = False

    def supervisor() -> CheckResult:
        if gave_up:
            return CheckResult(FAIL, "restarted 5 times within 60s; gave up")
        return CheckResult(PASS)

    def broken() -> bool:
        raise RuntimeError("status bug")

    lc.health.register_component("background:listener", supervisor, affects_liveness=True)
    lc.health.register_component("cache-stats", broken, affects_readiness=False)

    async with lifespan_client(app_for(lc, show_details=lambda request: True)) as client:
        before = {p: await client.get(p) for p in ("/readyz", "/livez", "/healthz")}
        gave_up = True
        after = {p: await client.get(p) for p in ("/readyz", "/livez", "/healthz")}

    assert before["/readyz"].status_code == 200
    assert before["/livez"].status_code == 200
    assert before["/healthz"].json()["status"] == "warn"  # the broken one decides nothing
    assert entry(before["/healthz"], "cache-stats")["output"] == (
        "Its status function raised RuntimeError: status bug"
    )
    for path in ("/readyz", "/livez", "/healthz"):
        assert after[path].status_code == 503, path
        assert entry(after[path], "background:listener")["output"].endswith("gave up")
    logged = [r for r in caplog.records if "health component 'cache-stats'" in r.getMessage()]
    assert len(logged) == 1  # once, not on every probe


# -- guard rails ----------------------------------------------------------------------------


async def test_guard_rails_warn_at_startup(caplog: pytest.LogCaptureFixture) -> None:
    lc = Lifecycle()

    @lc.service
    async def db() -> AsyncIterator[str]:
        yield "db"

    @lc.health_check(liveness=True)
    async def database_alive(db: str) -> None:
        pass

    @lc.health_check(interval=20.0, failure_threshold=3)
    async def sluggish() -> None:
        pass

    @lc.health_check(liveness=True, interval=1.0)
    async def disk_writable() -> None:  # in-process: fine for liveness
        pass

    with caplog.at_level(logging.WARNING, logger="lifecycle.health"):
        async with lc.run():
            pass
    messages = [r.getMessage() for r in caplog.records if r.name == "lifecycle.health"]
    assert len(messages) == 2, messages
    assert "'database_alive' is attached to liveness but takes the services 'db'" in messages[0]
    assert "'sluggish' needs up to 60.0s (interval 20.0s x 3) to fail" in messages[1]
    assert "probe budget of 30.0s" in messages[1]

    caplog.clear()
    lc.health.configure(probe_budget=None)
    with caplog.at_level(logging.WARNING, logger="lifecycle.health"):
        async with lc.run():
            pass
    assert not [r for r in caplog.records if "probe budget" in r.getMessage()]


# -- wiring into the graph ------------------------------------------------------------------


async def test_service_health_gets_the_service_value_and_runs_between_start_and_stop() -> None:
    lc = Lifecycle()
    pinged: list[str] = []

    async def ping(connection: str) -> None:
        pinged.append(connection)

    @lc.service(health=ping)
    async def db() -> AsyncIterator[str]:
        yield "connection"

    class Client:
        async def ping(self) -> None:
            raise TimeoutError("no answer")

    @lc.service(health=lambda client: client.ping())  # returns an awaitable: awaited
    async def api() -> AsyncIterator[Client]:
        yield Client()

    async with lc.run():
        report = lc.health.readiness()
    assert pinged[0] == "connection"
    assert report["db"].status is PASS
    assert report["api"].status is FAIL
    assert report["api"].output == "TimeoutError: no answer"
    assert_started_before(lc, "db", "health:db")
    assert_stopped_before(lc, "health:db", "db")
    # health= runs with the defaults of @lc.health_check.
    defaults = inspect.signature(Lifecycle.health_check).parameters
    check = lc.health.checks["db"]
    for option in ("interval", "timeout", "failure_threshold", "success_threshold"):
        assert getattr(check, option) == defaults[option].default, option
    assert check.services == ("db",)


async def test_checks_take_services_by_parameter_or_depends() -> None:
    lc = Lifecycle()

    @lc.service
    async def primary() -> AsyncIterator[str]:
        yield "primary"

    seen: list[str] = []

    @lc.health_check("replication", depends={"database": primary})
    def check(database: str) -> bool:  # a plain function: in-memory checks need no await
        seen.append(database)
        return True

    async with lc.run() as services:
        assert lc.health.readiness()["replication"].status is PASS
        assert "health:replication" not in services  # internal: hidden from the app
    assert seen[0] == "primary"
    assert check.name == "replication"
    assert check.services == ("primary",)


def test_a_lifecycle_that_never_uses_health_pays_nothing() -> None:
    lc = Lifecycle()

    @lc.service
    async def db() -> AsyncIterator[str]:
        yield "db"

    assert list(lc.declared) == ["db"]
    lc.health  # noqa: B018 - first use creates the monitor and its watchdog
    assert list(lc.declared) == ["db", "health:event_loop"]


async def test_misuse_is_refused_with_the_fix() -> None:
    lc = Lifecycle()

    async def noop() -> None:
        pass

    lc.health_check(name="taken")(noop)
    with pytest.raises(GraphError, match="'taken' is already taken"):
        lc.health_check(name="taken")(noop)

    @lc.service(name="health:clash")
    async def squatter() -> AsyncIterator[None]:
        yield None

    for _ in range(2):  # a failed declaration leaves the name free: the same error again
        with pytest.raises(GraphError, match="named 'health:clash' is already declared"):
            lc.health_check(name="clash")(noop)
    with pytest.raises(GraphError, match="'lifecycle' is already taken"):
        lc.health.register_component("lifecycle", lambda: True)
    with pytest.raises(GraphError, match=r"takes \*args"):

        @lc.health_check
        async def variadic(*args: str) -> None:
            pass

    with pytest.raises(GraphError, match="'nope' is not a parameter"):
        lc.health_check(depends={"nope": "db"})(noop)
    with pytest.raises(ValueError, match="interval of health check 'bad'"):
        lc.health_check(name="bad", interval=0)(lambda: None)
    with pytest.raises(ValueError, match="failure_threshold of health check 'bad2'"):
        lc.health_check(name="bad2", failure_threshold=0)(lambda: None)

    async def async_status() -> bool:
        return True

    with pytest.raises(TypeError, match="probes never await"):
        lc.health.register_component("async", async_status)
    with pytest.raises(ValueError, match=r"lag_warn .* must be below lag_fail"):
        lc.health.configure(lag_warn=2.0, lag_fail=1.0)
    with pytest.raises(ValueError, match="at least 16 characters"):
        health_routes(lc, details_token="short")
    with pytest.raises(ValueError, match="must start with '/'"):
        health_routes(lc, readyz="readyz")
    with pytest.raises(TypeError, match="HealthStatus"):
        health_routes(lc, status_codes={"fail": 500})  # type: ignore[dict-item]

    async with lc.run():
        with pytest.raises(RuntimeError, match="before it starts"):
            lc.health.configure(lag_fail=3.0)
        with pytest.raises(RuntimeError, match="before it starts"):
            lc.health_check(lambda: None)
    other = Lifecycle()
    async with other.run():
        with pytest.raises(RuntimeError, match=r"lc\.health was first used while"):
            other.health  # noqa: B018


async def test_a_check_returning_nonsense_fails_with_the_fix() -> None:
    lc = Lifecycle()

    @lc.health_check
    async def confused() -> dict[str, str]:
        return {"status": "ok"}

    async with lc.run():
        stats = confused.statistics()
    assert stats.status is FAIL
    assert stats.output == (
        "The health check 'confused' returned dict; return None or True (pass), False (fail) "
        "or a CheckResult."
    )


# -- routes and middleware ------------------------------------------------------------------


async def test_fastapi_router_with_configured_paths() -> None:
    lc = Lifecycle()

    @lc.health_check
    async def failing() -> None:
        raise OSError(SECRET)

    app = FastAPI(lifespan=lc.lifespan)
    app.include_router(health_router(lc, readyz="/ready", livez=None, details_token=TOKEN))
    async with lifespan_client(app) as client:
        ready = await client.get("/ready")
        livez = await client.get("/livez")
        shown = await client.get("/healthz", headers={"Authorization": f"Bearer {TOKEN}"})
        schema = (await client.get("/openapi.json")).json()
    assert ready.status_code == 503
    assert ready.headers["content-type"] == "application/health+json"
    assert SECRET not in ready.text
    assert livez.status_code == 404
    assert entry(shown, "failing")["output"] == f"OSError: {SECRET}"
    assert schema["paths"] == {}


async def test_deadline_and_admission_middlewares_leave_probes_alone() -> None:
    lc = Lifecycle()
    busy = anyio.Event()
    release = anyio.Event()

    async def slow(request: Request) -> Response:
        busy.set()
        await release.wait()
        return PlainTextResponse("slow")

    async def other(request: Request) -> Response:
        return PlainTextResponse("other")

    app = app_for(lc, Route("/slow", slow), Route("/other", other))
    limited = ConcurrencyLimitMiddleware(app, max_concurrency=1, max_waiting=0)
    guarded = DeadlineMiddleware(limited, default_timeout=10.0, strict=True)
    malformed = {"grpc-timeout": "soon"}
    async with lifespan_client(guarded) as client, anyio.create_task_group() as task_group:
        task_group.start_soon(client.get, "/slow")
        await busy.wait()  # the only slot is taken
        refused = await client.get("/other")
        rejected = await client.get("/other", headers=malformed)
        probes = [await client.get(p, headers=malformed) for p in ("/readyz", "/livez")]
        release.set()
    assert refused.status_code == 503  # admission control at work...
    assert rejected.status_code == 400  # ...and the strict deadline middleware
    assert [p.status_code for p in probes] == [200, 200]  # ...but not for probes


def test_public_names() -> None:
    for name in (
        "CheckResult",
        "ComponentHealth",
        "HEALTH_JSON",
        "HealthCheck",
        "HealthCheckStatistics",
        "HealthMonitor",
        "HealthReport",
        "HealthStatus",
    ):
        assert getattr(lifecycle, name) is getattr(lifecycle._health, name)
    assert "health_routes" in lifecycle.starlette.__all__
    assert "health_router" in lifecycle.fastapi.__all__


# -- real PostgreSQL and Redis (asyncio only: asyncpg and redis.asyncio) ----------------------


async def ping(component: Any) -> None:
    """The example app's checks: its Database and Cache each have an async ``ping()``."""
    await component.ping()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_example_app_checks_pass_against_real_postgres_and_redis(tmp_path: Path) -> None:
    from example_app import cache as cache_module
    from example_app import db as db_module

    postgres_url, redis_url = require_postgres(), require_redis()
    lc = Lifecycle()

    @lc.service(health=ping)
    async def db() -> AsyncIterator[Any]:
        async with db_module.connect(postgres_url, str(tmp_path / "unused.db")) as database:
            yield database

    @lc.service(health=ping)
    async def cache() -> AsyncIterator[Any]:
        async with cache_module.connect(redis_url) as store:
            yield store

    async with lifespan_client(app_for(lc, details_token=TOKEN)) as client:
        details = {"Authorization": f"Bearer {TOKEN}"}
        ready = await client.get("/readyz", headers=details)
        assert lc.get(db).kind == "postgresql"
        assert lc.get(cache).kind == "redis"
    assert ready.status_code == 200
    for name in ("db", "cache"):
        item = entry(ready, name)
        assert item["status"] == "pass", item
        assert item["observedUnit"] == "ms"
        assert item["observedValue"] > 0  # a real round trip


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_checks_fail_and_recover_against_real_postgres_and_redis() -> None:
    import asyncpg
    import redis.asyncio

    postgres_url, redis_url = require_postgres(), require_redis()
    lc = Lifecycle()
    options: dict[str, Any] = {
        "interval": 0.05,
        "timeout": 0.3,
        "failure_threshold": 2,
        "success_threshold": 2,
    }

    # Pools of one connection, so that the test can starve a check of it: the dependency
    # stops answering in time, for real, without disturbing anyone else using the servers.
    @lc.service
    async def db() -> AsyncIterator[Any]:
        pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=1)
        try:
            yield pool
        finally:
            await pool.close()

    @lc.service
    async def cache() -> AsyncIterator[Any]:
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            redis_url, max_connections=1, timeout=None
        )
        client = redis.asyncio.Redis(connection_pool=pool)
        try:
            yield client
        finally:
            await client.aclose()
            await pool.disconnect()

    @lc.health_check(**options)
    async def postgres(db: Any) -> None:
        await db.fetchval("SELECT 1")

    @lc.health_check(**options)
    async def redis_ping(cache: Any) -> None:
        await cache.ping()

    details = {"Authorization": f"Bearer {TOKEN}"}
    async with lifespan_client(app_for(lc, details_token=TOKEN)) as client:
        assert (await client.get("/readyz")).status_code == 200

        async with lc.get(db).acquire():  # hold PostgreSQL's only connection
            failing_db = await wait_for_status(client, "/readyz", 503)
            shown_db = await client.get("/readyz", headers=details)
        await wait_for_status(client, "/readyz", 200)

        pool = lc.get(cache).connection_pool
        connection = await pool.get_connection()  # hold Redis's only connection
        try:
            failing_cache = await wait_for_status(client, "/readyz", 503)
            shown_cache = await client.get("/readyz", headers=details)
        finally:
            await pool.release(connection)
        recovered = await wait_for_status(client, "/readyz", 200)

    assert entry(failing_db, "postgres")["status"] == "fail"
    assert "output" not in entry(failing_db, "postgres")
    assert entry(failing_db, "redis_ping")["status"] == "pass"
    assert entry(shown_db, "postgres")["output"] == ("Did not answer within its timeout of 0.3s.")
    assert entry(failing_cache, "redis_ping")["status"] == "fail"
    assert entry(shown_cache, "redis_ping")["output"].startswith("Did not answer")
    assert entry(failing_cache, "postgres")["status"] == "pass"
    assert recovered.json()["status"] == "pass"
    assert postgres.statistics().timeouts >= 2


async def test_healthz_shows_the_timeline_only_with_details() -> None:
    lc = Lifecycle()

    @lc.service
    async def db() -> AsyncIterator[str]:
        yield "db"

    async with lifespan_client(app_for(lc, details_token=TOKEN)) as client:
        hidden = await client.get("/healthz")
        shown = await client.get("/healthz", headers={"Authorization": f"Bearer {TOKEN}"})
    assert "timeline" not in hidden.json()
    timeline = shown.json()["timeline"]
    assert timeline[0].startswith("startup: ")
    assert any(line.split("|")[0].strip() == "db" for line in timeline[1:])
    assert shown.headers["content-type"] == "application/health+json"
    assert shown.headers["cache-control"] == "no-store"


async def test_a_check_stuck_in_a_thread_does_not_hold_up_shutdown() -> None:
    """The check waits for a thread that nothing can cut off; shutdown gives up on it within
    its bound, names it, and leaves the thread to the process's exit."""
    lc = Lifecycle(shutdown_timeout=0.3)
    release = threading.Event()
    entered = threading.Event()

    def blocking_ping() -> None:
        entered.set()
        release.wait(10)

    @lc.health_check(interval=0.05, timeout=0.05)
    async def database() -> None:
        await anyio.to_thread.run_sync(blocking_ping)

    began: list[float] = []

    async def run_until_the_check_is_stuck() -> None:
        async with lc.run():
            await anyio.to_thread.run_sync(entered.wait, 5)
            began.append(anyio.current_time())

    try:
        with anyio.fail_after(10), pytest.raises(lifecycle.ShutdownError) as info:
            await run_until_the_check_is_stuck()
        took = anyio.current_time() - began[0]
    finally:
        release.set()
    assert took < 0.3 + 1.0 + 0.5  # shutdown_timeout + the abandon grace + slack
    assert set(info.value.errors) == {"health:database"}
    assert "left to the process's exit" in str(info.value)
    await anyio.sleep(0.1)  # the released thread and its check end on their own


async def test_a_services_own_check_takes_the_options_of_health_check() -> None:
    lc = Lifecycle()
    pings: list[str] = []
    third = anyio.Event()

    async def ping(client: str) -> None:
        pings.append(client)
        if len(pings) == 3:
            third.set()
        raise ConnectionError("down")

    @lc.service(health=lifecycle.check(ping, interval=0.01, timeout=0.5, failure_threshold=2))
    async def cache() -> AsyncIterator[str]:
        yield "client"

    own = lc.health.checks["cache"]
    assert (own.interval, own.timeout, own.failure_threshold) == (0.01, 0.5, 2)
    async with lc.run():
        await third.wait()
        assert own.statistics().status is HealthStatus.FAIL  # two failures in a row
    assert set(pings) == {"client"}


def test_a_services_own_check_refuses_bad_options_at_declaration() -> None:
    lc = Lifecycle()

    async def ping(client: str) -> None:
        pass

    with pytest.raises(ValueError, match="failure_threshold of health check 'cache'"):

        @lc.service(health=lifecycle.check(ping, failure_threshold=0))
        async def cache() -> AsyncIterator[str]:
            yield "client"

    with pytest.raises(TypeError, match=r"health= of service 'other' must be a check function"):

        @lc.service(health="ping")  # type: ignore[arg-type]
        async def other() -> AsyncIterator[str]:
            yield "client"
