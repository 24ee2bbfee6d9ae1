"""The core install (``pip install anyio-lifecycle``), from the wheel, with nothing else.

Run by scripts/check in a clean venv holding the wheel, pytest and pytest-timeout only.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sysconfig
from pathlib import Path

import pytest

import lifecycle

# Every public module that needs no extra.
CORE_MODULES = ["lifecycle", "lifecycle.exceptions", "lifecycle.starlette", "lifecycle.testing"]
EXTRA_MODULES = {"lifecycle.fastapi": "fastapi", "lifecycle.httpx": "httpx"}


def test_lifecycle_is_the_installed_wheel_not_the_source_tree() -> None:
    installed = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert Path(lifecycle.__file__).resolve().is_relative_to(installed), lifecycle.__file__
    files = {str(f) for f in importlib.metadata.files("anyio-lifecycle") or []}
    assert "lifecycle/py.typed" in files, "the wheel lacks py.typed"
    assert (Path(lifecycle.__file__).parent / "py.typed").is_file()


def test_only_the_core_dependencies_are_installed() -> None:
    for module in ("fastapi", "httpx", "trio", "prometheus_client", "opentelemetry", "sniffio"):
        assert importlib.util.find_spec(module) is None, f"{module} is installed beside the core"


def test_the_lowest_set_runs_the_lower_bounds() -> None:
    from packaging.requirements import Requirement

    if os.environ.get("INSTALL_SET") != "lowest":
        pytest.skip("only in the lowest-direct install set")
    for line in importlib.metadata.requires("anyio-lifecycle") or []:
        requirement = Requirement(line)
        if requirement.marker is None:  # a core dependency
            [bound] = [s.version for s in requirement.specifier if s.operator == ">="]
            installed = importlib.metadata.version(requirement.name)
            assert installed.split(".")[: len(bound.split("."))] == bound.split("."), (
                f"{requirement.name} {installed} installed, lower bound {bound}"
            )


@pytest.mark.parametrize("name", CORE_MODULES)
def test_every_core_module_imports(name: str) -> None:
    importlib.import_module(name)


@pytest.mark.parametrize("name", sorted(EXTRA_MODULES))
def test_an_extras_module_names_what_is_missing(name: str) -> None:
    with pytest.raises(ImportError, match=EXTRA_MODULES[name]):
        importlib.import_module(name)


@pytest.mark.anyio
async def test_a_lifespan_with_drain_delay_runs_on_the_core_install() -> None:
    lc = lifecycle.Lifecycle(drain_delay=0.1)
    stopped: list[str] = []

    @lc.service
    async def settings():  # type: ignore[no-untyped-def]
        yield {"ok": True}
        stopped.append("settings")

    async with lc.run() as services:
        assert services["settings"] == {"ok": True}
    assert stopped == ["settings"]
