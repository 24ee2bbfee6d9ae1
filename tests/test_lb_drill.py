"""A real load balancer drill: a rolling restart behind HAProxy loses no request.

Three replicas of tests/apps/lb_replica.py (``Lifecycle(drain_delay=1.5)``), each its own
server process on a loopback port, stand behind a real HAProxy (Debian's package, which no one
here wrote) that checks ``/readyz`` every 250 ms and takes a replica out of rotation after one
failed check. Under continuous load through HAProxy (a few clients sending fast requests, and a
stream of 1-2 s requests, half of them streaming their body) each replica in turn gets a real
SIGTERM while a slow request is in flight on it that outlasts the drain delay (so the server's
own graceful shutdown must let it finish), must exit by itself within its budget, and is
started again on the same port; the next one goes once HAProxy has the last one UP again. This
is Kubernetes' endpoint removal in miniature: the client must see no failed request at all
(no 5xx, no reset, no truncated or wrong body), and each replica's readiness must have failed,
and HAProxy must have marked it DOWN, while the replica still accepted connections.

HAProxy is configured so that nothing but the drain can make this clean:

- ``retries 0``, ``retry-on none``, no ``option redispatch``: a request HAProxy sends to a
  replica that no longer accepts is a 503 to the client, not a silent retry on another one.
- ``option http-server-close``: a backend connection per request, none kept idle. With
  keep-alive to the backends (HAProxy's default, ``http-reuse safe``), a replica may close an
  idle connection (its keep-alive timeout, or its shutdown) just as HAProxy reuses it, and that
  request fails with a 502 whatever the app does; that race is HAProxy's and the server's, not
  the drain's, and would make this drill flaky rather than strict.
- ``on-marked-down`` is left at its default: marking a replica DOWN stops new requests to it
  but lets the ones on it finish, which is what a draining replica needs.
- Client-side keep-alive (test client to HAProxy) outlasts the drill, so HAProxy never closes
  an idle client connection while the client reuses it.

The figures (requests, failures, time from SIGTERM to HAProxy's DOWN, time to exit) are printed
at the end of the pytest run by tests/conftest.py and recorded as the test's ``lb_drill``
property (junitxml).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest

from .apps.lb_replica import fast_body, slow_body
from .servers import Spawner, free_ports, require_binary, server_command

pytestmark = [
    pytest.mark.slow,
    pytest.mark.anyio,
    pytest.mark.parametrize("anyio_backend", ["asyncio"]),  # httpx client side only
    pytest.mark.timeout(120),
]

APP = "tests.apps.lb_replica:app"
REPLICAS = 3
DRAIN_DELAY = 1.5
# The slow requests cycle through these; half take 2 s, so that one outlasting the drain
# delay (OUTLASTS) is soon in flight on the replica about to be stopped.
SLOW_SECONDS = (2.0, 1.0, 2.0, 1.25, 2.0, 1.5, 2.0, 1.75)
GRACE = 3.0  # the server's graceful window: more than the slowest request needs
# The graceful window begins when the drain delay ends and bounds every request in flight,
# slow ones included; the margin is the lifespan shutdown and the process exiting.
EXIT_BUDGET = DRAIN_DELAY + GRACE + 1.5
OUTLASTS = DRAIN_DELAY + 0.2  # seconds left to the request in flight at each SIGTERM
CHECK_INTER = 0.25  # HAProxy's health check interval
FAST_CLIENTS = 4
FAST_PAUSE = 0.02  # between two requests of one fast client: a load, not a flood, on 2 cores
SLOW_EVERY = 0.2  # a slow request starts this often: about 2-3 in flight on each replica
STATS_EVERY = 0.02  # how often HAProxy's state is read
PROBE_EVERY = 0.02  # how often the draining replica is probed directly
TAIL = 1.0  # load after the last replica is back, so that it is seen serving again


def haproxy_config(directory: Path, port: int, replicas: list[Replica]) -> str:
    servers = "\n".join(f"    server {r.name} 127.0.0.1:{r.port}" for r in replicas)
    inter = f"{int(CHECK_INTER * 1000)}ms"
    return f"""\
global
    nbthread 1
    stats socket {directory / "haproxy.sock"} mode 600 level admin
    log stdout format raw local0

