"""Prometheus metrics of a `Lifecycle`, its services, background work and middleware.

Almost everything is read at scrape time: `LifecycleMetrics` is a prometheus-client
collector whose `collect` turns the lifecycle's state and timeline, the ``statistics()``
snapshots of its worker pools, supervised tasks, periodic jobs and health checks, its health
probes, and the ``statistics()`` of the deadline and admission middlewares into metric
families, so that none of it costs anything between scrapes. Only the per-job wait and run
times of worker pools need every value: those are pushed, through the pool's observer hook,
into histograms that count into buckets without a lock (every observation happens on the
event loop's thread) and are exposed at scrape time.

prometheus-client is an optional dependency (``pip install 'anyio-lifecycle[metrics]'``), imported
only when metrics are enabled or collected.
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from . import _admission, _deadline
from ._kernel import Observer
from ._observe import JobObserver, attach, check_attachable, detach
from ._timeline import LifecycleState, ServiceState, Timeline
from ._validate import seconds

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

    from ._admission import ConcurrencyLimitMiddleware
    from ._deadline import DeadlineMiddleware
    from ._health import HealthMonitor
    from ._lifecycle import Lifecycle
    from ._workers import BackgroundTask, PeriodicJob, WorkerPool

__all__ = ["DEFAULT_BUCKETS", "LifecycleMetrics", "instrument_metrics"]

DEFAULT_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Upper bounds (seconds) of the job wait and run time histograms: 0.5 ms to a minute."""

_INSTALL_HINT = "pip install 'anyio-lifecycle[metrics]'"
# How far `LifecycleMetrics.watch` follows an app's ``.app`` chain looking for middleware.
_MAX_MIDDLEWARE_DEPTH = 64


def instrument_metrics(
    lifecycle: Lifecycle,
    *,
    registry: CollectorRegistry | None = None,
    buckets: Sequence[float] = DEFAULT_BUCKETS,
    multiprocess: bool | None = None,
    multiprocess_interval: float = 1.0,
) -> LifecycleMetrics:
    """Expose ``lifecycle``'s metrics to Prometheus through ``registry``.

    Call it once, after declaring the services and before the app starts; then serve the
    registry, for instance with `lifecycle.starlette.metrics_route` or
    `lifecycle.fastapi.metrics_router`::

        metrics = lifecycle.instrument_metrics(lc)
        app = FastAPI(lifespan=lc.lifespan)
        app.include_router(lifecycle.fastapi.metrics_router())
        metrics.watch(app)  # deadline and admission middleware metrics too

    Args:
        lifecycle: The `Lifecycle` to measure.
        registry: The prometheus-client registry to register with; ``None`` for the default
            (global) ``prometheus_client.REGISTRY``.
        buckets: Upper bounds, in seconds, of the job wait and run time histograms.
        multiprocess: Also write the metrics to prometheus-client's multiprocess files, so
            that one scrape of any worker process (``uvicorn --workers N``) shows them all;
            ``None`` (the default) for whenever ``PROMETHEUS_MULTIPROC_DIR`` is set. Each
            process writes its values every ``multiprocess_interval`` seconds, as it stops,
            and just before it answers a scrape (`lifecycle.starlette.metrics_route`
            serves the merged view in that mode). Gauges (and the statesets, which the
            multiprocess files keep as gauges) get a ``pid`` label and leave the scrape
            when their process stops; counters and histograms are summed over processes.
        multiprocess_interval: Seconds between two writes of a process's values.

    Returns:
        The registered collector; `LifecycleMetrics.close` unregisters it.

    Raises:
        ImportError: prometheus-client is not installed.
        TypeError: ``lifecycle`` is not a `Lifecycle`.
        ValueError: ``buckets`` are not increasing positive numbers, ``registry`` already
            has metrics of the same names (another instrumented `Lifecycle`), or
            ``multiprocess=True`` without a ``PROMETHEUS_MULTIPROC_DIR`` directory.
        RuntimeError: The Lifecycle is running, or its metrics are already enabled.
    """
    require_prometheus()
    from prometheus_client import REGISTRY

    interval = seconds("multiprocess_interval", multiprocess_interval)
    directory = multiprocess_directory()
    if multiprocess is None:
        multiprocess = directory is not None
    elif multiprocess and directory is None:
        raise ValueError(
            "multiprocess=True needs the environment variable PROMETHEUS_MULTIPROC_DIR set to "
            "a directory that every worker process can write (and that is empty when the "
            "server starts); set it, or leave multiprocess unset."
        )

    check_attachable(
        lifecycle,
        _MetricsObserver,
        api="instrument_metrics",
        what="metrics",
        verb="measures",
        handle="LifecycleMetrics",
    )
    metrics = LifecycleMetrics(lifecycle, registry if registry is not None else REGISTRY, buckets)
    try:
        metrics.registry.register(metrics)
    except ValueError as exc:
        raise ValueError(
            f"The registry already has lifecycle metrics ({exc}); another Lifecycle was "
            f"instrumented with it. Give each Lifecycle its own CollectorRegistry."
        ) from exc
    # Only once registered, so that a refused registration leaves nothing behind.
    _deadline.observers.append(metrics._budget_left)
    _admission.observers.append(metrics._admissions)
    attach(lifecycle, metrics._observer)
    if multiprocess:
        mirror = _Mirror(metrics, interval)
        lifecycle.declare(mirror.run, name="metrics:multiprocess", internal=True, kind="lifecycle")
    return metrics


