"""Health: liveness, readiness and startup probes computed from lifecycle state and checks.

A probe never waits on a dependency. Checks run in the background, each in a loop of its own
that is an internal service of the `Lifecycle` graph: it starts after the services the check
takes, stops before them, and lives in the app's task group. Every run is bounded by the
check's timeout and its result is cached with its time; hysteresis turns the stream of
results into a status (``failure_threshold`` consecutive failures before a passing check
fails, ``success_threshold`` consecutive successes before a failing one passes). A probe
reads what is cached and answers in microseconds.

- **Startup** passes once every service has started (the Lifecycle is running or stopping).
- **Readiness** passes while the Lifecycle runs, no drain has begun, no service crashed,
  every critical check passes and every component registered for readiness (a supervised
  task that gave up, say) passes.
- **Liveness** is the process's own health, never a dependency's: an event-loop watchdog
  sleeps for a fixed interval and measures how late it wakes up. A loop blocked past
  ``lag_fail`` fails liveness until ``lag_recovery`` seconds have passed without such a
  block. A blocked loop cannot answer any request, so the probe that arrives during the block
  is answered just after it; it then sees how late the watchdog is (even if the watchdog has
  not run yet) and fails.

Statuses are ``pass``, ``warn`` (degraded, still serving) and ``fail``; reports render as
``application/health+json`` (`HealthReport.to_dict`), with error text and observed values left
out unless the caller is allowed to see them.
"""

from __future__ import annotations

import enum
import inspect
import json
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import anyio
from anyio.abc import TaskStatus

from ._drain import Drain
from ._kernel import TASK_STATUS, Kernel, Service, parameters
from ._observe import TaskObserver, task_observer
from ._timeline import LifecycleState
from ._validate import count, describe, seconds
from .exceptions import GraphError

__all__ = [
    "HEALTH_JSON",
    "CheckResult",
    "CheckSpec",
    "ComponentHealth",
    "HealthCheck",
    "HealthCheckStatistics",
    "HealthMonitor",
    "HealthReport",
    "HealthStatus",
    "check",
]

logger = logging.getLogger("lifecycle.health")

HEALTH_JSON: Final = "application/health+json"
"""The media type of health reports (draft-inadarei-api-health-check)."""

# Defaults of `Lifecycle.health_check`, also used for the checks of ``health=`` services.
DEFAULT_INTERVAL: Final = 5.0
DEFAULT_TIMEOUT: Final = 2.0
DEFAULT_FAILURE_THRESHOLD: Final = 3
DEFAULT_SUCCESS_THRESHOLD: Final = 1

_LIFECYCLE: Final = "lifecycle"
_EVENT_LOOP: Final = "event_loop"
_PREFIX: Final = "health:"  # names of the internal services running checks
_VALUE: Final = "value"  # the parameter through which a service's own check gets its value


class HealthStatus(enum.Enum):
    """The status of a check, a component or a whole report.

    ``PASS`` is healthy, ``WARN`` is degraded but serving (a probe still answers 200 by
    default), ``FAIL`` is unhealthy (503 by default).
    """

    PASS = "pass"  # noqa: S105 - a health+json status, not a password
    WARN = "warn"
    FAIL = "fail"


_RANK: Final = {HealthStatus.PASS: 0, HealthStatus.WARN: 1, HealthStatus.FAIL: 2}

ObservedValue = float | str | None


@dataclass(frozen=True)
class CheckResult:
    """What a check (or a registered component) reports, when more than pass/fail is needed.

    A check passes by returning ``None`` or ``True`` and fails by raising or returning
    ``False``; it returns a `CheckResult` to report a degraded state with its reason, or an
    observed value::

        @lc.health_check
        async def replication(db: Database) -> CheckResult:
            lag = await db.replication_lag()
            if lag > 5.0:
                return CheckResult(HealthStatus.WARN, f"replica is {lag:.1f}s behind", lag, "s")
            return CheckResult(HealthStatus.PASS, observed_value=lag, observed_unit="s")

    Attributes:
        status: Pass, warn or fail.
        output: Why it is not passing (shown only to callers allowed to see details).
        observed_value: A value it measured (shown only with details); by default a check's
            observed value is how long it took, in milliseconds.
        observed_unit: The unit of ``observed_value`` (``"ms"``, ``"s"``, ``"%"``...).
    """

    status: HealthStatus
    output: str | None = None
    observed_value: ObservedValue = None
    observed_unit: str | None = None


