"""Pictures and logs: the graph from the command line, the timeline's Gantt chart, the logs."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType

import anyio
import anyio.lowlevel
import pytest
from starlette.applications import Starlette

from lifecycle import (
    DeadlineMiddleware,
    Lifecycle,
    ServiceState,
    Timeline,
    TimelineEntry,
)
from lifecycle._cli import main, render_graph

ROOT = Path(__file__).parent.parent


def shop() -> Lifecycle:
    lc = Lifecycle()

    @lc.service
    async def settings() -> AsyncIterator[str]:
        yield "settings"

    @lc.service
    async def db(settings: str) -> AsyncIterator[str]:
        yield "db"

    @lc.service(depends={"store": "db"})
    async def cache(settings: str, store: str) -> AsyncIterator[str]:
        yield "cache"

    @lc.worker
    async def index(job: int, db: str, cache: str) -> None:
        pass

    @lc.service
    async def api(db: str) -> AsyncIterator[str]:
        yield "api"

    return lc


@pytest.fixture
def module(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A module ``shop_app`` defining a Lifecycle, an app and a wrapped app."""
    shop_app = ModuleType("shop_app")
    lc = shop()

    @asynccontextmanager
    async def own(app: object) -> AsyncIterator[None]:
        yield None

    shop_app.lc = lc  # type: ignore[attr-defined]
    shop_app.app = Starlette(lifespan=lc.lifespan)  # type: ignore[attr-defined]
    shop_app.wrapped = DeadlineMiddleware(  # type: ignore[attr-defined]
        Starlette(lifespan=lc.wrap_lifespan(own))
    )
    shop_app.nothing = Starlette()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "shop_app", shop_app)
    return shop_app


# -- python -m lifecycle graph ------------------------------------------------------------

TREE = """\
shop_app:lc: each service above the services it depends on; (*) marks a service expanded above
worker:index  [worker]
├── db
│   └── settings
└── cache
    ├── settings
    └── db (as store) (*)
api
└── db (*)"""

MERMAID = """\
%% Services of shop_app:lc: an arrow points to a dependency.
flowchart TD
    s0["settings"]
    s1["db"]
    s2["cache"]
    s3[["worker:index"]]
    s4["api"]
    s1 --> s0
    s2 --> s0
    s2 -->|store| s1
    s3 --> s1
    s3 --> s2
    s4 --> s1
    classDef internal stroke-dasharray: 4 4
    class s3 internal"""

DOT = """\
// Services of shop_app:lc: an edge points to a dependency.
digraph lifecycle {
    node [shape=box];
    "settings";
    "db";
    "cache";
    "worker:index" [style=dashed];
    "api";
    "db" -> "settings";
    "cache" -> "settings";
    "cache" -> "db" [label="store"];
    "worker:index" -> "db";
    "worker:index" -> "cache";
    "api" -> "db";
}"""


@pytest.mark.parametrize(("fmt", "expected"), [("tree", TREE), ("mermaid", MERMAID), ("dot", DOT)])
def test_graph_formats(
    module: ModuleType, capsys: pytest.CaptureFixture[str], fmt: str, expected: str
) -> None:
    assert main(["graph", "shop_app:lc", "--format", fmt]) == 0
    assert capsys.readouterr().out == expected + "\n"


@pytest.mark.parametrize("target", ["shop_app", "shop_app:app", "shop_app:wrapped"])
def test_graph_finds_the_lifecycle_of_a_module_or_an_app(
    module: ModuleType, capsys: pytest.CaptureFixture[str], target: str
) -> None:
    assert main(["graph", target]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{target}: each service above")
    assert out.splitlines()[1:] == TREE.splitlines()[1:]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("shop_app:nothing", "is a Starlette, neither a Lifecycle nor an app whose lifespan"),
        ("shop_app:missing", "'shop_app' has no attribute 'missing'"),
        ("no_such_module_here:lc", "Cannot import 'no_such_module_here'"),
        ("sys", "Module 'sys' defines no Lifecycle; name one with sys:attribute."),
        (":lc", "names no module"),
    ],
)
def test_graph_explains_a_bad_target(
    module: ModuleType, capsys: pytest.CaptureFixture[str], target: str, message: str
) -> None:
    assert main(["graph", target]) == 1
    assert message in capsys.readouterr().err


