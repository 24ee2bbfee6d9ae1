"""What lifecycle knows of the ASGI server that runs it, and of that server's supervisor.

Each server is told apart by its command and the modules its process imported; a supervisor,
by `multiprocessing.parent_process` (uvicorn ``--workers``, hypercorn and granian spawn their
workers with `multiprocessing`; gunicorn forks its own) and the parent's command line. What
each server does on SIGTERM, read from its source:

- uvicorn: Python-level handlers; its ``--workers`` supervisor passes SIGTERM to each worker.
- hypercorn: event-loop handlers with ``--workers 0``; otherwise (its default is one worker)
  the supervisor takes the signal and stops its workers through a `multiprocessing.Event`
  that each polls, and that no app can delay.
- granian: its main process passes SIGTERM to each worker, which hears it through event-loop
  handlers.
- daphne: runs no ASGI lifespan at all.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
from pathlib import Path

__all__ = [
    "no_lifespan_message",
    "serving_server",
    "stop_whole_server",
    "supervisor_identity",
    "supervisor_warning",
]

logger = logging.getLogger("lifecycle")

# The servers whose modules an app is least likely to import for another reason come first.
_KNOWN = ("granian", "hypercorn", "daphne", "gunicorn", "uvicorn")

NO_LIFESPAN = (
    "The app's lifespan never started: the server did not send the ASGI lifespan events "
    "({server}does not support them), or the app was not given lifespan=lc.lifespan. No "
    "service runs. Serve the app with uvicorn, hypercorn or granian, which run the lifespan "
    "(all three serve Django Channels and websocket apps too). In tests, enter the client "
    "(`with TestClient(app):`) or use lifecycle.testing."
)


def serving_server() -> str | None:
    """The name of the server that runs this process's app, if it is one lifecycle knows.

    Its command (``sys.argv[0]``, which `multiprocessing` passes on to spawned workers) says
    first; otherwise the server modules the process imported.
    """
    command = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if command == "__main__.py":  # python -m <server>
        command = os.path.basename(os.path.dirname(sys.argv[0]))
    for name in _KNOWN:
        if command == name and name in sys.modules:
            return name
    for name in _KNOWN:
        if name in sys.modules:
            return name
    return None


def _supervisor_pid() -> int | None:
    """The pid of the server's supervisor, when this process is one of its workers.

    The parent process counts only when it runs that same server (its command line, read
    from /proc, names it): any process may start a server as a child of its own (a launcher,
    a test), and must not be told to stop in its place.
    """
    server = serving_server()
    if server not in ("uvicorn", "hypercorn", "granian", "gunicorn"):
        return None
    if server != "gunicorn" and multiprocessing.parent_process() is None:
        return None  # uvicorn, hypercorn and granian spawn their workers with multiprocessing
    parent = os.getppid()
    return parent if parent > 0 and _runs(parent, server) else None


def _runs(pid: int, server: str) -> bool:
    """Whether process ``pid``'s command line names ``server`` (False where it is unknown)."""
    try:
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False  # not Linux: a parent that cannot be told apart is never signalled
    for raw in arguments:
        argument = raw.decode(errors="replace")
        name = os.path.basename(argument)
        if name == server or argument.startswith(f"{server}:"):  # gunicorn: "gunicorn: master"
            return True
    return False


def supervisor_identity() -> str | None:
    """Who supervises this worker, as ``"<pid>-<start time>"``; ``None`` without one.

    The start time (from /proc) tells a supervisor from a later process given the same pid.
    """
    pid = _supervisor_pid()
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; the fields after its closing parenthesis
    # do not: the start time is field 22 of the whole line.
    fields = stat.rpartition(")")[2].split()
    return f"{pid}-{fields[19]}" if len(fields) > 19 else None


def supervisor_warning() -> str | None:
    """Why a signal-driven drain cannot work in this process, or ``None`` when it can."""
    if serving_server() == "hypercorn" and _supervisor_pid() is not None:
        return (
            "hypercorn runs this app in a worker under its supervisor, which stops its workers "
            "through a shared event rather than a signal: SIGTERM closes the listening socket "
            "at once, with no time to drain. Run `hypercorn --workers 0` (one process that "
            "takes the signal itself; scale with replicas), or begin the drain from a preStop "
            "hook (lifecycle.starlette.drain_route)."
        )
    return None


def stop_whole_server() -> None:
    """Ask the whole server to stop gracefully: its supervisor, when there is one.

    A worker that only stopped itself would be started again by its supervisor.
    """
    pid = _supervisor_pid()
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
    else:
        signal.raise_signal(signal.SIGTERM)


_reported_no_lifespan = False


def no_lifespan_message() -> str:
    """What a request that arrives without a started lifespan is told, naming the server.

    The first call in the process also logs it, once, as an error: every request after it
    gets the same 503, and one line says why.
    """
    global _reported_no_lifespan
    server = serving_server()
    message = NO_LIFESPAN.format(server=f"{server} " if server == "daphne" else "it ")
    if not _reported_no_lifespan:
        _reported_no_lifespan = True
        logger.error("%s", message, extra={"phase": "startup"})
    return message
