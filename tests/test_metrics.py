"""Prometheus metrics: drive a scenario, scrape /metrics, check the values."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

import lifecycle
from lifecycle import (
    ConcurrencyLimitMiddleware,
    DeadlineMiddleware,
    Lifecycle,
    QueueFull,
    SupervisorState,
    _deadline,
    instrument_metrics,
)
from lifecycle._metrics import _Histogram
from lifecycle.starlette import metrics_route
from lifecycle.testing import lifespan_client

pytestmark = pytest.mark.anyio

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    if key not in samples:
        known = sorted(n for n, _ in samples if n.startswith(name))
        raise AssertionError(f"no sample {name}{labels}; samples named like it: {known}")
    return samples[key]


# -- a whole scenario: services, a pool, a supervised task, a periodic job ---------------


async def test_scenario_scraped_from_the_metrics_route() -> None:
    registry = CollectorRegistry()
    lc = Lifecycle(shutdown_timeout=5.0)
    blocker_started = anyio.Event()
    never = anyio.Event()
    gave_up = anyio.Event()
    periodic_ran = anyio.Event()
    runs = 0

    @lc.service
    async def db() -> AsyncIterator[str]:
        yield "db"
        await anyio.sleep(0.01)  # a cleanup that takes a while

    @lc.worker(concurrency=1, queue_size=2, overflow="reject", drain_timeout=0.05)
    async def jobs(job: str, db: str) -> str:
        if job == "fail":
            raise ValueError("bad job")
        if job == "block":
            blocker_started.set()
            await never.wait()
        return job

    @lc.background(restart="on_failure", max_restarts=1, backoff_base=0.001)
    async def flaky(db: str) -> None:
        nonlocal runs
        runs += 1
        if runs == 2:
            gave_up.set()  # the supervisor gives up before anyone else runs
        raise RuntimeError("lost the connection")

    @lc.background(restart="always")
    async def patient() -> None:
        raise RuntimeError("down")

    @lc.periodic(every=3600.0, first_run="now")
    async def report(db: str) -> None:
        periodic_ran.set()
        raise ValueError("report failed")

    patient.delay = lambda attempt: 30.0  # type: ignore[method-assign]

    metrics = instrument_metrics(lc, registry=registry)
    app = Starlette(lifespan=lc.lifespan, routes=[metrics_route(registry)])

    async with lifespan_client(app) as client:
        assert await jobs.call("ok") == "ok"
        with pytest.raises(ValueError, match="bad job"):
            await jobs.call("fail")
        jobs.submit_nowait("block")
        await blocker_started.wait()
        jobs.submit_nowait("q1")
        jobs.submit_nowait("q2")
        with pytest.raises(QueueFull):
            jobs.submit_nowait("q3")
        await gave_up.wait()
        await periodic_ran.wait()
        assert patient.state is SupervisorState.BACKOFF

        response = await client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=")
        assert response.headers["cache-control"] == "no-store"
        running = parse(response.text)

    # While running: the lifecycle and its services.
    assert value(running, "lifecycle_state", lifecycle_state="running") == 1
    assert value(running, "lifecycle_state", lifecycle_state="starting") == 0
    assert value(running, "lifecycle_draining") == 0
    assert value(running, "lifecycle_startup_duration_seconds") > 0
    assert ("lifecycle_shutdown_duration_seconds", frozenset()) not in running
    for service in ("db", "worker:jobs", "background:flaky", "periodic:report"):
        assert (
            value(
                running,
                "lifecycle_service_state",
                service=service,
                lifecycle_service_state="running",
            )
            == 1
        )
        assert (
            value(
                running,
                "lifecycle_service_state",
                service=service,
                lifecycle_service_state="stopped",
            )
            == 0
        )
        assert value(running, "lifecycle_service_start_duration_seconds", service=service) >= 0
    # The pool: one running, two queued, one of each outcome so far, one rejected.
    assert value(running, "lifecycle_pool_running_jobs", pool="jobs") == 1
    assert value(running, "lifecycle_pool_queued_jobs", pool="jobs") == 2
    assert value(running, "lifecycle_pool_queue_capacity_jobs", pool="jobs") == 2
    assert value(running, "lifecycle_pool_concurrency_limit_jobs", pool="jobs") == 1
    assert value(running, "lifecycle_pool_saturation_ratio", pool="jobs") == 1.0
    assert value(running, "lifecycle_pool_jobs_accepted_total", pool="jobs") == 5
    assert value(running, "lifecycle_pool_jobs_completed_total", pool="jobs") == 1
    assert value(running, "lifecycle_pool_jobs_failed_total", pool="jobs") == 1
    assert value(running, "lifecycle_pool_jobs_rejected_total", pool="jobs") == 1
    assert value(running, "lifecycle_pool_jobs_abandoned_total", pool="jobs") == 0
    # Three jobs left the queue (ok, fail, block); the histograms count the two that ended.
    wait = "lifecycle_pool_job_wait_duration_seconds"
    assert value(running, f"{wait}_count", pool="jobs") == 2
    assert value(running, f"{wait}_bucket", pool="jobs", le="+Inf") == 2
    assert value(running, f"{wait}_sum", pool="jobs") >= 0
    assert value(running, "lifecycle_pool_job_run_duration_seconds_count", pool="jobs") == 2
    # The supervised tasks: one gave up after a restart, one waits out a 30 s backoff.
    assert (
        value(
            running,
            "lifecycle_background_state",
            task="flaky",
            lifecycle_background_state="gave_up",
        )
        == 1
    )
    assert (
        value(
            running,
            "lifecycle_background_state",
            task="flaky",
            lifecycle_background_state="running",
        )
        == 0
    )
    assert value(running, "lifecycle_background_restarts_total", task="flaky") == 1
    assert value(running, "lifecycle_background_failures_total", task="flaky") == 2
    assert value(running, "lifecycle_background_backoff_remaining_seconds", task="flaky") == 0
    assert (
        value(
            running,
            "lifecycle_background_state",
            task="patient",
            lifecycle_background_state="backoff",
        )
        == 1
    )
    backoff = value(running, "lifecycle_background_backoff_remaining_seconds", task="patient")
    assert 25 < backoff <= 30
    # The periodic job ran once and failed.
    assert value(running, "lifecycle_periodic_runs_total", periodic="report") == 1
    assert value(running, "lifecycle_periodic_failures_total", periodic="report") == 1
    assert value(running, "lifecycle_periodic_timeouts_total", periodic="report") == 0
    assert value(running, "lifecycle_periodic_running", periodic="report") == 0
    assert value(running, "lifecycle_periodic_last_duration_seconds", periodic="report") >= 0

    # After shutdown: the drain ran out, so the blocked job and the two queued were abandoned.
    stopped = parse(generate_latest(registry).decode())
    assert value(stopped, "lifecycle_state", lifecycle_state="stopped") == 1
    assert value(stopped, "lifecycle_state", lifecycle_state="running") == 0
    assert value(stopped, "lifecycle_shutdown_duration_seconds") >= 0.01  # db's cleanup
    assert value(stopped, "lifecycle_service_stop_duration_seconds", service="db") >= 0.01
    assert (
        value(stopped, "lifecycle_service_state", service="db", lifecycle_service_state="stopped")
        == 1
    )
    assert value(stopped, "lifecycle_pool_jobs_abandoned_total", pool="jobs") == 3
    assert value(stopped, "lifecycle_pool_queued_jobs", pool="jobs") == 0
    assert value(stopped, "lifecycle_pool_running_jobs", pool="jobs") == 0
    accepted = value(stopped, "lifecycle_pool_jobs_accepted_total", pool="jobs")
    finished = sum(
        value(stopped, f"lifecycle_pool_jobs_{outcome}_total", pool="jobs")
        for outcome in ("completed", "failed", "abandoned")
    )
    assert accepted == finished == 5
    # The blocked job was abandoned: like statistics(), the histograms leave it out.
    stats = jobs.statistics()
    run = "lifecycle_pool_job_run_duration_seconds"
    assert value(stopped, f"{wait}_count", pool="jobs") == 2
    assert value(stopped, f"{run}_count", pool="jobs") == 2
    assert value(stopped, f"{wait}_sum", pool="jobs") == pytest.approx(stats.wait_time_total)
    assert value(stopped, f"{run}_sum", pool="jobs") == pytest.approx(stats.run_time_total)
    assert (
        value(
            stopped,
            "lifecycle_background_state",
            task="patient",
            lifecycle_background_state="stopped",
        )
        == 1
    )
    metrics.close()


async def test_a_failed_startup_shows_the_failed_service() -> None:
    registry = CollectorRegistry()
    lc = Lifecycle()

    @lc.service
    async def db() -> AsyncIterator[str]:
        yield "db"

    @lc.service
    async def cache(db: str) -> AsyncIterator[str]:
        raise ConnectionError("no cache")
        yield "cache"  # pragma: no cover

    instrument_metrics(lc, registry=registry)
    with pytest.raises(lifecycle.StartupError):
        async with lc.run():
            pass
    samples = parse(generate_latest(registry).decode())
    assert value(samples, "lifecycle_state", lifecycle_state="failed") == 1
    assert (
        value(samples, "lifecycle_service_state", service="cache", lifecycle_service_state="failed")
        == 1
    )
    assert (
        value(samples, "lifecycle_service_state", service="db", lifecycle_service_state="stopped")
        == 1
    )
    assert ("lifecycle_service_start_duration_seconds", frozenset({("service", "db")})) in samples


# -- health -------------------------------------------------------------------------------


async def test_health_checks_probes_and_event_loop_lag() -> None:
    registry = CollectorRegistry()
    lc = Lifecycle()
    lc.health.configure(watchdog_interval=0.02, lag_warn=0.1, lag_fail=5.0, lag_recovery=30.0)

    @lc.health_check(interval=3600.0)
    async def database() -> None:
        pass

    @lc.health_check(interval=3600.0, critical=False)
    async def search() -> None:
        raise ConnectionError("search is down")

    instrument_metrics(lc, registry=registry)
    async with lc.run():  # startup waits for each check's first result
        await anyio.sleep(0.05)  # the watchdog is armed
        time.sleep(0.3)  # noqa: ASYNC251 - blocking the event loop is the point
        await anyio.sleep(0.05)  # the watchdog measures the lag
        samples = parse(generate_latest(registry).decode())

    assert (
        value(
            samples,
            "lifecycle_health_check_status",
            check="database",
            lifecycle_health_check_status="pass",
        )
        == 1
    )
    assert (
        value(
            samples,
            "lifecycle_health_check_status",
            check="database",
            lifecycle_health_check_status="fail",
        )
        == 0
    )
    assert (
        value(
            samples,
            "lifecycle_health_check_status",
            check="search",
            lifecycle_health_check_status="fail",
        )
        == 1
    )
    assert value(samples, "lifecycle_health_check_runs_total", check="search") == 1
    assert value(samples, "lifecycle_health_check_failures_total", check="search") == 1
    assert value(samples, "lifecycle_health_check_failures_total", check="database") == 0
    assert value(samples, "lifecycle_health_check_timeouts_total", check="search") == 0
    assert value(samples, "lifecycle_health_check_duration_seconds", check="database") >= 0
    # The failing check is not critical: readiness passes; the blocked loop degrades liveness.
    assert (
        value(
            samples,
            "lifecycle_health_probe_status",
            probe="readiness",
            lifecycle_health_probe_status="pass",
        )
        == 1
    )
    assert (
        value(
            samples,
            "lifecycle_health_probe_status",
            probe="liveness",
            lifecycle_health_probe_status="warn",
        )
        == 1
    )
    assert (
        value(
            samples,
            "lifecycle_health_probe_status",
            probe="startup",
            lifecycle_health_probe_status="pass",
        )
        == 1
    )
    assert value(samples, "lifecycle_event_loop_lag_seconds") >= 0.25
    assert (
        value(
            samples,
            "lifecycle_service_state",
            service="health:search",
            lifecycle_service_state="running",
        )
        == 1
    )


async def test_no_health_metrics_and_no_monitor_unless_health_is_used() -> None:
    registry = CollectorRegistry()
    lc = Lifecycle()
    instrument_metrics(lc, registry=registry)
    async with lc.run():
        text = generate_latest(registry).decode()
    assert "lifecycle_health" not in text
    assert "lifecycle_event_loop_lag_seconds" not in text
    assert lc.health_monitor is None  # scraping did not create one


# -- deadline and admission middleware ----------------------------------------------------


async def test_deadline_and_admission_counters_of_watched_middleware() -> None:
    registry = CollectorRegistry()
    lc = Lifecycle()
    instrument_metrics_obj = instrument_metrics(lc, registry=registry)
    holding = anyio.Event()
    release = anyio.Event()

    async def slow(request: Request) -> PlainTextResponse:
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    async def fast(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def hold(request: Request) -> PlainTextResponse:
        holding.set()
        await release.wait()
        return PlainTextResponse("held")

    app = Starlette(
        lifespan=lc.lifespan,
        routes=[
            Route("/slow", slow),
            Route("/fast", fast),
            Route("/hold", hold),
            metrics_route(registry),
        ],
        middleware=[
            Middleware(DeadlineMiddleware, max_timeout=10.0, reserve=0.001, min_budget=0.005),
            Middleware(ConcurrencyLimitMiddleware, max_concurrency=1, max_waiting=0),
        ],
    )
    instrument_metrics_obj.watch(app)

    async with lifespan_client(app) as client:
        expired = await client.get("/slow", headers={"x-request-timeout-ms": "20"})
        assert expired.status_code == 504
        clamped = await client.get("/fast", headers={"x-request-timeout-ms": "99999999"})
        assert clamped.status_code == 200
        malformed = await client.get("/fast", headers={"x-request-timeout-ms": "soon"})
        assert malformed.status_code == 200
        early = await client.get("/fast", headers={"x-request-timeout-ms": "1"})
        assert early.status_code == 504

        async with anyio.create_task_group() as tg:
            tg.start_soon(client.get, "/hold")
            await holding.wait()
            rejected = await client.get("/fast")
            assert rejected.status_code == 503
            during = parse((await client.get("/metrics")).text)
            release.set()
        after = parse((await client.get("/metrics")).text)

    assert value(after, "lifecycle_deadline_budgets_received_total") == 3
    assert value(after, "lifecycle_deadline_budgets_clamped_total") == 1
    assert value(after, "lifecycle_deadline_budgets_malformed_total") == 1
    assert value(after, "lifecycle_deadline_expired_total") == 1
    assert value(after, "lifecycle_deadline_rejected_early_total") == 1
    assert value(after, "lifecycle_deadline_aborted_total") == 0
    assert value(after, "lifecycle_deadline_in_flight_requests") == 0
    assert value(during, "lifecycle_deadline_in_flight_requests") == 1
    assert value(during, "lifecycle_admission_in_flight_requests") == 1
    assert value(after, "lifecycle_admission_in_flight_requests") == 0
    assert value(after, "lifecycle_admission_concurrency_limit_requests") == 1
    assert value(after, "lifecycle_admission_rejected_total") == 1
    # /slow, /fast twice (clamped, malformed) and /hold were admitted; the early 504 never
    # reached the admission middleware, nor did the rejected request.
    assert value(after, "lifecycle_admission_admitted_total") == 4
    assert value(after, "lifecycle_admission_waited_total") == 0


async def test_request_counters_are_labelled_by_route_template_and_method() -> None:
    """Bounded labels: the template, never the raw path; one fixed value when nothing matched;
    a request rejected before routing is matched against the app's routes."""
    registry = CollectorRegistry()
    lc = Lifecycle()
    metrics = instrument_metrics(lc, registry=registry)
    holding = anyio.Event()
    release = anyio.Event()

    async def item(request: Request) -> PlainTextResponse:
        return PlainTextResponse(str(request.path_params))

    async def slow(request: Request) -> PlainTextResponse:
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    async def hold(request: Request) -> PlainTextResponse:
        holding.set()
        await release.wait()
        return PlainTextResponse("held")

    app = Starlette(
        lifespan=lc.lifespan,
        routes=[
            Route("/items/{item_id}", item, methods=["GET", "POST"]),
            Route("/slow", slow),
            Route("/hold", hold),
            Mount("/api", routes=[Route("/users/{user_id}", item)]),
            metrics_route(registry),
        ],
        middleware=[
            Middleware(DeadlineMiddleware, default_timeout=5.0, reserve=0.0),
            Middleware(ConcurrencyLimitMiddleware, max_concurrency=1, max_waiting=0),
        ],
    )
    metrics.watch(app)
    async with lifespan_client(app) as client:
        for number in range(3):
            assert (await client.get(f"/items/{number}")).status_code == 200
        assert (await client.post("/items/7")).status_code == 200
        assert (await client.get("/api/users/5")).status_code == 200
        assert (await client.get("/nowhere/1")).status_code == 404
        assert (await client.request("BREW", "/items/1")).status_code == 405
        expired = await client.get("/slow", headers={"x-request-timeout-ms": "20"})
        assert expired.status_code == 504
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.get, "/hold")
            await holding.wait()
            assert (await client.get("/items/9")).status_code == 503
            release.set()
        text = (await client.get("/metrics")).text
    samples = parse(text)
    deadline = "lifecycle_deadline_requests_total"
    # Three served, and the one the admission control rejected inside the deadline.
    assert (
        value(samples, deadline, route="/items/{item_id}", method="GET", outcome="completed") == 4
    )
    assert (
        value(samples, deadline, route="/items/{item_id}", method="POST", outcome="completed") == 1
    )
    assert (
        value(samples, deadline, route="/items/{item_id}", method="_OTHER", outcome="completed")
        == 1
    )
    assert (
        value(samples, deadline, route="/api/users/{user_id}", method="GET", outcome="completed")
        == 1
    )
    assert value(samples, deadline, route="unmatched", method="GET", outcome="completed") == 1
    assert value(samples, deadline, route="/slow", method="GET", outcome="expired") == 1
    admission = "lifecycle_admission_requests_total"
    assert (
        value(samples, admission, route="/items/{item_id}", method="GET", outcome="admitted") == 3
    )
    assert (
        value(samples, admission, route="/items/{item_id}", method="GET", outcome="rejected") == 1
    )
    assert value(samples, admission, route="/hold", method="GET", outcome="admitted") == 1
    assert "/items/9" not in text
    assert "/items/1" not in text
    assert "/nowhere" not in text