def test_graph_reports_an_invalid_graph(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = ModuleType("broken_app")
    lc = Lifecycle()

    @lc.service
    async def api(db: str) -> AsyncIterator[str]:
        yield "api"

    broken.lc = lc  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "broken_app", broken)
    assert main(["graph", "broken_app:lc"]) == 1
    assert "depends on unknown service 'db'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("source", "target", "message"),
    [
        ("import not_installed_pkg_xyz\n", "needs_dep:lc", "it imports 'not_installed_pkg_xyz'"),
        ("raise RuntimeError('boom at import')\n", "boom_app:lc", "raised RuntimeError: boom"),
        ("def broken(:\n", "syntax_app:lc", "raised SyntaxError"),
        ("", ".relative:lc", "'.relative' is a relative module name"),
    ],
)
def test_graph_explains_a_module_that_cannot_be_imported(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    source: str,
    target: str,
    message: str,
) -> None:
    module_name = target.partition(":")[0].lstrip(".")
    (tmp_path / f"{module_name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module_name, raising=False)
    assert main(["graph", target]) == 1
    assert message in capsys.readouterr().err


def test_render_graph_rejects_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="format must be one of"):
        render_graph(shop(), "svg")


def test_the_example_apps_graph_from_python_dash_m() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lifecycle", "graph", "example_app.main:app"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()

    def children(root: str) -> list[str]:
        """The direct dependencies drawn under a top-level entry."""
        start = lines.index(root) + 1
        below = []
        for line in lines[start:]:
            if not line.startswith(("├", "└", "│", " ")):
                break
            if line.startswith(("├── ", "└── ")):
                below.append(line[4:].removesuffix(" (*)"))
        return below

    assert children("worker:warm_cache  [worker]") == ["db", "cache", "settings"]
    assert children("worker:reindex  [worker]") == ["db", "settings"]
    assert children("health:db  [health check]") == ["db (as value)"]
    assert "    └── settings" in lines  # db and cache drawn with their own dependency
    assert "periodic:report_items  [periodic]" in lines
    # Lifecycle's own machinery is told apart from what the user declared.
    assert "health:event_loop  [lifecycle's own]" in lines
    assert not any("[internal]" in line for line in lines)


# -- the timeline as a Gantt chart --------------------------------------------------------


def test_gantt_of_a_run() -> None:
    ms = 0.001
    timeline = Timeline(
        (
            TimelineEntry("settings", ServiceState.STOPPED, True, 0.0, 1 * ms, 98 * ms, 100 * ms),
            TimelineEntry("db", ServiceState.STOPPED, True, 1 * ms, 11 * ms, 90 * ms, 98 * ms),
            TimelineEntry(
                "cache",
                ServiceState.FAILED,
                True,
                1 * ms,
                6 * ms,
                80 * ms,
                90 * ms,
                "TimeoutError: cut off",
            ),
        )
    )
    assert timeline.gantt(width=20) == (
        "startup: 11.0ms\n"
        "  settings |==                  |     1.0ms\n"
        "  db       | ===================|    10.0ms\n"
        "  cache    | ==========         |     5.0ms\n"
        "shutdown: 20.0ms, began at 80.0ms\n"
        "  cache    |=========x          |    10.0ms  failed: TimeoutError: cut off\n"
        "  db       |          ========  |     8.0ms\n"
        "  settings |                  ==|     2.0ms"
    )


