"""Metrics as the real instruments see them: the example app under a real uvicorn, scraped
by a real Prometheus, and prometheus-client's multiprocess mode under ``--workers 2``.

The example app runs on its embedded defaults (SQLite, an in-process cache): no other server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .servers import free_port, require_binary

pytestmark = [
    pytest.mark.slow,
    pytest.mark.anyio,
    pytest.mark.parametrize("anyio_backend", ["asyncio"]),  # httpx client side only
]

ROOT = Path(__file__).parent.parent
REINDEX_SECONDS = 30.0  # each reindex job outlives the test: the queue stays as it was filled


class Process:
    def __init__(self, process: subprocess.Popen[bytes], log: Path, url: str) -> None:
        self.process = process
        self.log = log
        self.url = url

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    """What a test started, killed and reaped at its end whatever happened."""
    started: list[Process] = []
    yield started
    for process in started:
        # The whole process group: uvicorn --workers leaves its workers behind otherwise.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.process.pid, signal.SIGKILL)
        process.process.wait(timeout=10)


def start(processes: list[Process], command: list[str], log: Path, url: str, **env: str) -> Process:
    with log.open("w") as sink:
        popen = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a group of its own, its workers included
        )
    process = Process(popen, log, url)
    processes.append(process)
    return process


def start_example(processes: list[Process], tmp_path: Path, *extra: str, **env: str) -> Process:
    port = free_port()
    return start(
        processes,
        [
            *(sys.executable, "-m", "uvicorn", "example_app.main:app"),
            *("--host", "127.0.0.1", "--port", str(port), *extra),
        ],
        tmp_path / "uvicorn.log",
        f"http://127.0.0.1:{port}",
        SQLITE_PATH=str(tmp_path / "items.db"),
        REINDEX_SECONDS=str(REINDEX_SECONDS),
        LOG_LEVEL="WARNING",
        **env,
    )


async def wait_until_up(client: httpx.AsyncClient, process: Process, path: str) -> None:
    with anyio.fail_after(30):
        while True:
            try:
                if (await client.get(path)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert process.process.poll() is None, process.output()
            await anyio.sleep(0.05)


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


async def fill_the_reindex_queue_and_expire_a_deadline(client: httpx.AsyncClient) -> None:
    # concurrency 1: one job runs (for REINDEX_SECONDS), the four others wait in the queue.
    queued = await client.post("/reindex", json={"ids": [1, 2, 3, 4, 5]})
    assert queued.status_code == 202, queued.text
    expired = await client.get(
        "/slow", params={"seconds": 5}, headers={"x-request-timeout-ms": "50"}
    )
    assert expired.status_code == 504


# -- a real Prometheus --------------------------------------------------------------------


def start_prometheus(processes: list[Process], tmp_path: Path, target: str) -> Process:
    binary = require_binary("prometheus", package="prometheus")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 500ms\n"
        "  scrape_timeout: 400ms\n"
        "scrape_configs:\n"
        "  - job_name: example\n"
        "    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    port = free_port()
    return start(
        processes,
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        tmp_path / "prometheus.log",
        f"http://127.0.0.1:{port}",
    )


async def query(
    client: httpx.AsyncClient, prometheus: Process, promql: str, *, until: Any
) -> list[dict[str, Any]]:
    """Ask Prometheus's HTTP API until the result satisfies ``until``; return it."""
    with anyio.fail_after(10):
        while True:
            answer = await client.get(f"{prometheus.url}/api/v1/query", params={"query": promql})
            assert answer.status_code == 200, answer.text
            result: list[dict[str, Any]] = answer.json()["data"]["result"]
            if until(result):
                return result
            assert prometheus.process.poll() is None, prometheus.output()
            await anyio.sleep(0.1)


