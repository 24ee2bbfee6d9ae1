"""The README's examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import anyio
import pytest

from lifecycle.testing import lifespan_client

README = Path(__file__).parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_has_examples() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("source", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(source: str) -> None:
    namespace: dict[str, object] = {"__name__": "readme_example"}
    exec(compile(source, str(README), "exec"), namespace)
    app = namespace.get("app")
    if app is None or "provide(" not in source:
        return

    async def request_index() -> object:
        async with lifespan_client(app) as client:  # type: ignore[arg-type]
            return (await client.get("/")).json()

    assert anyio.run(request_index) == {"text": "hello"}