async def test_middleware_instances_can_be_watched_directly() -> None:
    registry = CollectorRegistry()
    lc = Lifecycle()
    metrics = instrument_metrics(lc, registry=registry)

    async def fast(scope: Any, receive: Any, send: Any) -> None:
        await PlainTextResponse("ok")(scope, receive, send)

    limited = ConcurrencyLimitMiddleware(fast, max_concurrency=3)
    metrics.watch(limited, limited)  # watching twice counts once
    samples = parse(generate_latest(registry).decode())
    assert value(samples, "lifecycle_admission_concurrency_limit_requests") == 3
    assert ("lifecycle_deadline_expired_total", frozenset()) not in samples


# -- the route ----------------------------------------------------------------------------


async def test_route_negotiates_openmetrics_and_filters_by_name() -> None:
    registry = CollectorRegistry()
    lc = Lifecycle()

    @lc.service
    async def db() -> AsyncIterator[str]:
        yield "db"

    instrument_metrics(lc, registry=registry)
    app = Starlette(lifespan=lc.lifespan, routes=[metrics_route(registry, path="/m")])
    async with lifespan_client(app) as client:
        open_metrics = await client.get(
            "/m", headers={"accept": "application/openmetrics-text; version=1.0.0"}
        )
        assert open_metrics.headers["content-type"].startswith("application/openmetrics-text")
        assert open_metrics.text.rstrip().endswith("# EOF")
        filtered = await client.get("/m", params={"name[]": "lifecycle_draining"})
        assert (await client.post("/m")).status_code == 405
    assert "lifecycle_state" in open_metrics.text
    names = {family.name for family in text_string_to_metric_families(filtered.text)}
    assert names == {"lifecycle_draining"}


