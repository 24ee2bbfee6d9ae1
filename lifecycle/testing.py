"""Test kit: run an app's lifespan with an httpx client, inject faults, check the order.

Example::

    async with lifecycle.testing.lifespan_client(app) as client:
        response = await client.get("/items")

    with lifecycle.testing.inject_faults(lc) as faults:
        faults.fail_start("db")
        with pytest.raises(lifecycle.StartupError):
            async with lc.run():
                pass

``lifespan_client`` needs the ``httpx`` extra. The same tools are pytest fixtures in
`lifecycle.pytest_plugin`, which pytest loads by itself once lifecycle is installed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager, suppress
from typing import TYPE_CHECKING, Any, Literal, Never

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._kernel import Service
from ._lifecycle import Lifecycle

if TYPE_CHECKING:
    import httpx

__all__ = [
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "DEFAULT_STARTUP_TIMEOUT",
    "Faults",
    "LifespanNotSupported",
    "OrderAssertions",
    "assert_started_before",
    "assert_stopped_before",
    "inject_faults",
    "lifespan_client",
]

logger = logging.getLogger("lifecycle.testing")

DEFAULT_STARTUP_TIMEOUT = 5.0
"""Seconds `lifespan_client` waits for the app's startup by default."""

DEFAULT_SHUTDOWN_TIMEOUT = 5.0
"""Seconds `lifespan_client` waits for the app's shutdown by default."""

_LifespanMode = Literal["on", "auto", "off"]
_MODES = ("on", "auto", "off")
# What lifespan_client sets on the httpx client itself; passing them again would be ambiguous.
_RESERVED_CLIENT_OPTIONS = frozenset({"app", "transport", "base_url"})


class LifespanNotSupported(RuntimeError):
    """The app does not speak the ASGI lifespan protocol; raised by `lifespan_client`.

    An app is taken not to support the lifespan when it raises or returns before it first
    calls ``receive()`` on a lifespan scope (a bare ASGI app that asserts
    ``scope["type"] == "http"``, say). The app's own exception, if any, is the ``__cause__``.
    Pass ``lifespan="auto"`` to `lifespan_client` to serve such an app without a lifespan, as
    uvicorn's and hypercorn's default mode does.
    """


def lifespan_client(
    app: ASGIApp,
    *,
    base_url: str = "http://testserver",
    startup_timeout: float | None = DEFAULT_STARTUP_TIMEOUT,
    shutdown_timeout: float | None = DEFAULT_SHUTDOWN_TIMEOUT,
    lifespan: _LifespanMode = "on",
    client_options: Mapping[str, Any] | None = None,
    **unknown: Never,
) -> AbstractAsyncContextManager[httpx.AsyncClient]:
    """Run ``app``'s ASGI lifespan and yield an `httpx.AsyncClient` talking to it.

    The lifespan runs as a server would run it: startup completes before the client is
    yielded (so every service has started), each request sees a copy of the lifespan state
    (``request.state.<service>``), and shutdown runs when the block exits, whether it exits
    normally, by an exception or by a cancellation from outside (a test's ``move_on_after``):
    the app is shut down gracefully, never cancelled, unless its shutdown overruns
    ``shutdown_timeout``. Both waits are bounded by default, so a test never hangs on an app.

    An app that reports ``lifespan.startup.failed`` or ``lifespan.shutdown.failed`` has ended
    its lifespan: the client stops waiting at once (as uvicorn does), cancels whatever the app
    still runs, and raises the app's own exception if it raised one.

    Args:
        app: The ASGI application (a Starlette or FastAPI app, possibly wrapped in
            middleware).
        base_url: The client's base URL.
        startup_timeout: Seconds to wait for startup to complete, or ``None`` for no bound.
        shutdown_timeout: Seconds to wait for shutdown to complete, or ``None`` for no
            bound. On expiry the app's lifespan is cancelled.
        lifespan: ``"on"`` (the default) runs the lifespan and raises `LifespanNotSupported`
            for an app without lifespan support; ``"auto"`` serves such an app without a
            lifespan, logging it, as uvicorn's and hypercorn's default mode does; ``"off"``
            never runs the lifespan.
        client_options: Keyword arguments for `httpx.AsyncClient` (``headers``,
            ``cookies``, ``follow_redirects``, ``timeout``...), except ``transport`` and
            ``base_url``, which are set here.
        **unknown: Refused with a `TypeError`: httpx's options go in ``client_options``.

    Returns:
        An async context manager yielding the client.

    Raises:
        TypeError: An unknown keyword argument, or a ``client_options`` key set here.
        ValueError: A timeout is not a positive number of seconds, or ``lifespan`` is not
            ``"on"``, ``"auto"`` or ``"off"``.

    The context manager raises, on entry or on exit:

    * The app's own startup or shutdown exception (a `lifecycle.StartupError`, for instance),
      re-raised as itself. An exception from the block wins over a shutdown failure, which
      is added to it as a note.
    * `LifespanNotSupported`: with ``lifespan="on"``, the app does not support the lifespan.
    * `RuntimeError`: the app reported a lifespan failure, or returned, without raising.
    * `TimeoutError`: startup or shutdown overran its timeout.
    """
    if unknown:
        names = ", ".join(repr(name) for name in sorted(unknown))
        raise TypeError(
            f"lifespan_client() got unexpected keyword argument(s) {names}. It takes base_url, "
            f"startup_timeout, shutdown_timeout, lifespan and client_options; pass options for "
            f"httpx.AsyncClient as client_options={{...}}."
        )
    _check_timeout("startup_timeout", startup_timeout)
    _check_timeout("shutdown_timeout", shutdown_timeout)
    if lifespan not in _MODES:
        raise ValueError(
            f"lifespan_client(lifespan={lifespan!r}): lifespan must be 'on', 'auto' or 'off'."
        )
    options = dict(client_options or {})
    reserved = sorted(_RESERVED_CLIENT_OPTIONS & options.keys())
    if reserved:
        raise TypeError(
            f"lifespan_client(client_options=...) may not set {reserved!r}: the client talks "
            f"to the app through its own transport; pass base_url to lifespan_client itself."
        )
    return _lifespan_client(
        app,
        base_url=base_url,
        startup_timeout=startup_timeout,
        shutdown_timeout=shutdown_timeout,
        mode=lifespan,
        client_options=options,
    )


