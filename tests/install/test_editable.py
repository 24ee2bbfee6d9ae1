"""An editable install (``pip install -e .``) is visible to mypy and pyright in a user's
project.

Run by scripts/check in a clean venv holding the editable install, mypy, pyright, pytest and
pytest-timeout. pyright's PyPI package runs pyright on Node.js, fetched from the npm registry
on first use: where Node.js or the registry is missing, that test skips with the reason (and
fails under CI=true).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_pyright_finds_the_editable_install(tmp_path: Path) -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        reason = "pyright needs Node.js and npm, which are not installed"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; CI=true, so this check must run.")
        pytest.skip(reason)
    (tmp_path / "app.py").write_text(USER_APP)
    (tmp_path / "bad.py").write_text("import lifecycle\n\nlifecycle.Lifecycle(drain_delay='x')\n")
    pyright = [sys.executable, "-m", "pyright", "--pythonpath", sys.executable]
    good = subprocess.run(
        [*pyright, "app.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert good.returncode == 0, good.stdout + good.stderr
    bad = subprocess.run(
        [*pyright, "bad.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "drain_delay" in bad.stdout, bad.stdout