async def test_route_gzips_for_scrapers_that_accept_it() -> None:
    registry = CollectorRegistry()
    lc = Lifecycle()
    instrument_metrics(lc, registry=registry)
    app = Starlette(lifespan=lc.lifespan, routes=[metrics_route(registry)])
    async with lifespan_client(app) as client:
        zipped = await client.get("/metrics", headers={"accept-encoding": "gzip"})
        plain = await client.get("/metrics", headers={"accept-encoding": "identity"})
    assert zipped.headers["content-encoding"] == "gzip"
    assert zipped.headers["vary"] == "Accept-Encoding"
    assert int(zipped.headers["content-length"]) < len(zipped.content)  # httpx unzipped it
    assert "content-encoding" not in plain.headers
    assert zipped.text == plain.text


async def test_multiprocess_mode_writes_this_process_and_serves_the_merged_view(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """In one process here; tests/test_metrics_e2e.py runs it under uvicorn --workers 2."""
    import os

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    lc = Lifecycle()

    @lc.worker(queue_size=7)
    async def index(job: int) -> None:
        pass

    metrics = instrument_metrics(lc, registry=CollectorRegistry(), multiprocess_interval=60)
    assert "metrics:multiprocess" in lc.declared
    app = Starlette(lifespan=lc.lifespan, routes=[metrics_route()])
    try:
        async with lifespan_client(app) as client:
            await index.call(1)
            await index.call(2)
            merged = parse((await client.get("/metrics")).text)
    finally:
        metrics.close()
    pid = str(os.getpid())
    # A gauge per process (its pid), counters and histograms summed over the processes.
    assert value(merged, "lifecycle_pool_queue_capacity_jobs", pool="index", pid=pid) == 7
    assert value(merged, "lifecycle_pool_jobs_completed_total", pool="index") == 2
    assert value(merged, "lifecycle_pool_job_run_duration_seconds_count", pool="index") == 2
    assert (
        value(merged, "lifecycle_pool_job_run_duration_seconds_bucket", pool="index", le="+Inf")
        == 2
    )
    stateset = {"service": "db", "lifecycle_service_state": "running", "pid": pid}
    assert ("lifecycle_service_state", frozenset(stateset.items())) not in merged  # no db
    running = {"service": "worker:index", "lifecycle_service_state": "running", "pid": pid}
    assert merged[("lifecycle_service_state", frozenset(running.items()))] == 1
    # Stopped: the process's gauges left with it; its counters stay in the sums.
    files = sorted([path.name async for path in anyio.Path(tmp_path).iterdir()])
    assert files == [f"counter_{pid}.db", f"histogram_{pid}.db"], files


def test_multiprocess_mode_says_what_it_needs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with pytest.raises(ValueError, match="PROMETHEUS_MULTIPROC_DIR set to a directory"):
        instrument_metrics(Lifecycle(), registry=CollectorRegistry(), multiprocess=True)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="is not a directory; create it"):
        instrument_metrics(Lifecycle(), registry=CollectorRegistry())
    with pytest.raises(ValueError, match="is not a directory; create it"):
        metrics_route()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="multiprocess_interval"):
        instrument_metrics(Lifecycle(), registry=CollectorRegistry(), multiprocess_interval=0)