def _check_timeout(name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"lifespan_client({name}={value!r}): {name} must be a number of seconds or None."
        )
    if not 0 < value < math.inf:
        raise ValueError(
            f"lifespan_client({name}={value!r}): {name} must be a finite number of seconds "
            f"above 0, or None for no bound."
        )


@asynccontextmanager
async def _lifespan_client(
    app: ASGIApp,
    *,
    base_url: str,
    startup_timeout: float | None,
    shutdown_timeout: float | None,
    mode: _LifespanMode,
    client_options: dict[str, Any],
) -> AsyncIterator[httpx.AsyncClient]:
    import httpx

    if mode == "off":
        async with _client(httpx, app, {}, base_url, client_options) as client:
            yield client
        return

    cancelled = anyio.get_cancelled_exc_class()
    session = _LifespanSession(app)
    error: BaseException | None = None
    # The task group is entered and left by hand, rather than around the yield, so that an
    # exception from the block or from the app reaches the caller as itself, not wrapped in
    # the task group's exception group. The app's task never raises (its errors are kept).
    task_group = anyio.create_task_group()
    await task_group.__aenter__()
    try:
        task_group.start_soon(session.run, name="lifespan_client: the app's lifespan")
        error = await session.exchange(
            "lifespan.startup", startup_timeout, "startup_timeout", shielded=False
        )
        if isinstance(error, _Unsupported):
            if mode == "on":
                raise LifespanNotSupported(
                    f"The app {app!r} does not support the ASGI lifespan protocol: it "
                    f"{error.how} before receiving 'lifespan.startup'. Pass lifespan='auto' to "
                    f"lifespan_client to serve it without a lifespan (as uvicorn's default mode "
                    f"does), or lifespan='off' to skip the lifespan."
                ) from error.cause
            logger.info(
                "ASGI 'lifespan' protocol appears unsupported by %r; serving it without one.",
                app,
            )
            error = None
            async with _client(httpx, app, {}, base_url, client_options) as client:
                yield client
        elif error is None:
            try:
                async with _client(httpx, app, session.state, base_url, client_options) as client:
                    yield client
            except BaseException as exc:
                # Whatever ended the block (a cancellation from outside included), the app is
                # shut down gracefully, and the block's exception wins.
                shutdown_error = await session.exchange(
                    "lifespan.shutdown", shutdown_timeout, "shutdown_timeout", shielded=True
                )
                if shutdown_error is not None:
                    exc.add_note(f"The app's lifespan shutdown also failed: {shutdown_error!r}")
                    if isinstance(exc, cancelled):
                        # The note goes wherever the cancellation is caught: log it as well.
                        logger.error(
                            "The app's lifespan shutdown failed while lifespan_client was "
                            "cancelled.",
                            exc_info=shutdown_error,
                        )
                if isinstance(exc, cancelled):
                    raise
                error = exc
            else:
                error = await session.exchange(
                    "lifespan.shutdown", shutdown_timeout, "shutdown_timeout", shielded=True
                )
    finally:
        # The app has answered, failed or timed out by now: whatever it still runs is over.
        # (The task group's own scope must be the current one when it is left, so this cannot
        # be shielded; a pending cancellation only makes it wait for the cancelled app.)
        session.app_scope.cancel()
        try:
            await task_group.__aexit__(None, None, None)
        finally:
            session.close()
    if error is not None:
        try:
            raise error
        finally:
            del error


