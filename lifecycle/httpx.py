"""httpx integration: outbound calls bounded by, and carrying, the current deadline.

`DeadlineTransport` wraps an httpx async transport. Inside a request handled by
`lifecycle.DeadlineMiddleware` (or any anyio deadline), each outgoing request:

- fails fast with `DeadlineExceeded`, without being sent, when the budget left (minus
  ``reserve``) is spent;
- gets every httpx timeout (connect, read, write, pool) capped at that budget, and runs, its
  response body included, under a cancel scope with that deadline, so that retries made by the
  wrapped transport (``httpx.AsyncHTTPTransport(retries=...)``) stay inside it too;
- carries the budget in ``x-request-timeout-ms`` (relative, integer milliseconds), to every
  host or only to an allow-list;
- raises `DeadlineExceeded` when the upstream answers 504 with ``x-deadline-expired``: the
  budget we gave it is spent, so ours nearly is, and the middleware turns it into our own 504
  with the marker, hop after hop.

Outside any deadline the transport only forwards. Importing this module needs the ``httpx``
extra (``pip install 'anyio-lifecycle[httpx]'``)::

    client = httpx.AsyncClient(transport=lifecycle.httpx.DeadlineTransport())
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator, Iterable
from typing import Final, NoReturn

import anyio
import anyio.lowlevel
import httpx

from . import _deadline
from ._deadline import DEADLINE_EXPIRED_HEADER
from ._validate import seconds

__all__ = ["DeadlineExceeded", "DeadlineTransport"]

_TIMEOUT_KEYS: Final = ("connect", "read", "write", "pool")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")


class DeadlineExceeded(_deadline.DeadlineExceeded, httpx.TimeoutException):
    """The deadline of an outbound request passed, or the upstream reported it expired.

    Both a `lifecycle.DeadlineExceeded` (so `lifecycle.DeadlineMiddleware` answers 504 with
    the expiry marker when it escapes a handler) and an `httpx.TimeoutException` (so code that
    handles httpx timeouts handles it too; retrying it fails fast while the budget is spent).
    """

    def __init__(self, message: str, *, request: httpx.Request) -> None:
        httpx.TimeoutException.__init__(self, message, request=request)


class _DeadlineStream(httpx.AsyncByteStream):
    """A response body whose every read is bounded by the request's outbound deadline."""

    def __init__(
        self,
        stream: httpx.AsyncByteStream,
        deadline: float,
        effective: float,
        request: httpx.Request,
    ) -> None:
        self._stream = stream
        self._deadline = deadline
        self._effective = effective
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunks = self._stream.__aiter__()
        while True:
            with anyio.CancelScope(deadline=self._deadline) as scope:
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    return
            if scope.cancelled_caught:
                DeadlineTransport._expired(
                    self._effective,
                    self._request,
                    f"the deadline passed while reading the response body of "
                    f"{self._request.method} {self._request.url}",
                )
            yield chunk

    async def aclose(self) -> None:
        await self._stream.aclose()


def _check_hosts(hosts: Iterable[str] | None) -> tuple[frozenset[str], tuple[str, ...]] | None:
    if hosts is None:
        return None
    if isinstance(hosts, str | bytes):
        raise TypeError(
            f"hosts must be a collection of host names, not the single string {hosts!r}; "
            f"use hosts=[{hosts!r}]."
        )
    exact: set[str] = set()
    suffixes: list[str] = []
    for host in hosts:
        if not isinstance(host, str) or not host or host.strip() != host:
            raise ValueError(
                f"Host {host!r} in hosts must be a host name such as 'api.internal' or a "
                "pattern such as '*.internal'."
            )
        if host.startswith("*."):
            suffixes.append(host[1:].lower())
        else:
            exact.add(host.lower())
    return frozenset(exact), tuple(suffixes)


