"""Problem bodies (RFC 9457): the one place the package builds its error responses.

Every error response lifecycle answers itself is ``application/problem+json`` with the same
members: ``type`` (one of the URIs below, documented in the README), ``title``, ``status``,
``detail`` (safe to show an external caller: never an internal URL, host or exception text)
and ``instance``, a ``urn:uuid:`` naming this occurrence. The same ``instance`` is written to
the ``lifecycle`` logs next to whatever internal detail explains the error, so an operator can
find the cause of the answer a caller quotes.

Types:

- ``urn:lifecycle:problem:deadline-expired`` (504): the request's budget ran out, here or
  upstream.
- ``urn:lifecycle:problem:malformed-budget`` (400): a budget header is malformed (strict mode).
- ``urn:lifecycle:problem:overloaded`` (503): admission control found no free slot in time.
- ``urn:lifecycle:problem:queue-full`` (503): a worker pool or queue is full (`QueueFull`).
- ``urn:lifecycle:problem:shutting-down`` (503): the service is draining (`PoolClosed`).
- ``urn:lifecycle:problem:service-unavailable`` (503): a service the request needs is not
  running (`ServiceNotRunning`).
- ``urn:lifecycle:problem:unauthorized`` (401): a call of the drain hook without its token.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any, Final

__all__ = [
    "DEADLINE_EXPIRED_TYPE",
    "MALFORMED_BUDGET_TYPE",
    "OVERLOADED_TYPE",
    "PROBLEM_CONTENT_TYPE",
    "QUEUE_FULL_TYPE",
    "SERVICE_UNAVAILABLE_TYPE",
    "SHUTTING_DOWN_TYPE",
    "UNAUTHORIZED_TYPE",
    "new_instance",
    "problem_body",
    "send_problem",
]

DEADLINE_EXPIRED_TYPE: Final = "urn:lifecycle:problem:deadline-expired"
"""RFC 9457 problem type of the 504 answered when a request's deadline expired."""

MALFORMED_BUDGET_TYPE: Final = "urn:lifecycle:problem:malformed-budget"
"""RFC 9457 problem type of the 400 answered to a malformed budget header in strict mode."""

OVERLOADED_TYPE: Final = "urn:lifecycle:problem:overloaded"
"""RFC 9457 problem type of the 503 answered when no admission slot is free in time."""

QUEUE_FULL_TYPE: Final = "urn:lifecycle:problem:queue-full"
"""RFC 9457 problem type of the 503 answered to `QueueFull`."""

SHUTTING_DOWN_TYPE: Final = "urn:lifecycle:problem:shutting-down"
"""RFC 9457 problem type of the 503 answered to `PoolClosed` (the service is draining)."""

SERVICE_UNAVAILABLE_TYPE: Final = "urn:lifecycle:problem:service-unavailable"
"""RFC 9457 problem type of the 503 answered when a service a request needs is not running."""

UNAUTHORIZED_TYPE: Final = "urn:lifecycle:problem:unauthorized"
"""RFC 9457 problem type of the 401 answered to a drain call without the right token."""

PROBLEM_CONTENT_TYPE: Final = "application/problem+json"

_CONTENT_TYPE_HEADER: Final = (b"content-type", PROBLEM_CONTENT_TYPE.encode("ascii"))
_NO_STORE: Final = (b"cache-control", b"no-store")


def new_instance() -> str:
    """Return a fresh ``instance`` URI naming one occurrence of a problem."""
    return f"urn:uuid:{uuid.uuid4()}"


def problem_body(status: int, type_: str, title: str, detail: str, instance: str) -> bytes:
    """Return the JSON body of a problem response."""
    problem = {
        "type": type_,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": instance,
    }
    return json.dumps(problem, ensure_ascii=True).encode("ascii")


async def send_problem(
    send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    status: int,
    *,
    type_: str,
    title: str,
    detail: str,
    instance: str | None = None,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> str:
    """Send a complete problem response over ASGI; return its ``instance``."""
    if instance is None:
        instance = new_instance()
    body = problem_body(status, type_, title, detail, instance)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                _CONTENT_TYPE_HEADER,
                (b"content-length", str(len(body)).encode("ascii")),
                _NO_STORE,
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
    return instance
