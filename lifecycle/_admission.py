"""Admission control: a bound on the HTTP requests a service handles at once.

Overload is made explicit at the edge: past ``max_concurrency`` requests in flight, a request
waits a bounded time in a bounded line for a slot, and is otherwise answered ``503`` with
``Retry-After`` before any of its work starts. Health probes and metrics are exempt, so a
saturated service still answers its orchestrator.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import anyio

from ._deadline import (
    DEFAULT_EXEMPT_PATHS,
    ASGIApp,
    Receive,
    Scope,
    Send,
    send_problem,
    validate_exempt_paths,
)

__all__ = ["OVERLOADED_TYPE", "AdmissionStatistics", "ConcurrencyLimitMiddleware"]

_LOG = logging.getLogger("lifecycle.admission")

OVERLOADED_TYPE: Final = "urn:lifecycle:problem:overloaded"
"""RFC 9457 problem type of the body of the 503 answered when no slot is free in time."""


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


def _check_int(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value!r}.")
    return value


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
        exempt_paths: Request paths (exact matches on the ASGI ``path``) that bypass the
            limit; health probes and metrics by default.

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
        self._max_concurrency = _check_int("max_concurrency", max_concurrency, minimum=1)
        self._max_waiting = (
            self._max_concurrency
            if max_waiting is None
            else _check_int("max_waiting", max_waiting, minimum=0)
        )
        if isinstance(max_wait, bool) or not isinstance(max_wait, int | float):
            raise TypeError(f"max_wait must be a number of seconds, got {max_wait!r}.")
        if not math.isfinite(max_wait) or max_wait < 0:
            raise ValueError(f"max_wait must be a finite number of seconds >= 0, got {max_wait!r}.")
        self._max_wait = float(max_wait)
        self._retry_after = _check_int("retry_after", retry_after, minimum=0)
        self._retry_after_header = str(self._retry_after).encode("ascii")
        self._exempt_paths = validate_exempt_paths(exempt_paths)
        # Created without a running loop, anyio defers binding it to a backend to first use.
        self._slots = anyio.Semaphore(self._max_concurrency)
        self._in_flight = 0
        self._waiting = 0
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
            waiting=self._waiting,
            admitted=self._admitted,
            waited=self._waited,
            rejected=self._rejected,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._exempt_paths:
            await self.app(scope, receive, send)
            return

        try:
            self._slots.acquire_nowait()
        except anyio.WouldBlock:
            if not await self._wait_for_slot():
                await self._reject(scope, send)
                return

        self._admitted += 1
        self._in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self._in_flight -= 1
            self._slots.release()

    async def _wait_for_slot(self) -> bool:
        """Wait in line for a slot; return whether one was acquired."""
        if self._waiting >= self._max_waiting or self._max_wait == 0:
            return False
        acquired = False
        self._waiting += 1
        try:
            with anyio.move_on_after(self._max_wait):
                await self._slots.acquire()
                acquired = True
        finally:
            self._waiting -= 1
        if acquired:
            self._waited += 1
        return acquired

    async def _reject(self, scope: Scope, send: Send) -> None:
        self._rejected += 1
        _LOG.debug(
            "Rejected %s %s: %d requests in flight and %d waiting.",
            scope.get("method", "?"),
            scope["path"],
            self._in_flight,
            self._waiting,
        )
        await send_problem(
            send,
            503,
            type_=OVERLOADED_TYPE,
            title="Service overloaded",
            detail=(
                f"The service is handling as many requests as it allows "
                f"({self._max_concurrency}) and none finished in time; retry after "
                f"{self._retry_after} s."
            ),
            headers=((b"retry-after", self._retry_after_header),),
        )
