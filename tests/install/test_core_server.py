"""The core install with uvicorn beside it (``anyio-lifecycle[uvicorn]``), from the wheel:
a Starlette app with services, a worker pool, health routes, the deadline middleware and
``drain_delay`` serves under a real uvicorn, and drains on a real SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def test_the_core_app_serves_and_drains_under_uvicorn(
    tmp_path: Path, start_server: Callable[..., Any]
) -> None:
    shutil.copy(HERE / "core_app.py", tmp_path / "core_app.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    server = start_server(
        [sys.executable, "-m", "uvicorn", "core_app:app", "--port", "{port}"], cwd=tmp_path, env=env
    )
    code, body = server.call("/submit?job=1", "POST")
    assert code == 200, body
    assert 0 < json.loads(body)["remaining"] <= 5.0  # the deadline middleware's default
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    assert server.call("/readyz")[0] == 503, server.output()
    assert server.call("/livez")[0] == 200, server.output()
    assert server.call("/submit?job=2", "POST")[0] == 200  # still served during the delay
    assert server.process.wait(timeout=20) in (0, -signal.SIGTERM), server.output()
    output = server.output()
    assert "Drain begun: readiness now fails." in output, output
    assert "Stopped 4 services" in output, output  # settings, the pool, watchdog, signals
