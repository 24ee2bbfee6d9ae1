"""Checked by mypy in tests/test_typing.py: declared things keep their types."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import assert_type

from fastapi import FastAPI
from starlette.applications import Starlette

import lifecycle
from lifecycle import BackgroundTask, PeriodicJob, QueueFull, Service, WorkerPool
from lifecycle.starlette import exception_handlers

lc = lifecycle.Lifecycle()


@lc.service
async def db() -> AsyncIterator[str]:
    yield "db"


@lc.worker(concurrency=2)
async def handle(job: int, db: str) -> bytes:
    return b""


@lc.worker
def sync_handle(job: float) -> bool:
    return True


@lc.background(max_restarts=2)
async def listener(db: str) -> None:
    pass


@lc.periodic(every=1.0)
async def tick() -> None:
    pass


assert_type(db, Service[str])
assert_type(handle, WorkerPool[int, bytes])
assert_type(sync_handle, WorkerPool[float, bool])
assert_type(listener, BackgroundTask)
assert_type(tick, PeriodicJob)


async def use() -> None:
    async with lc.run() as services:
        assert_type(services[db], str)
    assert_type(await handle.call(1), bytes)
    assert_type(lc.get(db), str)


# The overload handlers plug into both frameworks as they are typed.
fastapi_app = FastAPI(exception_handlers=exception_handlers(retry_after=2))
handlers = exception_handlers()
fastapi_app_merged = FastAPI(exception_handlers={**handlers, 404: handlers[QueueFull]})
starlette_app = Starlette(exception_handlers=exception_handlers())
