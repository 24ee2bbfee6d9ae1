"""Admission control: a bound on the HTTP requests a service handles at once.

Overload is made explicit at the edge: past ``max_concurrency`` requests in flight, a request
waits a bounded time in a bounded line for a slot, and is otherwise answered ``503`` with
``Retry-After`` before any of its work starts. Health probes and metrics are exempt, so a
saturated service still answers its orchestrator.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import anyio

from ._deadline import (
    DEFAULT_EXEMPT_PATHS,
    ASGIApp,
    Receive,
    Scope,
    Send,
    route_path,
    validate_exempt_paths,
)
from ._problem import OVERLOADED_TYPE, send_problem
from ._validate import count, seconds

__all__ = ["OVERLOADED_TYPE", "AdmissionStatistics", "ConcurrencyLimitMiddleware"]

_LOG = logging.getLogger("lifecycle.admission")


class _AdmissionObserver(Protocol):
    """What metrics watch of each request a `ConcurrencyLimitMiddleware` handles."""

    def request_ended(self, scope: Scope, root_path: str, outcome: str) -> None:
        """The request was answered, with ``outcome``.

        ``outcome`` is ``"admitted"`` (at once), ``"waited"`` (admitted after waiting for a
        slot) or ``"rejected"`` (answered 503). Called once the application returns (routing
        has filled in ``scope``), or after the 503; ``root_path`` is the request's as it
        reached the middleware.
        """


# Process-wide, like `lifecycle._deadline.observers`: `instrument_metrics` appends to it.
observers: list[_AdmissionObserver] = []
"""What watches every admitted or rejected request; empty by default: nothing per request."""


@dataclass(frozen=True, slots=True)
class AdmissionStatistics:
    """A snapshot of a `ConcurrencyLimitMiddleware`.

    Attributes:
        max_concurrency: The configured bound on requests in flight.
        in_flight: Requests admitted and running now.
        waiting: Requests waiting for a slot now.
        admitted: Requests admitted so far, at once or after waiting.
        waited: Requests among ``admitted`` that had to wait for their slot.
        rejected: Requests answered 503 so far: the line was full, or no slot came in time.
    """

    max_concurrency: int
    in_flight: int
    waiting: int
    admitted: int
    waited: int
    rejected: int


class ConcurrencyLimitMiddleware:
    """Pure ASGI middleware that admits at most ``max_concurrency`` HTTP requests at once.

    A request that finds every slot taken joins a line of at most ``max_waiting`` requests and
    waits up to ``max_wait`` seconds, first come first served. A request that finds the line
    full, or whose wait runs out, is answered ``503`` with ``Retry-After`` and an
    ``application/problem+json`` body of type `OVERLOADED_TYPE`, without running the
    application. A slot is held for the whole application call, background tasks that run
    after the response included.

    Put it inside `lifecycle.DeadlineMiddleware` so that time spent waiting for a slot counts
    against the request's deadline (a request whose deadline passes while waiting gets the
    504 of the deadline middleware).

    WebSocket and lifespan scopes, and HTTP requests to ``exempt_paths``, pass through
    without taking a slot.

    Args:
        app: The ASGI application to wrap.
        max_concurrency: Requests allowed in flight at once.
        max_waiting: Requests allowed to wait for a slot at once; ``None`` for as many as
            ``max_concurrency``, ``0`` to reject at once when the service is full.
        max_wait: Longest wait for a slot, in seconds; ``0`` to reject at once.
        retry_after: Seconds sent in ``Retry-After`` with each 503.
        exempt_paths: Request paths that bypass the limit (exact matches on the ASGI ``path``
            below ``root_path``, as routes match); health probes and metrics by default.

    Raises:
        TypeError: An option has the wrong type.
        ValueError: An option is out of range.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_concurrency: int,
        max_waiting: int | None = None,
        max_wait: float = 1.0,
        retry_after: int = 1,
        exempt_paths: Iterable[str] = DEFAULT_EXEMPT_PATHS,
    ) -> None:
        self.app = app
        self._max_concurrency = count("max_concurrency", max_concurrency, minimum=1)
        self._max_waiting = (
            self._max_concurrency
            if max_waiting is None
            else count("max_waiting", max_waiting, minimum=0)
        )
        self._max_wait = seconds("max_wait", max_wait, zero=True)
        self._retry_after = count("retry_after", retry_after, minimum=0)
        self._retry_after_header = str(self._retry_after).encode("ascii")
        self._exempt_paths = validate_exempt_paths(exempt_paths)
        # Not an anyio.Semaphore: that binds to the first event loop that waits on it, and one
        # middleware may serve several loops in turn (an app tested on asyncio, then trio).
        # Each waiter brings an event of its own loop instead; a freed slot goes straight to
        # the first waiter, so ``_free`` is 0 whenever anyone waits (first come, first served).
        self._free = self._max_concurrency
        self._waiters: deque[anyio.Event] = deque()
        self._in_flight = 0
        self._admitted = 0
        self._waited = 0
        self._rejected = 0

    def statistics(self) -> AdmissionStatistics:
        """Return the current load and counters of the middleware.

        Returns:
            A frozen snapshot; see `AdmissionStatistics`.
        """
        return AdmissionStatistics(
            max_concurrency=self._max_concurrency,
            in_flight=self._in_flight,
            waiting=len(self._waiters),
            admitted=self._admitted,
            waited=self._waited,
            rejected=self._rejected,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope) in self._exempt_paths:
            await self.app(scope, receive, send)
            return

        waited = False
        if self._free:
            self._free -= 1
        elif not await self._wait_for_slot():
            await self._reject(scope, send)
            if observers:
                for observer in observers:
                    observer.request_ended(scope, scope.get("root_path", ""), "rejected")
            return
        else:
            waited = True

        root_path = scope.get("root_path", "") if observers else ""
        self._admitted += 1
        self._in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self._in_flight -= 1
            self._release()
            if observers:
                outcome = "waited" if waited else "admitted"
                for observer in observers:
                    observer.request_ended(scope, root_path, outcome)

    def _release(self) -> None:
        """Give a slot back: to the first request in line, else to the free ones."""
        if self._waiters:
            self._waiters.popleft().set()
        else:
            self._free += 1

    async def _wait_for_slot(self) -> bool:
        """Wait in line for a slot; return whether one was handed over."""
        if len(self._waiters) >= self._max_waiting or self._max_wait == 0:
            return False
        handed = anyio.Event()
        self._waiters.append(handed)
        acquired = False
        try:
            with anyio.move_on_after(self._max_wait):
                await handed.wait()
            # A slot handed over as the wait ran out is still ours.
            acquired = handed.is_set()
        finally:
            if acquired:
                self._waited += 1
            elif handed.is_set():
                self._release()  # handed a slot while being cancelled: pass it on
            else:
                self._waiters.remove(handed)
        return acquired

    async def _reject(self, scope: Scope, send: Send) -> None:
        self._rejected += 1
        instance = await send_problem(
            send,
            503,
            type_=OVERLOADED_TYPE,
            title="Service overloaded",
            detail=f"The service is at capacity; retry after {self._retry_after} s.",
            headers=((b"retry-after", self._retry_after_header),),
        )
        _LOG.debug(
            "Rejected %s %s (%s): %d requests in flight (the limit) and %d waiting.",
            scope.get("method", "?"),
            scope["path"],
            instance,
            self._in_flight,
            len(self._waiters),
        )
