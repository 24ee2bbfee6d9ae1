"""The pytest plugin: registered once through its entry point, fixtures only, each working."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from importlib.metadata import entry_points

import anyio
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from trio.testing import MockClock

import lifecycle
import lifecycle.pytest_plugin
from lifecycle import DeadlineMiddleware, Lifecycle, ServiceState, ShutdownError, StartupError
from lifecycle.testing import Faults, OrderAssertions, lifespan_client

pytest_plugins = ["pytester"]

lc = Lifecycle()
log: list[str] = []


@lc.service
async def db() -> AsyncIterator[str]:
    log.append("start db")
    yield "the db"
    log.append("stop db")


@lc.service(start_timeout=20.0, stop_timeout=15.0)
async def api(db: str) -> AsyncIterator[str]:
    log.append("start api")
    yield f"api on {db}"
    log.append("stop api")


async def index(request: Request) -> PlainTextResponse:
    return PlainTextResponse(request.state.api)


starlette_app = Starlette(routes=[Route("/", index)], lifespan=lc.lifespan)


@pytest.fixture
def lifecycle_app() -> Starlette:
    log.clear()
    return starlette_app


def test_the_plugin_is_registered_once_through_its_entry_point(
    pytestconfig: pytest.Config,
) -> None:
    (entry,) = [ep for ep in entry_points(group="pytest11") if ep.name == "lifecycle"]
    assert entry.value == "lifecycle.pytest_plugin"
    manager = pytestconfig.pluginmanager
    assert manager.get_plugin("lifecycle") is lifecycle.pytest_plugin
    registered = [p for p in manager.get_plugins() if p is lifecycle.pytest_plugin]
    assert len(registered) == 1


@pytest.mark.anyio
async def test_lifecycle_client_runs_the_app_for_the_test(
    lifecycle_client: object, lifecycle_services: lifecycle.Services
) -> None:
    import httpx

    assert isinstance(lifecycle_client, httpx.AsyncClient)
    assert log == ["start db", "start api"]
    assert (await lifecycle_client.get("/")).text == "api on the db"
    assert lifecycle_services["api"] == "api on the db"
    assert lifecycle_services[db] == "the db"


@pytest.mark.anyio
async def test_lifecycle_order_asserts_on_the_running_lifecycle(
    lifecycle_client: object, lifecycle_order: OrderAssertions
) -> None:
    assert lifecycle_order.lifecycle is lc
    lifecycle_order.started_before("db", "api")
    with pytest.raises(AssertionError, match="Expected 'api' to be running before 'db'"):
        lifecycle_order.started_before(api, db)


@pytest.mark.anyio
async def test_lifecycle_faults_inject_into_the_app_under_test(lifecycle_faults: Faults) -> None:
    boom = ConnectionError("no route to the db")
    lifecycle_faults.fail_start("db", boom)
    with pytest.raises(StartupError) as info:
        async with lifespan_client(starlette_app):
            pytest.fail("startup should have failed")  # pragma: no cover
    assert info.value.failures == {"db": boom}
    assert log == []


@pytest.fixture(
    params=["starlette", "fastapi", "middleware"],
)
def wrapped_app(request: pytest.FixtureRequest) -> object:
    if request.param == "starlette":
        return starlette_app
    if request.param == "fastapi":
        return FastAPI(lifespan=lc.lifespan)
    return DeadlineMiddleware(starlette_app, default_timeout=1.0)


def test_lifecycle_instance_is_found_through_frameworks_and_middleware(
    wrapped_app: object,
) -> None:
    from lifecycle.pytest_plugin import _find_lifecycle

    assert _find_lifecycle(wrapped_app) is lc
    with pytest.raises(pytest.UsageError, match="Define a fixture named lifecycle_instance"):
        _find_lifecycle(DeadlineMiddleware(Starlette(), default_timeout=1.0))


@pytest.mark.anyio
async def test_lifecycle_clock_gives_start_and_stop_timeouts_virtual_time(
    lifecycle_clock: MockClock, lifecycle_faults: Faults, anyio_backend: object
) -> None:
    assert anyio_backend == ("trio", {"clock": lifecycle_clock})
    real_start, virtual_start = time.monotonic(), anyio.current_time()
    lifecycle_faults.hang_start("api")
    with pytest.raises(StartupError, match="'api' did not start within its start_timeout"):
        async with lifespan_client(starlette_app, startup_timeout=60.0):
            pytest.fail("startup should have failed")  # pragma: no cover
    assert lc.service_state("api") is ServiceState.FAILED
    lifecycle_faults.clear()
    lifecycle_faults.hang_stop("api")
    with pytest.raises(ShutdownError, match="'api'"):
        async with lifespan_client(starlette_app, shutdown_timeout=60.0):
            pass
    # 20 s of start timeout and 15 s of stop timeout went by on the virtual clock only.
    assert anyio.current_time() - virtual_start >= 35.0
    assert time.monotonic() - real_start < 10.0


@pytest.mark.anyio
async def test_lifecycle_clock_times_a_supervisors_backoff(
    lifecycle_clock: MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    import random

    # The jitter draws the whole ceiling, so the waits are exactly 8, 16 and 30 s.
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    supervised = Lifecycle()
    crashes: list[float] = []
    crashed_four_times = anyio.Event()

    @supervised.background(max_restarts=5, within=1000.0, backoff_base=8.0, backoff_max=30.0)
    async def flaky() -> None:
        crashes.append(anyio.current_time())
        if len(crashes) == 4:
            crashed_four_times.set()
        raise ConnectionError("upstream gone")

    real_start = time.monotonic()
    async with supervised.run():
        await crashed_four_times.wait()
    gaps = [round(later - earlier, 3) for earlier, later in itertools.pairwise(crashes)]
    assert gaps == [8.0, 16.0, 30.0]
    assert time.monotonic() - real_start < 10.0


@pytest.mark.anyio
@pytest.mark.parametrize(
    "lifecycle_client_options",
    [{"client_options": {"headers": {"x-from": "options"}}, "startup_timeout": 1.0}],
)
async def test_lifecycle_client_options_reach_lifespan_client(
    lifecycle_client: object,
) -> None:
    import httpx

    assert isinstance(lifecycle_client, httpx.AsyncClient)
    assert lifecycle_client.headers["x-from"] == "options"


# -- what the plugin does in a project of its own --------------------------------------------


def test_without_lifecycle_app_the_fixtures_say_what_to_define(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.anyio
        async def test_it(lifecycle_client):
            pass
        """
    )
    result = pytester.runpytest_inprocess()
    outcomes = result.parseoutcomes()
    assert outcomes.get("errors", 0) >= 1
    assert "passed" not in outcomes
    result.stdout.fnmatch_lines(["*define a fixture named lifecycle_app returning it*"])


