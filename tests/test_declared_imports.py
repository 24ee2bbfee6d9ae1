"""Every third-party module lifecycle/ imports is declared for the code path that imports it.

The core install (``pip install anyio-lifecycle``) has anyio and Starlette only, so a core
module importing anything else, even lazily, fails for its users (as ``_drain.py`` did with
sniffio, which the dev install brings in through trio). Read from the source with ``ast``,
so the dev venv, which has every extra installed, cannot hide a missing declaration.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "lifecycle"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# The modules that belong to an extra: they may import it at module level.
MODULE_EXTRAS = {
    "fastapi.py": "fastapi",
    "httpx.py": "httpx",
    "_metrics.py": "metrics",
    "_tracing.py": "tracing",
}
# Optional code paths inside other modules: only inside a function, and only this extra.
LAZY_EXTRAS = {
    ("_deadline.py", "trio"): "trio",  # imported only when trio is the running loop
    ("starlette.py", "prometheus_client"): "metrics",  # metrics_route()
    ("testing.py", "httpx"): "httpx",  # the test client
    ("pytest_plugin.py", "trio"): "trio",  # the lifecycle_clock fixture (trio's MockClock)
}
# The pytest plugin belongs to the testing extra (pytest, httpx); pytest loads it.
MODULE_EXTRAS["pytest_plugin.py"] = "testing"
LOADED_BY: dict[str, set[str]] = {}


@dataclass(frozen=True)
class Import:
    """One import statement's top-level module, and how it runs."""

    module: str
    line: int
    lazy: bool  # inside a function: runs only when it is called
    type_checking: bool  # under ``if TYPE_CHECKING:``: never runs


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(source: str, filename: str = "<source>") -> list[Import]:
    """Every absolute import in ``source``, including ``importlib.import_module("name")``."""
    found: list[Import] = []

    def visit(node: ast.AST, *, lazy: bool, type_checking: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(alias.name.split(".")[0], node.lineno, lazy, type_checking))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(Import(node.module.split(".")[0], node.lineno, lazy, type_checking))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append(Import(node.args[0].value.split(".")[0], node.lineno, lazy, False))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, lazy=lazy, type_checking=True)
            for child in node.orelse:
                visit(child, lazy=lazy, type_checking=type_checking)
            return
        inner = lazy or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, lazy=inner, type_checking=type_checking)

    visit(ast.parse(source, filename), lazy=False, type_checking=False)
    return found


def third_party(module: str) -> bool:
    return module not in sys.stdlib_module_names and module not in ("lifecycle", "__future__")


def undeclared(
    source: str,
    *,
    module_level: set[str],
    lazy: set[str] = frozenset(),  # type: ignore[assignment]
    type_checking: set[str] = frozenset(),  # type: ignore[assignment]
    filename: str = "<source>",
) -> list[str]:
    """Messages for the imports in ``source`` that the given import names do not cover.

    Args:
        source: A module's source.
        module_level: Import names it may import anywhere (its install set's).
        lazy: Further import names it may import inside a function only.
        type_checking: Further import names it may import under ``TYPE_CHECKING`` only.
        filename: Named in the messages.
    """
    problems = []
    for imp in imports_of(source, filename):
        if not third_party(imp.module) or imp.module in module_level:
            continue
        if imp.lazy and imp.module in lazy:
            continue
        if imp.type_checking and imp.module in type_checking | lazy:
            continue
        where = "under TYPE_CHECKING" if imp.type_checking else "lazily" if imp.lazy else ""
        problems.append(
            f"{filename}:{imp.line} imports {imp.module!r} {where}".rstrip()
            + ", which its install set does not declare; declare it in pyproject.toml or "
            "stop importing it."
        )
    return problems


def _name(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


@functools.cache
def _installed() -> dict[str, set[str]]:
    """Import name -> the installed distributions that provide it."""
    return {
        module: {_name(d) for d in distributions}
        for module, distributions in importlib.metadata.packages_distributions().items()
    }


def import_names(requirements: list[str]) -> set[str]:
    """The top-level import names the distributions in ``requirements`` provide."""
    wanted = {_name(Requirement(r).name) for r in requirements}
    provided = {module for module, dists in _installed().items() if wanted & dists}
    missing = wanted - set().union(*_installed().values())
    assert not missing, f"not installed here, so their import names are unknown: {missing}"
    return provided


CORE = import_names(PYPROJECT["project"]["dependencies"])
EXTRAS = PYPROJECT["project"]["optional-dependencies"]


def extra(name: str) -> set[str]:
    return import_names(EXTRAS[name])


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_every_import_is_declared_for_its_code_path(path: Path) -> None:
    module_level = CORE | (extra(MODULE_EXTRAS[path.name]) if path.name in MODULE_EXTRAS else set())
    module_level |= LOADED_BY.get(path.name, set())
    lazy = set().union(*(extra(e) for (f, _), e in LAZY_EXTRAS.items() if f == path.name))
    every_extra = set().union(*(extra(e) for e in EXTRAS if e not in ("dev", "example")))
    problems = undeclared(
        path.read_text(),
        module_level=module_level,
        lazy=lazy,
        type_checking=every_extra,
        filename=f"lifecycle/{path.name}",
    )
    assert not problems, "\n".join(problems)


def test_each_lazy_exception_is_still_needed() -> None:
    # A stale entry would let a later, unrelated import of that module pass unchecked.
    for (filename, module), _ in LAZY_EXTRAS.items():
        imports = imports_of((PACKAGE / filename).read_text())
        assert any(i.module == module and i.lazy for i in imports), (filename, module)


def test_the_core_install_provides_anyio_and_starlette_only() -> None:
    assert {"anyio", "starlette"} <= CORE
    assert "sniffio" not in CORE


SNIFFIO_AT_TOP = """
import asyncio
import sniffio

def backend():
    return sniffio.current_async_library()
"""
SNIFFIO_LAZY = """
from __future__ import annotations

def backend():
    from sniffio import current_async_library
    return current_async_library()
"""


@pytest.mark.parametrize("source", [SNIFFIO_AT_TOP, SNIFFIO_LAZY], ids=["top", "lazy"])
def test_the_checker_fails_a_core_module_that_imports_sniffio(source: str) -> None:
    [problem] = undeclared(source, module_level=CORE, filename="lifecycle/_drain.py")
    assert "lifecycle/_drain.py" in problem
    assert "'sniffio'" in problem
    assert "does not declare" in problem


def test_the_checker_allows_an_extra_only_where_it_is_declared() -> None:
    lazy_trio = "def f():\n    import trio\n"
    assert undeclared(lazy_trio, module_level=CORE, lazy=extra("trio")) == []
    assert undeclared(lazy_trio, module_level=CORE) != []  # not declared for this module
    top_trio = "import trio.lowlevel\n"
    assert undeclared(top_trio, module_level=CORE, lazy=extra("trio")) != []  # lazy only
    checking = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import httpx\n"
    assert undeclared(checking, module_level=CORE, type_checking=extra("httpx")) == []
    assert undeclared(checking, module_level=CORE) != []
    dynamic = "import importlib\ndef f():\n    importlib.import_module('sniffio')\n"
    assert undeclared(dynamic, module_level=CORE) != []
    assert (
        undeclared("import anyio.abc\nfrom starlette.routing import Route\n", module_level=CORE)
        == []
    )