@dataclass(frozen=True)
class ComponentHealth:
    """One entry of a `HealthReport`.

    An entry is a check, a registered component, the Lifecycle itself or the event loop.

    Attributes:
        name: The check's or component's name (``"lifecycle"`` and ``"event_loop"`` are
            lifecycle's own).
        status: Its status, after hysteresis for checks.
        component_type: ``"system"`` for lifecycle's own entries, ``"component"`` otherwise.
        output: Why it is not passing, if it is not.
        observed_value: What it measured, if anything.
        observed_unit: The unit of ``observed_value``.
        time: When the reading was taken (UTC), if it is a reading.
    """

    name: str
    status: HealthStatus
    component_type: str = "component"
    output: str | None = None
    observed_value: ObservedValue = None
    observed_unit: str | None = None
    time: datetime | None = None

    def to_dict(self, *, details: bool = False) -> dict[str, Any]:
        """The entry as a health+json check object.

        Args:
            details: Include ``output``, ``observedValue`` and ``observedUnit``; leave them
                out (the default) for callers who may not see them, since an error message
                can hold a connection string or a host name.

        Returns:
            A JSON-serializable mapping.
        """
        item: dict[str, Any] = {
            "componentId": self.name,
            "componentType": self.component_type,
            "status": self.status.value,
        }
        if self.time is not None:
            item["time"] = self.time.isoformat(timespec="milliseconds")
        if details:
            if self.observed_value is not None:
                item["observedValue"] = self.observed_value
                if self.observed_unit is not None:
                    item["observedUnit"] = self.observed_unit
            if self.output is not None:
                item["output"] = self.output
        return item


@dataclass(frozen=True)
class HealthReport:
    """The answer to one probe: an overall status and the entries it was computed from.

    Attributes:
        status: The worst status among the entries that decide the probe.
        components: The entries, lifecycle's own first.
    """

    status: HealthStatus
    components: tuple[ComponentHealth, ...]
    # Rendered bodies, by whether details are shown: probes reuse a report while nothing in
    # it changed, so its body is rendered once rather than on every request.
    _bodies: dict[bool, bytes] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __getitem__(self, name: str) -> ComponentHealth:
        for component in self.components:
            if component.name == name:
                return component
        raise KeyError(name)

    def to_dict(self, *, details: bool = False) -> dict[str, Any]:
        """The report as an ``application/health+json`` body.

        Args:
            details: Include each entry's output and observed value (see
                `ComponentHealth.to_dict`).

        Returns:
            ``{"status": ..., "checks": {name: [entry]}}``, JSON-serializable.
        """
        return {
            "status": self.status.value,
            "checks": {c.name: [c.to_dict(details=details)] for c in self.components},
        }

    def to_json(self, *, details: bool = False) -> bytes:
        """The report as an ``application/health+json`` body, encoded (and remembered).

        Args:
            details: Include each entry's output and observed value.

        Returns:
            The compact JSON encoding of `to_dict`, in UTF-8.
        """
        body = self._bodies.get(details)
        if body is None:
            body = json.dumps(self.to_dict(details=details), separators=(",", ":")).encode()
            self._bodies[details] = body
        return body


@dataclass(frozen=True)
class HealthCheckStatistics:
    """A snapshot of one check, from `HealthCheck.statistics`.

    Attributes:
        name: The check's name.
        status: The reported status, after hysteresis; ``FAIL`` until the first result.
        last_result: The status of the latest run, before hysteresis; ``None`` before any.
        output: The latest run's output (its error, for a failure).
        observed_value: The latest run's observed value (its duration in ms by default).
        observed_unit: The unit of ``observed_value``.
        checked_at: When the latest run finished (UTC), or ``None``.
        changed_at: When the reported status last changed (UTC), or ``None``.
        duration: Seconds the latest run took (its timeout, if it timed out).
        running: Whether a run is in progress.
        runs: Runs finished in the current (or last) run of the Lifecycle.
        failures: How many of them failed (timeouts included).
        timeouts: How many of them timed out.
        consecutive_failures: Failures in a row, up to the latest run.
        consecutive_successes: Passes or warnings in a row, up to the latest run.
    """

    name: str
    status: HealthStatus
    last_result: HealthStatus | None
    output: str | None
    observed_value: ObservedValue
    observed_unit: str | None
    checked_at: datetime | None
    changed_at: datetime | None
    duration: float | None
    running: bool
    runs: int
    failures: int
    timeouts: int
    consecutive_failures: int
    consecutive_successes: int


# -- checks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckSpec:
    """A service's own health check with its options: what `check` returns, for ``health=``.

    Attributes:
        fn: The check; it receives the service's value as its only argument.
        interval: Seconds between the starts of two runs.
        timeout: Seconds one run may take; a run cut off is a failure.
        critical: Readiness fails while it fails.
        liveness: Liveness fails while it fails, too.
        failure_threshold: Consecutive failures before a passing check fails.
        success_threshold: Consecutive successes before a failing check passes.
    """

    fn: Callable[[Any], Any]
    interval: float = DEFAULT_INTERVAL
    timeout: float = DEFAULT_TIMEOUT
    critical: bool = True
    liveness: bool = False
    failure_threshold: int = DEFAULT_FAILURE_THRESHOLD
    success_threshold: int = DEFAULT_SUCCESS_THRESHOLD