def test_the_plugin_adds_no_autouse_fixture_and_can_be_disabled(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        def test_fixtures(request):
            assert not [name for name in request.fixturenames if name.startswith("lifecycle")]

        def test_uses(lifecycle_order):
            pass
        """
    )
    pytester.runpytest_inprocess().assert_outcomes(passed=1, errors=1)
    disabled = pytester.runpytest_inprocess("-p", "no:lifecycle")
    disabled.assert_outcomes(passed=1, errors=1)
    disabled.stdout.fnmatch_lines(["*fixture 'lifecycle_order' not found*"])


def test_lifecycle_clock_with_a_parametrized_backend_is_refused(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.parametrize("anyio_backend", ["asyncio"])
        @pytest.mark.anyio
        async def test_it(lifecycle_clock):
            pass
        """
    )
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*requests lifecycle_clock*drop one of the two*"])


def test_a_shutdown_failure_fails_the_test_at_teardown(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        from contextlib import asynccontextmanager

        import pytest
        from starlette.applications import Starlette


        @asynccontextmanager
        async def lifespan(app):
            yield
            raise OSError("flush failed")


        @pytest.fixture
        def lifecycle_app():
            return Starlette(lifespan=lifespan)


        @pytest.mark.parametrize("anyio_backend", ["asyncio"])
        @pytest.mark.anyio
        async def test_it(lifecycle_client):
            assert (await lifecycle_client.get("/missing")).status_code == 404
        """
    )
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_it*", "*OSError: flush failed*"])
