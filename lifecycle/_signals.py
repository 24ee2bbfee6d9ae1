"""Holding a process's termination signals for a while, whichever way the server listens.

Servers learn of SIGTERM and SIGINT in one of two ways. Some install Python-level handlers
with `signal.signal` (uvicorn, trio's `open_signal_receiver`); others register them on the
asyncio event loop with ``loop.add_signal_handler`` (hypercorn, granian's workers), where the
Python-level handler is a no-op and the loop learns of the signal from the byte that the C
handler writes to the *wakeup fd* (`signal.set_wakeup_fd`). Replacing the Python-level handler
stops the first kind and not the second: the loop still reads the byte and stops the server.

A `SignalHold` stops both. The holds of a process share one installation (`_Hub`): it
replaces the Python-level handlers of SIGINT and SIGTERM (not one that was ignored: a
supervisor that set ``SIG_IGN`` meant it), and on asyncio it puts a socket of its own in
place of the loop's wakeup fd, relaying to the loop every signal it does not hold (a
``SIGHUP`` or ``SIGCHLD`` handler of the loop keeps working) and dropping the held ones.

Holds stack: a signal goes to the newest hold (a nested Lifecycle's startup, say, before the
outer one's drain). `SignalHold.forward` releases a hold and passes its signal on to the next
hold, or, when none is left, to the server exactly as it would have seen it without any hold:
its Python-level handler is called and its loop reads the signal's byte. Which hold a signal
goes to is decided when it is handled on the loop, not when it arrives, so a signal that
arrives while one hold hands over to the next is never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

__all__ = ["SignalHold", "loop_scheduler"]

logger = logging.getLogger("lifecycle")

Handler = Callable[[int, FrameType | None], Any] | int | None

HELD: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)
"""The signals a hold may hold."""


def loop_scheduler() -> Callable[[Callable[[], None]], None]:
    """A way to run a callback on the running event loop from a signal handler, safely.

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


class SignalHold:
    """Hold ``signals`` (SIGINT, SIGTERM or both) from the server until `release`/`forward`.

    ``on_signal(signum)`` runs on the event loop (never inside the signal handler itself) for
    every held signal that arrives while this is the newest hold holding it. Used in the
    event loop's thread, which must be the main thread: `install` returns ``False`` (and
    holds nothing) anywhere else, and where a signal cannot be held at all.
    """

    def __init__(self, signals: Sequence[signal.Signals], on_signal: Callable[[int], None]) -> None:
        if not set(signals) <= set(HELD):
            raise ValueError(f"A SignalHold holds SIGINT and SIGTERM only, not {signals!r}.")
        self.signals = frozenset(int(sig) for sig in signals)
        self._on_signal = on_signal
        self._hub: _Hub | None = None

    @property
    def held(self) -> bool:
        """Whether this hold is in place now."""
        return self._hub is not None

    def install(self) -> bool:
        """Hold the signals; ``False`` outside the main thread, where that is impossible."""
        if self._hub is not None:
            return True
        if threading.current_thread() is not threading.main_thread():
            return False
        hub = _Hub.join(self)
        if hub is None:
            return False
        self._hub = hub
        return True

    def release(self) -> None:
        """Stop holding; the last hold of the process gives the signals back to the server."""
        hub, self._hub = self._hub, None
        if hub is not None:
            hub.leave(self)

    def listened(self, signum: int) -> bool:
        """Whether the server had a handler of its own for ``signum`` (not ignoring it)."""
        hub = self._hub or _Hub.last
        return hub is not None and callable(hub.previous.get(signum))

    def forward(self, signum: int) -> None:
        """Release the hold, then pass ``signum`` on: to the next hold, else to the server."""
        hub = self._hub or _Hub.last
        self.release()
        if hub is not None:
            hub.dispatch(signum)