def check(
    fn: Callable[[Any], Any],
    /,
    *,
    interval: float = DEFAULT_INTERVAL,
    timeout: float = DEFAULT_TIMEOUT,
    critical: bool = True,
    liveness: bool = False,
    failure_threshold: int = DEFAULT_FAILURE_THRESHOLD,
    success_threshold: int = DEFAULT_SUCCESS_THRESHOLD,
) -> CheckSpec:
    """A service's own check with options, for ``@lc.service(health=check(ping, ...))``.

    The options are those of `Lifecycle.health_check`, checked when the service is declared::

        @lc.service(health=lifecycle.check(lambda db: db.ping(), interval=1.0, timeout=0.5))
        async def db() -> AsyncIterator[Database]: ...

    Returns:
        The `CheckSpec` to pass as ``health=``.
    """
    if not callable(fn):
        raise TypeError(f"check() takes the check function first, not {fn!r}.")
    return CheckSpec(
        fn, interval, timeout, critical, liveness, failure_threshold, success_threshold
    )


class HealthCheck:
    """A health check running in the background; what `Lifecycle.health_check` returns.

    Each check runs in a loop of its own, an internal service named ``health:<name>`` that
    starts after the services the check takes and stops before them. A run starts every
    ``interval`` seconds (at once when the previous run took longer), is cut off after
    ``timeout`` (a timeout is a failure), and never overlaps the previous one.

    Attributes:
        name: The check's name, as it appears in reports.
        interval: Seconds between the starts of two runs.
        timeout: Seconds one run may take.
        critical: Whether readiness depends on it; a non-critical check only degrades the
            full report (`HealthMonitor.report`) to ``warn`` when it fails.
        liveness: Whether liveness depends on it too.
        failure_threshold: Consecutive failures before a passing check is reported failing.
        success_threshold: Consecutive successes before a failing check is reported passing.
        services: The names of the services it takes.
        service: The internal service running it.
    """

    def __init__(
        self,
        monitor: HealthMonitor,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        interval: float = DEFAULT_INTERVAL,
        timeout: float = DEFAULT_TIMEOUT,
        critical: bool = True,
        liveness: bool = False,
        failure_threshold: int = DEFAULT_FAILURE_THRESHOLD,
        success_threshold: int = DEFAULT_SUCCESS_THRESHOLD,
        depends: Mapping[str, Service[Any] | str] | None = None,
        _of_service: Service[Any] | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"@lc.health_check decorates a function, not {fn!r}.")
        name = name if name is not None else getattr(fn, "__name__", None)
        if not isinstance(name, str) or not name:
            raise TypeError(
                f"Cannot name the health check {fn!r}; pass a non-empty string with "
                f"@lc.health_check(name=...)."
            )
        self.name = name
        self.interval = seconds(f"interval of health check {name!r}", interval)
        self.timeout = seconds(f"timeout of health check {name!r}", timeout)
        self.failure_threshold = count(
            f"failure_threshold of health check {name!r}", failure_threshold
        )
        self.success_threshold = count(
            f"success_threshold of health check {name!r}", success_threshold
        )
        self.critical = bool(critical)
        self.liveness = bool(liveness)
        self._fn = fn
        self._monitor = monitor
        self._of_service = _of_service
        self._observer: TaskObserver | None = None
        if _of_service is not None:
            targets = {_VALUE: _of_service.name}
        else:
            targets = parameters(
                monitor.kernel, fn, kind="Health check", name=name, depends=depends
            )
        params = list(targets)
        self.services = tuple(targets.values())
        monitor._check_free(name, "health check")
        self.service = monitor.kernel.declare(
            _check_service(self._serve, params),
            name=_PREFIX + name,
            depends=targets,
            stop_timeout=self.timeout,
            internal=True,
            kind="health check",
        )
        monitor._claim(name, "health check")
        monitor._checks[name] = self
        self._reset()

    def __repr__(self) -> str:
        return f"<HealthCheck {self.name!r} {self._status.value}>"

    def _reset(self) -> None:
        self._status = HealthStatus.FAIL
        self._last: CheckResult | None = None
        self._checked_at: datetime | None = None
        self._changed_at: datetime | None = None
        self._duration: float | None = None
        self._running = False
        self._runs = 0
        self._failures = 0
        self._timeouts = 0
        self._consecutive_failures = 0
        self._consecutive_successes = 0
        self._first_result = anyio.Event()
        # What probes read: rebuilt only when a result comes in.
        self._entry = ComponentHealth(self.name, HealthStatus.FAIL, output="Not checked yet.")

    # -- running ----------------------------------------------------------------------------

    async def _serve(self, deps: dict[str, Any], task_status: TaskStatus[HealthCheck]) -> None:
        self._reset()
        # Tracing, when enabled: a span per run.
        self._observer = task_observer(self._monitor.kernel, "health_check", self)
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(self._loop, deps)
            # Startup waits for the first result, so that readiness means something as soon
            # as startup completes; but never long enough to make a slow dependency fail the
            # startup: at most the check's timeout and half of what is left of the budget.
            wait = self.timeout
            startup_timeout = self._monitor.kernel.startup_timeout
            if startup_timeout is not None:
                wait = min(wait, startup_timeout / 2)
            deadline = anyio.current_effective_deadline()
            if math.isfinite(deadline):
                wait = min(wait, max(0.0, (deadline - anyio.current_time()) / 2))
            with anyio.move_on_after(wait):
                await self._first_result.wait()
            task_status.started(self)

    async def _loop(self, deps: dict[str, Any]) -> None:
        while True:
            began = anyio.current_time()
            await self._run_once(deps)
            await anyio.sleep_until(began + self.interval)

    async def _run_once(self, deps: dict[str, Any]) -> None:
        outcome: CheckResult | None = None
        done = anyio.Event()
        attempt_scope = anyio.CancelScope()

        async def attempt() -> None:
            nonlocal outcome
            try:
                with attempt_scope:
                    own = self._of_service is not None  # a health= check gets the service's value
                    value = self._fn(deps[_VALUE]) if own else self._fn(**deps)
                    if inspect.isawaitable(value):
                        if self._observer is not None:
                            value = self._observer.wrap(value)
                        value = await value
                    outcome = _as_result(value, f"health check {self.name!r}")
            except Exception as exc:
                outcome = CheckResult(HealthStatus.FAIL, describe(exc))
            finally:
                done.set()

        # The attempt runs in a task of its own so that its timeout is recorded on time even
        # when the check does not yield to cancellation (a thread, a shielded scope). The next
        # run waits for it to finish, so that runs never overlap; meanwhile each run that falls
        # due while it is still hung counts as one more failure, so the failure threshold trips
        # as it would for a dependency that fails fast.
        began = anyio.current_time()
        self._running = True
        try:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(attempt)
                with anyio.move_on_after(self.timeout):
                    await done.wait()
                if not done.is_set():
                    attempt_scope.cancel()
                    self._timeouts += 1
                    self._record(
                        CheckResult(
                            HealthStatus.FAIL,
                            f"Did not answer within its timeout of {self.timeout}s.",
                        ),
                        self.timeout,
                    )
                    due = began + self.interval
                    while due <= anyio.current_time():  # a timeout longer than the interval
                        due += self.interval
                    while not done.is_set():
                        with anyio.move_on_at(due):
                            await done.wait()
                        if not done.is_set():
                            due += self.interval
                            hung = anyio.current_time() - began
                            message = (
                                f"Still running {hung:.1f}s after it began, ignoring the "
                                f"cancellation at its timeout of {self.timeout}s."
                            )
                            self._record(CheckResult(HealthStatus.FAIL, message), hung)
                    return
        finally:
            self._running = False
        assert outcome is not None
        self._record(outcome, anyio.current_time() - began)

    def _record(self, result: CheckResult, duration: float) -> None:
        now = datetime.now(UTC)
        self._runs += 1
        self._last = result
        self._checked_at = now
        self._duration = duration
        if result.status is HealthStatus.FAIL:
            self._failures += 1
            self._consecutive_failures += 1
            self._consecutive_successes = 0
        else:
            self._consecutive_successes += 1
            self._consecutive_failures = 0

        previous = self._status
        if self._runs == 1:
            status = result.status  # the first result is taken as it is
        elif result.status is HealthStatus.FAIL:
            failing = self._consecutive_failures >= self.failure_threshold
            status = HealthStatus.FAIL if failing else previous
        elif previous is HealthStatus.FAIL:
            passing = self._consecutive_successes >= self.success_threshold
            status = result.status if passing else HealthStatus.FAIL
        else:
            status = result.status  # pass <-> warn: both serve, so no hysteresis
        if status is not previous or self._runs == 1:
            self._status = status
            self._changed_at = now
            self._log_transition(previous, result)

        observed, unit = result.observed_value, result.observed_unit
        if observed is None:
            observed, unit = round(duration * 1000, 3), "ms"
        self._entry = ComponentHealth(
            self.name,
            status,
            output=None if status is HealthStatus.PASS else result.output,
            observed_value=observed,
            observed_unit=unit,
            time=now,
        )
        self._first_result.set()

    def _log_transition(self, previous: HealthStatus, result: CheckResult) -> None:
        extra = {"check": self.name, "phase": "health"}
        if self._status is HealthStatus.FAIL:
            logger.warning(
                "Health check %r fails: %s", self.name, result.output or "failed", extra=extra
            )
        elif self._status is HealthStatus.WARN:
            logger.warning(
                "Health check %r is degraded: %s", self.name, result.output or "warn", extra=extra
            )
        elif previous is not HealthStatus.PASS and self._runs > 1:
            logger.info("Health check %r passes again.", self.name, extra=extra)

    # -- reading ----------------------------------------------------------------------------

    def statistics(self) -> HealthCheckStatistics:
        """A frozen snapshot of the check's cached state and counters."""
        last = self._last
        return HealthCheckStatistics(
            name=self.name,
            status=self._status,
            last_result=None if last is None else last.status,
            output=None if last is None else last.output,
            observed_value=self._entry.observed_value,
            observed_unit=self._entry.observed_unit,
            checked_at=self._checked_at,
            changed_at=self._changed_at,
            duration=self._duration,
            running=self._running,
            runs=self._runs,
            failures=self._failures,
            timeouts=self._timeouts,
            consecutive_failures=self._consecutive_failures,
            consecutive_successes=self._consecutive_successes,
        )


