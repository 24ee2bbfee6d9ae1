"""``anyio-lifecycle[httpx]`` alone: DeadlineTransport against a real loopback server."""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anyio
import httpx
import pytest

from lifecycle.httpx import DeadlineTransport

pytestmark = pytest.mark.anyio


def test_only_httpx_is_installed_beside_the_core() -> None:
    for module in ("fastapi", "trio", "prometheus_client", "opentelemetry"):
        assert importlib.util.find_spec(module) is None, module


@pytest.fixture
def server() -> Iterator[str]:
    class Echo(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = (self.headers.get("x-request-timeout-ms") or "none").encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        thread.join()
        httpd.server_close()


async def test_the_remaining_budget_reaches_the_upstream(server: str) -> None:
    async with httpx.AsyncClient(transport=DeadlineTransport()) as client:
        assert (await client.get(server)).text == "none"  # no deadline, no header
        with anyio.fail_after(2.0):
            budget = int((await client.get(server)).text)
    assert 1000 < budget <= 2000