async def test_fastapi_router() -> None:
    from fastapi import FastAPI

    from lifecycle.fastapi import metrics_router

    registry = CollectorRegistry()
    lc = Lifecycle()

    @lc.worker
    async def index(job: int) -> None:
        pass

    instrument_metrics(lc, registry=registry)
    app = FastAPI(lifespan=lc.lifespan)
    app.include_router(metrics_router(registry))
    async with lifespan_client(app) as client:
        await index.call(1)
        response = await client.get("/metrics")
        schema = (await client.get("/openapi.json")).json()
    assert response.status_code == 200
    samples = parse(response.text)
    assert value(samples, "lifecycle_pool_jobs_completed_total", pool="index") == 1
    assert "/metrics" not in schema["paths"]


async def test_job_time_histograms_count_finished_jobs_not_abandoned_ones() -> None:
    registry = CollectorRegistry()
    lc = Lifecycle()
    stuck = anyio.Event()

    @lc.worker(job_timeout=0.01)
    async def timed(job: str) -> str:
        if job == "hang":
            await anyio.sleep_forever()
        return job

    @lc.worker(drain_timeout=0.01)
    async def drained(job: str) -> None:
        stuck.set()
        await anyio.sleep_forever()

    metrics = instrument_metrics(lc, registry=registry)
    try:
        async with lc.run():
            assert await timed.call("ok") == "ok"
            with pytest.raises(TimeoutError):
                await timed.call("hang")  # cut off by its job_timeout: failed
            drained.submit_nowait("stuck")  # cut off by the end of the drain: abandoned
            await stuck.wait()
        samples = parse(generate_latest(registry).decode())
    finally:
        metrics.close()

    stats = timed.statistics()
    assert (stats.completed, stats.failed, stats.abandoned) == (1, 1, 0)
    assert drained.statistics().abandoned == 1
    for histogram, total in (
        ("lifecycle_pool_job_wait_duration_seconds", stats.wait_time_total),
        ("lifecycle_pool_job_run_duration_seconds", stats.run_time_total),
    ):
        assert value(samples, f"{histogram}_count", pool="timed") == 2
        assert value(samples, f"{histogram}_sum", pool="timed") == pytest.approx(total)
        assert value(samples, f"{histogram}_count", pool="drained") == 0
        assert value(samples, f"{histogram}_sum", pool="drained") == 0