def _check_service(
    serve: Callable[[dict[str, Any], TaskStatus[Any]], Awaitable[None]], params: list[str]
) -> Callable[..., Awaitable[None]]:
    """A long-running service function taking ``params`` by keyword, delegating to ``serve``."""

    async def service(*, task_status: TaskStatus[Any], **deps: Any) -> None:
        await serve(deps, task_status)

    keyword = inspect.Parameter.KEYWORD_ONLY
    service.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(p, keyword) for p in params] + [inspect.Parameter(TASK_STATUS, keyword)]
    )
    return service


# -- components registered by other parts of lifecycle -------------------------------------


@dataclass(frozen=True)
class _Component:
    name: str
    status: Callable[[], CheckResult | HealthStatus | bool | None]
    affects_readiness: bool
    affects_liveness: bool
    component_type: str

    def read(self, monitor: HealthMonitor) -> ComponentHealth:
        try:
            result = _as_result(self.status(), f"component {self.name!r}")
        except Exception as exc:
            if self.name not in monitor._broken:
                monitor._broken.add(self.name)
                logger.error(
                    "The status function of health component %r raised %s; it is reported "
                    "failing until it answers.",
                    self.name,
                    describe(exc),
                    exc_info=exc,
                    extra={"check": self.name, "phase": "health"},
                )
            result = CheckResult(HealthStatus.FAIL, f"Its status function raised {describe(exc)}")
        else:
            monitor._broken.discard(self.name)
        return ComponentHealth(
            self.name,
            result.status,
            self.component_type,
            output=result.output,
            observed_value=result.observed_value,
            observed_unit=result.observed_unit,
            time=datetime.now(UTC),
        )


