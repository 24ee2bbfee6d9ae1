"""An app whose database refuses the connection at startup, configuring no logging."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.applications import Starlette

import lifecycle

lc = lifecycle.Lifecycle()


@lc.service
async def settings() -> AsyncIterator[dict[str, str]]:
    yield {}


@lc.service
async def db(settings: dict[str, str]) -> AsyncIterator[str]:
    raise ConnectionRefusedError("Connect call failed ('127.0.0.1', 6390).")
    yield "never"  # pragma: no cover


app = Starlette(lifespan=lc.lifespan)
