"""Helpers shared by the tests that talk to real servers.

Reaching the real PostgreSQL and Redis that integration tests talk to, and finding the real
binaries (HAProxy) that some tests run: on a developer's laptop without them, such tests skip
with the reason; under ``CI=true`` they fail instead, because CI runs them for real. Free
loopback ports for the servers tests start, the command line that runs an app under each ASGI
server users run, and a `Spawner` that reaps every process a test started.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent

POSTGRES_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def require_server(name: str, host: str, port: int) -> None:
    """Skip (or, under CI, fail) the calling test unless ``host:port`` accepts connections."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return
    except OSError as exc:
        reason = f"{name} is not reachable at {host}:{port} ({exc})"
    unavailable(reason, "start it to run this integration test")


def unavailable(reason: str, fix: str) -> None:
    """Skip the calling test for ``reason`` (saying how to ``fix`` it); under CI, fail it."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI=true, so this integration test must run for real.")
    pytest.skip(f"{reason}; {fix}.")


def require_binary(name: str, *, package: str, also: Sequence[str] = ("/usr/sbin",)) -> str:
    """The path of executable ``name``, looked up on PATH and then in ``also``.

    Missing, the calling test skips (saying which Debian ``package`` has it), or fails under CI.
    """
    path = shutil.which(name) or shutil.which(name, path=os.pathsep.join(also))
    if path is None:
        unavailable(
            f"{name} is neither on PATH nor in {', '.join(also)}",
            f"install it (apt-get install -y {package}) to run this test",
        )
    assert path is not None
    return path


def require_postgres() -> str:
    require_server("PostgreSQL", "127.0.0.1", 5432)
    return POSTGRES_URL


def require_redis() -> str:
    require_server("Redis", "127.0.0.1", 6379)
    return REDIS_URL


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """``count`` different TCP ports on 127.0.0.1 that nothing listens on right now."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


# The ASGI servers users run, each as its own CLI runs it by default (one process serving,
# or the server's supervisor in front of one worker, as that server does).
SERVERS = ("uvicorn", "hypercorn", "granian")


def server_command(
    server: str, app: str, port: int, *, graceful: float, workers: int | None = None
) -> list[str]:
    """The command line that serves ``app`` (``module:attribute``) under ``server`` on
    127.0.0.1:``port``, giving in-flight requests ``graceful`` seconds once the server's own
    shutdown begins, with the server's ``--workers`` option when ``workers`` is given.
    Access logs are off: probes every few hundred ms would flood them."""
    python = sys.executable
    scale = () if workers is None else ("--workers", str(workers))
    if server == "uvicorn":
        return [
            *(python, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)),
            *("--timeout-graceful-shutdown", str(math.ceil(graceful)), "--no-access-log"),
            *scale,
        ]
    if server == "hypercorn":  # --workers 0: no supervisor, the worker is the process
        return [
            *(python, "-m", "hypercorn", app, "--bind", f"127.0.0.1:{port}"),
            *("--graceful-timeout", str(math.ceil(graceful))),
            *scale,
        ]
    if server == "granian":
        # granian has no graceful window for requests: --workers-kill-timeout would kill the
        # worker, drain delay included. Left at its default (wait), the test's own bound on
        # the exit is what limits it.
        return [
            *(python, "-m", "granian", "--interface", "asgi", app),
            *("--host", "127.0.0.1", "--port", str(port)),
            *scale,
        ]
    raise ValueError(f"Unknown server {server!r}; expected one of {SERVERS}.")


class Spawner:
    """Starts a test's subprocesses, their output in a log file each, and reaps them.

    Each process leads a process group of its own, so that what it starts in turn (a
    server's workers) can be found (`group`) and killed with it. `close` (the ``spawner``
    fixture calls it at teardown) kills every group that still has a process and waits for
    the processes it started, so that no test leaves one behind, whether it passed or not.
    """

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []

    def spawn(
        self,
        command: Sequence[str],
        *,
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> subprocess.Popen[bytes]:
        """Run ``command`` in ``cwd`` with ``env`` added to this process's environment."""
        with log.open("wb") as sink:
            process = subprocess.Popen(
                list(command),
                cwd=cwd,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append(process)
        return process

    @staticmethod
    def group(process: subprocess.Popen[bytes]) -> dict[int, str]:
        """The live processes (not zombies) of ``process``'s group: pid and command line.

        Read from /proc (Linux), since a signal (``killpg(pgid, 0)``) would count zombies too.
        """
        members = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                # The command name, in parentheses, may hold spaces: split after it.
                state, _ppid, pgrp = stat.read_text().rpartition(")")[2].split()[:3]
                if int(pgrp) == process.pid and state != "Z":
                    cmdline = (stat.parent / "cmdline").read_bytes()
                    members[int(stat.parent.name)] = cmdline.replace(b"\0", b" ").decode()
            except (OSError, ValueError):
                continue  # it exited while being read
        return members

    def close(self) -> None:
        for process in self.processes:
            # ProcessLookupError: the group is gone, the process and all it started exited.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        for process in self.processes:
            process.wait(timeout=10)
