"""Every exception `lifecycle` raises on purpose.

The hierarchy::

    Exception
     └── LifecycleError                  base of everything below
          ├── GraphError (ValueError)     the service graph is invalid: cycle, unknown
          │                               dependency, duplicate name, bad declaration
          ├── StartupError                startup failed; started services were rolled back
          ├── ShutdownError               one or more cleanups failed or timed out
          ├── ServiceNotRunning (LookupError)
          │                               a service's value was asked for while it is not running
          ├── QueueFull                   a bounded queue has no room (`*_nowait` put)
          ├── QueueEmpty                  a queue has nothing to take (`*_nowait` get)
          ├── PoolClosed (RuntimeError)   a worker pool is not accepting jobs
          ├── JobAbandoned                an accepted job never finished: its pool stopped
          └── DeadlineExceeded (TimeoutError)
                                          a request's deadline (or an upstream's) passed

Errors about what a caller passed (a bad timeout, a function of the wrong kind) are plain
`ValueError` / `TypeError` raised where the value is given, with a message naming the fix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = [
    "DeadlineExceeded",
    "GraphError",
    "JobAbandoned",
    "LifecycleError",
    "PoolClosed",
    "QueueEmpty",
    "QueueFull",
    "ServiceNotRunning",
    "ShutdownError",
    "StartupError",
]


class LifecycleError(Exception):
    """Base class of every error `lifecycle` raises on purpose."""


class GraphError(LifecycleError, ValueError):
    """The service graph is invalid; raised before any service starts.

    Raised for a dependency cycle (the message shows the path, ``'a' -> 'b' -> 'a'``), a
    dependency on an unknown service, a duplicate service name, or a declaration that cannot
    be wired (a positional-only parameter, a ``depends=`` key that is not a parameter).
    """


class StartupError(LifecycleError):
    """Startup failed, and the services that had started were stopped again.

    Attributes:
        failures: Each service whose start failed or timed out, mapped to its original
            exception (a `TimeoutError` for a timeout).
        cancelled: Services whose start was in progress and was cancelled because another
            service failed.
        rolled_back: Services that had started and were stopped again, in the order their
            stops began.
        rollback_errors: Cleanups that failed or timed out during the rollback, by service.
        interrupted_by: The signal (``"SIGINT"``, ``"SIGTERM"``) that aborted the startup, or
            ``None`` if it was not interrupted; ``failures`` is then empty.
    """

    def __init__(
        self,
        message: str,
        *,
        failures: Mapping[str, BaseException],
        cancelled: Sequence[str] = (),
        rolled_back: Sequence[str] = (),
        rollback_errors: Mapping[str, BaseException] | None = None,
        interrupted_by: str | None = None,
    ) -> None:
        super().__init__(message)
        self.failures: dict[str, BaseException] = dict(failures)
        self.cancelled: tuple[str, ...] = tuple(cancelled)
        self.rolled_back: tuple[str, ...] = tuple(rolled_back)
        self.rollback_errors: dict[str, BaseException] = dict(rollback_errors or {})
        self.interrupted_by = interrupted_by


class ShutdownError(LifecycleError):
    """Raised after every cleanup has been attempted, when some failed or timed out.

    Attributes:
        errors: Each service whose cleanup raised or ran past its deadline (a `TimeoutError`),
            or that crashed while running, mapped to the original exception.
    """

    def __init__(self, message: str, *, errors: Mapping[str, BaseException]) -> None:
        super().__init__(message)
        self.errors: dict[str, BaseException] = dict(errors)


class ServiceNotRunning(LifecycleError, LookupError):
    """A service's value was requested while the service is not running.

    Raised by typed accessors such as `lifecycle.fastapi.provide` when the app's lifespan has
    not started the service (or has already stopped it).

    Attributes:
        never_started: Whether the Lifecycle has never run in this process at all: at request
            time, the server did not run the app's lifespan.
    """

    def __init__(self, message: str, *, never_started: bool = False) -> None:
        super().__init__(message)
        self.never_started = never_started


class QueueFull(LifecycleError):
    """A bounded queue or worker pool has no room for another item.

    Raised by the non-blocking ``*_nowait`` variants; the blocking variants wait for room
    instead. At the HTTP edge it becomes a 503 with ``Retry-After``.
    """


class QueueEmpty(LifecycleError):
    """A non-blocking get found the queue empty."""


class PoolClosed(LifecycleError, RuntimeError):
    """A worker pool is not accepting jobs: it has not started yet, or it is draining.

    Raised by `WorkerPool.submit`, `submit_nowait` and `call`; also raised to submitters
    that were waiting for room when the drain began.
    """


class JobAbandoned(LifecycleError):
    """An accepted job never finished because its pool stopped (the drain deadline passed).

    Raised by `WorkerPool.call` to the caller waiting for that job's result.
    """


class DeadlineExceeded(LifecycleError, TimeoutError):
    """A deadline passed: the request's own, or an upstream's that received our budget.

    Raised by `deadline_scope` when its deadline passes, and by
    `lifecycle.httpx.DeadlineTransport` when the budget is spent before a request is sent or
    an upstream answers that its deadline expired. When it escapes an application running
    under `DeadlineMiddleware`, the middleware answers ``504`` with the expiry marker, exactly
    as for the request's own deadline.
    """