async def test_prometheus_scrapes_the_example_app(processes: list[Process], tmp_path: Path) -> None:
    promtool = require_binary("promtool", package="prometheus")
    app = start_example(processes, tmp_path)
    prometheus = start_prometheus(processes, tmp_path, app.url.removeprefix("http://"))
    async with httpx.AsyncClient(base_url=app.url) as client:
        await wait_until_up(client, app, "/readyz")
        await fill_the_reindex_queue_and_expire_a_deadline(client)
        await wait_until_up(client, prometheus, f"{prometheus.url}/-/ready")

        def value_is(expected: float) -> Any:
            return lambda result: len(result) == 1 and float(result[0]["value"][1]) == expected

        queued = await query(
            client, prometheus, 'lifecycle_pool_queued_jobs{pool="reindex"}', until=value_is(4)
        )
        expired = await query(
            client,
            prometheus,
            'lifecycle_deadline_requests_total{route="/slow",method="GET",outcome="expired"}',
            until=value_is(1),
        )
        periodic = await query(
            client, prometheus, "lifecycle_periodic_runs_total", until=lambda result: result
        )
        states = await query(
            client,
            prometheus,
            'lifecycle_service_state{service="db"} == 1',
            until=lambda result: result,
        )
        exposition = await client.get("/metrics", headers={"accept-encoding": "gzip"})
    # The target's own labels stay Prometheus's: nothing was renamed exported_*.
    for series in (*queued, *expired, *periodic):
        labels = series["metric"]
        assert labels["job"] == "example", labels
        assert not any(name.startswith("exported_") for name in labels), labels
    assert periodic[0]["metric"]["periodic"] == "report_items"
    assert [s["metric"]["lifecycle_service_state"] for s in states] == ["running"]
    # Prometheus asked for gzip and OpenMetrics; promtool lints the Prometheus text format.
    assert exposition.headers["content-encoding"] == "gzip"
    assert len(exposition.content) > 3 * int(exposition.headers["content-length"])
    lint = await anyio.run_process(
        [promtool, "check", "metrics"], input=exposition.content, check=False
    )
    problems = (lint.stdout + lint.stderr).decode()
    assert lint.returncode == 0, problems
    assert not problems.strip(), problems


# -- prometheus-client's multiprocess mode -------------------------------------------------


async def test_one_scrape_shows_every_worker_under_workers_2(
    processes: list[Process], tmp_path: Path
) -> None:
    directory = tmp_path / "multiproc"
    directory.mkdir()
    app = start_example(
        processes, tmp_path, "--workers", "2", PROMETHEUS_MULTIPROC_DIR=str(directory)
    )
    async with httpx.AsyncClient(base_url=app.url) as client:
        await wait_until_up(client, app, "/readyz")
        # Either worker answers each request; both write their pools' values.
        with anyio.fail_after(20):
            while True:
                text = (await client.get("/metrics")).text
                pids = {
                    labels["pid"]
                    for name, labels, _ in samples(text)
                    if name == "lifecycle_pool_queue_capacity_jobs"
                    and labels.get("pool") == "reindex"
                }
                if len(pids) == 2:
                    break
                await anyio.sleep(0.1)
        posts = 6
        for _ in range(posts):
            queued = await client.post("/reindex", json={"ids": [1]})
            assert queued.status_code == 202, queued.text
        # Each worker writes its values every second and before it answers a scrape.
        with anyio.fail_after(10):
            while True:
                merged = samples((await client.get("/metrics")).text)
                accepted = [
                    value
                    for name, labels, value in merged
                    if name == "lifecycle_pool_jobs_accepted_total"
                    and labels.get("pool") == "reindex"
                ]
                if accepted == [posts]:
                    break
                await anyio.sleep(0.2)
    # The jobs went to whichever worker took each request: the merged count is their sum,
    # and each worker's queue is there under its pid.
    queues = {
        labels["pid"]: value
        for name, labels, value in merged
        if name == "lifecycle_pool_queued_jobs" and labels.get("pool") == "reindex"
    }
    assert set(queues) == pids
    # One job runs in each worker that got any; the others wait.
    running = sum(
        value
        for name, labels, value in merged
        if name == "lifecycle_pool_running_jobs" and labels.get("pool") == "reindex"
    )
    assert sum(queues.values()) + running == posts
    assert len(list(directory.glob("*.db"))) >= 2
