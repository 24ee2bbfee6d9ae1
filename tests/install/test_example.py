"""``anyio-lifecycle[example]``, the install set the Dockerfile installs: the example app.

Run under a real uvicorn from a copy of example_app/ (so that lifecycle comes from the
installed wheel), it drains on SIGTERM: /readyz answers 503 while /livez answers 200, and
the process exits by itself.
"""

from __future__ import annotations

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

ROOT = Path(__file__).resolve().parent.parent.parent


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_example_app_drains_on_sigterm(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "example_app", tmp_path / "example_app")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "DRAIN_DELAY": "1", "SQLITE_PATH": str(tmp_path / "items.db")}
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    env.pop("PYTHONPATH", None)
    where = subprocess.run(
        [sys.executable, "-c", "import lifecycle; print(lifecycle.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "site-packages" in where, where
    log = tmp_path / "uvicorn.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "uvicorn"),
                "example_app.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--timeout-graceful-shutdown",
                "5",
            ],
            cwd=tmp_path,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if status(f"{url}/readyz") == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert status(f"{url}/readyz") == 503, log.read_text()
        assert status(f"{url}/livez") == 200, log.read_text()
        assert process.wait(timeout=20) in (0, -signal.SIGTERM), log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "Drain begun: readiness now fails." in log.read_text()
