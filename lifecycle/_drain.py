"""Graceful drain: learn of SIGTERM before the server does.

uvicorn closes its listening sockets as soon as it handles SIGTERM, and only then sends the
lifespan shutdown, so an app that waits for the lifespan to hear about the signal can no
longer tell the load balancer to stop sending traffic while it still accepts it. With
``Lifecycle(drain_delay=...)`` the app wraps the server's signal handlers when its lifespan
starts. On the first SIGTERM (or SIGINT) it begins the drain: readiness fails at once, while
liveness holds and the app keeps serving; after ``drain_delay`` the signal is handed to the
server's own handler, whose graceful shutdown follows (stop accepting, finish in-flight
requests), and then the lifespan shutdown drains worker pools and stops services in reverse
order. A second signal skips what is left of the delay.

This works per process, so under ``uvicorn --workers N`` each worker drains on its own. The
same drain can be begun by an authenticated HTTP call (`drain_endpoint`), for a Kubernetes
``preStop`` hook.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from types import FrameType
from typing import Any

import anyio

from ._kernel import Kernel
from ._validate import seconds

__all__ = ["Drain", "SignalDrain"]

logger = logging.getLogger("lifecycle.drain")

Handler = Callable[[int, FrameType | None], Any] | int | None


def _loop_scheduler() -> Callable[[Callable[[], None]], None]:
    """A way to run a callback on the event loop from a signal handler, safely.

    Asks trio only when trio is already imported (it is, whenever a trio loop runs), so that
    the core install needs neither trio nor sniffio.
    """
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            token = trio.lowlevel.current_trio_token()
        except RuntimeError:
            pass  # trio is imported, but this loop is asyncio's
        else:
            run_sync_soon: Callable[[Callable[[], None]], None] = token.run_sync_soon
            return run_sync_soon
    loop = asyncio.get_running_loop()

    def schedule(callback: Callable[[], None]) -> None:
        loop.call_soon_threadsafe(callback)

    return schedule


class Drain:
    """Whether the app is draining: from the drain's start until the next run starts.

    The health extension fails readiness while it drains. With a positive ``delay`` the drain
    is begun by the first SIGTERM or SIGINT (`SignalDrain`); it can always be begun by a call
    (`begin`), as the ``/drain`` preStop hook does. It watches its kernel's runs (through
    `Kernel.observers`) to reset itself when the next run starts.

    Attributes:
        delay: Seconds to keep serving between the signal and the server's own shutdown.
        draining: Whether the drain has begun in the current run.
        began: When it began (``time.monotonic()``), or ``None``.
    """

    def __init__(self, kernel: Kernel, *, delay: float) -> None:
        self.delay = seconds("drain_delay", delay, zero=True)
        self.draining = False
        self.began: float | None = None
        kernel.observers.add(self)
        if self.delay > 0:
            SignalDrain(kernel, self)

    def __repr__(self) -> str:
        return f"<Drain delay={self.delay}s draining={self.draining}>"

    def run_starting(self, kernel: Kernel) -> None:
        """Observer hook: a new run starts undrained."""
        self.draining = False
        self.began = None

    def begin(self) -> None:
        """Begin the drain (once a run): from now on readiness fails, while liveness holds."""
        if not self.draining:
            self.draining = True
            # time.monotonic, not the loop's clock: this runs from signal callbacks too, where
            # no task is current and anyio cannot tell which event loop is running.
            self.began = time.monotonic()
            logger.info("Drain begun: readiness now fails.", extra={"phase": "drain"})


class SignalDrain:
    """The signal side of the drain protocol; an internal service of its kernel."""

    def __init__(
        self,
        kernel: Kernel,
        drain: Drain,
        *,
        signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
    ) -> None:
        self.drain = drain
        self.delay = drain.delay
        self.signals = tuple(signals)
        self._first: tuple[int, FrameType | None] | None = None
        self._forwarded = False
        self._previous: dict[int, Handler] = {}
        self._requested: anyio.Event | None = None
        self._skip: anyio.Event | None = None
        kernel.declare(self._serve, name="drain:signals", internal=True, kind="lifecycle")

    async def _serve(self) -> AsyncIterator[SignalDrain]:
        if threading.current_thread() is not threading.main_thread():
            logger.warning(
                "drain_delay is set, but the lifespan runs outside the main thread, where "
                "signal handlers cannot be installed; the drain will not be signal-driven."
            )
            yield self
            return
        self._first = None
        self._forwarded = False
        self._requested = anyio.Event()
        self._skip = anyio.Event()
        schedule = _loop_scheduler()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            # Runs between two bytecodes of the event loop's thread: only hand over.
            schedule(lambda: self._on_signal(signum, frame))

        self._previous = {sig: signal.getsignal(sig) for sig in self.signals}
        for sig in self.signals:
            signal.signal(sig, on_signal)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch)
                yield self
                tg.cancel_scope.cancel()
        finally:
            for signum, previous in self._previous.items():
                if signal.getsignal(signum) is on_signal:
                    signal.signal(signum, previous)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        assert self._requested is not None
        assert self._skip is not None
        if self._forwarded:
            self._forward(signum, frame)  # the server's own second-signal behaviour
        elif self._first is None:
            self._first = (signum, frame)
            self.drain.begin()
            logger.info(
                "%s received: draining for %.1fs before the server shuts down",
                signal.Signals(signum).name,
                self._remaining(),
                extra={"phase": "drain"},
            )
            self._requested.set()
        else:
            logger.info(
                "%s received again: skipping the rest of the drain delay",
                signal.Signals(signum).name,
                extra={"phase": "drain"},
            )
            self._skip.set()

    def _remaining(self) -> float:
        began = self.drain.began
        if began is None:
            return self.delay
        return max(0.0, began + self.delay - time.monotonic())

    async def _watch(self) -> None:
        assert self._requested is not None
        assert self._skip is not None
        await self._requested.wait()
        # The delay counts from when the drain began, which may be earlier (a preStop call).
        with anyio.move_on_after(self._remaining()):
            await self._skip.wait()
        assert self._first is not None
        self._forwarded = True
        self._forward(*self._first)

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous.get(signum)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)
            return
        # No server handler (a plain script): behave as the signal would have without us.
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        signal.raise_signal(signum)