def test_gantt_of_a_failed_and_an_unfinished_startup() -> None:
    ms = 0.001
    timeline = Timeline(
        (
            TimelineEntry("db", ServiceState.FAILED, False, 0.0, 10 * ms, error="OSError: down"),
            TimelineEntry("cache", ServiceState.STOPPED, False, 0.0, 10 * ms),
            TimelineEntry("api", ServiceState.STARTING, False, 5 * ms),
            TimelineEntry("never", ServiceState.PENDING),
        )
    )
    assert timeline.gantt(width=10) == (
        "startup: 10.0ms\n"
        "  db    |=========x|    10.0ms  failed: OSError: down\n"
        "  cache |=========x|    10.0ms  cancelled\n"
        "  api   |     ====>|            starting"
    )
    assert Timeline((TimelineEntry("db", ServiceState.PENDING),)).gantt() == (
        "No service has begun to start."
    )
    with pytest.raises(ValueError, match="at least 10 columns"):
        timeline.gantt(width=5)


# -- logs ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_logs_carry_structured_fields_and_one_summary_line_each_way(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="lifecycle")
    lc = Lifecycle()

    @lc.service
    async def db() -> AsyncIterator[str]:
        yield "db"

    @lc.worker
    async def index(job: int, db: str) -> None:
        raise ValueError(f"cannot index {job}")

    async with lc.run():
        with pytest.raises(ValueError, match="cannot index 7"):
            await index.call(7)

    records = [r for r in caplog.records if r.name.startswith("lifecycle.")]
    started = [r for r in records if r.getMessage().startswith("Started ")]
    stopped = [r for r in records if r.getMessage().startswith("Stopped ")]
    assert len(started) == len(stopped) == 1
    assert (started[0].levelno, started[0].phase) == (logging.INFO, "startup")  # type: ignore[attr-defined]
    assert (stopped[0].levelno, stopped[0].phase) == (logging.INFO, "shutdown")  # type: ignore[attr-defined]
    assert started[0].duration >= 0  # type: ignore[attr-defined]
    assert stopped[0].duration >= 0  # type: ignore[attr-defined]

    per_service = {
        (r.service, r.phase): r.duration  # type: ignore[attr-defined]
        for r in records
        if r.levelno == logging.DEBUG and hasattr(r, "service")
    }
    assert set(per_service) == {
        ("db", "start"),
        ("db", "stop"),
        ("worker:index", "start"),
        ("worker:index", "stop"),
    }
    assert all(duration >= 0 for duration in per_service.values())

    failed = next(r for r in records if r.getMessage().startswith("Worker pool 'index': job 7"))
    assert (failed.levelno, failed.pool, failed.job) == (logging.ERROR, "index", "7")  # type: ignore[attr-defined]

    gantt = next(r for r in records if r.getMessage().startswith("Timeline of the run:"))
    assert gantt.levelno == logging.DEBUG
    lines = gantt.getMessage().splitlines()
    assert lines[1].startswith("startup: ")
    assert [line.split()[0] for line in lines[2:4]] == ["db", "worker:index"]
    assert lines[4].startswith("shutdown: ")
    assert [line.split()[0] for line in lines[5:7]] == ["worker:index", "db"]


@pytest.mark.anyio
async def test_no_gantt_is_rendered_unless_debug_is_on(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="lifecycle")
    rendered: list[int] = []
    monkeypatch.setattr(Timeline, "gantt", lambda self, width=60: rendered.append(width) or "")
    lc = Lifecycle()

    @lc.service
    async def db() -> AsyncIterator[str]:
        await anyio.lowlevel.checkpoint()
        yield "db"

    async with lc.run():
        pass
    assert rendered == []
    assert not any(r.getMessage().startswith("Timeline") for r in caplog.records)


def test_mermaid_labels_escape_markup_in_service_names() -> None:
    lc = Lifecycle()

    @lc.service(name='a"b#c<br>d\ne')
    async def odd() -> AsyncIterator[str]:
        yield "odd"

    rendered = render_graph(lc, "mermaid")
    assert '    s0["a#34;b#35;c#60;br#62;d#10;e"]' in rendered.splitlines()
