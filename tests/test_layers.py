"""The package is layered: kernel -> extensions -> facade -> adapters, with no import cycle.

Every import between lifecycle's own modules counts, wherever it is written: at module level,
inside a function (a lazy import) or under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lifecycle"

# From the bottom up. A module may import only from its own layer or the layers below.
LAYERS: dict[str, set[str]] = {
    "base": {
        "exceptions",
        "_validate",
        "_timeline",
        "_toolkit",
        "_queue",
        "_leaks",
        "_deadline",
        "_admission",
        "_problem",
        "_signals",
        "_servers",
    },
    "kernel": {"_kernel"},
    "extensions": {"_observe", "_drain", "_health", "_workers"},
    "facade": {"_lifecycle"},
    "adapters": {
        "starlette",
        "fastapi",
        "httpx",
        "testing",
        "pytest_plugin",
        "_metrics",
        "_tracing",
        "_cli",
        "__init__",
        "__main__",
    },
}
RANK = {module: rank for rank, modules in enumerate(LAYERS.values()) for module in modules}


def imports_of(path: Path) -> set[str]:
    """The lifecycle modules that ``path`` imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from ._kernel import X
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import _deadline
                found.update(alias.name for alias in node.names)
            elif node.level == 0 and node.module and node.module.startswith("lifecycle."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lifecycle."):
                    found.add(alias.name.split(".")[1])
    found.discard(path.stem)
    return found


def graph() -> dict[str, set[str]]:
    return {path.stem: imports_of(path) for path in sorted(PACKAGE.glob("*.py"))}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``edges`` as a path ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_every_module_has_a_layer() -> None:
    assert set(graph()) - set(RANK) == set(), "place each new module in LAYERS"


def test_there_is_no_import_cycle() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_imports_only_run_down_the_layers() -> None:
    upward = [
        f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})"
        for module, targets in graph().items()
        for target in targets
        if RANK[target] > RANK[module]
    ]
    assert upward == []


def test_the_kernel_knows_only_services() -> None:
    assert graph()["_kernel"] <= LAYERS["base"]


def layer_of(module: str) -> str:
    return next(name for name, modules in LAYERS.items() if module in modules)


@pytest.mark.parametrize(
    ("edges", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": {"b"}}, ["b", "c", "b"]),
    ],
)
def test_the_cycle_finder_finds_cycles(
    edges: dict[str, set[str]], expected: list[str] | None
) -> None:
    assert find_cycle(edges) == expected


def test_lazy_and_type_only_imports_count(tmp_path: Path) -> None:
    module = tmp_path / "_sample.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from ._lifecycle import Lifecycle\n"
        "def f():\n"
        "    from . import _health\n"
        "    import lifecycle._workers\n"
    )
    assert imports_of(module) == {"_lifecycle", "_health", "_workers"}