defaults
    mode http
    log global
    option httplog
    option log-health-checks
    option http-server-close
    retries 0
    retry-on none
    timeout connect 1s
    timeout client 60s
    timeout http-keep-alive 60s
    timeout server 10s
    timeout check 1s

frontend drill
    bind 127.0.0.1:{port}
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk
    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host replica
    http-check expect status 200
    default-server check inter {inter} fall 1 rise 2
{servers}
"""


class Replica:
    """One replica: a server process on a fixed port, started again on the same port."""

    def __init__(
        self,
        name: str,
        command: Callable[[int], list[str]],
        port: int,
        spawner: Spawner,
        logs: Path,
    ):
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.command = command(port)
        self.spawner = spawner
        self.logs = logs
        self.log_files: list[Path] = []
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        log = self.logs / f"{self.name}-{len(self.log_files)}.log"
        self.log_files.append(log)
        env = {"REPLICA_NAME": self.name, "DRAIN_DELAY": str(DRAIN_DELAY)}
        self.process = self.spawner.spawn(self.command, log=log, env=env)
        return self.process

    def output(self) -> str:
        return "".join(f"--- {log.name}\n{log.read_text()}" for log in self.log_files)

    async def wait_ready(self, client: httpx.AsyncClient) -> None:
        """Until the replica answers 200 on ``/readyz`` directly (30 s at most)."""
        with anyio.fail_after(30):
            while True:
                try:
                    if (await client.get(f"{self.url}/readyz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                assert self.process is not None
                assert self.process.poll() is None, self.output()
                await anyio.sleep(0.05)

    async def wait_long_request(self, client: httpx.AsyncClient) -> float:
        """Until a slow request in flight here outlasts the drain delay: the server's own
        shutdown will begin with it in flight. Returns the seconds it has left."""
        with anyio.fail_after(10):
            while True:
                remaining = (await client.get(f"{self.url}/inflight")).json()["remaining"]
                if max(remaining, default=0.0) > OUTLASTS:
                    return float(max(remaining))
                await anyio.sleep(0.01)

    async def wait_exit(self, budget: float) -> int:
        """The exit code, once the process and all it started exited by themselves; fails
        after ``budget`` seconds."""
        assert self.process is not None
        deadline = time.monotonic() + budget
        while (code := self.process.poll()) is None:
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{self.name} did not exit within {budget:.1f}s of SIGTERM\n{self.output()}"
                )
            await anyio.sleep(0.01)
        # A replica is its whole process group: the server's workers must be gone too.
        while left := Spawner.group(self.process):
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{self.name}'s main process exited ({code}), but not all it started "
                    f"within {budget:.1f}s of SIGTERM: {left}\n{self.output()}"
                )
            await anyio.sleep(0.01)
        return code


class HAProxy:
    """The HAProxy in front of the replicas, and what its stats socket says of each."""

    def __init__(self, binary: str, directory: Path, port: int, replicas: list[Replica]):
        self.url = f"http://127.0.0.1:{port}"
        self.socket = directory / "haproxy.sock"
        # A Unix socket's path is limited to 107 bytes: under a very deep --basetemp, say so.
        assert len(str(self.socket)) < 100, f"{self.socket} is too long for a Unix socket"
        self.config = directory / "haproxy.cfg"
        self.config.write_text(haproxy_config(directory, port, replicas))
        self.log = directory / "haproxy.log"
        self.binary = binary
        self.status: dict[str, str] = {}
        self.seen: dict[str, float] = {}  # when each replica's status was first seen

    def start(self, spawner: Spawner) -> None:
        checked = subprocess.run(
            [self.binary, "-c", "-f", str(self.config)], capture_output=True, text=True
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        self.process = spawner.spawn([self.binary, "-db", "-f", str(self.config)], log=self.log)

    async def show_stat(self) -> dict[str, str]:
        """Each replica's status as HAProxy has it: UP, DOWN, or on its way (``UP 1/1``)."""
        async with await anyio.connect_unix(self.socket) as stream:
            await stream.send(b"show stat replicas 4 -1\n")  # 4: servers only, -1: all
            answer = b"".join([chunk async for chunk in stream])
        rows = csv.DictReader(io.StringIO(answer.decode().removeprefix("# ")))
        return {row["svname"]: row["status"] for row in rows if row.get("svname")}

    async def watch(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Read the stats every STATS_EVERY s; note when each status was first seen."""
        with anyio.fail_after(10):
            while True:
                assert self.process.poll() is None, self.log.read_text()
                try:
                    self.status = await self.show_stat()
                    self.seen = dict.fromkeys(self.status, time.monotonic())
                    break
                except OSError:  # not listening yet
                    await anyio.sleep(0.05)
        task_status.started()
        while True:
            status = await self.show_stat()
            seen = time.monotonic()  # after the answer: no earlier than the change
            for name, value in status.items():
                if self.status.get(name) != value:
                    self.seen[name] = seen
            self.status = status
            await anyio.sleep(STATS_EVERY)

    async def wait_status(
        self,
        replica: Replica,
        wanted: Callable[[str], bool],
        within: float,
        what: str,
    ) -> float:
        """When HAProxy's status for ``replica`` was first seen to be ``wanted``."""
        try:
            with anyio.fail_after(within):
                while not wanted(self.status.get(replica.name, "")):  # noqa: ASYNC110
                    await anyio.sleep(0.005)
        except TimeoutError:
            pytest.fail(
                f"HAProxy did not mark {replica.name} {what} within {within}s "
                f"(status {self.status.get(replica.name)!r})\n{replica.output()}"
            )
        return self.seen[replica.name]

    async def wait_up(self, replica: Replica, within: float = 30) -> float:
        return await self.wait_status(replica, lambda s: s == "UP", within, "UP")

    async def wait_down(self, replica: Replica, within: float) -> float:
        return await self.wait_status(replica, lambda s: s.startswith("DOWN"), within, "DOWN")


@dataclass
class Load:
    """What the clients sent through HAProxy and what came back."""

    started: float = field(default_factory=time.monotonic)
    fast_sent: int = 0
    slow_sent: int = 0
    slow_completed: int = 0
    failures: list[str] = field(default_factory=list)
    answers: list[tuple[float, str]] = field(default_factory=list)  # (when, x-replica)

    def fail(self, what: str, problem: str) -> None:
        self.failures.append(f"{time.monotonic() - self.started:6.2f}s {what}: {problem}")

    def check(self, what: str, response: httpx.Response, expected: str) -> bool:
        replica = response.headers.get("x-replica", "no x-replica header")
        if response.status_code != 200:
            self.fail(what, f"HTTP {response.status_code} {response.text[:200]!r}")
        elif response.text != expected:
            self.fail(
                what,
                f"{len(response.text)} characters from {replica}, not the "
                f"{len(expected)} expected: {response.text[-80:]!r}",
            )
        else:
            self.answers.append((time.monotonic(), replica))
            return True
        return False


async def fast_client(url: str, load: Load, numbers: itertools.count[int], stop: anyio.Event):
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        while not stop.is_set():
            n = next(numbers)
            load.fast_sent += 1
            try:
                response = await client.get("/fast", params={"n": n})
            except httpx.HTTPError as exc:
                load.fail(f"GET /fast?n={n}", f"{type(exc).__name__}: {exc}")
            else:
                load.check(f"GET /fast?n={n}", response, fast_body(n))
            await anyio.sleep(FAST_PAUSE)


async def slow_stream(url: str, load: Load, numbers: itertools.count[int], stop: anyio.Event):
    """Start a slow request every SLOW_EVERY s until ``stop``; return once all have ended."""
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with (
        httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as client,
        anyio.create_task_group() as tg,
    ):

        async def slow(n: int, seconds: float, stream: int) -> None:
            what = f"GET /slow?n={n}&seconds={seconds}&stream={stream}"
            try:
                response = await client.get(
                    "/slow", params={"n": n, "seconds": seconds, "stream": stream}
                )
            except httpx.HTTPError as exc:
                load.fail(what, f"{type(exc).__name__}: {exc}")
            else:
                load.slow_completed += load.check(what, response, slow_body(n))

        for seconds, stream in zip(
            itertools.cycle(SLOW_SECONDS), itertools.cycle((0, 1, 1, 0)), strict=False
        ):
            if stop.is_set():
                break
            load.slow_sent += 1
            tg.start_soon(slow, next(numbers), seconds, stream)
            await anyio.sleep(SLOW_EVERY)


@dataclass
class DirectProbe:
    """Probes one replica's ``/readyz`` directly, a new connection each time, until it fails."""

    replica: Replica
    unready: float | None = None  # when the first non-200 answer came
    last_accepted: float | None = None  # when the last probe that got an answer began
    refused: float | None = None  # when the first probe that got none began

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        limits = httpx.Limits(max_keepalive_connections=0)
        # A second without an answer counts as not accepting (a socket still listening that
        # nothing accepts from); shorter, a replica slowed by a busy machine would count too.
        async with httpx.AsyncClient(base_url=self.replica.url, timeout=1, limits=limits) as c:
            assert (await c.get("/readyz")).status_code == 200
            task_status.started()
            while True:
                began = time.monotonic()
                try:
                    response = await c.get("/readyz")
                except httpx.TransportError:
                    self.refused = began
                    return
                self.last_accepted = began
                if response.status_code != 200 and self.unready is None:
                    self.unready = time.monotonic()
                await anyio.sleep(PROBE_EVERY)


@dataclass
class Roll:
    """One replica's restart, its times in seconds from its SIGTERM."""

    name: str
    longest: float  # seconds left to the longest request in flight on it
    unready: float | None
    down: float
    last_accepted: float | None
    refused: float | None
    exited: float
    exit_code: int
    sent_at: float  # time.monotonic() of the SIGTERM
    up_again: float = 0.0  # from the restart
    up_at: float = 0.0  # time.monotonic()


async def roll(replica: Replica, haproxy: HAProxy, direct: httpx.AsyncClient) -> Roll:
    """SIGTERM ``replica``, wait for it to exit by itself, start it again and see it UP."""
    longest = await replica.wait_long_request(direct)
    probe = DirectProbe(replica)
    assert replica.process is not None
    async with anyio.create_task_group() as tg:
        await tg.start(probe.run)
        sent = time.monotonic()
        replica.process.send_signal(signal.SIGTERM)
        down = await haproxy.wait_down(replica, within=EXIT_BUDGET)
        exit_code = await replica.wait_exit(EXIT_BUDGET - (time.monotonic() - sent))
        exited = time.monotonic()
        # The port closed by the exit at the latest; the probe's next attempt is refused.
        with anyio.fail_after(3):
            while probe.refused is None:  # noqa: ASYNC110
                await anyio.sleep(0.01)

    def since(moment: float | None) -> float | None:
        return None if moment is None else moment - sent

    result = Roll(
        name=replica.name,
        longest=longest,
        unready=since(probe.unready),
        down=down - sent,
        last_accepted=since(probe.last_accepted),
        refused=since(probe.refused),
        exited=exited - sent,
        exit_code=exit_code,
        sent_at=sent,
    )
    restarted = time.monotonic()
    replica.start()
    result.up_at = await haproxy.wait_up(replica)
    result.up_again = result.up_at - restarted
    return result


def figures(server: str, load: Load, rolls: list[Roll]) -> str:
    def s(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}s"

    lines = [
        f"HAProxy drill under {server}: {load.fast_sent + load.slow_sent} requests sent "
        f"({load.fast_sent} fast, {load.slow_sent} slow), {len(load.failures)} failed, "
        f"{load.slow_completed} slow completed; exit budget {EXIT_BUDGET:.1f}s",
        "  replica  in flight  unready  HAProxy DOWN  last accepted  exited  code  UP again",
    ]
    lines.extend(
        f"  {r.name:<7}  {s(r.longest):>9}  {s(r.unready):>7}  {s(r.down):>12}"
        f"  {s(r.last_accepted):>13}  {s(r.exited):>6}  {r.exit_code:>4}  {s(r.up_again):>8}"
        for r in rolls
    )
    lines.append(
        "  (seconds from SIGTERM; in flight: left to the longest request on the replica;"
        " unready: its /readyz first failed;\n   HAProxy DOWN: first seen on the stats"
        f" socket, read every {STATS_EVERY * 1000:.0f} ms; last accepted: the last direct"
        " probe it answered began; UP again: from the restart)"
    )
    return "\n".join(lines)


# Each server as users run it: uvicorn and granian by default (granian's main process
# supervises one worker); hypercorn with --workers 0, its one mode where the process that
# serves takes the signal (its supervisor stops workers through an event: lifecycle warns).
@pytest.mark.parametrize(
    ("server", "workers"),
    [
        pytest.param("uvicorn", None, id="uvicorn"),
        pytest.param("hypercorn", 0, id="hypercorn-workers-0"),
        pytest.param("granian", None, id="granian"),
    ],
)
async def test_rolling_restart_behind_haproxy_loses_no_request(
    server: str,
    workers: int | None,
    spawner: Spawner,
    tmp_path: Path,
    record_property: Callable[[str, Any], None],
) -> None:
    binary = require_binary("haproxy", package="haproxy")
    lb_port, *ports = free_ports(1 + REPLICAS)
    command = partial(server_command, server, APP, graceful=GRACE, workers=workers)
    replicas = [Replica(f"r{i}", command, port, spawner, tmp_path) for i, port in enumerate(ports)]
    for replica in replicas:
        replica.start()
    haproxy = HAProxy(binary, tmp_path, lb_port, replicas)
    load = Load()
    rolls: list[Roll] = []
    numbers = itertools.count()
    stop = anyio.Event()
    try:
        async with httpx.AsyncClient(timeout=2) as direct:
            for replica in replicas:
                await replica.wait_ready(direct)
            haproxy.start(spawner)
            with anyio.fail_after(90):  # the drill takes 15-30 s
                async with anyio.create_task_group() as watching:
                    await watching.start(haproxy.watch)
                    for replica in replicas:
                        await haproxy.wait_up(replica)
                    load.started = time.monotonic()
                    async with anyio.create_task_group() as clients:
                        for _ in range(FAST_CLIENTS):
                            clients.start_soon(fast_client, haproxy.url, load, numbers, stop)
                        clients.start_soon(slow_stream, haproxy.url, load, numbers, stop)
                        for replica in replicas:
                            rolls.append(await roll(replica, haproxy, direct))
                        await anyio.sleep(TAIL)
                        stop.set()
                    watching.cancel_scope.cancel()
    finally:  # the figures of as far as the drill got, even when it failed on the way
        name = server if workers is None else f"{server} --workers {workers}"
        report = figures(name, load, rolls)
        record_property("lb_drill", report)
        (tmp_path / "figures.txt").write_text(report + "\n")
        rows = [vars(r) for r in rolls]
        (tmp_path / "figures.json").write_text(
            json.dumps({"server": name, "failures": load.failures, "rolls": rows})
        )
        print(report)

    def haproxy_errors() -> str:  # what HAProxy logged of anything but a 200
        lines = haproxy.log.read_text().splitlines()
        errors = [line for line in lines if '"GET ' in line and " 200 " not in line]
        return "\n".join(errors[:30])

    if load.failures:
        pytest.fail(
            f"{len(load.failures)} requests failed:\n" + "\n".join(load.failures[:20]) + "\n"
            f"{report}\nHAProxy logged:\n{haproxy_errors()}",
            pytrace=False,
        )
    assert load.slow_completed == load.slow_sent > 0
    for replica, r in zip(replicas, rolls, strict=True):
        # uvicorn re-raises the signal after its graceful shutdown: -15 is its normal exit.
        assert r.exit_code in (0, -signal.SIGTERM), f"{report}\n{replica.output()}"
        # Readiness failed, and HAProxy took the replica out, while it still accepted.
        assert r.unready is not None, f"{r.name}'s /readyz never failed before it closed\n{report}"
        assert r.last_accepted is not None, f"{r.name} stopped accepting at SIGTERM\n{report}"
        assert r.unready < r.last_accepted, f"{r.name}: unready only as it closed\n{report}"
        assert r.down < r.last_accepted, f"{r.name}: HAProxy had it UP once it closed\n{report}"
        # Back in rotation: a new process of it served requests after HAProxy had it UP.
        served = [(when, who) for when, who in load.answers if who.startswith(f"{r.name}/")]
        before = {who for when, who in served if when < r.sent_at}
        after = {who for when, who in served if when > r.up_at}
        assert before, f"{r.name} served nothing before its SIGTERM\n{report}"
        assert after, f"{r.name} served nothing after its restart\n{report}"
        assert not before & after, f"{r.name} is the same process after its restart: {after}"
