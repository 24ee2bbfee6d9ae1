"""What lifecycle knows of the ASGI server that runs it, and of that server's supervisor.

Each server is told apart by the modules its process imported; a supervisor, by
`multiprocessing.parent_process` (uvicorn ``--workers``, hypercorn and granian spawn their
workers with `multiprocessing`) or by the server (gunicorn forks its workers). What each
server does on SIGTERM, read from its source:

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

__all__ = [
    "no_lifespan_message",
    "serving_server",
    "stop_whole_server",
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
    """The pid of the server's supervisor process, when this process is one of its workers."""
    server = serving_server()
    if server in ("uvicorn", "hypercorn", "granian"):
        parent = multiprocessing.parent_process()
        if parent is not None and parent.pid == os.getppid():
            return parent.pid
    elif server == "gunicorn" and os.getppid() != 1:
        return os.getppid()
    return None


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
