"""Test kit: run an app's lifespan with an httpx client, inject faults, check the order.

Example::

    async with lifecycle.testing.lifespan_client(app) as client:
        response = await client.get("/items")

    with lifecycle.testing.inject_faults(lc) as faults:
        faults.fail_start("db")
        with pytest.raises(lifecycle.StartupError):
            async with lc.run():
                pass

``lifespan_client`` needs the ``httpx`` extra.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._kernel import Service
from ._lifecycle import Lifecycle

if TYPE_CHECKING:
    import httpx

__all__ = [
    "Faults",
    "assert_started_before",
    "assert_stopped_before",
    "inject_faults",
    "lifespan_client",
]


@asynccontextmanager
async def lifespan_client(
    app: ASGIApp,
    *,
    base_url: str = "http://testserver",
    startup_timeout: float | None = None,
    **client_options: Any,
) -> AsyncIterator[httpx.AsyncClient]:
    """Run ``app``'s ASGI lifespan and yield an `httpx.AsyncClient` talking to it.

    The lifespan runs as a server would run it: startup completes before the client is
    yielded (so every service has started), each request sees a copy of the lifespan state
    (``request.state.<service>``), and shutdown runs when the block exits.

    Args:
        app: The ASGI application (a Starlette or FastAPI app, possibly wrapped in
            middleware).
        base_url: The client's base URL.
        startup_timeout: Seconds to wait for startup, or ``None`` to rely on the app's own
            ``startup_timeout``.
        **client_options: Passed to `httpx.AsyncClient`.

    Yields:
        The client.

    Raises:
        Exception: The app's own startup or shutdown exception (a `lifecycle.StartupError`,
            for instance), re-raised as itself.
        RuntimeError: The app reported a lifespan failure without raising.
        TimeoutError: The startup did not complete within ``startup_timeout``.
    """
    import httpx

    state: dict[str, Any] = {}
    to_app_send, to_app_receive = anyio.create_memory_object_stream[Message](1)
    from_app_send, from_app_receive = anyio.create_memory_object_stream[Message | None](2)
    app_error: list[Exception] = []

    async def receive() -> Message:
        return await to_app_receive.receive()

    async def send(message: Message) -> None:
        await from_app_send.send(message)

    async def run_lifespan() -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}}
        scope["state"] = state
        try:
            await app(scope, receive, send)
        except Exception as exc:
            app_error.append(exc)
        finally:
            # The app returned (or failed): wake whoever waits for its next message.
            with anyio.CancelScope(shield=True):
                await from_app_send.send(None)

    async def exchange(message: Message, expected: str) -> Exception | None:
        await to_app_send.send(message)
        reply = await from_app_receive.receive()
        if reply is not None and reply["type"] == expected:
            return None
        if reply is not None:
            # Starlette sends *.failed and then re-raises: wait for the exception itself.
            await from_app_receive.receive()
        if app_error:
            return app_error[0]
        detail = reply.get("message", "") if reply is not None else "it returned"
        return RuntimeError(
            f"The app's lifespan did not answer {message['type']!r} with {expected!r}: "
            f"{detail or 'no message'}"
        )

    # Errors are raised once the task group has exited, so that they reach the caller as
    # themselves rather than wrapped in the task group's ExceptionGroup.
    error: Exception | None = None
    async with (
        from_app_send,
        from_app_receive,
        to_app_send,
        to_app_receive,
        anyio.create_task_group() as task_group,
    ):
        task_group.start_soon(run_lifespan)
        with anyio.move_on_after(startup_timeout) as startup:
            error = await exchange({"type": "lifespan.startup"}, "lifespan.startup.complete")
        if startup.cancelled_caught:
            # The app's startup is cancelled with the task group (rolling back what started).
            error = TimeoutError(
                f"The app's lifespan startup did not complete within the startup_timeout of "
                f"{startup_timeout}s given to lifespan_client."
            )
            task_group.cancel_scope.cancel()
        elif error is None:
            transport = httpx.ASGITransport(app=_with_state(app, state))
            try:
                async with httpx.AsyncClient(
                    transport=transport, base_url=base_url, **client_options
                ) as client:
                    yield client
            except Exception as exc:
                error = exc
            finally:
                with anyio.CancelScope(shield=True):
                    shutdown_error = await exchange(
                        {"type": "lifespan.shutdown"}, "lifespan.shutdown.complete"
                    )
            if error is None:
                error = shutdown_error
            elif shutdown_error is not None:
                error.add_note(f"The app's lifespan shutdown also failed: {shutdown_error}")
    if error is not None:
        raise error


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


def _name(service: Service[Any] | str) -> str:
    return service.name if isinstance(service, Service) else service
