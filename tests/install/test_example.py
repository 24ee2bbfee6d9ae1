"""``anyio-lifecycle[example]``, the install set the Dockerfile installs: the example app.

Run under a real uvicorn from a copy of example_app/ (so that lifecycle comes from the
installed wheel), it drains on SIGTERM: /readyz answers 503 while /livez answers 200, and
the process exits by itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent


def test_the_example_app_drains_on_sigterm(
    tmp_path: Path, start_server: Callable[..., Any]
) -> None:
    shutil.copytree(ROOT / "example_app", tmp_path / "example_app")
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
    server = start_server(
        [
            str(Path(sys.executable).parent / "uvicorn"),
            "example_app.main:app",
            "--host",
            "127.0.0.1",
            "--port",
            "{port}",
            "--timeout-graceful-shutdown",
            "5",
        ],
        cwd=tmp_path,
        env=env,
    )
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    assert server.call("/readyz")[0] == 503, server.output()
    assert server.call("/livez")[0] == 200, server.output()
    assert server.process.wait(timeout=20) in (0, -signal.SIGTERM), server.output()
    assert "Drain begun: readiness now fails." in server.output()