def multiprocess_directory() -> str | None:
    """The directory of prometheus-client's multiprocess mode, or ``None`` when it is off.

    Raises:
        ValueError: ``PROMETHEUS_MULTIPROC_DIR`` names no directory.
    """
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return None
    if not os.path.isdir(directory):
        raise ValueError(
            f"PROMETHEUS_MULTIPROC_DIR={directory!r} is not a directory; create it (empty) "
            "before the server starts its workers, or unset the variable."
        )
    return directory


def refresh_multiprocess() -> None:
    """Write this process's values to the multiprocess files now (before a scrape)."""
    for mirror in _mirrors:
        mirror.write()


# The mirrors of this process (one per instrumented Lifecycle that runs in multiprocess mode).
_mirrors: list[_Mirror] = []


class _Mirror:
    """Copies a `LifecycleMetrics` into prometheus-client's multiprocess files.

    The metric families are read as a scrape would, and each sample is written to the value
    prometheus-client's own metrics would use in multiprocess mode (``MultiProcessValue``):
    gauges in the ``liveall`` mode (a ``pid`` label; the file goes when the process is marked
    dead), counters and histograms summed across processes. Histogram buckets are written
    per bucket, as prometheus-client's own histograms store them.
    """

    def __init__(self, metrics: LifecycleMetrics, interval: float) -> None:
        self.metrics = metrics
        self.interval = interval
        self.value_class: Any = None
        self.values: dict[tuple[str, str, str, tuple[str, ...], tuple[str, ...]], Any] = {}

    async def run(self, *, task_status: Any) -> None:
        import anyio
        from prometheus_client import values

        # Files of their own for each run: the end of the last one deleted its gauges' file.
        # MultiProcessValue registers a function that closes the files of the class it makes;
        # it is kept to close them when the run ends (a process may run the Lifecycle again).
        cleanups: list[Callable[[], None]] = getattr(values, "_multi_process_cleanups", [])
        known = list(cleanups)
        self.value_class = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        close = [cleanup for cleanup in cleanups if cleanup not in known]
        self.values.clear()
        _mirrors.append(self)
        try:
            self.write()
            task_status.started()
            while True:
                await anyio.sleep(self.interval)
                self.write()
        finally:
            _mirrors.remove(self)
            self.write()  # the last states and counts: counters outlive the process
            from prometheus_client import multiprocess

            # Its gauges leave the scrape.
            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
            for cleanup in close:
                cleanup()
                if cleanup in cleanups:
                    cleanups.remove(cleanup)
            self.value_class = None

    def write(self) -> None:
        if self.metrics._closed or self.value_class is None:
            return
        for family in self.metrics.collect():
            kind = family.type
            if kind == "stateset":
                kind = "gauge"
            if kind not in ("gauge", "counter", "histogram"):
                continue
            previous: dict[tuple[tuple[str, str], ...], float] = {}
            for sample in family.samples:
                labels = dict(sample.labels)
                value = sample.value
                if kind == "histogram":
                    if sample.name.endswith(("_count", "_created")):
                        continue  # prometheus-client counts the buckets
                    if "le" in labels:  # cumulative here, per bucket in the files
                        rest = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
                        value, previous[rest] = value - previous.get(rest, 0.0), value
                elif kind == "counter" and not sample.name.endswith("_total"):
                    continue  # _created
                self._set(kind, family.name, sample.name, labels, value, family.documentation)

    def _set(
        self,
        kind: str,
        family: str,
        name: str,
        labels: dict[str, str],
        value: float,
        documentation: str,
    ) -> None:
        names = tuple(labels)
        values = tuple(labels.values())
        key = (kind, family, name, names, values)
        stored = self.values.get(key)
        if stored is None:
            stored = self.values[key] = self.value_class(
                kind,
                family,
                name,
                names,
                values,
                documentation,
                multiprocess_mode="liveall" if kind == "gauge" else "",
            )
        stored.set(value)