class DeadlineTransport(httpx.AsyncBaseTransport):
    """An httpx async transport that bounds outbound requests by the current deadline.

    The budget of an outgoing request is `lifecycle.remaining` minus ``reserve``, read when the
    request is sent. When there is no deadline, requests pass through unchanged. Otherwise:
    a spent budget raises `DeadlineExceeded` without sending; each httpx timeout becomes
    ``min(configured, budget)``; the whole exchange, retries and response body included, is
    bounded by the budget (`DeadlineExceeded` when it runs out); and the budget is sent in
    ``header``, unless the host is outside ``hosts``.

    A 504 with ``x-deadline-expired`` from a host that was sent the budget raises
    `DeadlineExceeded` (the response is closed), so the expiry propagates hop by hop.

    Retries made by the caller (a retry loop around ``client.get``) recompute the budget at
    each attempt and fail fast once it is spent.

    Args:
        transport: The transport to wrap; a new ``httpx.AsyncHTTPTransport()`` by default.
            The wrapper closes it when it is closed.
        header: Header that carries the budget, in integer milliseconds. A value the caller
            already set is kept when it is smaller.
        reserve: Seconds kept back from the budget, for this service to answer once the
            outbound call gives up.
        hosts: Hosts that may receive the budget header (exact names, or ``*.suffix``
            patterns matching subdomains); ``None`` for every host. Requests to other hosts
            are still bounded by the deadline.

    Raises:
        TypeError: An option has the wrong type.
        ValueError: An option is out of range or malformed.
    """

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        header: str = "x-request-timeout-ms",
        reserve: float = 0.02,
        hosts: Iterable[str] | None = None,
    ) -> None:
        if transport is not None and not isinstance(transport, httpx.AsyncBaseTransport):
            raise TypeError(
                f"transport must be an httpx.AsyncBaseTransport, got {transport!r}; wrap "
                "httpx.AsyncHTTPTransport(...) or another async transport."
            )
        if not isinstance(header, str) or not _HEADER_NAME.fullmatch(header.lower()):
            raise ValueError(f"header {header!r} is not a valid HTTP header name.")
        seconds("reserve", reserve, zero=True)
        self._transport = transport if transport is not None else httpx.AsyncHTTPTransport()
        self._header = header.lower()
        self._reserve = float(reserve)
        self._hosts = _check_hosts(hosts)

    def _propagates_to(self, host: str) -> bool:
        if self._hosts is None:
            return True
        exact, suffixes = self._hosts
        host = host.lower()
        return host in exact or host.endswith(suffixes)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the wrapped transport, bounded by the current deadline.

        Args:
            request: The outgoing request.

        Returns:
            The response, whose body reads are bounded by the same deadline.

        Raises:
            DeadlineExceeded: The budget was spent before sending or ran out during the
                exchange, or the upstream answered 504 with ``x-deadline-expired``.
        """
        effective = anyio.current_effective_deadline()
        if effective == math.inf:
            return await self._transport.handle_async_request(request)
        now = anyio.current_time()
        budget = effective - now - self._reserve
        if budget < 0.001:
            # An enclosing scope that is already cancelled must surface as a cancellation.
            await anyio.lowlevel.checkpoint()
            self._expired(
                effective,
                request,
                f"the deadline leaves {max(effective - now, 0.0) * 1000:.0f} ms, no more than "
                f"the {self._reserve * 1000:.0f} ms reserve; {request.method} {request.url} was "
                "not sent",
            )

        configured = request.extensions.get("timeout", {})
        timeouts = {}
        for key in _TIMEOUT_KEYS:
            value = configured.get(key)
            timeouts[key] = budget if value is None else min(value, budget)

        # The caller's request is left untouched: httpx builds a redirected request from its
        # headers, and the budget must not follow a redirect to a host outside ``hosts``.
        headers = request.headers.copy()
        propagated = self._propagates_to(request.url.host)
        if propagated:
            milliseconds = int(budget * 1000)
            existing = headers.get(self._header, "")
            smaller = (
                existing.isascii() and existing.isdigit() and 0 < int(existing) <= milliseconds
            )
            if not smaller:
                headers[self._header] = str(milliseconds)
        sent = httpx.Request(
            request.method,
            request.url,
            headers=headers,
            stream=request.stream,
            extensions={**request.extensions, "timeout": timeouts},
        )

        deadline = now + budget
        try:
            with anyio.CancelScope(deadline=deadline) as scope:
                response = await self._transport.handle_async_request(sent)
        except httpx.TimeoutException as exc:
            # A timeout capped at the budget is the budget running out.
            if anyio.current_time() >= deadline - 0.001:
                self._expired(
                    effective,
                    request,
                    f"the deadline passed during {request.method} {request.url} ({exc!r})",
                    cause=exc,
                )
            raise
        if scope.cancelled_caught:
            self._expired(
                effective,
                request,
                f"the deadline passed after {budget * 1000:.0f} ms waiting for "
                f"{request.method} {request.url}",
            )

        expired_upstream = DEADLINE_EXPIRED_HEADER in response.headers
        if propagated and response.status_code == 504 and expired_upstream:
            await response.aclose()
            self._expired(
                effective,
                request,
                f"{request.method} {request.url} answered 504 with {DEADLINE_EXPIRED_HEADER}: "
                f"the {budget * 1000:.0f} ms budget it was given expired there",
            )

        if isinstance(response.stream, httpx.AsyncByteStream):
            response.stream = _DeadlineStream(response.stream, deadline, effective, request)
        return response

    @staticmethod
    def _expired(
        effective: float,
        request: httpx.Request,
        reason: str,
        *,
        cause: BaseException | None = None,
    ) -> NoReturn:
        # When the request's own deadline is the one spent, the whole request ends as expired
        # (a 504 with the marker), even if this exception is caught on its way up.
        _deadline.expire_request(effective, reason)
        raise DeadlineExceeded(reason[0].upper() + reason[1:] + ".", request=request) from cause

    async def aclose(self) -> None:
        """Close the wrapped transport."""
        await self._transport.aclose()
