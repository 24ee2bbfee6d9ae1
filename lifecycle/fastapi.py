"""FastAPI integration: typed dependencies and routers.

Thin adapters over the framework-free core; importing this module needs the ``fastapi``
extra (``pip install 'anyio-lifecycle[fastapi]'``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ._kernel import Service
from ._servers import no_lifespan_message
from ._timeline import LifecycleState
from ._validate import seconds
from .exceptions import ServiceNotRunning
from .starlette import ServiceUnavailable

__all__ = ["provide", "request_timeout"]

T = TypeVar("T")

_log = logging.getLogger("lifecycle.fastapi")
_RUNS = (LifecycleState.STARTING, LifecycleState.RUNNING, LifecycleState.STOPPING)

# -- service values -----------------------------------------------------------------------


def provide(service: Service[T]) -> Callable[[], Awaitable[T]]:
    """A FastAPI dependency returning a running service's value, keeping its type.

    Example::

        Database = Annotated[DatabasePool, Depends(provide(db))]

        @app.get("/items")
        async def items(database: Database) -> list[Item]: ...

    The dependency is async, so FastAPI calls it on the event loop rather than in a
    thread.

    Args:
        service: The `Service` whose value to inject.

    Returns:
        The dependency callable.

    Raises:
        lifecycle.starlette.ServiceUnavailable: At request time, while the app's lifespan is
            not running the service (it starts, drains or has stopped): a 503 with
            ``Retry-After``, never a 500.
    """
    lifecycle = service.lifecycle

    async def dependency() -> T:
        try:
            return lifecycle.get(service)
        except ServiceNotRunning as exc:
            if exc.never_started:
                # The server never ran the lifespan: said once, as an error, with the fix.
                no_lifespan_message()
            elif lifecycle.state in (LifecycleState.STOPPED, LifecycleState.FAILED):
                _log.warning("%s Answering 503.", exc)
            else:  # a start or a drain: the ordinary life of a server
                _log.info("%s Answering 503.", exc)
            raise ServiceUnavailable from exc

    dependency.__name__ = f"provide_{service.name}"
    dependency.__qualname__ = dependency.__name__
    return dependency


# -- health -------------------------------------------------------------------------------
# Imported here rather than at the top so that this section stays self-contained.
from collections.abc import Mapping  # noqa: E402

import fastapi  # noqa: E402
from starlette.requests import Request  # noqa: E402

from ._health import HealthStatus  # noqa: E402
from ._lifecycle import Lifecycle  # noqa: E402
from .starlette import health_routes  # noqa: E402

__all__ += ["health_router"]


def health_router(
    lifecycle: Lifecycle,
    *,
    livez: str | None = "/livez",
    readyz: str | None = "/readyz",
    startupz: str | None = "/startupz",
    healthz: str | None = "/healthz",
    details_token: str | None = None,
    show_details: Callable[[Request], bool] | None = None,
    status_codes: Mapping[HealthStatus, int] | None = None,
) -> fastapi.APIRouter:
    """A router with the probe routes: ``/livez``, ``/readyz``, ``/startupz``, ``/healthz``.

    The FastAPI form of `lifecycle.starlette.health_routes` (same options, bodies and status
    codes)::

        app = FastAPI(lifespan=lc.lifespan)
        app.include_router(lifecycle.fastapi.health_router(lc, details_token=token))

    The routes are plain Starlette routes: they skip FastAPI's dependency resolution (and the
    router's ``dependencies``), answer from cached state without awaiting anything, and are
    left out of the OpenAPI schema.

    Args:
        lifecycle: The app's `Lifecycle`; call this before it starts.
        livez: Path of the liveness probe, or ``None`` for none.
        readyz: Path of the readiness probe, or ``None`` for none.
        startupz: Path of the startup probe, or ``None`` for none.
        healthz: Path of the full report, or ``None`` for none.
        details_token: A secret of at least 16 characters; requests presenting it as a
            bearer token see error text and observed values.
        show_details: A predicate on the request; requests for which it returns true see the
            details.
        status_codes: HTTP status per health status, overriding ``{PASS: 200, WARN: 200,
            FAIL: 503}``.

    Returns:
        The router, for ``app.include_router``.

    Raises:
        TypeError: A ``status_codes`` key is not a `lifecycle.HealthStatus`.
        ValueError: A path does not start with ``/``, the token is too short, or a status
            code is not an HTTP status.
    """
    router = fastapi.APIRouter()
    for route in health_routes(
        lifecycle,
        livez=livez,
        readyz=readyz,
        startupz=startupz,
        healthz=healthz,
        details_token=details_token,
        show_details=show_details,
        status_codes=status_codes,
    ):
        router.add_route(
            route.path, route.endpoint, methods=["GET"], name=route.name, include_in_schema=False
        )
    return router


# -- deadlines ----------------------------------------------------------------------------
# Imported here rather than at the top so that this section stays self-contained.
from fastapi import params  # noqa: E402

from . import _deadline  # noqa: E402


def request_timeout(timeout: float | None, *, keep_for_background: bool = False) -> params.Depends:
    """A route dependency that gives the route its own timeout, or none at all.

    The FastAPI form of `lifecycle.request_timeout`, applied while dependencies are resolved;
    list it first so that the dependencies after it run under the route's timeout::

        @app.get("/report", dependencies=[lifecycle.fastapi.request_timeout(120.0)])
        async def report() -> Report: ...

        @app.get("/events", dependencies=[lifecycle.fastapi.request_timeout(None)])
        async def events() -> StreamingResponse: ...  # opted out: no deadline

    The route's timeout replaces ``default_timeout`` and ``max_timeout`` of
    `lifecycle.DeadlineMiddleware` for the route and counts from the request's arrival; a
    client's shorter budget still wins.

    Args:
        timeout: Seconds, counted from the request's arrival; ``None`` for no deadline.
        keep_for_background: Keep the deadline for background tasks that run after the
            response; by default it is lifted once the response is complete.

    Returns:
        A ``Depends`` marker for a route's ``dependencies`` (or a parameter default).

    Raises:
        TypeError: ``timeout`` is not a number or ``None``.
        ValueError: ``timeout`` is not positive and finite.
    """
    checked = seconds("timeout", timeout, optional=True)
    # Applied from a dependency, it cannot open a scope of its own: the middleware must.
    _deadline.route_timeouts_need_scope()

    async def apply_request_timeout() -> None:
        _deadline.apply_route_timeout(checked, keep_for_background)

    return params.Depends(apply_request_timeout)


# -- metrics ------------------------------------------------------------------------------
# Imported here rather than at the top so that this section stays self-contained.
from typing import TYPE_CHECKING  # noqa: E402

from fastapi import APIRouter  # noqa: E402

from .starlette import metrics_route  # noqa: E402

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

__all__ += ["metrics_router"]


def metrics_router(
    registry: CollectorRegistry | None = None, *, path: str = "/metrics"
) -> APIRouter:
    """A router with a ``GET`` route serving a prometheus-client registry to Prometheus.

    The FastAPI form of `lifecycle.starlette.metrics_route` (same formats and headers), left
    out of the OpenAPI schema::

        metrics = lifecycle.instrument_metrics(lc, registry=registry)
        app = FastAPI(lifespan=lc.lifespan)
        app.include_router(lifecycle.fastapi.metrics_router(registry))

    Args:
        registry: The registry to serve; ``None`` for prometheus-client's default
            ``REGISTRY``.
        path: Where to mount the route.

    Returns:
        The router, for ``app.include_router``.

    Raises:
        ImportError: prometheus-client is not installed
            (``pip install 'anyio-lifecycle[metrics]'``).
    """
    router = APIRouter()
    route = metrics_route(registry, path=path)
    router.add_route(route.path, route.endpoint, methods=["GET"], include_in_schema=False)
    return router
