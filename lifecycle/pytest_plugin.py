"""pytest fixtures for testing an app built on lifecycle; pytest loads them by itself.

Installing lifecycle registers this module through the ``pytest11`` entry point, so its
fixtures are available in every test without an import. It adds fixtures and nothing else:
no autouse fixture, no hook that changes how other tests run (``-p no:lifecycle`` disables
it). Tell it which app to test by defining ``lifecycle_app``::

    # conftest.py
    import pytest

    from myservice.main import app


    @pytest.fixture
    def lifecycle_app():
        return app


    # test_items.py
    @pytest.mark.anyio
    async def test_items(lifecycle_client, lifecycle_services):
        assert (await lifecycle_client.get("/items")).status_code == 200

The fixtures, all prefixed ``lifecycle_`` so that they cannot collide with pytest-anyio's or
pytest-asyncio's own:

* ``lifecycle_app``: the ASGI app under test. Define it; the plugin's own raises an error
  saying so.
* ``lifecycle_client_options``: keyword arguments for `lifecycle.testing.lifespan_client`
  (``startup_timeout``, ``lifespan``, ``client_options``...); ``{}`` unless overridden.
* ``lifecycle_client`` (async): runs ``lifecycle_app``'s lifespan for the test and yields an
  ``httpx.AsyncClient`` talking to it; the shutdown runs at teardown, and its failure fails
  the test.
* ``lifecycle_instance``: the `lifecycle.Lifecycle` under test, found from ``lifecycle_app``'s
  lifespan (through Starlette or FastAPI and wrapping middleware). Override it when the app's
  lifespan is not ``lc.lifespan`` itself (``lc.wrap_lifespan(...)``, say).
* ``lifecycle_services`` (async): the running Lifecycle's started services
  (`lifecycle.Services`); it starts the app through ``lifecycle_client``.
* ``lifecycle_faults``: a `lifecycle.testing.Faults` injecting faults into
  ``lifecycle_instance`` for the test. Request it before ``lifecycle_client`` if a start
  fault must be in place when the app starts (then the start fails in the fixture's setup).
* ``lifecycle_order``: a `lifecycle.testing.OrderAssertions` for ``lifecycle_instance``:
  ``lifecycle_order.started_before("db", "api")``, ``lifecycle_order.stopped_before(...)``.
* ``lifecycle_clock``: virtual time. A test that requests it runs on trio alone, with a
  ``trio.testing.MockClock(autojump_threshold=0)`` that jumps to the next deadline whenever
  every task is blocked, so start and stop timeouts, drain delays and supervisor backoff take
  no real time; the fixture is that clock. asyncio has no pluggable clock, so such a test
  does not run there: test the asyncio side of the same logic with short real timeouts. The
  test's ``anyio_backend`` is set by the plugin; a test that parametrizes ``anyio_backend``
  itself cannot also request ``lifecycle_clock``.

The async fixtures run under anyio's pytest plugin: mark the tests ``@pytest.mark.anyio``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import httpx
    from trio.testing import MockClock

    from ._kernel import Services
    from ._lifecycle import Lifecycle
    from .testing import Faults, OrderAssertions

__all__ = [
    "lifecycle_app",
    "lifecycle_client",
    "lifecycle_client_options",
    "lifecycle_clock",
    "lifecycle_faults",
    "lifecycle_instance",
    "lifecycle_order",
    "lifecycle_services",
]

# lifecycle itself is imported inside the fixtures, not here: pytest imports this module when
# it starts, and importing the package that early would, for one, hide its module-level code
# from a coverage measurement started later.

_CLOCK_FIXTURE = "lifecycle_clock"


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run a test that requests ``lifecycle_clock`` on trio with a virtual clock."""
    if _CLOCK_FIXTURE not in metafunc.fixturenames:
        return
    for marker in metafunc.definition.iter_markers("parametrize"):
        names = marker.args[0] if marker.args else marker.kwargs.get("argnames", "")
        if isinstance(names, str):
            names = [name.strip() for name in names.split(",")]
        if "anyio_backend" in names:
            raise pytest.UsageError(
                f"{metafunc.definition.nodeid} parametrizes anyio_backend and requests "
                f"lifecycle_clock, which runs the test on trio with a virtual clock itself; "
                f"drop one of the two."
            )
    try:
        from trio.testing import MockClock
    except ImportError:  # pragma: no cover - the trio extra is part of the dev install
        metafunc.parametrize(
            "anyio_backend",
            [pytest.param(("trio", {}), marks=pytest.mark.skip(reason="needs trio"))],
            ids=["trio-mockclock"],
        )
        return
    metafunc.parametrize(
        "anyio_backend",
        [("trio", {"clock": MockClock(autojump_threshold=0)})],
        ids=["trio-mockclock"],
    )


