"""A Starlette app that configures no logging at all, as most apps under plain uvicorn."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.applications import Starlette

import lifecycle

lc = lifecycle.Lifecycle()


@lc.service
async def settings() -> AsyncIterator[dict[str, str]]:
    yield {}


app = Starlette(lifespan=lc.lifespan)