@asynccontextmanager
async def _client(
    httpx: Any,
    app: ASGIApp,
    state: dict[str, Any],
    base_url: str,
    client_options: dict[str, Any],
) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=_with_state(app, state))
    async with httpx.AsyncClient(
        transport=transport, base_url=base_url, **client_options
    ) as client:
        yield client


class _Unsupported(Exception):
    """The outcome of a startup exchange with an app that does not support the lifespan."""

    def __init__(self, how: str, cause: BaseException | None) -> None:
        super().__init__(how)
        self.how = how
        self.cause = cause


class _LifespanSession:
    """One run of an app's lifespan: the app's task, its two channels, and what it raised."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.state: dict[str, Any] = {}
        # The app's lifespan is shielded from the caller's cancellation: a cancelled test
        # shuts the app down (see _lifespan_client) instead of cancelling it midway.
        self.app_scope = anyio.CancelScope(shield=True)
        self.error: BaseException | None = None
        self.received = False
        self.ended = anyio.Event()
        self._to_app_send, self._to_app_receive = anyio.create_memory_object_stream[Message](1)
        # A reply and the end-of-app marker fit without blocking.
        self._from_app_send, self._from_app_receive = anyio.create_memory_object_stream[
            Message | None
        ](2)

    async def _receive(self) -> Message:
        self.received = True
        return await self._to_app_receive.receive()

    async def _send(self, message: Message) -> None:
        await self._from_app_send.send(message)

    async def run(self) -> None:
        scope = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.0"},
            "state": self.state,
        }
        cancelled = anyio.get_cancelled_exc_class()
        with self.app_scope:
            try:
                await self.app(scope, self._receive, self._send)
            except cancelled:
                raise
            except BaseException as exc:
                # Kept and raised by the caller, as itself: KeyboardInterrupt and SystemExit
                # too, which would otherwise come out wrapped in the task group's group.
                self.error = exc
        # The app returned, raised or was cancelled: wake whoever waits for its next message.
        # (Should the app have filled the channel with messages nobody asked for, the marker
        # is not needed: the waiter has those to read.)
        self.ended.set()
        with suppress(anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._from_app_send.send_nowait(None)

    async def exchange(
        self, event: str, seconds: float | None, timeout_name: str, *, shielded: bool
    ) -> BaseException | None:
        """Send ``event`` and wait for the app's answer; return the error, if it failed."""
        expected = f"{event}.complete"
        with anyio.move_on_after(math.inf if seconds is None else seconds, shield=shielded) as wait:
            await self._to_app_send.send({"type": event})
            reply = await self._from_app_receive.receive()
        if wait.cancelled_caught:
            self.app_scope.cancel()
            phase = event.removeprefix("lifespan.")
            return TimeoutError(
                f"The app's lifespan {phase} did not complete within the {timeout_name} of "
                f"{seconds}s given to lifespan_client; its lifespan was cancelled. Raise "
                f"{timeout_name} if it is merely slow."
            )
        if reply is not None and reply["type"] == expected:
            return None
        # The app reported a failure (or ended): its lifespan is over. The ASGI spec does not
        # promise that it raises or returns afterwards, so do not wait for another message:
        # cancel what it still runs and wait for its task to end. An app that raises right
        # after reporting the failure (Starlette does) has raised by then.
        self.app_scope.cancel()
        failure = reply
        with anyio.CancelScope(shield=True):
            await self.ended.wait()
        if self.error is not None:
            if event == "lifespan.startup" and not self.received:
                return _Unsupported(f"raised {self.error!r}", self.error)
            return self.error
        if failure is None:
            if event == "lifespan.startup" and not self.received:
                return _Unsupported("returned", None)
            return RuntimeError(
                f"The app's lifespan returned without answering {event!r} with {expected!r}."
            )
        detail = failure.get("message") or "no message"
        return RuntimeError(
            f"The app's lifespan answered {event!r} with {failure['type']!r} instead of "
            f"{expected!r}, without raising: {detail}"
        )

    def close(self) -> None:
        for stream in (
            self._to_app_send,
            self._to_app_receive,
            self._from_app_send,
            self._from_app_receive,
        ):
            stream.close()