class _Hub:
    """The one installation of a process's holds: the handlers, the relay, the stack."""

    current: _Hub | None = None
    last: _Hub | None = None  # the newest, installed or not: where a late signal goes

    def __init__(self) -> None:
        self.holds: list[SignalHold] = []
        self.previous: dict[int, Handler] = {}
        self.relay: _WakeupRelay | None = None
        self.loop_fd = -1  # the loop's own wakeup fd, as it was at the last uninstall
        self.schedule = loop_scheduler()
        self.loop = _loop_identity()  # asyncio's loop or trio's token: whose holds these are
        self.handler: Callable[[int, FrameType | None], None] | None = None

    @classmethod
    def join(cls, hold: SignalHold) -> _Hub | None:
        hub = cls.current
        if hub is not None and hub.loop is not _loop_identity():
            # A hold of an event loop that is gone was never released: start afresh.
            logger.warning("A signal hold of an earlier event loop was never released.")
            hub._uninstall()
            hub = None
        if hub is None:
            hub = cls()
            if not hub._install():
                return None
            cls.current = cls.last = hub
        elif hub.relay is not None:
            hub.relay.hurry()  # a new phase (serving, say) may be about to start a loop run
        hub.holds.append(hold)
        return hub

    def leave(self, hold: SignalHold) -> None:
        with contextlib.suppress(ValueError):
            self.holds.remove(hold)
        if not self.holds and _Hub.current is self:
            self._uninstall()

    def _install(self) -> bool:
        schedule = self.schedule
        asyncio_loop = _running_loop()

        def handler(signum: int, frame: FrameType | None) -> None:
            # Runs between two bytecodes of the loop's thread: only hand over. Which hold it
            # goes to is decided on the loop.
            schedule(lambda: self.dispatch(signum))

        taken = {}
        for sig in HELD:
            previous = signal.getsignal(sig)
            if previous is signal.SIG_IGN:
                continue  # ignored on purpose (hypercorn's workers ignore SIGINT): left so
            taken[int(sig)] = previous
        if not taken:
            return False
        for signum in taken:
            signal.signal(signum, handler)
        self.previous, self.handler = taken, handler
        if asyncio_loop is not None:
            try:
                self.relay = _WakeupRelay.install(asyncio_loop, set(taken))
            except (NotImplementedError, RuntimeError, OSError):
                # A loop that cannot watch a socket (Windows' proactor loop) listens to no
                # signal through a wakeup fd either: the Python-level handlers are enough.
                self.relay = None
        return True

    def _uninstall(self) -> None:
        handler, self.handler = self.handler, None
        if _Hub.current is self:
            _Hub.current = None
        for hold in self.holds:
            hold._hub = None
        self.holds.clear()
        if handler is None:
            return
        for signum, previous in self.previous.items():
            if signal.getsignal(signum) is handler:  # not replaced since: ours to put back
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        relay, self.relay = self.relay, None
        if relay is not None:
            self.loop_fd = relay.uninstall()

    def dispatch(self, signum: int) -> None:
        """Give ``signum`` to the newest hold holding it, or to the server (on the loop)."""
        for hold in reversed(self.holds):
            if signum in hold.signals:
                hold._on_signal(signum)
                return
        self._deliver(signum)

    def _deliver(self, signum: int) -> None:
        """Deliver ``signum`` to the server as if no hold had ever been (holds all gone)."""
        previous = self.previous.get(signum, signal.getsignal(signum))
        if previous is signal.SIG_IGN:
            return
        if callable(previous) and previous is not signal.default_int_handler:
            loop_fd = self.relay.loop_fd() if self.relay is not None else self.loop_fd
            if loop_fd != -1:  # what the C handler would have written for the loop
                with contextlib.suppress(OSError):
                    os.write(loop_fd, bytes([signum]))
            previous(signum, None)
            return
        if previous is None or previous is signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)  # the default action: SIGTERM ends the process


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _loop_identity() -> object:
    """The running event loop: asyncio's loop object, or trio's token."""
    trio = sys.modules.get("trio")
    if trio is not None:
        with contextlib.suppress(RuntimeError):
            return trio.lowlevel.current_trio_token()
    return _running_loop()


class _WakeupRelay:
    """Stands in for the loop's wakeup fd: relays every signal byte but the held ones.

    A loop may set its wakeup fd again: uvloop does at the start of every ``run_forever``
    (granian runs its worker's loop once for the startup and again to serve), and asyncio's
    loop whenever a signal handler is added. So the relay checks that the wakeup fd is still
    its own, every 10 ms for a second after it is installed (when a server starts serving)
    and every half second after that, and otherwise takes the new one as the loop's. The
    loop's fd is relayed to, and put back, only while it is still the same file: a loop that
    closed it may have had its number reused.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, held: set[int]) -> None:
        self.loop = loop
        self.held = held
        self.receiver, self.sender = socket.socketpair()
        self.receiver.setblocking(False)
        self.sender.setblocking(False)
        self.original = -1
        self.identity: tuple[int, int] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.installed = time.monotonic()

    @classmethod
    def install(cls, loop: asyncio.AbstractEventLoop, held: set[int]) -> _WakeupRelay:
        relay = cls(loop, held)
        try:
            loop.add_reader(relay.receiver.fileno(), relay._relay)
            relay._steal()
        except BaseException:
            relay.receiver.close()
            relay.sender.close()
            raise
        return relay

    def _steal(self) -> None:
        ours = self.sender.fileno()
        current = signal.set_wakeup_fd(ours, warn_on_full_buffer=False)
        if current != ours:
            self.original, self.identity = current, _identity(current)
        every = 0.01 if time.monotonic() - self.installed < 1.0 else 0.5
        self.timer = self.loop.call_later(every, self._steal)

    def hurry(self) -> None:
        """Check every 10 ms again, for the next second."""
        self.installed = time.monotonic()
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(0.01, self._steal)

    def loop_fd(self) -> int:
        """The loop's own wakeup fd, or -1 if it is gone (closed, or its number reused)."""
        if self.original == -1 or _identity(self.original) != self.identity:
            return -1
        return self.original

    def _relay(self, *, passing: frozenset[int] | set[int] = frozenset()) -> None:
        try:
            data = self.receiver.recv(4096)
        except (BlockingIOError, InterruptedError, OSError):
            return
        passed = bytes(b for b in data if b not in self.held or b in passing)
        target = self.loop_fd()
        if passed and target != -1:
            with contextlib.suppress(OSError):
                os.write(target, passed)

    def uninstall(self) -> int:
        """Put the loop's wakeup fd back; return it (-1 if it is gone)."""
        if self.timer is not None:
            self.timer.cancel()
        ours = self.sender.fileno()
        loop_fd = self.loop_fd()
        try:
            current = signal.set_wakeup_fd(loop_fd, warn_on_full_buffer=False)
        except ValueError:  # a loop fd that is no longer non-blocking: none is better
            current = signal.set_wakeup_fd(-1)
            loop_fd = -1
        if current != ours:
            signal.set_wakeup_fd(current)  # replaced since by someone else: theirs stays
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.receiver.fileno())
        # What arrived since the last read belongs to the server now, held signals included:
        # their Python-level handler was already the server's again.
        self._relay(passing=self.held)
        self.receiver.close()
        self.sender.close()
        return loop_fd


def _identity(fd: int) -> tuple[int, int] | None:
    try:
        status = os.fstat(fd)
    except OSError:
        return None
    return (status.st_dev, status.st_ino)