def require_prometheus() -> None:
    """Raise an `ImportError` naming the extra to install when prometheus-client is missing.

    Used by `instrument_metrics` and by `lifecycle.starlette.metrics_route`.
    """
    try:
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"Metrics need prometheus-client, which is not installed: {_INSTALL_HINT}."
        ) from exc


class LifecycleMetrics:
    """A prometheus-client collector of a `Lifecycle`'s metrics; see `instrument_metrics`.

    Everything but the job time histograms and the per-route request counters is read
    when the registry is scraped. Metric
    names (the ``lifecycle_`` prefix, units in the names, ``_total`` counters):

    - the lifecycle: ``lifecycle_state`` (an OpenMetrics stateset: one sample per state, the
      state in the label named after the metric, 1 for the current one),
      ``lifecycle_draining``, ``lifecycle_startup_duration_seconds``,
      ``lifecycle_shutdown_duration_seconds``;
    - each service, worker pools and other internal ones included (``worker:<name>``...):
      ``lifecycle_service_state{service}`` (a stateset),
      ``lifecycle_service_start_duration_seconds{service}``,
      ``lifecycle_service_stop_duration_seconds{service}`` (of the current or last run);
    - each worker pool: ``lifecycle_pool_queued_jobs``, ``lifecycle_pool_queue_capacity_jobs``,
      ``lifecycle_pool_running_jobs``, ``lifecycle_pool_concurrency_limit_jobs``,
      ``lifecycle_pool_saturation_ratio`` (running / concurrency),
      ``lifecycle_pool_jobs_{accepted,completed,failed,rejected,abandoned}_total`` and the
      histograms ``lifecycle_pool_job_wait_duration_seconds`` and
      ``lifecycle_pool_job_run_duration_seconds`` of the jobs that completed or failed (as
      in the pool's ``statistics()``, abandoned jobs are left out), all labelled ``pool``;
    - each supervised task: ``lifecycle_background_state{task}`` (a stateset),
      ``lifecycle_background_restarts_total``, ``lifecycle_background_failures_total``,
      ``lifecycle_background_backoff_remaining_seconds``;
    - each periodic job: ``lifecycle_periodic_runs_total``, ``lifecycle_periodic_failures_total``,
      ``lifecycle_periodic_timeouts_total``, ``lifecycle_periodic_running``,
      ``lifecycle_periodic_last_duration_seconds``, labelled ``periodic`` (not ``job``, which
      is Prometheus's own target label);
    - health, once the Lifecycle uses it: ``lifecycle_health_check_status{check}`` (a stateset),
      ``lifecycle_health_check_duration_seconds``, ``lifecycle_health_check_runs_total``,
      ``lifecycle_health_check_failures_total``, ``lifecycle_health_check_timeouts_total``,
      ``lifecycle_health_probe_status{probe}`` (a stateset) and
      ``lifecycle_event_loop_lag_seconds``;
    - watched middleware (`watch`): ``lifecycle_deadline_*`` and ``lifecycle_admission_*``
      totals; and, for every deadline and admission middleware in the process,
      ``lifecycle_deadline_requests_total{route,method,outcome}`` and
      ``lifecycle_admission_requests_total{route,method,outcome}``, labelled with the route
      template (never the raw path; `UNMATCHED_ROUTE` when no route matched) and the method
      (``_OTHER`` for non-standard ones).

    Pool counters restart from zero with each run of the Lifecycle (Prometheus's ``rate``
    handles the reset); the histograms keep counting across runs.

    Attributes:
        lifecycle: The measured `Lifecycle`.
        registry: The registry it is registered with.
    """

    def __init__(
        self, lifecycle: Lifecycle, registry: CollectorRegistry, buckets: Sequence[float]
    ) -> None:
        self.lifecycle = lifecycle
        self.registry = registry
        self._observer = _MetricsObserver(_check_buckets(buckets))
        self._watched: list[object] = []
        # What is left of each request's budget when it ends, from every DeadlineMiddleware
        # in the process (the middleware knows no Lifecycle); `instrument_metrics` adds it to
        # the middleware's observers.
        self._budget_left = _BudgetLeft(_check_buckets(buckets))
        # Each request the admission middleware answers, by route (`_admission.observers`).
        self._admissions = _Admissions()
        self._closed = False

    def __repr__(self) -> str:
        return f"<LifecycleMetrics of {self.lifecycle!r}>"

    def watch(self, *targets: object) -> None:
        """Also report the deadline and admission middleware in ``targets``.

        A target is a `lifecycle.DeadlineMiddleware` or `lifecycle.ConcurrencyLimitMiddleware`
        instance, or an ASGI app (a Starlette or FastAPI app, or middleware wrapping one)
        whose middleware stack is searched at each scrape, so that middleware added with
        ``app.add_middleware`` (which builds its instances lazily) is found too. Several
        middleware of one kind are summed.

        Args:
            *targets: Middleware instances or apps.
        """
        for target in targets:
            if not any(target is known for known in self._watched):
                self._watched.append(target)

    def close(self) -> None:
        """Unregister from the registry and stop observing the Lifecycle.

        Closing again does nothing.
        """
        if self._closed:
            return
        self._closed = True
        detach(self.lifecycle, self._observer)
        if self._budget_left in _deadline.observers:
            _deadline.observers.remove(self._budget_left)
        if self._admissions in _admission.observers:
            _admission.observers.remove(self._admissions)
        self.registry.unregister(self)

    # -- the prometheus-client collector protocol -------------------------------------------

    def describe(self) -> list[Metric]:
        """The metric families this collector exposes, without samples.

        prometheus-client calls it once at registration, to detect clashing names.
        """
        return _Families().all()

    def collect(self) -> list[Metric]:
        """Read the current state of everything measured, as metric families."""
        families = _Families()
        lifecycle = self.lifecycle
        families.state.add_metric([], {s.value: lifecycle.state is s for s in LifecycleState})
        families.draining.add_metric([], float(lifecycle.draining))
        self._collect_services(families, lifecycle.timeline())
        observer = self._observer
        for name, pool in observer.pools.items():
            _collect_pool(families, pool, observer.histograms[name])
        for task in observer.tasks.values():
            _collect_background(families, task)
        for job in observer.periodic.values():
            _collect_periodic(families, job)
        # Read without creating it: lc.health would declare a monitor on first use.
        monitor = lifecycle.health_monitor
        if monitor is not None:
            _collect_health(families, monitor)
        deadlines, admissions = self._middleware()
        _collect_deadlines(families, deadlines)
        budget_left = self._budget_left.histogram
        if any(budget_left.counts):
            families.deadline_budget_left.add_metric([], budget_left.buckets(), budget_left.total)
        _collect_admissions(families, admissions)
        for labels, count in self._budget_left.requests.items():
            families.deadline_requests.add_metric(labels, count)
        for labels, count in self._admissions.requests.items():
            families.admission_requests.add_metric(labels, count)
        # Families with nothing to report (no shutdown yet, no middleware) are left out.
        return [family for family in families.all() if family.samples]

    def _collect_services(self, families: _Families, timeline: Timeline) -> None:
        entries = timeline.entries
        for entry in entries:
            families.service_state.add_metric(
                [entry.service], {state.value: entry.state is state for state in ServiceState}
            )
            if entry.start_duration is not None:
                families.service_start.add_metric([entry.service], entry.start_duration)
            if entry.stop_duration is not None:
                families.service_stop.add_metric([entry.service], entry.stop_duration)
        starts = [e for e in entries if e.start_began is not None]
        if starts and self.lifecycle.state is not LifecycleState.STARTING:
            began = min(e.start_began or 0.0 for e in starts)
            ended = max(e.start_ended or 0.0 for e in starts)
            families.startup.add_metric([], ended - began)
        stops = [e for e in entries if e.stop_began is not None]
        if stops and self.lifecycle.state in (LifecycleState.STOPPED, LifecycleState.FAILED):
            began = min(e.stop_began or 0.0 for e in stops)
            ended = max(e.stop_ended or 0.0 for e in stops)
            families.shutdown.add_metric([], ended - began)

    def _middleware(self) -> tuple[list[DeadlineMiddleware], list[ConcurrencyLimitMiddleware]]:
        """The watched deadline and admission middleware, found anew at each scrape."""
        from ._admission import ConcurrencyLimitMiddleware
        from ._deadline import DeadlineMiddleware

        deadlines: list[DeadlineMiddleware] = []
        admissions: list[ConcurrencyLimitMiddleware] = []
        seen: set[int] = set()
        for target in self._watched:
            node: object = target
            for _ in range(_MAX_MIDDLEWARE_DEPTH):
                if node is None or id(node) in seen:
                    break
                seen.add(id(node))
                if isinstance(node, DeadlineMiddleware):
                    deadlines.append(node)
                elif isinstance(node, ConcurrencyLimitMiddleware):
                    admissions.append(node)
                # A Starlette app builds its middleware stack on its first call.
                node = getattr(node, "middleware_stack", None) or getattr(node, "app", None)
        return deadlines, admissions


