"""An editable install (``pip install -e .``) is visible to mypy in a user's project.

Run by scripts/check in a clean venv holding the editable install, mypy, pytest and
pytest-timeout. pyright is not run: its PyPI package downloads pyright from npm at run
time, which needs a network this check does not assume.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

USER_APP = """
from collections.abc import AsyncIterator

import lifecycle

lc = lifecycle.Lifecycle(shutdown_timeout=5.0)


@lc.service
async def settings() -> AsyncIterator[dict[str, str]]:
    yield {"url": "sqlite://"}


timeout: float | None = lc.shutdown_timeout
"""


def test_mypy_finds_the_editable_install(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(USER_APP)
    (tmp_path / "bad.py").write_text("import lifecycle\n\nlifecycle.Lifecycle(drain_delay='x')\n")
    good = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "app.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert good.returncode == 0, good.stdout + good.stderr
    assert "Cannot find implementation" not in good.stdout
    # And mypy reads lifecycle's types, not Any: a wrong argument type is an error.
    bad = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "bad.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "drain_delay" in bad.stdout or "incompatible type" in bad.stdout, bad.stdout
