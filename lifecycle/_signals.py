"""Holding a process's termination signals for a while, whichever way the server listens.

Servers learn of SIGTERM and SIGINT in one of two ways. Some install Python-level handlers
with `signal.signal` (uvicorn, trio's `open_signal_receiver`); others register them on the
asyncio event loop with ``loop.add_signal_handler`` (hypercorn, granian's workers), where the
Python-level handler is a no-op and the loop learns of the signal from the byte that the C
handler writes to the *wakeup fd* (`signal.set_wakeup_fd`). Replacing the Python-level handler
stops the first kind and not the second: the loop still reads the byte and stops the server.

`SignalHold` stops both. It replaces the Python-level handlers, and on asyncio it puts a
socket of its own in place of the loop's wakeup fd, relaying to the loop every signal it does
not hold (a ``SIGHUP`` or ``SIGCHLD`` handler of the loop keeps working) and dropping the
held ones. `SignalHold.forward` puts everything back and raises the signal again, so that the
server sees it exactly as it would have without the hold: its Python-level handler runs, and
the loop reads its byte.
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
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

__all__ = ["SignalHold", "loop_scheduler"]

logger = logging.getLogger("lifecycle")

Handler = Callable[[int, FrameType | None], Any] | int | None


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
    """Hold ``signals`` from the server until `release` or `forward`.

    ``on_signal(signum)`` runs on the event loop (never inside the signal handler itself) for
    every held signal that arrives. Created and used in the event loop's thread, which must be
    the main thread: `install` returns ``False`` (and holds nothing) anywhere else.
    """

    def __init__(self, signals: Sequence[signal.Signals], on_signal: Callable[[int], None]) -> None:
        self.signals = tuple(signals)
        self._on_signal = on_signal
        self._previous: dict[int, Handler] = {}
        self._handler: Callable[[int, FrameType | None], None] | None = None
        self._relay: _WakeupRelay | None = None
        self._frames: dict[int, FrameType | None] = {}

    @property
    def held(self) -> bool:
        """Whether the signals are held now."""
        return self._handler is not None

    def install(self) -> bool:
        """Hold the signals; ``False`` outside the main thread, where that is impossible."""
        if self._handler is not None:
            return True
        if threading.current_thread() is not threading.main_thread():
            return False
        schedule = loop_scheduler()
        on_signal = self._on_signal
        frames = self._frames

        def handler(signum: int, frame: FrameType | None) -> None:
            # Runs between two bytecodes of the loop's thread: only hand over.
            frames[signum] = frame
            schedule(lambda: on_signal(signum))

        self._previous = {sig: signal.getsignal(sig) for sig in self.signals}
        for sig in self.signals:
            signal.signal(sig, handler)
        self._handler = handler
        if _on_asyncio():
            self._relay = _WakeupRelay.install({int(sig) for sig in self.signals})
        return True

    def release(self) -> None:
        """Give the signals back to whoever had them before `install`."""
        handler, self._handler = self._handler, None
        if handler is None:
            return
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) is handler:  # not replaced since: ours to put back
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        relay, self._relay = self._relay, None
        if relay is not None:
            relay.uninstall()

    def listened(self, signum: int) -> bool:
        """Whether someone had a handler of their own for ``signum`` before `install`."""
        previous = self._previous.get(signum)
        return callable(previous) or previous is signal.SIG_IGN

    def forward(self, signum: int) -> None:
        """Release the signals, then deliver ``signum`` as if it had just arrived.

        A Python-level handler is called with the frame the signal interrupted (trio's
        decides from it how to deliver KeyboardInterrupt); the loop learns of it from a byte
        on its wakeup fd, as the C handler would have written it. Without either, the
        signal's default action follows (SIGTERM ends the process, SIGINT raises
        KeyboardInterrupt).
        """
        previous = self._previous.get(signum)
        frame = self._frames.pop(signum, None)
        loop_fd = -1 if self._relay is None else self._relay.loop_fd()
        self.release()
        if previous is signal.SIG_IGN:
            return
        if callable(previous) and previous is not signal.default_int_handler:
            if loop_fd != -1:
                with contextlib.suppress(OSError):
                    os.write(loop_fd, bytes([signum]))
            previous(signum, frame)
            return
        if previous is None or previous is signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class _WakeupRelay:
    """Stands in for the loop's wakeup fd: relays every signal byte but the held ones.

    A loop may set its wakeup fd again: uvloop does at the start of every ``run_forever``
    (granian runs its worker's loop once for the startup and again to serve), and asyncio's
    loop whenever a signal handler is added. So the relay checks every `RECHECK` seconds
    that the wakeup fd is still its own, and otherwise takes the new one as the loop's. The
    loop's fd is relayed to, and put back, only while it is still the same file: a loop that
    closed it may have had its number reused.
    """

    RECHECK = 0.01

    def __init__(self, loop: asyncio.AbstractEventLoop, held: set[int]) -> None:
        self.loop = loop
        self.held = held
        self.receiver, self.sender = socket.socketpair()
        self.receiver.setblocking(False)
        self.sender.setblocking(False)
        self.original = -1
        self.identity: tuple[int, int] | None = None
        self.timer: asyncio.TimerHandle | None = None

    @classmethod
    def install(cls, held: set[int]) -> _WakeupRelay:
        relay = cls(asyncio.get_running_loop(), held)
        try:
            relay.loop.add_reader(relay.receiver.fileno(), relay._relay)
            relay._steal()
        except BaseException:
            relay.uninstall()
            raise
        return relay

    def _steal(self) -> None:
        ours = self.sender.fileno()
        current = signal.set_wakeup_fd(ours)
        if current != ours:
            self.original, self.identity = current, _identity(current)
        self.timer = self.loop.call_later(self.RECHECK, self._steal)

    def loop_fd(self) -> int:
        """The loop's own wakeup fd, or -1 if it is gone (closed, or its number reused)."""
        if self.original == -1 or _identity(self.original) != self.identity:
            return -1
        return self.original

    def _relay(self) -> None:
        try:
            data = self.receiver.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        passed = bytes(b for b in data if b not in self.held)
        target = self.loop_fd()
        if passed and target != -1:
            with contextlib.suppress(OSError):
                os.write(target, passed)

    def uninstall(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        ours = self.sender.fileno()
        current = signal.set_wakeup_fd(-1)
        if current == ours:
            with contextlib.suppress(ValueError):  # a loop fd that is no longer non-blocking
                signal.set_wakeup_fd(self.loop_fd())
        else:
            signal.set_wakeup_fd(current)  # replaced since by someone else: theirs stays
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.receiver.fileno())
        self._relay()  # what arrived since the last read, minus the held signals
        self.receiver.close()
        self.sender.close()


def _identity(fd: int) -> tuple[int, int] | None:
    try:
        status = os.fstat(fd)
    except OSError:
        return None
    return (status.st_dev, status.st_ino)
