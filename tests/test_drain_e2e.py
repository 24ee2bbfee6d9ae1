"""The whole drain, end to end: the example app under a real uvicorn, a real SIGTERM, real
PostgreSQL and Redis.

Under `uvicorn module:app` and under `fastapi run`: while 20 slow requests are in flight,
SIGTERM makes /readyz fail within 100 ms while /livez passes and new requests are still served
for the drain delay; then uvicorn shuts down
gracefully, every in-flight request completes, the queued jobs drain, the services stop in
reverse dependency order, and the process exits by itself within drain_delay + grace + 2 s.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from .servers import free_port, require_postgres, require_redis

pytestmark = [
    pytest.mark.slow,
    pytest.mark.anyio,
    pytest.mark.parametrize("anyio_backend", ["asyncio"]),  # httpx client side only
]

ROOT = Path(__file__).parent.parent
DRAIN_DELAY = 1.0
GRACE = 5.0  # uvicorn --timeout-graceful-shutdown
SLOW = 2.0  # seconds each in-flight request takes
JOBS = 8
JOB_SECONDS = 0.4


class Server:
    def __init__(self, port: int, process: subprocess.Popen[str], log: Path) -> None:
        self.port = port
        self.process = process
        self.log = log
        self.url = f"http://127.0.0.1:{port}"

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[object]:
    started: list[Server] = []

    def start(runner: str = "uvicorn", **extra_env: str) -> Server:
        port = free_port()
        log = tmp_path / f"uvicorn-{port}.log"
        env = {
            **os.environ,
            "DATABASE_URL": require_postgres(),
            "REDIS_URL": require_redis(),
            "DRAIN_DELAY": str(DRAIN_DELAY),
            "REINDEX_SECONDS": str(JOB_SECONDS),
            "LOG_LEVEL": "DEBUG",
            "PYTHONUNBUFFERED": "1",
            **extra_env,
        }
        if runner == "uvicorn":
            command = [
                *(sys.executable, "-m", "uvicorn", "example_app.main:app"),
                *("--host", "127.0.0.1", "--port", str(port)),
                *("--timeout-graceful-shutdown", str(int(GRACE))),
                *(("--workers", extra_env["WORKERS"]) if "WORKERS" in extra_env else ()),
            ]
        else:  # FastAPI's own CLI, which runs uvicorn in process with no graceful limit
            assert runner == "fastapi run"
            command = [
                *(sys.executable, "-m", "fastapi", "run", "example_app/main.py"),
                *("--host", "127.0.0.1", "--port", str(port)),
            ]
        with log.open("w") as sink:
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,  # a group of its own, uvicorn's workers included
            )
        server = Server(port, process, log)
        started.append(server)
        return server

    yield start
    for server in started:
        with contextlib.suppress(ProcessLookupError):  # the group: no worker left behind
            os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=10)


async def wait_ready(client: httpx.AsyncClient, server: Server) -> None:
    with anyio.fail_after(30):
        while True:
            try:
                if (await client.get("/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert server.process.poll() is None, server.output()
            await anyio.sleep(0.05)


async def drain_scenario(server: Server) -> tuple[float, list[int], str]:
    """Run the scenario; return (seconds from SIGTERM to exit, in-flight statuses, log)."""
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30) as client:
        await wait_ready(client, server)
        ids = []
        for n in range(JOBS):
            created = await client.post("/items", json={"name": f"drain-{n}"})
            assert created.status_code == 201
            ids.append(created.json()["id"])
        queued = (await client.post("/reindex", json={"ids": ids})).json()["queued"]
        assert queued == JOBS

        statuses: list[int] = []

        async def slow_request() -> None:
            response = await client.get("/slow", params={"seconds": SLOW})
            statuses.append(response.status_code)

        # The probing client exists before the signal: building one (its TLS context reads
        # the CA bundle) takes tens of milliseconds, which the 100 ms must not include.
        async with (
            anyio.create_task_group() as tg,
            httpx.AsyncClient(base_url=server.url, timeout=5) as probe,
        ):
            for _ in range(20):
                tg.start_soon(slow_request)
            await anyio.sleep(0.5)  # all 20 are in flight now (each takes 2 s)
            # Its connection is open before the signal too (opening one resolves the address
            # in a worker thread), so that the probes measure the server, not the client.
            assert (await probe.get("/readyz")).status_code == 200
            # Nor may a garbage collection of this (test) process, with the heap of the whole
            # suite behind it, land inside the 100 ms: collect now, and not while measuring.
            gc.collect()
            gc.disable()
            try:
                sent = time.monotonic()
                server.process.send_signal(signal.SIGTERM)

                # Readiness fails within 100 ms; liveness holds; new requests are still served.
                while (await probe.get("/readyz")).status_code != 503:
                    assert time.monotonic() - sent < 0.1, "/readyz still passing after 100 ms"
                readiness_failed_after = time.monotonic() - sent
            finally:
                gc.enable()
            assert (await probe.get("/livez")).status_code == 200
            during_drain = await probe.get("/items")
            assert during_drain.status_code == 200
            assert time.monotonic() - sent < DRAIN_DELAY  # served during the delay
        assert readiness_failed_after < 0.1

        exit_code = await anyio.to_thread.run_sync(server.process.wait, 30)
        took = time.monotonic() - sent
    # uvicorn re-raises the signal after its graceful shutdown: -15 is its normal exit.
    assert exit_code == -signal.SIGTERM, server.output()
    return took, statuses, server.output()


@pytest.mark.parametrize("runner", ["uvicorn", "fastapi run"])
async def test_sigterm_drains_gracefully_in_order(server_factory: object, runner: str) -> None:
    server = server_factory(runner)  # type: ignore[operator]
    took, statuses, log = await drain_scenario(server)

    assert statuses == [200] * 20, log
    assert took <= DRAIN_DELAY + GRACE + 2, f"exit took {took:.1f}s\n{log}"
    # Every queued job ran: the pool drained before its dependencies stopped.
    assert len(re.findall(r"reindexed item \d+", log)) == JOBS, log
    order = [
        log.index("Service 'worker:reindex' stopped"),
        log.index("Service 'db' stopped"),
        log.index("Service 'settings' stopped"),
    ]
    assert order == sorted(order), log
    assert log.index("Service 'cache' stopped") < log.index("Service 'settings' stopped")
    assert "Drain begun: readiness now fails." in log


async def test_a_hanging_cleanup_is_cut_off_and_named(server_factory: object) -> None:
    shutdown_timeout = 2.0
    server = server_factory(  # type: ignore[operator]
        HANG_CLEANUP="cache", SHUTDOWN_TIMEOUT=str(shutdown_timeout)
    )
    took, statuses, log = await drain_scenario(server)

    assert statuses == [200] * 20, log
    assert took <= DRAIN_DELAY + SLOW + shutdown_timeout + 2, f"exit took {took:.1f}s\n{log}"
    assert "Service 'cache' failed to stop cleanly: TimeoutError" in log, log
    assert "'cache' timed out" in log
    assert "Service 'db' stopped" in log  # the others still stopped cleanly


# uvicorn's multi-process supervisor (uvicorn/supervisors/multiprocess.py) only records a
# signal in its handler; its main loop polls for it every 0.5 s and then terminates the
# workers. A worker can therefore learn of the SIGTERM up to this long after it was sent.
SUPERVISOR_POLL = 0.5
WORKERS_DRAIN_DELAY = 2.0


async def test_each_worker_process_drains_under_workers_2(server_factory: object) -> None:
    """uvicorn --workers 2: the supervisor forwards SIGTERM, and every worker drains."""
    server = server_factory(  # type: ignore[operator]
        WORKERS="2", DRAIN_DELAY=str(WORKERS_DRAIN_DELAY)
    )
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        await wait_ready(client, server)
        with anyio.fail_after(30):  # both workers, not just the first, have started
            while server.output().count("Application startup complete.") < 2:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        sent = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        # Readiness must fail once the supervisor has had its poll to forward the signal, plus
        # the 100 ms the single-process test allows. From the first failing answer on, new
        # connections land on either worker, and every one must fail readiness while liveness
        # holds, for the rest of the drain delay.
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as fresh:
            with anyio.fail_after(SUPERVISOR_POLL + 0.25):
                while (await fresh.get("/readyz")).status_code != 503:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
        flipped = time.monotonic() - sent
        answers = []
        while time.monotonic() - sent < WORKERS_DRAIN_DELAY * 0.8:
            async with httpx.AsyncClient(base_url=server.url, timeout=5) as fresh:
                answers.append((await fresh.get("/readyz")).status_code)
                assert (await fresh.get("/livez")).status_code == 200
            await anyio.sleep(0.02)
        assert len(answers) >= 10, (flipped, answers)
        assert set(answers) == {503}, answers
        exit_code = await anyio.to_thread.run_sync(server.process.wait, 30)
    took = time.monotonic() - sent
    log = server.output()
    assert exit_code in (0, -signal.SIGTERM), log
    bound = SUPERVISOR_POLL + WORKERS_DRAIN_DELAY + GRACE + 2
    assert took <= bound, f"exit took {took:.1f}s\n{log}"
    assert log.count("readiness now fails.") == 2, log  # begun in each, or by a sibling


async def test_the_upstream_follows_the_port_the_app_was_started_on(
    server_factory: Any,
) -> None:
    """Without UPSTREAM_URL, /upstream/items asks this same server, on whatever port."""
    server = server_factory(UPSTREAM_URL="")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        await wait_ready(client, server)
        created = await client.post("/items", json={"name": "seen from upstream"})
        assert created.status_code == 201
        response = await client.get("/upstream/items")
        assert response.status_code == 200, response.text
        assert {"seen from upstream"} <= {item["name"] for item in response.json()}