# -- the monitor ----------------------------------------------------------------------------


class _Unset(enum.Enum):
    UNSET = "unset"


_UNSET: Final = _Unset.UNSET

_ACTIVE = (LifecycleState.STARTING, LifecycleState.RUNNING, LifecycleState.STOPPING)


class HealthMonitor:
    """The health of one `Lifecycle`: its checks, components, watchdog and probes.

    Get it as ``lc.health``; it is created on first use, which must come before the
    Lifecycle starts (declaring a check, a ``health=`` service or health routes does it).
    A Lifecycle that never uses health runs no watchdog and no check.

    The probes (`liveness`, `readiness`, `startup`, `report`) only read cached state: they
    are synchronous, never wait, and never raise.

    Attributes:
        watchdog_interval: Seconds between two measurements of the event loop's lag.
        lag_warn: Lag, in seconds, that makes liveness warn, or ``None``.
        lag_fail: Lag, in seconds, that fails liveness.
        lag_recovery: Seconds without such a lag before liveness passes again.
        probe_budget: The guard rail on ``interval x threshold`` of checks, or ``None``.
        service: The internal service running the watchdog (``health:event_loop``).

    Change the options with `configure`, which checks them.
    """

    def __init__(self, kernel: Kernel, drain: Drain | None = None) -> None:
        if kernel.state in _ACTIVE:
            raise RuntimeError(
                f"lc.health was first used while the Lifecycle is {kernel.state.value}; "
                f"set up health (checks, health= services, health routes) before it starts, "
                f"next to the services, so that its watchdog runs in the app's task group."
            )
        self.kernel = kernel
        self._drain = drain
        self._checks: dict[str, HealthCheck] = {}
        self._components: dict[str, _Component] = {}
        self._names: dict[str, str] = {
            _LIFECYCLE: "lifecycle's own",
            _EVENT_LOOP: "lifecycle's own",
        }
        self._broken: set[str] = set()
        self._reports: dict[str, HealthReport] = {}
        self.watchdog_interval = 0.5
        self.lag_warn: float | None = 0.25
        self.lag_fail = 1.0
        self.lag_recovery = 10.0
        self.probe_budget: float | None = 30.0
        self._reset_watchdog()
        self.service = kernel.declare(
            self._watch, name=_PREFIX + _EVENT_LOOP, internal=True, kind="lifecycle"
        )

    def __repr__(self) -> str:
        return (
            f"<HealthMonitor checks={list(self._checks)!r} components={list(self._components)!r}>"
        )

    # -- configuring --------------------------------------------------------------------------

    def configure(
        self,
        *,
        watchdog_interval: float | _Unset = _UNSET,
        lag_warn: float | _Unset | None = _UNSET,
        lag_fail: float | _Unset = _UNSET,
        lag_recovery: float | _Unset = _UNSET,
        probe_budget: float | _Unset | None = _UNSET,
    ) -> None:
        """Tune the watchdog and the guard rails; options not given keep their value.

        Args:
            watchdog_interval: Seconds the event-loop watchdog sleeps between two
                measurements of the loop's lag (0.5 by default).
            lag_warn: Lag, in seconds, that makes liveness ``warn`` (0.25 by default);
                ``None`` for no warning.
            lag_fail: Lag, in seconds, that fails liveness (1.0 by default): the loop was
                blocked that long, by blocking code or CPU-bound work in a handler.
            lag_recovery: Seconds without such a lag before liveness passes (or stops
                warning) again (10.0 by default).
            probe_budget: Longest acceptable time, in seconds, for a check to change its
                reported status (``interval`` times ``failure_threshold`` or
                ``success_threshold``); a check over it is logged as a warning at startup
                (30.0 by default). ``None`` turns the warning off.

        Raises:
            RuntimeError: The Lifecycle is running.
            TypeError: An option is not a number.
            ValueError: An option is out of range.
        """
        if self.kernel.state in _ACTIVE:
            raise RuntimeError(
                f"Cannot configure health while the Lifecycle is "
                f"{self.kernel.state.value}; call lc.health.configure() before it starts."
            )
        interval = self.watchdog_interval
        warn, fail, recovery, budget = (
            self.lag_warn,
            self.lag_fail,
            self.lag_recovery,
            self.probe_budget,
        )
        if not isinstance(watchdog_interval, _Unset):
            interval = seconds("watchdog_interval", watchdog_interval)
        if not isinstance(lag_warn, _Unset):
            warn = None if lag_warn is None else seconds("lag_warn", lag_warn)
        if not isinstance(lag_fail, _Unset):
            fail = seconds("lag_fail", lag_fail)
        if not isinstance(lag_recovery, _Unset):
            recovery = seconds("lag_recovery", lag_recovery)
        if not isinstance(probe_budget, _Unset):
            budget = None if probe_budget is None else seconds("probe_budget", probe_budget)
        if warn is not None and warn >= fail:
            raise ValueError(
                f"lag_warn ({warn}s) must be below lag_fail ({fail}s): a lag warns before it "
                f"fails liveness. Lower lag_warn, or pass lag_warn=None for no warning."
            )
        self.watchdog_interval, self.lag_warn, self.lag_fail = interval, warn, fail
        self.lag_recovery, self.probe_budget = recovery, budget

    def register_component(
        self,
        name: str,
        status: Callable[[], CheckResult | HealthStatus | bool | None],
        *,
        affects_readiness: bool = True,
        affects_liveness: bool = False,
        component_type: str = "component",
    ) -> None:
        """Add an in-process component whose status the probes read, synchronously.

        For parts of lifecycle (and apps) that already know their own state: a supervised
        task that gave up registers a status function returning ``FAIL`` once it has, so that
        readiness (and, with ``affects_liveness``, liveness) fails. Call it before the
        Lifecycle starts, typically where the component is declared.

        ``status`` is called on every probe that includes the component, on the event loop:
        it must read cached state and return at once (no I/O, no awaiting). It returns a
        `CheckResult`, a `HealthStatus`, ``True``/``None`` (pass) or ``False`` (fail). If it
        raises, the component is reported failing and the error is logged once.

        Args:
            name: The component's name in reports; unique among checks and components.
            status: The status function.
            affects_readiness: Whether readiness fails when it fails.
            affects_liveness: Whether liveness fails when it fails. Only for what a restart
                of the process would fix, never for an external dependency.
            component_type: Its ``componentType`` in health+json.

        Raises:
            GraphError: The name is taken.
            TypeError: ``status`` is not a plain (synchronous) callable.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"A health component needs a non-empty string name, not {name!r}.")
        if not callable(status) or inspect.iscoroutinefunction(status):
            raise TypeError(
                f"The status of health component {name!r} must be a plain function returning "
                f"its status from cached state, not {status!r}; probes never await."
            )
        self._claim(name, "health component")
        self._components[name] = _Component(
            name, status, bool(affects_readiness), bool(affects_liveness), component_type
        )

    def _check_free(self, name: str, kind: str) -> None:
        owner = self._names.get(name)
        if owner is not None:
            raise GraphError(
                f"The {kind} name {name!r} is already taken (by {owner}); give this one another "
                f"name (@lc.health_check(name=...) for a check)."
            )

    def _claim(self, name: str, kind: str) -> None:
        self._check_free(name, kind)
        self._names[name] = f"a {kind}"

    def add_service_check(self, service: Service[Any]) -> HealthCheck:
        """Run the ``health=`` check of ``service`` as a check named after the service."""
        spec = service.health
        if not isinstance(spec, CheckSpec):
            if not callable(spec):
                raise TypeError(
                    f"health= of service {service.name!r} must be a check function or "
                    f"lifecycle.check(fn, ...) with its options, not {spec!r}."
                )
            spec = CheckSpec(spec)
        return HealthCheck(
            self,
            spec.fn,
            name=service.name,
            interval=spec.interval,
            timeout=spec.timeout,
            critical=spec.critical,
            liveness=spec.liveness,
            failure_threshold=spec.failure_threshold,
            success_threshold=spec.success_threshold,
            _of_service=service,
        )

    @property
    def checks(self) -> Mapping[str, HealthCheck]:
        """The declared checks, by name."""
        return dict(self._checks)

    # -- probes ---------------------------------------------------------------------------------

    def startup(self) -> HealthReport:
        """Whether startup has finished: every service started and has not stopped yet."""
        state = self.kernel.state
        if state in (LifecycleState.RUNNING, LifecycleState.STOPPING):
            entry = _STARTED
        else:
            entry = _lifecycle_failing(f"The Lifecycle is {state.value}.")
        return self._report("startup", [entry])

    def readiness(self) -> HealthReport:
        """Whether to send traffic: started, not draining, critical checks and components pass."""
        entries = [self._lifecycle_entry()]
        entries.extend(c._entry for c in self._checks.values() if c.critical)
        entries.extend(c.read(self) for c in self._components.values() if c.affects_readiness)
        return self._report("readiness", entries)

    def liveness(self) -> HealthReport:
        """Whether the process is healthy: its event loop, and what is registered for it."""
        entries = [self._event_loop_entry()]
        entries.extend(c._entry for c in self._checks.values() if c.liveness)
        entries.extend(c.read(self) for c in self._components.values() if c.affects_liveness)
        return self._report("liveness", entries)

    def report(self) -> HealthReport:
        """Everything: the Lifecycle, the event loop, every check and every component.

        Its status is the worst of readiness and liveness, and at least ``warn`` when a
        check or component that decides neither is not passing.
        """
        entries = [self._lifecycle_entry(), self._event_loop_entry()]
        statuses = [entries[0].status, entries[1].status]
        for check in self._checks.values():
            entries.append(check._entry)
            statuses.append(_demoted(check._entry.status, check.critical or check.liveness))
        for component in self._components.values():
            entry = component.read(self)
            entries.append(entry)
            decides = component.affects_readiness or component.affects_liveness
            statuses.append(_demoted(entry.status, decides))
        return HealthReport(_worst(statuses), tuple(entries))

    def _report(self, probe: str, entries: list[ComponentHealth]) -> HealthReport:
        """The report of ``entries``: the previous one again if every entry is the same.

        Entries are immutable and rebuilt only when what they say changes (a check's new
        result, a new watchdog measurement), so a probe of a healthy app allocates almost
        nothing: load balancers probe often, and garbage collection is latency.
        """
        previous = self._reports.get(probe)
        if previous is not None and len(previous.components) == len(entries):
            for old, new in zip(previous.components, entries, strict=True):
                if old is not new:
                    break
            else:
                return previous
        report = HealthReport(_worst(e.status for e in entries), tuple(entries))
        self._reports[probe] = report
        return report

    def _lifecycle_entry(self) -> ComponentHealth:
        state = self.kernel.state
        if state is not LifecycleState.RUNNING:
            return _lifecycle_failing(f"The Lifecycle is {state.value}.")
        if self._drain is not None and self._drain.draining:
            return _DRAINING
        crashed = self.kernel.crashed()
        if crashed:
            return _lifecycle_failing(
                "Crashed while running: " + ", ".join(map(repr, crashed)) + "; see the logs."
            )
        return _RUNNING

    # -- the event-loop watchdog and the start-up guard rails ----------------------------------

    def _reset_watchdog(self) -> None:
        self._expected_wake: float | None = None
        self._last_lag = 0.0
        self._measured_at: datetime | None = None
        self._passing = ComponentHealth(_EVENT_LOOP, HealthStatus.PASS, "system")
        self._fail_lag = 0.0
        self._fail_seen: float | None = None
        self._warn_lag = 0.0
        self._warn_seen: float | None = None

    async def _watch(self, *, task_status: TaskStatus[HealthMonitor]) -> None:
        self._reset_watchdog()
        self._warn_about_configuration()
        task_status.started(self)
        try:
            interval = self.watchdog_interval
            while True:
                self._expected_wake = anyio.current_time() + interval
                await anyio.sleep(interval)
                now = anyio.current_time()
                self._observe(max(0.0, now - self._expected_wake), now)
        finally:
            self._expected_wake = None

    def _observe(self, lag: float, now: float) -> None:
        self._last_lag = lag
        self._measured_at = datetime.now(UTC)
        self._passing = ComponentHealth(
            _EVENT_LOOP,
            HealthStatus.PASS,
            "system",
            observed_value=round(lag * 1000, 3),
            observed_unit="ms",
            time=self._measured_at,
        )
        if lag >= self.lag_fail:
            self._fail_lag, self._fail_seen = lag, now
            logger.warning(
                "The event loop was blocked for %.3fs (lag_fail is %ss): liveness fails until "
                "it has run freely for %ss. Something runs blocking or CPU-bound code on the "
                "event loop; move it to a thread (anyio.to_thread.run_sync) or a process.",
                lag,
                self.lag_fail,
                self.lag_recovery,
                extra={"phase": "health", "lag": lag},
            )
        elif self.lag_warn is not None and lag >= self.lag_warn:
            self._warn_lag, self._warn_seen = lag, now

    def _event_loop_entry(self) -> ComponentHealth:
        try:
            now = anyio.current_time()
        except Exception:  # no event loop here (a probe read from a plain function)
            now = None
        overdue = 0.0
        if now is not None and self._expected_wake is not None:
            # The watchdog has not woken up yet: if it is late, the loop was blocked until
            # just now, and this probe is the first thing to run after the block.
            overdue = max(0.0, now - self._expected_wake)
        recovery = self.lag_recovery
        if overdue >= self.lag_fail or (
            now is not None and self._fail_seen is not None and now - self._fail_seen < recovery
        ):
            lag = max(overdue, self._fail_lag if self._fail_seen is not None else 0.0)
            status = HealthStatus.FAIL
            output = (
                f"The event loop was blocked for {lag:.3f}s within the last {recovery}s "
                f"(lag_fail is {self.lag_fail}s)."
            )
        elif self.lag_warn is not None and (
            overdue >= self.lag_warn
            or (
                now is not None and self._warn_seen is not None and now - self._warn_seen < recovery
            )
        ):
            lag = max(overdue, self._warn_lag if self._warn_seen is not None else 0.0)
            status = HealthStatus.WARN
            output = (
                f"The event loop lagged {lag:.3f}s within the last {recovery}s "
                f"(lag_warn is {self.lag_warn}s)."
            )
        else:
            return self._passing  # the latest measurement's, built when it was taken
        return ComponentHealth(
            _EVENT_LOOP,
            status,
            "system",
            output=output,
            observed_value=round(lag * 1000, 3),
            observed_unit="ms",
            time=self._measured_at,
        )

    def _warn_about_configuration(self) -> None:
        extra = {"phase": "health"}
        for check in self._checks.values():
            if check.liveness and check.services:
                names = ", ".join(repr(s) for s in check.services)
                logger.warning(
                    "Health check %r is attached to liveness but takes the services %s: when "
                    "what they talk to fails, every replica would be restarted at once, which "
                    "fixes nothing. Attach it to readiness only (liveness=False).",
                    check.name,
                    names,
                    extra=extra,
                )
            budget = self.probe_budget
            if budget is None:
                continue
            for what, threshold in (
                ("fail", check.failure_threshold),
                ("pass again", check.success_threshold),
            ):
                needed = check.interval * threshold
                if needed > budget:
                    logger.warning(
                        "Health check %r needs up to %.1fs (interval %ss x %d) to %s, more "
                        "than the probe budget of %ss; lower its interval or threshold, or "
                        "raise the budget with lc.health.configure(probe_budget=...).",
                        check.name,
                        needed,
                        check.interval,
                        threshold,
                        what,
                        budget,
                        extra=extra,
                    )


# -- helpers --------------------------------------------------------------------------------

_RUNNING: Final = ComponentHealth(_LIFECYCLE, HealthStatus.PASS, "system")
_STARTED: Final = _RUNNING
_DRAINING: Final = ComponentHealth(
    _LIFECYCLE,
    HealthStatus.FAIL,
    "system",
    output="Draining: the app is shutting down and takes no new traffic.",
)


def _lifecycle_failing(output: str) -> ComponentHealth:
    return ComponentHealth(_LIFECYCLE, HealthStatus.FAIL, "system", output=output)


def _worst(statuses: Iterable[HealthStatus]) -> HealthStatus:
    worst = HealthStatus.PASS
    for status in statuses:
        if _RANK[status] > _RANK[worst]:
            worst = status
    return worst


def _demoted(status: HealthStatus, decides: bool) -> HealthStatus:
    """A failure of what decides no probe only degrades the full report."""
    return HealthStatus.WARN if status is HealthStatus.FAIL and not decides else status


def _as_result(value: object, what: str) -> CheckResult:
    if value is None or value is True:
        return _PASSED
    if value is False:
        return CheckResult(HealthStatus.FAIL, "Returned False.")
    if isinstance(value, CheckResult):
        return value
    if isinstance(value, HealthStatus):
        return CheckResult(value)
    if inspect.iscoroutine(value):
        value.close()  # never awaited, and never will be: no "never awaited" warning
    return CheckResult(
        HealthStatus.FAIL,
        f"The {what} returned {type(value).__name__}; return None or True (pass), False "
        f"(fail) or a CheckResult.",
    )


_PASSED: Final = CheckResult(HealthStatus.PASS)