def _check_buckets(buckets: Sequence[float]) -> tuple[float, ...]:
    bounds = tuple(float(b) for b in buckets)
    if (
        not bounds
        or any(not math.isfinite(b) or b <= 0 for b in bounds)
        or any(a >= b for a, b in itertools.pairwise(bounds))
    ):
        raise ValueError(
            f"buckets must be increasing, positive, finite numbers of seconds (the +Inf bucket "
            f"is added), not {tuple(buckets)!r}."
        )
    return bounds


# -- pushed: job wait and run times -------------------------------------------------------


class _Histogram:
    """Bucket counts of observations, read at scrape time.

    prometheus-client's own ``Histogram`` takes a lock for each observation and scans its
    buckets one by one; these observations all happen on the event loop's thread, once per
    job, so a bisection and two additions do. A scrape from another thread may see the sum
    one observation ahead of the buckets; the count is always the buckets' total.
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        cumulative = 0
        result = []
        for bound, count in zip((*self.bounds, math.inf), list(self.counts), strict=True):
            cumulative += count
            result.append(("+Inf" if bound == math.inf else repr(bound), float(cumulative)))
        return result


UNMATCHED_ROUTE = "unmatched"
"""The ``route`` label of requests no route matched (a route template starts with ``/``)."""

_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY")
)


def request_labels(scope: Any, root_path: str) -> tuple[str, str]:
    """The ``route`` and ``method`` labels of a request: bounded by the app's routes.

    The route is the template of the route that handled it (``/items/{item_id}``, never the
    raw path), as Starlette and FastAPI leave it in ``scope["route"]``, behind the prefix of
    the mounts it went through; a request that never reached the router (rejected before it)
    is matched against the app's routes; one no route matches is `UNMATCHED_ROUTE`.
    Methods other than the standard ones are ``_OTHER``, as OpenTelemetry names them.
    """
    method = scope.get("method", "")
    if method not in _METHODS:
        method = "_OTHER"
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str):
        mounted: str = scope.get("root_path", "")
        prefix = mounted[len(root_path) :] if mounted.startswith(root_path) else ""
        return prefix + path, method
    return _match_route(scope), method


def _match_route(scope: Any) -> str:
    routes = getattr(scope.get("app"), "routes", None)
    if not routes:
        return UNMATCHED_ROUTE
    from starlette.routing import Match

    for route in routes:
        path = getattr(route, "path", None)
        if not isinstance(path, str):
            continue
        try:
            match, _ = route.matches(scope)
        except Exception:  # noqa: S112 - a label must never fail the request it counts
            continue
        if match is not Match.NONE:
            return path
    return UNMATCHED_ROUTE


class _Counts:
    """Counts by label values, on the event loop's thread; read whole at scrape time."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[tuple[str, ...], int] = {}

    def add(self, key: tuple[str, ...]) -> None:
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1

    def items(self) -> list[tuple[tuple[str, ...], int]]:
        return list(self.counts.copy().items())  # copy(): atomic against the loop's thread