def _with_state(app: ASGIApp, state: dict[str, Any]) -> ASGIApp:
    """Give each request a shallow copy of the lifespan state, as servers do."""

    async def with_state(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = {**scope, "state": dict(state)}
        await app(scope, receive, send)

    return with_state


class Faults:
    """Faults to inject into a `Lifecycle`'s services; made by `inject_faults`.

    A start fault happens before the service's own function is called, so the service never
    starts (its cleanup must not run). A stop fault happens after its real cleanup has run.
    """

    def __init__(self, lifecycle: Lifecycle) -> None:
        self._lifecycle = lifecycle
        self._start: dict[str, BaseException | None] = {}
        self._stop: dict[str, BaseException | None] = {}

    def fail_start(self, service: Service[Any] | str, error: Exception | None = None) -> None:
        """Make ``service``'s start raise ``error`` (a `RuntimeError` by default)."""
        name = self._name(service)
        self._start[name] = error or RuntimeError(f"injected start failure in {name!r}")

    def hang_start(self, service: Service[Any] | str) -> None:
        """Make ``service``'s start hang until it is cancelled (by a timeout, say)."""
        self._start[self._name(service)] = None

    def fail_stop(self, service: Service[Any] | str, error: Exception | None = None) -> None:
        """Make ``service``'s cleanup raise ``error`` after its real cleanup ran."""
        name = self._name(service)
        self._stop[name] = error or RuntimeError(f"injected stop failure in {name!r}")

    def hang_stop(self, service: Service[Any] | str) -> None:
        """Make ``service``'s cleanup hang after its real cleanup ran, until cut off."""
        self._stop[self._name(service)] = None

    def clear(self) -> None:
        """Remove every injected fault."""
        self._start.clear()
        self._stop.clear()

    async def before_start(self, service: str) -> None:
        """Called by the Lifecycle before a service starts."""
        await self._trigger(self._start, service)

    async def after_stop(self, service: str) -> None:
        """Called by the Lifecycle after a service's cleanup ran."""
        await self._trigger(self._stop, service)

    async def _trigger(self, faults: dict[str, BaseException | None], service: str) -> None:
        if service not in faults:
            return
        error = faults[service]
        if error is not None:
            raise error
        await anyio.sleep_forever()

    def _name(self, service: Service[Any] | str) -> str:
        name = service.name if isinstance(service, Service) else service
        if name not in self._lifecycle.declared:
            raise LookupError(
                f"Cannot inject a fault into {name!r}: no such service is declared; declared "
                f"services are {sorted(self._lifecycle.declared)!r}."
            )
        return name


@contextmanager
def inject_faults(lifecycle: Lifecycle) -> Iterator[Faults]:
    """Inject faults into ``lifecycle``'s services for the duration of the block.

    Yields:
        A `Faults` on which to declare the faults (before or during a run).
    """
    if lifecycle.hooks is not None:
        raise RuntimeError("Faults are already being injected into this Lifecycle.")
    faults = Faults(lifecycle)
    lifecycle.hooks = faults
    try:
        yield faults
    finally:
        lifecycle.hooks = None


def assert_started_before(
    lifecycle: Lifecycle, first: Service[Any] | str, then: Service[Any] | str
) -> None:
    """Assert that ``first`` was running before ``then`` began to start.

    Raises:
        AssertionError: It was not; the message shows the timeline.
    """
    timeline = lifecycle.timeline()
    a, b = timeline[_name(first)], timeline[_name(then)]
    if a.start_ended is None or b.start_began is None or a.start_ended > b.start_began:
        raise AssertionError(
            f"Expected {a.service!r} to be running before {b.service!r} began to start:\n{timeline}"
        )


def assert_stopped_before(
    lifecycle: Lifecycle, first: Service[Any] | str, then: Service[Any] | str
) -> None:
    """Assert that ``first`` finished stopping before ``then`` began its cleanup.

    Raises:
        AssertionError: It did not; the message shows the timeline.
    """
    timeline = lifecycle.timeline()
    a, b = timeline[_name(first)], timeline[_name(then)]
    if a.stop_ended is None or b.stop_began is None or a.stop_ended > b.stop_began:
        raise AssertionError(
            f"Expected {a.service!r} to have stopped before {b.service!r} began to stop:\n"
            f"{timeline}"
        )


class OrderAssertions:
    """`assert_started_before` and `assert_stopped_before` bound to one `Lifecycle`.

    What the ``lifecycle_order`` fixture of `lifecycle.pytest_plugin` gives a test.
    """

    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle

    def started_before(self, first: Service[Any] | str, then: Service[Any] | str) -> None:
        """Assert that ``first`` was running before ``then`` began to start.

        Raises:
            AssertionError: It was not; the message shows the timeline.
        """
        assert_started_before(self.lifecycle, first, then)

    def stopped_before(self, first: Service[Any] | str, then: Service[Any] | str) -> None:
        """Assert that ``first`` finished stopping before ``then`` began its cleanup.

        Raises:
            AssertionError: It did not; the message shows the timeline.
        """
        assert_stopped_before(self.lifecycle, first, then)


def _name(service: Service[Any] | str) -> str:
    return service.name if isinstance(service, Service) else service
