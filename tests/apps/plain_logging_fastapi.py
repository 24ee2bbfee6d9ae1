"""A FastAPI app that configures no logging at all, for ``fastapi run``."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import FastAPI

import lifecycle

lc = lifecycle.Lifecycle()


@lc.service
async def settings() -> AsyncIterator[dict[str, str]]:
    yield {}


app = FastAPI(lifespan=lc.lifespan)