class _BudgetLeft:
    """Observes each request under a deadline: what was left of its budget, how it ended."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.histogram = _Histogram(bounds)
        self.requests = _Counts()

    def request_started(
        self, scope: Any, budget: float, client_budget: float | None
    ) -> _DeadlineRequest:
        return _DeadlineRequest(self, scope)


class _DeadlineRequest:
    __slots__ = ("owner", "root_path", "scope")

    def __init__(self, owner: _BudgetLeft, scope: Any) -> None:
        self.owner = owner
        self.scope = scope
        self.root_path: str = scope.get("root_path", "")

    def response_started(self, remaining: float, outcome: str) -> None:
        pass

    def request_finished(self, remaining: float, outcome: str) -> None:
        owner = self.owner
        owner.histogram.observe(max(0.0, remaining))
        owner.requests.add((*request_labels(self.scope, self.root_path), outcome))


class _Admissions:
    """Counts each request a `ConcurrencyLimitMiddleware` answered, by route and method."""

    def __init__(self) -> None:
        self.requests = _Counts()

    def request_ended(self, scope: Any, root_path: str, outcome: str) -> None:
        self.requests.add((*request_labels(scope, root_path), outcome))


class _PoolHistograms(JobObserver):
    """The wait and run time histograms of one pool.

    Like the pool's ``statistics()``, they leave out the jobs abandoned when the pool stopped,
    whose run the end of the drain cut off: both count the jobs that completed or failed (a
    timeout included), each job once it ended, since a histogram cannot take an observation
    back. Unlike ``statistics()``, they keep counting across runs of the Lifecycle.
    """

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.wait = _Histogram(bounds)
        self.run = _Histogram(bounds)

    def finished(self, waited: float, ran: float) -> None:
        self.wait.observe(waited)
        self.run.observe(ran)


class _MetricsObserver(Observer):
    """Learns of the pools, tasks and jobs as they start; times each pool's jobs."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.pools: dict[str, WorkerPool[Any, Any]] = {}
        self.histograms: dict[str, _PoolHistograms] = {}
        self.tasks: dict[str, BackgroundTask] = {}
        self.periodic: dict[str, PeriodicJob] = {}

    def worker_pool(self, pool: WorkerPool[Any, Any]) -> JobObserver | None:
        self.pools[pool.name] = pool
        histograms = self.histograms.get(pool.name)
        if histograms is None:
            histograms = self.histograms[pool.name] = _PoolHistograms(self.buckets)
        return histograms

    def background_task(self, task: BackgroundTask) -> None:
        self.tasks[task.name] = task

    def periodic_job(self, job: PeriodicJob) -> None:
        self.periodic[job.name] = job


