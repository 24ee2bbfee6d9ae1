"""Spans reach a collector from a real uvicorn that a real SIGTERM stops.

uvicorn ends the process by raising SIGTERM again once the lifespan is done, so nothing at
exit runs: the shutdown spans arrive only because the lifespan flushes the span processors.
The collector is a small OTLP/HTTP receiver on loopback, in the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anyio
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from .servers import free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.anyio,
    pytest.mark.parametrize("anyio_backend", ["asyncio"]),  # httpx client side only
]

ROOT = Path(__file__).parent.parent


class Collector:
    """An OTLP/HTTP trace receiver: the names of the spans it was sent."""

    def __init__(self) -> None:
        self.spans: list[str] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                request = ExportTraceServiceRequest.FromString(body)
                with collector.lock:
                    collector.spans.extend(
                        span.name
                        for resource in request.resource_spans
                        for scope in resource.scope_spans
                        for span in scope.spans
                    )
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"

    def names(self) -> list[str]:
        with self.lock:
            return list(self.spans)


@pytest.fixture
def collector() -> Iterator[Collector]:
    receiver = Collector()
    thread = threading.Thread(target=receiver.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
        thread.join(timeout=5)


def start_uvicorn(collector: Collector, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": collector.url,
        "PYTHONUNBUFFERED": "1",
    }
    with log.open("w") as sink:
        return subprocess.Popen(
            [
                *(sys.executable, "-m", "uvicorn", "tests.apps.otlp_traced:app"),
                *("--host", "127.0.0.1", "--port", str(port)),
            ],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


async def test_shutdown_spans_reach_the_collector_after_sigterm(
    collector: Collector, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "uvicorn.log"
    process = start_uvicorn(collector, port, log)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            with anyio.fail_after(20):
                while True:
                    try:
                        if (await client.get("/ready")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    assert process.poll() is None, log.read_text()
                    await anyio.sleep(0.05)
        assert collector.names() == []  # the batch processor holds the startup spans
        process.send_signal(signal.SIGTERM)
        with anyio.fail_after(15):
            while process.poll() is None:  # noqa: ASYNC110 - a subprocess's exit
                await anyio.sleep(0.05)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
    # uvicorn re-raises the signal after its shutdown: nothing ran at exit.
    assert process.returncode == -signal.SIGTERM, log.read_text()
    names = collector.names()
    for name in ("lifecycle startup", "start db", "start cache"):
        assert name in names, (names, log.read_text())
    for name in ("lifecycle shutdown", "stop cache", "stop db"):
        assert name in names, (names, log.read_text())
