"""What a user sees in the logs without configuring logging, under a real uvicorn."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .servers import free_port

ROOT = Path(__file__).parent.parent

pytestmark = pytest.mark.slow


COMMANDS = {
    "uvicorn": [sys.executable, "-m", "uvicorn", "tests.apps.plain_logging:app", "--port"],
    # FastAPI's CLI runs uvicorn in process, with uvicorn's logging set up.
    "fastapi run": [
        *(sys.executable, "-m", "fastapi", "run", "tests/apps/plain_logging_fastapi.py"),
        *("--host", "127.0.0.1", "--port"),
    ],
}


@pytest.mark.parametrize("runner", list(COMMANDS))
def test_the_startup_and_shutdown_lines_appear_under_plain_uvicorn(runner: str) -> None:
    port = free_port()
    process = subprocess.Popen(
        [*COMMANDS[runner], str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "INFO:lifecycle.services: Started 1 services in" in output, output
    assert "INFO:lifecycle.services: Stopped 1 services in" in output, output
    assert output.count("Started 1 services") == 1  # once, not also through the root logger


def test_a_failed_start_prints_one_traceback_and_one_period() -> None:
    """The service's error is logged as one line; the traceback comes once, with the
    StartupError uvicorn prints; an error message that ends in a period gets no second."""
    process = subprocess.run(
        [
            *(sys.executable, "-m", "uvicorn", "tests.apps.failing_start:app"),
            *("--port", str(free_port())),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    output = process.stdout + process.stderr
    assert process.returncode != 0, output
    failed = "ERROR:lifecycle.services: Service 'db' failed to start: ConnectionRefusedError"
    assert output.count(failed) == 1, output
    # Each printed traceback shows the line that raised: once.
    assert output.count('raise ConnectionRefusedError("Connect call failed') == 1, output
    assert "6390). Rolled back: 'settings'." in output, output
    assert ".." not in output, output
