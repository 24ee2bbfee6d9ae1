"""Deadlines end to end across three real uvicorn processes on loopback: A calls B calls C.

Each hop runs tests/apps/deadline_chain.py under DeadlineMiddleware and calls the next one
through lifecycle.httpx.DeadlineTransport. The budget each hop sees shrinks; a deadline that
expires at C comes back to the client as a 504 with the marker through B and A, and nothing is
left running in any of them; a deadline that expires mid-stream aborts the response without a
500 or a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

import lifecycle

from .servers import free_ports

pytestmark = pytest.mark.slow

APPS = Path(__file__).parent / "apps"
BUDGET = "x-request-timeout-ms"


@dataclass
class Hop:
    name: str
    url: str
    log: Path

    def metrics(self) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/metrics", timeout=5)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def log_text(self) -> str:
        return self.log.read_text()


def wait_ready(hop: Hop, process: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"hop {hop.name} exited with {process.returncode}:\n{hop.log_text()}")
        try:
            if httpx.get(f"{hop.url}/metrics", timeout=0.5).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    pytest.fail(f"hop {hop.name} did not start within 15 s:\n{hop.log_text()}")


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Hop]]:
    """Start C, B and A (A calls B calls C); stop and reap all three afterwards."""
    directory = tmp_path_factory.mktemp("deadline-chain")
    ports = dict(zip("ABC", free_ports(3), strict=True))
    hops = {
        name: Hop(name, f"http://127.0.0.1:{port}", directory / f"{name}.log")
        for name, port in ports.items()
    }
    processes: dict[str, subprocess.Popen[bytes]] = {}
    with ExitStack() as stack:
        for name, next_name in (("C", None), ("B", "C"), ("A", "B")):
            log = stack.enter_context(hops[name].log.open("wb"))
            env = {
                **os.environ,
                "HOP_NAME": name,
                "NEXT_URL": hops[next_name].url if next_name else "",
            }
            processes[name] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "deadline_chain:app",
                    "--app-dir",
                    str(APPS),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(ports[name]),
                    "--no-access-log",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 15
            for name, hop in hops.items():
                wait_ready(hop, processes[name], deadline)
            yield hops
        finally:
            for process in processes.values():
                process.terminate()
            for process in processes.values():
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def test_the_budget_shrinks_at_each_hop(chain: dict[str, Hop]) -> None:
    response = httpx.get(f"{chain['A'].url}/hop", headers={BUDGET: "3000"}, timeout=10)
    assert response.status_code == 200
    a, b, c = response.json()
    assert [a["name"], b["name"], c["name"]] == ["A", "B", "C"]
    headers = [int(hop["header"]) for hop in (a, b, c)]
    remaining = [hop["remaining"] for hop in (a, b, c)]
    assert headers[0] == 3000
    assert headers[0] > headers[1] > headers[2] > 2000
    assert 3.0 > remaining[0] > remaining[1] > remaining[2] > 2.0
    # Each hop forwards what it has left minus the transport's 50 ms reserve.
    assert headers[1] <= remaining[0] * 1000 - 50
    assert headers[2] <= remaining[1] * 1000 - 50


def test_an_expiry_at_c_comes_back_as_a_504_with_the_marker_through_b_to_a(
    chain: dict[str, Hop],
) -> None:
    before = {name: hop.metrics() for name, hop in chain.items()}
    started = time.monotonic()
    response = httpx.get(f"{chain['A'].url}/stall", headers={BUDGET: "800"}, timeout=10)
    elapsed = time.monotonic() - started

    assert response.status_code == 504
    assert response.headers[lifecycle.DEADLINE_EXPIRED_HEADER] == "1"
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == lifecycle.DEADLINE_EXPIRED_TYPE
    # B's expiry is relayed as A's own, without B's URL or host (those stay in A's logs).
    assert problem["detail"] == "The request's deadline expired while waiting on a dependency."
    assert "127.0.0.1" not in response.text
    assert "http" not in problem["detail"]
    assert problem["instance"].startswith("urn:uuid:")
    assert elapsed < 5  # bounded by the budget, not by the 10 s server default

    after = {name: hop.metrics() for name, hop in chain.items()}
    for name in "ABC":
        assert after[name]["running"] == 0, f"{name} still has a handler running"
        assert after[name]["deadlines"]["in_flight"] == 0
        expired = after[name]["deadlines"]["expired"] - before[name]["deadlines"]["expired"]
        assert expired == 1, f"{name} did not answer 504 for the expiry"
        assert after[name]["deadlines"]["aborted"] == before[name]["deadlines"]["aborted"]
    # C's handler was cancelled by its own deadline, the first to pass.
    assert after["C"]["cancelled"] - before["C"]["cancelled"] == 1
    for hop in chain.values():
        assert "Traceback" not in hop.log_text()


def test_an_expiry_mid_stream_aborts_the_response_cleanly(chain: dict[str, Hop]) -> None:
    hop = chain["C"]
    before = hop.metrics()
    chunks: list[bytes] = []

    def read_all(response: httpx.Response) -> None:
        for chunk in response.iter_raw():
            chunks.append(chunk)

    with httpx.stream("GET", f"{hop.url}/stream", headers={BUDGET: "300"}, timeout=10) as response:
        assert response.status_code == 200
        # The response ends without its final chunk: the client knows it is truncated.
        with pytest.raises(httpx.RemoteProtocolError, match="incomplete"):
            read_all(response)
    assert b"".join(chunks) == b"first chunk\n"

    after = hop.metrics()
    assert after["deadlines"]["aborted"] - before["deadlines"]["aborted"] == 1
    assert after["running"] == 0
    log = hop.log_text()
    assert "aborted" in log  # logged once, by the middleware
    assert "Traceback" not in log
    assert "Exception in ASGI application" not in log
    assert " 500 " not in log
