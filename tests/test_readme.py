"""The README's examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import anyio
import pytest

from lifecycle.testing import lifespan_client

pytest_plugins = ["pytester"]

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


TESTING_EXAMPLE = next(block for block in BLOCKS if block.startswith("# test_app.py"))


def test_the_testing_example_passes_under_pytest_as_users_run_it(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_app=TESTING_EXAMPLE)
    result = pytester.runpytest_subprocess("-v")
    # anyio's own anyio_backend runs every installed backend; lifecycle_clock, trio alone.
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        [
            "*test_items?asyncio? PASSED*",
            "*test_items?trio? PASSED*",
            "*test_a_hanging_cache_fails_startup?trio-mockclock? PASSED*",
        ]
    )