@pytest.fixture
def lifecycle_app() -> object:
    """The ASGI app under test: define this fixture (in ``conftest.py``, say)."""
    raise pytest.UsageError(
        "The lifecycle_* fixtures need to know which app to test: define a fixture named "
        "lifecycle_app returning it, e.g. `@pytest.fixture\\ndef lifecycle_app(): return app`."
    )


@pytest.fixture
def lifecycle_client_options() -> Mapping[str, Any]:
    """Keyword arguments for `lifecycle.testing.lifespan_client`; override to change them."""
    return {}


@pytest.fixture
async def lifecycle_client(
    lifecycle_app: Any, lifecycle_client_options: Mapping[str, Any]
) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client talking to ``lifecycle_app``, whose lifespan runs for the test."""
    from .testing import lifespan_client

    async with lifespan_client(lifecycle_app, **lifecycle_client_options) as client:
        yield client


@pytest.fixture
def lifecycle_instance(lifecycle_app: Any) -> Lifecycle:
    """The `lifecycle.Lifecycle` whose lifespan ``lifecycle_app`` runs."""
    return _find_lifecycle(lifecycle_app)


def _find_lifecycle(lifecycle_app: object) -> Lifecycle:
    from ._lifecycle import Lifecycle

    app = lifecycle_app
    seen: set[int] = set()
    while app is not None and id(app) not in seen:
        seen.add(id(app))
        router = getattr(app, "router", None)
        lifespan = getattr(router, "lifespan_context", None)
        owner = getattr(lifespan, "__self__", None)
        if isinstance(owner, Lifecycle):
            return owner
        app = getattr(app, "app", None)  # the app a middleware wraps
    raise pytest.UsageError(
        f"Could not find the Lifecycle of {lifecycle_app!r}: its lifespan is not a "
        f"Lifecycle's lifespan (lc.lifespan). Define a fixture named lifecycle_instance "
        f"returning the Lifecycle."
    )


@pytest.fixture
async def lifecycle_services(
    lifecycle_client: httpx.AsyncClient, lifecycle_instance: Lifecycle
) -> Services:
    """The started services of ``lifecycle_instance``, running for the test."""
    return await lifecycle_instance.wait_started()


@pytest.fixture
def lifecycle_faults(lifecycle_instance: Lifecycle) -> Iterator[Faults]:
    """Faults to inject into ``lifecycle_instance``'s services during the test."""
    from .testing import inject_faults

    with inject_faults(lifecycle_instance) as faults:
        yield faults


@pytest.fixture
def lifecycle_order(lifecycle_instance: Lifecycle) -> OrderAssertions:
    """Start and stop order assertions about ``lifecycle_instance``."""
    from .testing import OrderAssertions

    return OrderAssertions(lifecycle_instance)


@pytest.fixture
def lifecycle_clock(anyio_backend: Any) -> MockClock:
    """The virtual clock of a test that runs on trio with it (see the module docstring)."""
    name, options = (anyio_backend, {}) if isinstance(anyio_backend, str) else anyio_backend
    clock = options.get("clock")
    if name != "trio" or clock is None:  # pragma: no cover - pytest_generate_tests sets it
        raise pytest.UsageError("lifecycle_clock needs the test to run on trio with a clock.")
    return clock  # type: ignore[no-any-return]
