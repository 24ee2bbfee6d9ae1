from __future__ import annotations

from collections.abc import Iterator

import pytest

from .servers import Spawner


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("trio", {}), id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, object]]:
    """Run every ``@pytest.mark.anyio`` test on asyncio and on trio."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def spawner() -> Iterator[Spawner]:
    """Start subprocesses with ``spawner.spawn(...)``; whatever still runs is killed after."""
    spawner = Spawner()
    try:
        yield spawner
    finally:
        spawner.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Show the load balancer drill's figures (tests/test_lb_drill.py) after every run that
    ran it, passed, failed or xfailed alike, without ``-s`` or ``-rP``."""
    figures = [
        value
        for reports in terminalreporter.stats.values()
        for report in reports
        if getattr(report, "when", None) == "call"
        for name, value in getattr(report, "user_properties", ())
        if name == "lb_drill"
    ]
    if figures:
        terminalreporter.section("HAProxy drill figures")
        for text in figures:
            terminalreporter.write_line(str(text))
