"""Graceful drain: learn of SIGTERM before the server does.

Servers close their listening sockets as soon as they handle SIGTERM, and only then send the
lifespan shutdown, so an app that waits for the lifespan to hear about the signal can no
longer tell the load balancer to stop sending traffic while it still accepts it. With
``Lifecycle(drain_delay=...)`` the app holds the process's SIGTERM and SIGINT from the end of
its startup (`lifecycle._signals.SignalHold`, which stops both the Python-level handlers of
uvicorn and the event-loop handlers of hypercorn and granian). On the first signal it begins
the drain: readiness fails at once, while liveness holds and the app keeps serving; after
``drain_delay`` the signal is handed to the server, whose graceful shutdown follows (stop
accepting, finish in-flight requests), and then the lifespan shutdown drains worker pools and
stops services in reverse order. A second signal skips what is left of the delay.

The drain works in the process that serves: under ``uvicorn --workers N`` and granian, whose
supervisors pass SIGTERM on to every worker, each worker drains on its own. hypercorn's
supervisor stops its workers through a shared event instead, which an app cannot delay:
`lifecycle._servers.supervisor_warning` says so at startup. The same drain can always be
begun by an authenticated HTTP call (`lifecycle.starlette.drain_route`), for a Kubernetes
``preStop`` hook.
"""

from __future__ import annotations

import logging
import signal
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import anyio

from ._kernel import Kernel
from ._servers import serving_server, supervisor_identity, supervisor_warning
from ._signals import SignalHold
from ._validate import seconds

__all__ = ["Drain", "SignalDrain"]

logger = logging.getLogger("lifecycle.drain")


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
        self._draining = False
        self.began: float | None = None
        self._marker: Path | None = None
        kernel.observers.add(self)
        if self.delay > 0:
            SignalDrain(kernel, self)

    def __repr__(self) -> str:
        return f"<Drain delay={self.delay}s draining={self.draining}>"

    @property
    def draining(self) -> bool:
        """Whether the drain has begun in this run: here, or in a sibling worker."""
        if not self._draining and self._marker is not None:
            self._adopt()
        return self._draining

    def run_starting(self, kernel: Kernel) -> None:
        """Observer hook: a new run starts undrained (unless its siblings drain already)."""
        self._draining = False
        self.began = None
        # The workers of one supervisor drain together: a drain begun in one (a preStop
        # call reaches one worker only) is marked in a file named after the supervisor, which
        # every sibling's readiness looks for.
        identity = supervisor_identity()
        self._marker = (
            None
            if identity is None
            else Path(tempfile.gettempdir()) / f"lifecycle-drain-{identity}"
        )

    def begin(self) -> None:
        """Begin the drain (once a run): from now on readiness fails, while liveness holds."""
        if self.draining:
            return
        self._draining = True
        # time.monotonic, not the loop's clock: this runs from signal callbacks too, where no
        # task is current and anyio cannot tell which event loop is running. It is the same
        # clock in every process of the machine, so siblings can count from it too.
        self.began = time.monotonic()
        logger.info("Drain begun: readiness now fails.", extra={"phase": "drain"})
        if self._marker is not None:
            try:
                with self._marker.open("x") as marker:
                    marker.write(repr(self.began))
            except FileExistsError:
                pass  # a sibling began it at the same moment
            except OSError as exc:
                logger.warning(
                    "Could not tell the sibling workers that the drain began (%s): each "
                    "drains when its own signal arrives.",
                    exc,
                )

    def _adopt(self) -> None:
        """Begin the drain here too if a sibling worker began it (the marker exists)."""
        assert self._marker is not None
        try:
            began = float(self._marker.read_text())
        except (OSError, ValueError):
            return  # no marker (the usual case), or one being written: look again next time
        self._draining = True
        self.began = began
        logger.info(
            "Drain begun by a sibling worker: readiness now fails.", extra={"phase": "drain"}
        )


class SignalDrain:
    """The signal side of the drain protocol; an internal service of its kernel.

    It holds its signals from the moment the startup has succeeded (when the kernel's own
    startup hold, which aborts a startup in progress, lets go of them) until the drain delay
    after the first one is over; that signal is then forwarded to the server.
    """

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
        self._first: int | None = None
        self._hold: SignalHold | None = None
        self._requested: anyio.Event | None = None
        self._skip: anyio.Event | None = None
        kernel.declare(self._serve, name="drain:signals", internal=True, kind="lifecycle")
        kernel.observers.add(self)

    async def _serve(self) -> AsyncIterator[SignalDrain]:
        self._first = None
        self._requested = anyio.Event()
        self._skip = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch)
                yield self
                tg.cancel_scope.cancel()
        finally:
            self._requested = None
            hold, self._hold = self._hold, None
            if hold is not None:
                hold.release()

    def run_started(self, kernel: Kernel, error: BaseException | None) -> None:
        """Observer hook: hold the signals once the whole startup has succeeded."""
        if error is not None or self._requested is None:
            return
        hold = SignalHold(self.signals, self._on_signal)
        if not hold.install() and threading.current_thread() is not threading.main_thread():
            logger.warning(
                "drain_delay is set, but the lifespan runs outside the main thread, where "
                "signal handlers cannot be installed: the drain will not be signal-driven. "
                "Begin it from a preStop hook instead (lifecycle.starlette.drain_route)."
            )
            return
        if hold.held:
            self._hold = hold
        warning = supervisor_warning()
        if warning is not None:
            logger.warning(warning)

    def _on_signal(self, signum: int) -> None:
        if self._requested is None or self._skip is None:
            return  # the service stopped as the signal was on its way
        if self._first is None:
            self._first = signum
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
        hold, self._hold = self._hold, None
        if hold is None:
            return
        signum = self._first
        server = serving_server()
        if (
            signum == signal.SIGTERM
            and server is not None
            and not hold.listened(signal.SIGTERM)
            and hold.listened(signal.SIGINT)
        ):
            # hypercorn's trio worker installs no SIGTERM handler: its default action would
            # end the process mid-request. SIGINT is the signal it shuts down gracefully on.
            logger.info(
                "%s has no SIGTERM handler in this process; handing it SIGINT, on which it "
                "shuts down gracefully.",
                server,
                extra={"phase": "drain"},
            )
            signum = signal.SIGINT
        # The server's own graceful shutdown follows; a further signal is its to handle.
        hold.forward(signum)
