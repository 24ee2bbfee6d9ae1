"""Run a test module on every code path of the request's cancel scope.

On asyncio, `DeadlineMiddleware` opens its fast scope (`lifecycle._deadline._LeanScope`)
when the import-time self-test passed, and plain `anyio.CancelScope` otherwise; on trio,
trio's own `CancelScope`. A module that imports `anyio_backend` from here runs each of its
async tests three times: ``asyncio`` (the fast scope), ``asyncio-plain-scope`` (the
fallback) and ``trio``.
"""

from __future__ import annotations

import pytest

from lifecycle import _deadline

# The options of the fallback run: the same as plain asyncio's, told apart by identity.
_PLAIN_SCOPE: dict[str, object] = {}


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("asyncio", _PLAIN_SCOPE), id="asyncio-plain-scope"),
        pytest.param(("trio", {}), id="trio"),
    ]
)
def anyio_backend(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, dict[str, object]]:
    """The backend, with the request scope's code path the test runs on."""
    backend: tuple[str, dict[str, object]] = request.param
    assert _deadline._LEAN_SCOPE_WORKS, "the fast scope failed its self-test on this anyio"
    monkeypatch.setattr(_deadline, "_use_lean_scope", backend[1] is not _PLAIN_SCOPE)
    return backend
