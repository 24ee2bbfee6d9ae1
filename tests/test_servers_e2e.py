"""The drain, the startup abort and the give-up under every server users run, end to end.

Each row starts ``tests/apps/servers_app.py`` under a real server as a subprocess, sends a
real signal to the server's main process (as Kubernetes does: to PID 1 only) and talks to it
over loopback with httpx. Servers: uvicorn (single process and ``--workers 2``), hypercorn
(``--workers 0`` on asyncio, uvloop and trio; and its default, a supervisor with one
worker), granian (one and two workers, on uvloop and asyncio) and daphne (no lifespan).
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest

from .servers import free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.anyio,
    pytest.mark.parametrize("anyio_backend", ["asyncio"]),  # the httpx client side only
]

ROOT = Path(__file__).parent.parent
APP = "tests.apps.servers_app:app"
DRAIN_DELAY = 1.5
SLOW = 2.0  # seconds each in-flight request takes
GRACE = 5  # each server's own graceful-shutdown limit
# uvicorn's supervisor polls for the signal it recorded every 0.5 s before passing it on.
UVICORN_SUPERVISOR_POLL = 0.5


def _command(server: str, port: int) -> list[str]:
    python = sys.executable
    host = ("--host", "127.0.0.1", "--port", str(port))
    if server.startswith("uvicorn"):
        extra = server.split()[1:]
        graceful = ("--timeout-graceful-shutdown", str(GRACE))
        return [python, "-m", "uvicorn", APP, *host, *graceful, *extra]
    if server.startswith("hypercorn"):
        extra = server.split()[1:]
        bind = ("--bind", f"127.0.0.1:{port}", "--graceful-timeout", str(GRACE))
        return [python, "-m", "hypercorn", *bind, *extra, APP]
    if server.startswith("granian"):
        extra = server.split()[1:]
        return [python, "-m", "granian", "--interface", "asgi", *host, *extra, APP]
    assert server == "daphne"
    return [python, "-m", "daphne", "--bind", "127.0.0.1", "--port", str(port), APP]


def _workers(server: str) -> int:
    """How many processes serve (hypercorn's ``--workers 0`` is one, its supervisor's own)."""
    parts = server.split()
    return max(1, int(parts[parts.index("--workers") + 1])) if "--workers" in parts else 1


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen[str]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text()

    async def wait_ready(self, workers: int = 1) -> None:
        """Until /readyz passes and every worker has finished its startup."""
        async with httpx.AsyncClient(base_url=self.url, timeout=5) as client:
            with anyio.fail_after(30):
                while True:
                    assert self.process.poll() is None, self.output()
                    try:
                        ready = (await client.get("/readyz")).status_code == 200
                    except httpx.TransportError:
                        ready = False
                    if ready and self.output().count("Started 4 services") >= workers:
                        return
                    await anyio.sleep(0.05)

    async def wait_exit(self, within: float) -> tuple[int, float]:
        began = time.monotonic()
        code = await anyio.to_thread.run_sync(self.process.wait, within)
        return code, time.monotonic() - began


@pytest.fixture
def start(tmp_path: Path) -> Iterator[object]:
    started: list[Server] = []

    def run(name: str, **env: str) -> Server:
        module = name.split()[0]
        if shutil.which(module, path=os.path.dirname(sys.executable)) is None:
            message = f"{module} is not installed in this venv (it is in the dev extra)"
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(message)
            pytest.skip(message)
        port = free_port()
        log = tmp_path / f"{module}-{port}.log"
        environment = {
            **os.environ,
            "DRAIN_DELAY": str(DRAIN_DELAY),
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        with log.open("w") as sink:
            process = subprocess.Popen(
                _command(name, port),
                cwd=ROOT,
                env=environment,
                stdout=sink,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,  # a signal to it reaches its process alone
            )
        server = Server(name, port, process, log)
        started.append(server)
        return server

    yield run
    for server in started:
        with contextlib.suppress(ProcessLookupError):  # the whole group, workers included
            os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=10)


DRAINING = [
    "uvicorn",
    "uvicorn --workers 2",
    "hypercorn --workers 0",
    "hypercorn --workers 0 --worker-class uvloop",
    "hypercorn --workers 0 --worker-class trio",
    "granian",
    "granian --loop asyncio",
    "granian --workers 2",
]


@pytest.mark.parametrize("name", DRAINING)
async def test_sigterm_drains_before_the_server_stops(start: object, name: str) -> None:
    """Readiness fails at once; liveness, new connections and in-flight requests are served
    for the drain delay; then the server's own graceful shutdown and the lifespan's run."""
    server: Server = start(name)  # type: ignore[operator]
    workers = _workers(name)
    await server.wait_ready(workers)
    # The signal reaches the serving process at once, except under uvicorn's supervisor.
    reach = UVICORN_SUPERVISOR_POLL if name.startswith("uvicorn --workers") else 0.0
    limits = httpx.Limits(max_keepalive_connections=0)  # every request a new connection
    slow_bodies: list[tuple[int, dict[str, float]]] = []

    async def slow_request(client: httpx.AsyncClient) -> None:
        response = await client.get("/slow", params={"seconds": SLOW})
        slow_bodies.append((response.status_code, response.json()))

    async with (
        httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as client,
        anyio.create_task_group() as tg,
    ):
        for _ in range(4):
            tg.start_soon(slow_request, client)
        await anyio.sleep(0.3)  # in flight now
        assert (await client.get("/readyz")).status_code == 200
        gc.collect()
        gc.disable()  # no collection of this process inside the measurement
        try:
            sent = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            while (await client.get("/readyz")).status_code != 503:
                assert time.monotonic() - sent < reach + 0.1, "/readyz still passing"
            flipped = time.monotonic() - sent
        finally:
            gc.enable()
        # From then on, for the rest of the delay (which began in the serving processes when
        # readiness failed): every new connection is accepted, fails readiness, passes
        # liveness, and is served.
        answers = []
        while time.monotonic() - sent < flipped + DRAIN_DELAY * 0.8:
            answers.append(
                (
                    (await client.get("/readyz")).status_code,
                    (await client.get("/livez")).status_code,
                    (await client.get("/fast")).status_code,
                )
            )
        assert len(answers) >= 5, answers
        assert set(answers) == {(503, 200, 200)}, answers
    code, _ = await server.wait_exit(reach + DRAIN_DELAY + SLOW + GRACE + 5)
    took = time.monotonic() - sent
    log = server.output()
    print(f"{name}: readiness failed after {flipped * 1000:.0f} ms, exited after {took:.2f}s")
    assert flipped < reach + 0.1
    assert [status for status, _ in slow_bodies] == [200] * 4, log
    assert all(body["slept"] == SLOW for _, body in slow_bodies)  # whole bodies
    assert code in (0, -signal.SIGTERM), f"exit code {code}\n{log}"
    assert took <= reach + DRAIN_DELAY + SLOW + GRACE + 2, f"exit took {took:.1f}s\n{log}"
    assert log.count("readiness now fails.") == workers, log  # begun here, or by a sibling
    assert log.count("db stopped in") == workers, log  # each lifespan shutdown ran
    assert "Traceback" not in log, log


async def test_hypercorn_under_its_supervisor_says_it_cannot_drain(start: object) -> None:
    """Its supervisor stops workers through an event, which no app can delay: one warning
    at startup names the server and both ways out, and the preStop route still drains."""
    server: Server = start("hypercorn")  # type: ignore[operator]
    await server.wait_ready()
    log = server.output()
    warnings = [line for line in log.splitlines() if "hypercorn runs this app" in line]
    assert len(warnings) == 1, log
    assert "--workers 0" in warnings[0]
    assert "drain_route" in warnings[0]
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        began = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: client.post(
                    "/drain", headers={"Authorization": "Bearer servers-app-drain-token"}
                )
            )
            await anyio.sleep(0.1)
            assert (await client.get("/readyz")).status_code == 503
            assert (await client.get("/fast")).status_code == 200
        assert time.monotonic() - began >= DRAIN_DELAY * 0.9  # preStop held for the delay
    server.process.send_signal(signal.SIGTERM)
    code, _ = await server.wait_exit(GRACE + 5)
    assert code == 0, server.output()


@pytest.mark.parametrize(
    "name",
    [
        "uvicorn",
        "uvicorn --workers 2",
        "hypercorn --workers 0",
        "granian",
        "hypercorn --workers 0 --worker-class trio",
    ],
)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_a_signal_aborts_a_hung_startup_at_once(
    start: object, name: str, signum: signal.Signals
) -> None:
    """The startup_timeout is 60 s; Ctrl+C (or SIGTERM) ends it at once, with the rollback."""
    server: Server = start(name, HANG_START="1")  # type: ignore[operator]
    with anyio.fail_after(30):
        while server.output().count("db start hangs") < _workers(name):
            assert server.process.poll() is None, server.output()
            await anyio.sleep(0.05)
    sent = time.monotonic()
    server.process.send_signal(signum)
    code, _ = await server.wait_exit(10)
    took = time.monotonic() - sent
    log = server.output()
    print(f"{name}: {signum.name} during startup, exited after {took:.2f}s (code {code})")
    # granian's main process and uvicorn's supervisor take the signal and send their workers
    # SIGTERM, whatever it was.
    supervised = name.startswith("granian") or "--workers 2" in name
    seen = "SIGTERM" if supervised else signum.name
    assert took < 3, f"took {took:.1f}s\n{log}"
    assert f"{seen} received while starting" in log, log
    assert f"Startup interrupted by {seen}." in log, log
    assert re.search(r"Rolled back: [^.]*'settings'", log), log
    assert "settings stopped in" in log, log
    if not supervised:  # a supervisor was asked to stop, and did: it exits 0
        assert code != 0, log  # the server reports the failed startup
    assert log.count("settings stopped in") == _workers(name), log  # each worker rolled back


async def test_giving_up_under_uvicorn_workers_stops_the_whole_server(start: object) -> None:
    """on_give_up="shutdown" in one worker of two: the supervisor stops, with every worker,
    rather than restarting the worker into the same failure."""
    server: Server = start("uvicorn --workers 2", GIVE_UP="1", DRAIN_DELAY="0.2")  # type: ignore[operator]
    code, took = await server.wait_exit(30)
    log = server.output()
    assert "giving up (asking the server to shut down)" in log, log
    assert code in (0, -signal.SIGTERM), f"exit code {code}\n{log}"
    assert log.count("db stopped in") >= 2, log  # both workers' lifespans shut down
    assert took < 15, f"took {took:.1f}s\n{log}"


async def test_daphne_runs_no_lifespan_and_every_answer_says_so(start: object) -> None:
    server: Server = start("daphne")  # type: ignore[operator]
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        with anyio.fail_after(30):
            while True:
                assert server.process.poll() is None, server.output()
                try:
                    ready = await client.get("/readyz")
                    break
                except httpx.TransportError:
                    await anyio.sleep(0.05)
        fast = await client.get("/fast")
        again = await client.get("/fast")
        live = await client.get("/livez")
    assert ready.status_code == 503
    assert "daphne does not support them" in ready.json()["output"]
    assert live.status_code == 200
    assert "daphne" in live.json()["output"]
    for response in (fast, again):
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/problem+json"
        assert "daphne does not support them" in response.json()["detail"]
    server.process.send_signal(signal.SIGTERM)
    await server.wait_exit(10)
    log = server.output()
    assert log.count("lifespan never started") == 1, log  # one error line, not one a request


@pytest.mark.parametrize(
    "name", ["uvicorn --workers 2", "granian --workers 2", "hypercorn --workers 2"]
)
async def test_the_prestop_route_drains_every_worker(start: object, name: str) -> None:
    """POST /drain reaches one worker; every sibling fails readiness too (a marker file
    named after the supervisor), for the delay; the SIGTERM after it stops the server."""
    server: Server = start(name, DRAIN_DELAY="2")  # type: ignore[operator]
    await server.wait_ready(_workers(name))
    limits = httpx.Limits(max_keepalive_connections=0)  # every request a new connection
    async with httpx.AsyncClient(base_url=server.url, timeout=10, limits=limits) as client:
        began = time.monotonic()
        async with anyio.create_task_group() as tg:

            async def prestop() -> None:
                answer = await client.post(
                    "/drain", headers={"Authorization": "Bearer servers-app-drain-token"}
                )
                assert answer.status_code == 200, answer.text

            tg.start_soon(prestop)
            await anyio.sleep(0.2)
            answers = []
            pids = set()
            while time.monotonic() - began < 1.6:
                ready = await client.get("/readyz")
                fast = await client.get("/fast")
                answers.append((ready.status_code, fast.status_code))
                pids.add(fast.json()["pid"])
        held_for = time.monotonic() - began
        assert len(pids) == 2, f"only {pids} answered: the test saw one worker"
        assert set(answers) == {(503, 200)}, answers
        assert held_for >= 2 * 0.9  # the preStop call answers once the delay has passed
    sent = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    code, _ = await server.wait_exit(GRACE + 5)
    took = time.monotonic() - sent
    log = server.output()
    assert code in (0, -signal.SIGTERM), log
    assert took < 1.5, f"the delay was spent already; exit took {took:.1f}s\n{log}"
    assert log.count("Drain begun by a sibling worker") == 1, log
