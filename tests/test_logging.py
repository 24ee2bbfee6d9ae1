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


def test_the_startup_and_shutdown_lines_appear_under_plain_uvicorn() -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "tests.apps.plain_logging:app", "--port", str(port)],
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