# -- enabling -----------------------------------------------------------------------------


async def test_instrument_refuses_what_it_cannot_do() -> None:
    lc = Lifecycle()
    with pytest.raises(TypeError, match="measures a Lifecycle"):
        instrument_metrics(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="buckets must be increasing"):
        instrument_metrics(lc, registry=CollectorRegistry(), buckets=[1.0, 0.5])
    with pytest.raises(ValueError, match="buckets must be increasing"):
        instrument_metrics(lc, registry=CollectorRegistry(), buckets=[])

    registry = CollectorRegistry()
    metrics = instrument_metrics(lc, registry=registry)
    with pytest.raises(RuntimeError, match="already enabled"):
        instrument_metrics(lc, registry=CollectorRegistry())
    with pytest.raises(ValueError, match="its own CollectorRegistry"):
        instrument_metrics(Lifecycle(), registry=registry)

    metrics.close()  # unregisters and detaches: enabling again works
    assert metrics._observer not in lc.observers
    assert "lifecycle_state" not in generate_latest(registry).decode()
    instrument_metrics(lc, registry=registry).close()

    async with lc.run():
        with pytest.raises(RuntimeError, match="before the app starts"):
            instrument_metrics(lc, registry=CollectorRegistry())


async def test_a_refused_registration_leaves_nothing_behind() -> None:
    registry = CollectorRegistry()
    metrics = instrument_metrics(Lifecycle(), registry=registry)
    observers = list(_deadline.observers)
    refused = Lifecycle()
    for _ in range(3):
        with pytest.raises(ValueError, match="its own CollectorRegistry"):
            instrument_metrics(refused, registry=registry)
    assert _deadline.observers == observers  # no budget observer of a refused collector
    assert not any(isinstance(o, type(metrics._observer)) for o in refused.observers)
    metrics.close()
    assert len(_deadline.observers) == len(observers) - 1


