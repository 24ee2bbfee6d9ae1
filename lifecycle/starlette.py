"""Starlette integration: routes and exception handlers.

Thin adapters over the framework-free core.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

import anyio
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ._problem import (
    PROBLEM_CONTENT_TYPE,
    QUEUE_FULL_TYPE,
    SERVICE_UNAVAILABLE_TYPE,
    SHUTTING_DOWN_TYPE,
    UNAUTHORIZED_TYPE,
    new_instance,
    problem_body,
)
from ._servers import no_lifespan_message
from .exceptions import PoolClosed, QueueFull, ServiceNotRunning

if TYPE_CHECKING:
    from ._lifecycle import Lifecycle

__all__ = ["ServiceUnavailable", "drain_route", "exception_handlers"]

_LOG = logging.getLogger("lifecycle.starlette")

# -- background work ----------------------------------------------------------------------


class ServiceUnavailable(HTTPException):
    """A 503: a service the request needs is not running (the app starts or drains).

    `lifecycle.fastapi.provide` raises it instead of `lifecycle.ServiceNotRunning`, so that
    FastAPI answers 503 with ``Retry-After`` rather than 500, even without the handlers of
    `exception_handlers` (which turn it into an ``application/problem+json`` body). The
    detail says nothing of the service; the log does.
    """

    def __init__(self, *, retry_after: int = 1) -> None:
        super().__init__(
            503,
            "A service this request needs is not running (the server is starting or "
            "shutting down); retry later.",
            headers={"Retry-After": str(retry_after), "Cache-Control": "no-store"},
        )


def exception_handlers(
    *, retry_after: int = 1
) -> dict[int | type[Exception], Callable[[Request, Any], Coroutine[Any, Any, Response]]]:
    """Exception handlers turning overload into ``503 Service Unavailable``.

    `QueueFull` (a worker pool or queue is full), `PoolClosed` (the app is draining) and
    `ServiceNotRunning` or `ServiceUnavailable` (a service the request needs is not running)
    become a 503 with ``Retry-After`` and an ``application/problem+json`` body. Pass them to
    ``Starlette(exception_handlers=...)`` or ``FastAPI(exception_handlers=...)``, or add them
    one by one with ``app.add_exception_handler``.

    Args:
        retry_after: Seconds the client should wait before retrying.

    Returns:
        A dict from exception class to handler, typed as Starlette and FastAPI take it.
    """
    if isinstance(retry_after, bool) or not isinstance(retry_after, int) or retry_after < 0:
        raise ValueError(f"retry_after must be whole seconds >= 0, not {retry_after!r}.")

    async def overloaded(request: Request, exc: Exception) -> Response:
        instance = new_instance()
        if isinstance(exc, QueueFull):
            kind, title = QUEUE_FULL_TYPE, "Service overloaded"
            detail = "The server is at capacity; retry later."
        elif isinstance(exc, PoolClosed):
            kind, title = SHUTTING_DOWN_TYPE, "Service shutting down"
            detail = "The server is shutting down; retry on another instance."
        else:
            kind, title = SERVICE_UNAVAILABLE_TYPE, "Service unavailable"
            cause = exc.__cause__
            if isinstance(cause, ServiceNotRunning):
                exc = cause  # what the log names
            if isinstance(exc, ServiceNotRunning) and exc.never_started:
                detail = no_lifespan_message()  # logged once, as an error
            else:
                detail = (
                    "A service this request needs is not running (the server is starting or "
                    "shutting down); retry later."
                )
        body = problem_body(503, kind, title, detail, instance)
        _LOG.info("Answered 503 to %s %s (%s): %s", request.method, request.url.path, instance, exc)
        return Response(
            body,
            status_code=503,
            media_type=PROBLEM_CONTENT_TYPE,
            headers={"Retry-After": str(retry_after), "Cache-Control": "no-store"},
        )

    return {
        QueueFull: overloaded,
        PoolClosed: overloaded,
        ServiceNotRunning: overloaded,
        ServiceUnavailable: overloaded,
    }


# -- drain --------------------------------------------------------------------------------


def drain_route(lifecycle: Lifecycle, *, token: str, path: str = "/drain") -> Route:
    """An authenticated ``POST`` route that begins the graceful drain, for a preStop hook.

    The call fails readiness at once (`Lifecycle.begin_drain`), then answers once
    ``drain_delay`` has passed since the drain began, so a Kubernetes ``preStop`` HTTP hook
    holds SIGTERM back for exactly the delay; the SIGTERM that follows is handed straight to
    the server. It needs ``Authorization: Bearer <token>``; anything else gets 401. Its path
    is exempt from `DeadlineMiddleware` and `ConcurrencyLimitMiddleware` by default (it waits
    out the drain delay, and must answer when the service is saturated): mounted elsewhere,
    add that path to their ``exempt_paths``.

    Add it with ``Starlette(routes=[drain_route(lc, token=...)])`` or, on FastAPI,
    ``app.router.routes.append(drain_route(lc, token=...))``.

    Args:
        lifecycle: The app's `Lifecycle`.
        token: The shared secret callers must present; keep it out of the image (an
            environment variable from a Kubernetes Secret, say).
        path: Where to mount the route.

    Returns:
        The route.
    """
    if not isinstance(token, str) or len(token) < 16:
        raise ValueError(
            "drain_route needs a token of at least 16 characters, so that the drain cannot be "
            "triggered by guessing; generate one with `python -c 'import secrets; "
            "print(secrets.token_urlsafe())'`."
        )
    expected = token.encode()

    async def drain(request: Request) -> Response:
        if not _presents_token(request, expected):
            instance = new_instance()
            _LOG.info(
                "Refused a drain call to %s (%s): it presented no valid bearer token.",
                request.url.path,
                instance,
            )
            return Response(
                problem_body(
                    401,
                    UNAUTHORIZED_TYPE,
                    "Unauthorized",
                    "This hook needs the drain token as a bearer token.",
                    instance,
                ),
                status_code=401,
                headers={"WWW-Authenticate": "Bearer", "Cache-Control": "no-store"},
                media_type=PROBLEM_CONTENT_TYPE,
            )
        lifecycle.begin_drain()
        began = lifecycle.drain_began
        remaining = 0.0 if began is None else began + lifecycle.drain_delay - time.monotonic()
        if remaining > 0:
            await anyio.sleep(remaining)
        return JSONResponse({"draining": True, "drain_delay": lifecycle.drain_delay})

    return Route(path, drain, methods=["POST"], name="lifecycle_drain")


def _presents_token(request: Request, token: bytes) -> bool:
    """Whether the request carries ``Authorization: Bearer <token>`` (scheme in any case)."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    # Header values arrive decoded as latin-1: encoding them back gives the bytes sent.
    presented = credentials.strip().encode("latin-1")
    return scheme.lower() == "bearer" and hmac.compare_digest(presented, token)