# -- pulled: families filled at scrape time -----------------------------------------------


class _Families:
    """Every metric family, empty; `LifecycleMetrics.collect` fills them."""

    def __init__(self) -> None:
        from prometheus_client.metrics_core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            StateSetMetricFamily,
        )

        def gauge(name: str, doc: str, *labels: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=labels)

        def counter(name: str, doc: str, *labels: str) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=labels)

        # OpenMetrics statesets: one sample per state, 1 for the current one; the state is
        # in the label named after the metric. (The Prometheus text format shows a gauge.)
        def stateset(name: str, doc: str, *labels: str) -> StateSetMetricFamily:
            return StateSetMetricFamily(name, doc, labels=labels)

        # The lifecycle and its services.
        self.state = stateset("lifecycle_state", "The Lifecycle's current state.")
        self.draining = gauge("lifecycle_draining", "1 once a graceful drain has begun.")
        self.startup = gauge(
            "lifecycle_startup_duration_seconds", "How long the last startup took."
        )
        self.shutdown = gauge(
            "lifecycle_shutdown_duration_seconds", "How long the last shutdown took."
        )
        self.service_state = stateset(
            "lifecycle_service_state", "Each service's current state.", "service"
        )
        self.service_start = gauge(
            "lifecycle_service_start_duration_seconds",
            "How long each service's start took in the current or last run.",
            "service",
        )
        self.service_stop = gauge(
            "lifecycle_service_stop_duration_seconds",
            "How long each service's cleanup took in the last shutdown.",
            "service",
        )
        # Worker pools.
        self.pool_queued = gauge(
            "lifecycle_pool_queued_jobs", "Jobs accepted and waiting in the queue.", "pool"
        )
        self.pool_capacity = gauge(
            "lifecycle_pool_queue_capacity_jobs", "How many jobs the queue holds.", "pool"
        )
        self.pool_running = gauge("lifecycle_pool_running_jobs", "Jobs running now.", "pool")
        self.pool_concurrency = gauge(
            "lifecycle_pool_concurrency_limit_jobs", "How many jobs may run at once.", "pool"
        )
        self.pool_saturation = gauge(
            "lifecycle_pool_saturation_ratio",
            "Running jobs over the concurrency limit (1 when every worker is busy).",
            "pool",
        )
        self.pool_accepted = counter(
            "lifecycle_pool_jobs_accepted_total", "Jobs accepted into the queue.", "pool"
        )
        self.pool_completed = counter(
            "lifecycle_pool_jobs_completed_total", "Jobs whose handler returned.", "pool"
        )
        self.pool_failed = counter(
            "lifecycle_pool_jobs_failed_total",
            "Jobs whose handler raised or timed out.",
            "pool",
        )
        self.pool_rejected = counter(
            "lifecycle_pool_jobs_rejected_total",
            "Submissions refused because the queue was full.",
            "pool",
        )
        self.pool_abandoned = counter(
            "lifecycle_pool_jobs_abandoned_total",
            "Accepted jobs that never finished because the pool stopped.",
            "pool",
        )
        self.pool_wait = HistogramMetricFamily(
            "lifecycle_pool_job_wait_duration_seconds",
            "How long the jobs that completed or failed had waited in the queue.",
            labels=["pool"],
        )
        self.deadline_budget_left = HistogramMetricFamily(
            "lifecycle_deadline_budget_remaining_seconds",
            "What was left of each request's deadline budget when it ended (0: it expired).",
        )
        self.pool_run = HistogramMetricFamily(
            "lifecycle_pool_job_run_duration_seconds",
            "How long the handlers of the jobs that completed or failed ran.",
            labels=["pool"],
        )
        # Supervised tasks and periodic jobs.
        self.background_state = stateset(
            "lifecycle_background_state", "Each supervised task's current state.", "task"
        )
        self.background_restarts = counter(
            "lifecycle_background_restarts_total", "Restarts of each supervised task.", "task"
        )
        self.background_failures = counter(
            "lifecycle_background_failures_total",
            "Runs of each supervised task that raised.",
            "task",
        )
        self.background_backoff = gauge(
            "lifecycle_background_backoff_remaining_seconds",
            "Seconds until a supervised task in backoff restarts (0 when not in backoff).",
            "task",
        )
        self.periodic_runs = counter(
            "lifecycle_periodic_runs_total", "Runs started of each periodic job.", "periodic"
        )
        self.periodic_failures = counter(
            "lifecycle_periodic_failures_total",
            "Runs of each periodic job that raised.",
            "periodic",
        )
        self.periodic_timeouts = counter(
            "lifecycle_periodic_timeouts_total", "Runs cut off by the job's timeout.", "periodic"
        )
        self.periodic_running = gauge(
            "lifecycle_periodic_running",
            "1 while a run of the periodic job is in progress.",
            "periodic",
        )
        self.periodic_last_duration = gauge(
            "lifecycle_periodic_last_duration_seconds",
            "How long the last finished run took.",
            "periodic",
        )
        # Health: checks, probes and the event-loop watchdog.
        self.check_status = stateset(
            "lifecycle_health_check_status",
            "Each health check's reported status (pass, warn, fail).",
            "check",
        )
        self.check_duration = gauge(
            "lifecycle_health_check_duration_seconds",
            "How long each health check's latest run took.",
            "check",
        )
        self.check_runs = counter(
            "lifecycle_health_check_runs_total", "Finished runs of each health check.", "check"
        )
        self.check_failures = counter(
            "lifecycle_health_check_failures_total",
            "Runs of each health check that failed (timeouts included).",
            "check",
        )
        self.check_timeouts = counter(
            "lifecycle_health_check_timeouts_total",
            "Runs of each health check cut off by its timeout.",
            "check",
        )
        self.probe_status = stateset(
            "lifecycle_health_probe_status",
            "Each probe's current status (pass, warn, fail).",
            "probe",
        )
        self.loop_lag = gauge(
            "lifecycle_event_loop_lag_seconds",
            "Event-loop lag the watchdog reports (the lag that fails or degrades liveness "
            "while it does, else the latest measurement).",
        )
        # Deadline and admission middleware.
        self.deadline_received = counter(
            "lifecycle_deadline_budgets_received_total",
            "Requests that carried a valid budget header.",
        )
        self.deadline_clamped = counter(
            "lifecycle_deadline_budgets_clamped_total", "Budgets cut down to max_timeout."
        )
        self.deadline_malformed = counter(
            "lifecycle_deadline_budgets_malformed_total",
            "Requests whose budget headers were malformed (ignored, or answered 400).",
        )
        self.deadline_expired = counter(
            "lifecycle_deadline_expired_total",
            "Requests answered 504 because their deadline expired before the response started.",
        )
        self.deadline_rejected_early = counter(
            "lifecycle_deadline_rejected_early_total",
            "Requests answered 504 on arrival, their budget below min_budget.",
        )
        self.deadline_aborted = counter(
            "lifecycle_deadline_aborted_total",
            "Responses aborted because the deadline expired after they started.",
        )
        self.deadline_overran = counter(
            "lifecycle_deadline_overran_total",
            "Requests that kept running past their deadline (code that cannot be cancelled).",
        )
        self.deadline_in_flight = gauge(
            "lifecycle_deadline_in_flight_requests", "Requests running under a deadline now."
        )
        self.deadline_requests = counter(
            "lifecycle_deadline_requests",
            "Requests that ended under a deadline, by route template, method and outcome "
            "(completed, expired: answered 504, aborted: expired after the response started).",
            "route",
            "method",
            "outcome",
        )
        self.admission_requests = counter(
            "lifecycle_admission_requests",
            "Requests the admission control answered, by route template, method and outcome "
            "(admitted at once, waited for a slot, rejected with 503).",
            "route",
            "method",
            "outcome",
        )
        self.admission_limit = gauge(
            "lifecycle_admission_concurrency_limit_requests",
            "How many requests may be in flight at once.",
        )
        self.admission_in_flight = gauge(
            "lifecycle_admission_in_flight_requests", "Requests admitted and running now."
        )
        self.admission_waiting = gauge(
            "lifecycle_admission_waiting_requests", "Requests waiting for a slot now."
        )
        self.admission_admitted = counter(
            "lifecycle_admission_admitted_total", "Requests admitted, at once or after waiting."
        )
        self.admission_waited = counter(
            "lifecycle_admission_waited_total", "Admitted requests that had to wait for a slot."
        )
        self.admission_rejected = counter(
            "lifecycle_admission_rejected_total",
            "Requests answered 503 because no slot was free in time.",
        )

    def all(self) -> list[Metric]:
        from prometheus_client.metrics_core import Metric

        return [value for value in vars(self).values() if isinstance(value, Metric)]