async def test_closing_twice_does_nothing_the_second_time() -> None:
    lc = Lifecycle()
    registry = CollectorRegistry()
    metrics = instrument_metrics(lc, registry=registry)
    metrics.close()
    metrics.close()
    again = instrument_metrics(lc, registry=registry)
    metrics.close()  # an old handle leaves the new collector alone
    assert metrics._observer not in lc.observers
    assert again._observer in lc.observers
    assert "lifecycle_state" in generate_latest(registry).decode()
    again.close()
    again.close()
    assert again._observer not in lc.observers
    assert "lifecycle_state" not in generate_latest(registry).decode()


async def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    histogram = _Histogram((0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 1.0, 3.0):
        histogram.observe(seconds)
    assert histogram.buckets() == [("0.1", 2.0), ("1.0", 4.0), ("+Inf", 5.0)]
    assert histogram.total == pytest.approx(4.65)


def test_public_names() -> None:
    for name in (
        "instrument_metrics",
        "LifecycleMetrics",
        "DEFAULT_BUCKETS",
        "instrument_tracing",
        "LifecycleTracing",
        "TRACER_NAME",
    ):
        assert hasattr(lifecycle, name), name


def test_works_without_prometheus_client_and_says_how_to_get_it() -> None:
    # prometheus-client and opentelemetry are made unimportable in a fresh interpreter.
    script = """
import sys
sys.modules["prometheus_client"] = None
sys.modules["opentelemetry"] = None
import anyio
import lifecycle

lc = lifecycle.Lifecycle()

@lc.worker
async def double(job: int) -> int:
    return job * 2

async def main() -> None:
    async with lc.run():
        assert await double.call(21) == 42

anyio.run(main)
for enable in (lifecycle.instrument_metrics, lifecycle.instrument_tracing):
    try:
        enable(lc)
    except ImportError as exc:
        print(exc)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=30
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines == [
        "Metrics need prometheus-client, which is not installed: "
        "pip install 'anyio-lifecycle[metrics]'.",
        "Tracing needs opentelemetry-api, which is not installed: "
        "pip install 'anyio-lifecycle[tracing]'.",
    ]


async def test_budget_left_at_the_end_of_each_request_is_a_histogram() -> None:
    import anyio
    from prometheus_client import CollectorRegistry, generate_latest
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    import lifecycle
    from lifecycle.testing import lifespan_client

    async def quick(request: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def slow(request: object) -> PlainTextResponse:
        await anyio.sleep(5)
        return PlainTextResponse("late")

    lc = Lifecycle()
    registry = CollectorRegistry()
    metrics = lifecycle.instrument_metrics(lc, registry=registry)
    try:
        app = lifecycle.DeadlineMiddleware(
            Starlette(routes=[Route("/quick", quick), Route("/slow", slow)], lifespan=lc.lifespan)
        )
        async with lifespan_client(app) as client:
            headers = {"x-request-timeout-ms": "2000"}
            assert (await client.get("/quick", headers=headers)).status_code == 200
            expired = await client.get("/slow", headers={"x-request-timeout-ms": "50"})
            assert expired.status_code == 504
            assert (await client.get("/quick")).status_code == 200  # no budget: not observed
        text = generate_latest(registry).decode()
    finally:
        metrics.close()
    assert "lifecycle_deadline_budget_remaining_seconds_count 2.0" in text
    # The expired request ended with nothing left; the quick one with almost all of 2 s.
    assert 'lifecycle_deadline_budget_remaining_seconds_bucket{le="0.0005"} 1.0' in text
    total = float(text.split("lifecycle_deadline_budget_remaining_seconds_sum ")[1].split()[0])
    assert 1.9 < total <= 2.0