# -- health -------------------------------------------------------------------------------
# Imported here rather than at the top so that this section stays self-contained.
import logging  # noqa: E402

from ._health import HEALTH_JSON, HealthReport, HealthStatus  # noqa: E402
from ._timeline import LifecycleState  # noqa: E402

__all__ += ["health_routes"]

_health_logger = logging.getLogger("lifecycle.health")
_NO_STORE = {"Cache-Control": "no-store"}


def health_routes(
    lifecycle: Lifecycle,
    *,
    livez: str | None = "/livez",
    readyz: str | None = "/readyz",
    startupz: str | None = "/startupz",
    healthz: str | None = "/healthz",
    details_token: str | None = None,
    show_details: Callable[[Request], bool] | None = None,
    status_codes: Mapping[HealthStatus, int] | None = None,
) -> list[Route]:
    """The probe routes: liveness, readiness, startup and the full health report.

    - ``/livez``: the process and its event loop are healthy (never a dependency);
    - ``/readyz``: startup finished, no drain begun, every critical check passing, nothing
      registered for readiness failing (a supervised task that gave up);
    - ``/startupz``: startup finished;
    - ``/healthz``: everything, non-critical checks included.

    Each ``GET`` (and ``HEAD``) answers from cached state, without awaiting anything, with an
    ``application/health+json`` body and ``Cache-Control: no-store``: ``200`` for ``pass``
    and ``warn``, ``503`` for ``fail`` (see ``status_codes``). Error text and observed values
    are left out unless the request presents ``Authorization: Bearer <details_token>`` or
    ``show_details(request)`` returns true, since a failing check's message may hold a
    connection string.

    Add them with ``Starlette(routes=[*health_routes(lc), ...])``. The default paths are in
    the default exempt paths of `lifecycle.DeadlineMiddleware` and
    `lifecycle.ConcurrencyLimitMiddleware`; pass other paths in their ``exempt_paths`` too.

    Args:
        lifecycle: The app's `Lifecycle`; call this before it starts.
        livez: Path of the liveness probe, or ``None`` for none.
        readyz: Path of the readiness probe, or ``None`` for none.
        startupz: Path of the startup probe, or ``None`` for none.
        healthz: Path of the full report, or ``None`` for none.
        details_token: A secret of at least 16 characters; requests presenting it as a
            bearer token see the details.
        show_details: A predicate on the request; requests for which it returns true see the
            details (``lambda request: True`` shows them to everyone, for local development).
        status_codes: HTTP status per health status, overriding the defaults
            (``{PASS: 200, WARN: 200, FAIL: 503}``).

    Returns:
        The routes, in the order above.

    Raises:
        TypeError: A ``status_codes`` key is not a `lifecycle.HealthStatus`.
        ValueError: A path does not start with ``/``, the token is too short, or a status
            code is not an HTTP status.
    """
    monitor = lifecycle.health
    codes = {HealthStatus.PASS: 200, HealthStatus.WARN: 200, HealthStatus.FAIL: 503}
    for status, code in (status_codes or {}).items():
        if not isinstance(status, HealthStatus):
            raise TypeError(f"status_codes keys must be lifecycle.HealthStatus, not {status!r}.")
        if isinstance(code, bool) or not isinstance(code, int) or not 100 <= code <= 599:
            raise ValueError(f"status_codes[{status}] must be an HTTP status code, not {code!r}.")
        codes[status] = code
    expected: bytes | None = None
    if details_token is not None:
        if not isinstance(details_token, str) or len(details_token) < 16:
            raise ValueError(
                "details_token must be a string of at least 16 characters, so that it cannot "
                "be guessed; generate one with `python -c 'import secrets; "
                "print(secrets.token_urlsafe())'`."
            )
        expected = details_token.encode()

    def may_see_details(request: Request) -> bool:
        if expected is not None and _presents_token(request, expected):
            return True
        if show_details is not None:
            try:
                return bool(show_details(request))
            except Exception as exc:
                _health_logger.error(
                    "show_details raised %r; details are hidden from this request.",
                    exc,
                    exc_info=exc,
                )
        return False

    def answer(report: HealthReport, request: Request) -> Response:
        body = report.to_json(details=may_see_details(request))
        if lifecycle.state is LifecycleState.IDLE:
            # A probe of an app whose lifespan never ran: say why, to everyone (it is no secret).
            document = json.loads(body)
            document["output"] = no_lifespan_message()
            body = json.dumps(document).encode()
        return Response(
            body,
            status_code=codes[report.status],
            media_type=HEALTH_JSON,
            headers=_NO_STORE,
        )

    async def live(request: Request) -> Response:
        return answer(monitor.liveness(), request)

    async def ready(request: Request) -> Response:
        return answer(monitor.readiness(), request)

    async def started(request: Request) -> Response:
        return answer(monitor.startup(), request)

    async def health(request: Request) -> Response:
        report = monitor.report()
        if not may_see_details(request):
            return answer(report, request)
        # With details, the full report also shows the start/stop timeline as a Gantt chart.
        body = report.to_dict(details=True)
        body["timeline"] = lifecycle.timeline().gantt().splitlines()
        return Response(
            json.dumps(body),
            status_code=codes[report.status],
            media_type=HEALTH_JSON,
            headers=_NO_STORE,
        )

    routes = []
    for path, endpoint, name in (
        (livez, live, "lifecycle_livez"),
        (readyz, ready, "lifecycle_readyz"),
        (startupz, started, "lifecycle_startupz"),
        (healthz, health, "lifecycle_healthz"),
    ):
        if path is None:
            continue
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"Health route paths must start with '/', not {path!r}.")
        routes.append(Route(path, endpoint, methods=["GET"], name=name))
    return routes


