"""The core install with uvicorn beside it (``anyio-lifecycle[uvicorn]``), from the wheel:
a Starlette app with services, a worker pool, health routes, the deadline middleware and
``drain_delay`` serves under a real uvicorn, and drains on a real SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent


def call(url: str, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_the_core_app_serves_and_drains_under_uvicorn(tmp_path: Path) -> None:
    shutil.copy(HERE / "core_app.py", tmp_path / "core_app.py")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    log = tmp_path / "uvicorn.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "core_app:app", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if call(f"{url}/readyz")[0] == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        code, body = call(f"{url}/submit?job=1", "POST")
        assert code == 200, body
        assert 0 < json.loads(body)["remaining"] <= 5.0  # the deadline middleware's default
        process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert call(f"{url}/readyz")[0] == 503, log.read_text()
        assert call(f"{url}/livez")[0] == 200, log.read_text()
        assert call(f"{url}/submit?job=2", "POST")[0] == 200  # still served during the delay
        assert process.wait(timeout=20) in (0, -signal.SIGTERM), log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log.read_text()
    assert "Drain begun: readiness now fails." in output, output
    assert "Stopped 4 services" in output, output  # settings, the pool, watchdog, signals
