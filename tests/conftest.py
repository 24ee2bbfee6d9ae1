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