# -- metrics ------------------------------------------------------------------------------
# Imported here rather than at the top so that this section stays self-contained.
if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

__all__ += ["metrics_route"]


def metrics_route(registry: CollectorRegistry | None = None, *, path: str = "/metrics") -> Route:
    """A ``GET`` route serving a prometheus-client registry for Prometheus to scrape.

    The exposition format follows the scraper's ``Accept`` header (the Prometheus text
    format, or OpenMetrics when asked for), ``?name[]=...`` restricts the answer to some
    metrics, the body is gzipped when the scraper accepts it (Prometheus does), and every
    answer carries ``Cache-Control: no-store``; prometheus-client's own exposition helpers
    do the work. Pair it with `lifecycle.instrument_metrics`::

        metrics = lifecycle.instrument_metrics(lc, registry=registry)
        app = Starlette(lifespan=lc.lifespan, routes=[metrics_route(registry)])

    In prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set, as under
    ``uvicorn --workers N``) and without a ``registry``, it serves what every process wrote
    to that directory, merged, after writing this process's current values: one scrape sees
    every worker.

    The default exempt paths of `lifecycle.DeadlineMiddleware` and
    `lifecycle.ConcurrencyLimitMiddleware` include ``/metrics``, so a saturated service still
    answers its scraper.

    Args:
        registry: The registry to serve; ``None`` for prometheus-client's default
            ``REGISTRY``, or in multiprocess mode the merged view of every process.
        path: Where to mount the route.

    Returns:
        The route.

    Raises:
        ImportError: prometheus-client is not installed
            (``pip install 'anyio-lifecycle[metrics]'``).
        ValueError: ``PROMETHEUS_MULTIPROC_DIR`` names no directory.
    """
    from ._metrics import multiprocess_directory, refresh_multiprocess, require_prometheus

    require_prometheus()
    import gzip

    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.exposition import choose_encoder, gzip_accepted

    directory = multiprocess_directory() if registry is None else None

    def source() -> CollectorRegistry:
        if directory is None:
            return registry if registry is not None else REGISTRY
        from prometheus_client.multiprocess import MultiProcessCollector

        refresh_multiprocess()
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=directory)  # type: ignore[no-untyped-call]
        return merged

    async def metrics(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        names = request.query_params.getlist("name[]")
        served = source()
        body = encoder(served.restricted_registry(names) if names else served)
        headers = {
            "Content-Type": content_type,
            "Cache-Control": "no-store",
            "Vary": "Accept-Encoding",
        }
        if gzip_accepted(request.headers.get("accept-encoding", "")):
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        return Response(body, headers=headers)

    return Route(path, metrics, methods=["GET"], name="lifecycle_metrics")
