"""``python -m lifecycle``: look at a Lifecycle from the command line.

``python -m lifecycle graph module:attribute [--format tree|mermaid|dot]`` prints the service
dependency graph of a `Lifecycle`, or of the Starlette or FastAPI app whose lifespan is a
Lifecycle's (``module`` alone finds the one Lifecycle the module defines). What the other
decorators declare appears too, marked by kind (``[worker]``, ``[periodic]``,
``[background]``, ``[health check]``), and so does lifecycle's own machinery, marked
``[lifecycle's own]`` (the event-loop watchdog, the drain's signal handlers).
Nothing is started: the module is imported and the graph validated, that is all.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ._kernel import Service
from ._lifecycle import Lifecycle
from .exceptions import GraphError

__all__ = ["main", "render_graph"]

FORMATS = ("tree", "mermaid", "dot")
# How far an app's ``.app`` chain (middleware wrapping it) is followed to reach the app.
_MAX_WRAPPERS = 64


class _TargetError(Exception):
    """The command line named something that is not (or does not lead to) a Lifecycle."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process's exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m lifecycle", description="Look at a lifecycle.Lifecycle."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    graph = commands.add_parser(
        "graph",
        help="print the service dependency graph",
        description="Print the service dependency graph of a Lifecycle: each service with "
        "the services it depends on.",
    )
    graph.add_argument(
        "target",
        help="module:attribute naming a Lifecycle, or an app whose lifespan is a Lifecycle's "
        "(lifespan=lc.lifespan); a module alone for the one Lifecycle it defines",
    )
    graph.add_argument(
        "--format",
        choices=FORMATS,
        default="tree",
        help="a text tree (the default), a Mermaid flowchart or a Graphviz DOT digraph",
    )
    args = parser.parse_args(argv)
    try:
        lifecycle = load(args.target)
        lifecycle.validate()
    except (_TargetError, GraphError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(render_graph(lifecycle, args.format, title=args.target))
    return 0


# -- finding the Lifecycle ----------------------------------------------------------------


def load(target: str) -> Lifecycle:
    """The `Lifecycle` that ``module:attribute`` (or ``module``) names."""
    module_name, _, attribute = target.partition(":")
    if not module_name:
        raise _TargetError(f"{target!r} names no module; write module:attribute.")
    if module_name.startswith("."):
        raise _TargetError(
            f"{module_name!r} is a relative module name; write the module's full dotted path."
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and not _is_self_or_parent(exc.name, module_name):
            raise _TargetError(
                f"Importing {module_name!r} failed: it imports {exc.name!r}, which is not "
                f"installed; install it in this environment."
            ) from exc
        raise _TargetError(
            f"Cannot import {module_name!r} ({exc}); run from the directory that contains it, "
            f"or add that directory to PYTHONPATH."
        ) from exc
    except Exception as exc:  # its own code failed: say so, not where to find it
        raise _TargetError(
            f"Importing {module_name!r} raised {type(exc).__name__}: {exc}; run "
            f"`python -c 'import {module_name}'` to see the traceback."
        ) from exc
    if not attribute:
        found = list({id(v): v for v in vars(module).values() if isinstance(v, Lifecycle)}.values())
        if len(found) != 1:
            what = "no Lifecycle" if not found else f"{len(found)} Lifecycles"
            raise _TargetError(
                f"Module {module_name!r} defines {what}; name one with {module_name}:attribute."
            )
        return found[0]
    obj: Any = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise _TargetError(
                f"{module_name!r} has no attribute {attribute!r}; check the name after the ':'."
            ) from None
    lifecycle = _lifecycle_of(obj)
    if lifecycle is None:
        raise _TargetError(
            f"{target!r} is a {type(obj).__name__}, neither a Lifecycle nor an app whose "
            f"lifespan is a Lifecycle's (lifespan=lc.lifespan or lc.wrap_lifespan(...)); name "
            f"the Lifecycle itself, as in {module_name}:lc."
        )
    return lifecycle


def _is_self_or_parent(name: str, module_name: str) -> bool:
    return module_name == name or module_name.startswith(f"{name}.")


def _lifecycle_of(obj: object) -> Lifecycle | None:
    """``obj`` if it is a Lifecycle, else the Lifecycle behind the app ``obj``, if any."""
    for _ in range(_MAX_WRAPPERS):
        if isinstance(obj, Lifecycle):
            return obj
        router = getattr(obj, "router", None)
        lifespan = getattr(router, "lifespan_context", None)
        if lifespan is not None:
            # lc.lifespan is a bound method; lc.wrap_lifespan(...) a closure over lc.
            owner = getattr(lifespan, "__self__", None)
            if isinstance(owner, Lifecycle):
                return owner
            for cell in getattr(inspect.unwrap(lifespan), "__closure__", None) or ():
                if isinstance(cell.cell_contents, Lifecycle):
                    return cell.cell_contents
            return None
        obj = getattr(obj, "app", None)  # middleware wrapping the app
        if obj is None:
            return None
    return None


# -- rendering ----------------------------------------------------------------------------


def render_graph(lifecycle: Lifecycle, format: str = "tree", *, title: str = "") -> str:
    """Render ``lifecycle``'s (valid) dependency graph as a text tree, Mermaid or DOT.

    Args:
        lifecycle: The Lifecycle.
        format: ``"tree"``, ``"mermaid"`` or ``"dot"``.
        title: What to call the graph in the output.

    Returns:
        The rendering, without a trailing newline.
    """
    renderers: dict[str, Callable[[list[Service[Any]], str], str]] = {
        "tree": _tree,
        "mermaid": _mermaid,
        "dot": _dot,
    }
    if format not in renderers:
        raise ValueError(f"format must be one of {FORMATS!r}, not {format!r}.")
    return renderers[format](list(lifecycle.declared.values()), title)


def _edges(service: Service[Any]) -> list[tuple[str, str]]:
    """(dependency, parameter) pairs of ``service``, each dependency once."""
    edges: dict[str, str] = {}
    for param, target in service.depends.items():
        edges.setdefault(target, param)
    return list(edges.items())


def _tree(services: list[Service[Any]], title: str) -> str:
    by_name = {service.name: service for service in services}
    depended_on = {target for service in services for target in service.depends.values()}
    lines = [
        f"{title or 'Lifecycle'}: each service above the services it depends on; (*) marks a "
        f"service expanded above"
    ]
    expanded: set[str] = set()

    def label(service: Service[Any], param: str | None) -> str:
        text = service.name
        if param is not None and param != service.name:
            text += f" (as {param})"
        if service.kind == "lifecycle":
            text += "  [lifecycle's own]"
        elif service.kind != "service":
            text += f"  [{service.kind}]"
        return text

    def visit(name: str, param: str | None, prefix: str, branch: str, last: bool) -> None:
        service = by_name[name]
        edges = _edges(service)
        repeated = bool(edges) and name in expanded
        lines.append(f"{prefix}{branch}{label(service, param)}{' (*)' if repeated else ''}")
        if repeated:
            return
        expanded.add(name)
        child_prefix = prefix + ("" if not branch else "    " if last else "│   ")
        for index, (target, via) in enumerate(edges):
            end = index == len(edges) - 1
            visit(target, via, child_prefix, "└── " if end else "├── ", end)

    for service in services:
        if service.name not in depended_on:
            visit(service.name, None, "", "", True)
    return "\n".join(lines)


def _mermaid(services: list[Service[Any]], title: str) -> str:
    ids = {service.name: f"s{index}" for index, service in enumerate(services)}
    lines = [
        f"%% Services of {title or 'the Lifecycle'}: an arrow points to a dependency.",
        "flowchart TD",
    ]
    for service in services:
        text = _mermaid_text(service.name)
        shape = f'[["{text}"]]' if service.internal else f'["{text}"]'
        lines.append(f"    {ids[service.name]}{shape}")
    for service in services:
        for target, param in _edges(service):
            via = "" if param == target else f"|{param}|"
            lines.append(f"    {ids[service.name]} -->{via} {ids[target]}")
    internal = [ids[s.name] for s in services if s.internal]
    if internal:
        lines.append("    classDef internal stroke-dasharray: 4 4")
        lines.append(f"    class {','.join(internal)} internal")
    return "\n".join(lines)


def _mermaid_text(text: str) -> str:
    """``text`` safe inside a quoted Mermaid label: markup characters as entity codes."""
    return "".join(
        f"#{ord(char)};" if char in '#"<>&' or not char.isprintable() else char for char in text
    )


def _dot(services: list[Service[Any]], title: str) -> str:
    def quote(text: str) -> str:
        return json.dumps(text, ensure_ascii=False)  # DOT strings escape like JSON ones

    lines = [
        f"// Services of {title or 'the Lifecycle'}: an edge points to a dependency.",
        "digraph lifecycle {",
        "    node [shape=box];",
    ]
    for service in services:
        style = " [style=dashed]" if service.internal else ""
        lines.append(f"    {quote(service.name)}{style};")
    for service in services:
        for target, param in _edges(service):
            label = "" if param == target else f" [label={quote(param)}]"
            lines.append(f"    {quote(service.name)} -> {quote(target)}{label};")
    lines.append("}")
    return "\n".join(lines)
