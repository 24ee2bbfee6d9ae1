"""What the install-set suites that run a real uvicorn share: start it, wait until it is
ready, call it with nothing but the standard library, and kill it if a test left it."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


class Server:
    """A server process on a free loopback port, its output in ``log``."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.process = process
        self.url = url
        self.log = log

    def call(self, path: str, method: str = "GET") -> tuple[int, bytes]:
        """The status and body of ``method path``; an HTTP error status is an answer too."""
        request = urllib.request.Request(f"{self.url}{path}", method=method)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return int(response.status), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``start_server(command, cwd=..., env=...)``: run ``command`` (given ``{port}``), wait
    for its ``/readyz`` to answer 200, and return it; it is killed at teardown if alive."""
    started: list[Server] = []

    def start(command: list[str], *, cwd: Path, env: dict[str, str]) -> Server:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        log = tmp_path / f"server-{port}.log"
        with log.open("w") as sink:
            process = subprocess.Popen(
                [part.format(port=port) for part in command],
                cwd=cwd,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        server = Server(process, f"http://127.0.0.1:{port}", log)
        started.append(server)
        deadline = time.monotonic() + 30
        while True:
            try:
                if server.call("/readyz")[0] == 200:
                    return server
            except OSError:
                pass
            assert process.poll() is None, server.output()
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.05)

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
