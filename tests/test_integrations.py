"""The graph under Starlette and FastAPI, in process and under a real uvicorn."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import anyio
import httpx
import pytest
from fastapi import Depends, FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from lifecycle import Lifecycle, StartupError
from lifecycle.fastapi import provide
from lifecycle.testing import lifespan_client

from .servers import free_port

pytestmark = pytest.mark.anyio


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.closed = False


def make_lifecycle() -> tuple[Lifecycle, Any]:
    lc = Lifecycle()

    @lc.service
    async def settings() -> AsyncIterator[dict[str, str]]:
        yield {"url": "sqlite://memory"}

    @lc.service
    async def db(settings: dict[str, str]) -> AsyncIterator[Database]:
        database = Database(settings["url"])
        try:
            yield database
        finally:
            database.closed = True

    return lc, db


# FastAPI resolves annotations in the module's namespace, so the typed dependency lives here.
shared_lc, shared_db = make_lifecycle()
DB = Annotated[Database, Depends(provide(shared_db))]


async def test_fastapi_typed_dependency_and_request_state() -> None:
    lc, db = shared_lc, shared_db
    app = FastAPI(lifespan=lc.lifespan)

    @app.get("/url")
    async def url(database: DB, request: Request) -> dict[str, Any]:
        return {"url": database.url, "same": request.state.db is database}

    async with lifespan_client(app) as client:
        response = await client.get("/url")
        database = lc.get(db)
    assert response.json() == {"url": "sqlite://memory", "same": True}
    assert database.closed


async def test_starlette_request_state() -> None:
    lc, _ = make_lifecycle()

    async def url(request: Request) -> JSONResponse:
        return JSONResponse({"url": request.state.db.url, "settings": request.state.settings})

    app = Starlette(routes=[Route("/url", url)], lifespan=lc.lifespan)
    async with lifespan_client(app) as client:
        response = await client.get("/url")
    assert response.json() == {"url": "sqlite://memory", "settings": {"url": "sqlite://memory"}}


async def test_provide_outside_the_lifespan_answers_503_and_logs_what_to_do(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = FastAPI()  # the lifespan was forgotten

    @app.get("/url")
    async def url(database: DB) -> str:
        return database.url

    transport = httpx.ASGITransport(app=app)
    with caplog.at_level(logging.INFO, logger="lifecycle.fastapi"):
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/url")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert "shared_db" not in response.text  # nothing internal in the body
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "pass lifespan=lc.lifespan" in record.getMessage()


async def test_provide_while_the_service_is_not_running_is_a_problem_503() -> None:
    from lifecycle.starlette import exception_handlers

    app = FastAPI(exception_handlers=exception_handlers())

    @app.get("/url")
    async def url(database: DB) -> str:
        return database.url

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/url")  # no lifespan run: the service never started
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == "urn:lifecycle:problem:service-unavailable"
    assert problem["instance"].startswith("urn:uuid:")


async def test_wrap_lifespan_runs_inside_the_services() -> None:
    lc, db = make_lifecycle()
    seen: list[str] = []

    @asynccontextmanager
    async def mine(app: Starlette) -> AsyncIterator[Mapping[str, Any]]:
        database = lc.get(db)  # the services are running already
        seen.append(f"enter with {database.url}")
        yield {"greeting": "hello"}
        seen.append(f"exit, db closed={database.closed}")

    async def hello(request: Request) -> JSONResponse:
        return JSONResponse([request.state.greeting, request.state.db.url])

    app = Starlette(routes=[Route("/", hello)], lifespan=lc.wrap_lifespan(mine))
    async with lifespan_client(app) as client:
        response = await client.get("/")
    assert response.json() == ["hello", "sqlite://memory"]
    assert seen == ["enter with sqlite://memory", "exit, db closed=False"]


async def test_startup_error_reaches_the_client_as_itself() -> None:
    lc = Lifecycle()

    @lc.service
    async def broken() -> AsyncIterator[None]:
        raise ConnectionRefusedError("db is down")
        yield None  # pragma: no cover

    app = FastAPI(lifespan=lc.lifespan)
    with pytest.raises(StartupError, match="'broken' raised ConnectionRefusedError"):
        async with lifespan_client(app):
            pytest.fail("startup should have failed")


# -- under a real uvicorn -------------------------------------------------------------------

APP_SOURCE = """
import os
from collections.abc import AsyncIterator

import anyio
from fastapi import FastAPI

from lifecycle import Lifecycle

lc = Lifecycle(startup_timeout=5, shutdown_timeout=5)


@lc.service
async def settings() -> AsyncIterator[dict[str, str]]:
    yield {"mode": os.environ.get("MODE", "ok")}
    print("cleanup settings", flush=True)


@lc.service
async def db(settings: dict[str, str]) -> AsyncIterator[str]:
    if settings["mode"] == "broken":
        raise ConnectionRefusedError("database at 127.0.0.1:1 refused the connection")
    yield "db"
    await anyio.sleep(0.01)
    print("cleanup db", flush=True)


app = FastAPI(lifespan=lc.lifespan)


@app.get("/")
async def index() -> dict[str, str]:
    return {"db": lc.get("db")}
"""


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "service_app.py").write_text(textwrap.dedent(APP_SOURCE))
    return tmp_path


def start_uvicorn(app_dir: Path, port: int, mode: str) -> subprocess.Popen[str]:
    env = {**os.environ, "MODE": mode, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "uvicorn", "service_app:app"),
            *("--host", "127.0.0.1", "--port", str(port), "--app-dir", str(app_dir)),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_uvicorn_exits_non_zero_with_the_startup_error(app_dir: Path) -> None:
    process = start_uvicorn(app_dir, free_port(), "broken")
    try:
        output, _ = process.communicate(timeout=20)
    finally:
        process.kill()
        process.wait()
    assert process.returncode not in (0, None)
    assert "Application startup failed. Exiting." in output
    assert "StartupError: Startup failed: service 'db' raised ConnectionRefusedError" in output
    assert "cleanup settings" in output  # what had started was rolled back


@pytest.mark.slow
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_uvicorn_serves_and_stops_in_reverse_order_on_sigterm(app_dir: Path) -> None:
    port = free_port()
    process = start_uvicorn(app_dir, port, "ok")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            deadline = time.monotonic() + 15
            while True:
                try:
                    response = await client.get("/")
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise
                    await anyio.sleep(0.05)
        assert response.json() == {"db": "db"}
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=20)
    finally:
        process.kill()
        process.wait()
    # uvicorn re-raises the signal after its graceful shutdown.
    assert process.returncode in (0, -signal.SIGTERM), output
    assert output.index("cleanup db") < output.index("cleanup settings")
    assert "Application shutdown complete." in output