def _collect_pool(
    families: _Families, pool: WorkerPool[Any, Any], histograms: _PoolHistograms
) -> None:
    stats = pool.statistics()
    label = [stats.name]
    families.pool_queued.add_metric(label, stats.queued)
    families.pool_capacity.add_metric(label, stats.queue_size)
    families.pool_running.add_metric(label, stats.running)
    families.pool_concurrency.add_metric(label, stats.concurrency)
    families.pool_saturation.add_metric(label, stats.running / stats.concurrency)
    families.pool_accepted.add_metric(label, stats.accepted)
    families.pool_completed.add_metric(label, stats.completed)
    families.pool_failed.add_metric(label, stats.failed)
    families.pool_rejected.add_metric(label, stats.rejected)
    families.pool_abandoned.add_metric(label, stats.abandoned)
    families.pool_wait.add_metric(label, histograms.wait.buckets(), histograms.wait.total)
    families.pool_run.add_metric(label, histograms.run.buckets(), histograms.run.total)


def _collect_background(families: _Families, task: BackgroundTask) -> None:
    from ._workers import SupervisorState

    stats = task.statistics()
    families.background_state.add_metric(
        [stats.name], {state.name.lower(): stats.state is state for state in SupervisorState}
    )
    families.background_restarts.add_metric([stats.name], stats.restarts)
    families.background_failures.add_metric([stats.name], stats.failures)
    families.background_backoff.add_metric([stats.name], stats.next_restart_in or 0.0)


def _collect_periodic(families: _Families, job: PeriodicJob) -> None:
    stats = job.statistics()
    label = [stats.name]
    families.periodic_runs.add_metric(label, stats.runs)
    families.periodic_failures.add_metric(label, stats.failures)
    families.periodic_timeouts.add_metric(label, stats.timeouts)
    families.periodic_running.add_metric(label, float(stats.running))
    if stats.last_duration is not None:
        families.periodic_last_duration.add_metric(label, stats.last_duration)


def _collect_health(families: _Families, monitor: HealthMonitor) -> None:
    from ._health import HealthStatus

    for check in monitor.checks.values():
        stats = check.statistics()
        families.check_status.add_metric(
            [stats.name], {status.value: stats.status is status for status in HealthStatus}
        )
        if stats.duration is not None:
            families.check_duration.add_metric([stats.name], stats.duration)
        families.check_runs.add_metric([stats.name], stats.runs)
        families.check_failures.add_metric([stats.name], stats.failures)
        families.check_timeouts.add_metric([stats.name], stats.timeouts)
    liveness = monitor.liveness()
    for probe, report in (
        ("liveness", liveness),
        ("readiness", monitor.readiness()),
        ("startup", monitor.startup()),
    ):
        families.probe_status.add_metric(
            [probe], {status.value: report.status is status for status in HealthStatus}
        )
    lag = next((c for c in liveness.components if c.name == "event_loop"), None)
    if lag is not None and isinstance(lag.observed_value, int | float):
        families.loop_lag.add_metric([], lag.observed_value / 1000)  # reported in ms


def _collect_deadlines(families: _Families, middleware: Iterable[DeadlineMiddleware]) -> None:
    snapshots = [m.statistics() for m in middleware]
    if not snapshots:
        return
    families.deadline_received.add_metric([], sum(s.received for s in snapshots))
    families.deadline_clamped.add_metric([], sum(s.clamped for s in snapshots))
    families.deadline_malformed.add_metric([], sum(s.malformed for s in snapshots))
    families.deadline_expired.add_metric([], sum(s.expired for s in snapshots))
    families.deadline_rejected_early.add_metric([], sum(s.rejected_early for s in snapshots))
    families.deadline_aborted.add_metric([], sum(s.aborted for s in snapshots))
    families.deadline_overran.add_metric([], sum(s.overran for s in snapshots))
    families.deadline_in_flight.add_metric([], sum(s.in_flight for s in snapshots))


def _collect_admissions(
    families: _Families, middleware: Iterable[ConcurrencyLimitMiddleware]
) -> None:
    snapshots = [m.statistics() for m in middleware]
    if not snapshots:
        return
    families.admission_limit.add_metric([], sum(s.max_concurrency for s in snapshots))
    families.admission_in_flight.add_metric([], sum(s.in_flight for s in snapshots))
    families.admission_waiting.add_metric([], sum(s.waiting for s in snapshots))
    families.admission_admitted.add_metric([], sum(s.admitted for s in snapshots))
    families.admission_waited.add_metric([], sum(s.waited for s in snapshots))
    families.admission_rejected.add_metric([], sum(s.rejected for s in snapshots))
