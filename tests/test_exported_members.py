"""The public API is exactly the documented names: nothing missing, nothing leaked."""

from __future__ import annotations

import inspect

import lifecycle

DOCUMENTED = {
    # service graph
    "Lifecycle", "Service", "Services", "LifecycleState", "ServiceState", "Timeline",
    "TimelineEntry",
    # errors
    "LifecycleError", "GraphError", "StartupError", "ShutdownError", "ServiceNotRunning",
    "QueueFull", "QueueEmpty", "PoolClosed", "JobAbandoned", "DeadlineExceeded",
    # background work
    "WorkerPool", "WorkerStatistics", "BackgroundTask", "BackgroundStatistics",
    "SupervisorState", "PeriodicJob", "PeriodicStatistics", "PoolState", "PeriodicState",
    # health
    "HealthStatus", "CheckResult", "CheckSpec", "check", "ComponentHealth", "HealthReport",
    "HealthCheck",
    "HealthCheckStatistics", "HealthMonitor", "HEALTH_JSON",
    # deadlines and admission control
    "DeadlineMiddleware", "DeadlineStatistics", "remaining", "current_deadline",
    "deadline_scope", "request_timeout", "DEADLINE_EXPIRED_HEADER", "DEADLINE_EXPIRED_TYPE",
    "MALFORMED_BUDGET_TYPE", "DEFAULT_BUDGET_HEADERS", "DEFAULT_EXEMPT_PATHS",
    "ConcurrencyLimitMiddleware", "AdmissionStatistics", "OVERLOADED_TYPE",
    # observability
    "instrument_metrics", "LifecycleMetrics", "DEFAULT_BUCKETS", "instrument_tracing",
    "LifecycleTracing", "TRACER_NAME",
    # toolkit
    "bounded_map", "as_completed", "gather", "race", "first_completed", "retry", "shield",
    "PriorityQueue", "PriorityQueueStatistics", "LeakTracker", "TrackedObject",
    # anyio's primitives, re-exported unchanged
    "TASK_STATUS_IGNORED", "CancelScope", "CapacityLimiter", "CapacityLimiterStatistics",
    "ClosedResourceError", "Condition", "EndOfStream", "Event", "Lock", "Semaphore",
    "TaskHandle", "TaskGroup", "TaskStatus", "MemoryObjectReceiveStream",
    "MemoryObjectSendStream", "create_memory_object_stream", "create_task_group",
    "current_effective_deadline", "fail_after", "fail_at", "move_on_after", "move_on_at",
    "to_thread", "to_process", "from_thread",
}  # fmt: skip


def public_names() -> set[str]:
    names = set()
    for name in dir(lifecycle):
        value = getattr(lifecycle, name)
        if name.startswith("_") or not name.isidentifier():
            # Not identifiers: pytest's assertion-rewriting helpers (@py_builtins), which it
            # puts into every module of a distribution that ships a pytest11 plugin.
            continue
        if inspect.ismodule(value) and value.__name__.startswith("lifecycle."):
            continue  # a submodule: lifecycle.fastapi, lifecycle.testing...
        names.add(name)
    return names


def test_public_names_are_exactly_the_documented_ones() -> None:
    public = public_names()
    assert public - DOCUMENTED == set(), "exported but not documented"
    assert DOCUMENTED - public == set(), "documented but not exported"


def test_anyio_primitives_are_re_exported_not_wrapped() -> None:
    import anyio

    for name in ("CancelScope", "CapacityLimiter", "Lock", "Event", "fail_after", "to_thread"):
        assert getattr(lifecycle, name) is getattr(anyio, name)


def test_every_public_name_of_ours_has_a_docstring() -> None:
    for name in public_names():
        value = getattr(lifecycle, name)
        ours = getattr(value, "__module__", "").startswith("lifecycle")
        if ours and (inspect.isclass(value) or inspect.isfunction(value)):
            assert inspect.getdoc(value), f"lifecycle.{name} has no docstring"


TESTING_DOCUMENTED = {
    "lifespan_client", "LifespanNotSupported", "DEFAULT_STARTUP_TIMEOUT",
    "DEFAULT_SHUTDOWN_TIMEOUT", "inject_faults", "Faults", "assert_started_before",
    "assert_stopped_before", "OrderAssertions",
}  # fmt: skip

PLUGIN_FIXTURES = {
    "lifecycle_app", "lifecycle_client", "lifecycle_client_options", "lifecycle_instance",
    "lifecycle_services", "lifecycle_faults", "lifecycle_order", "lifecycle_clock",
}  # fmt: skip


def test_the_test_kit_exports_exactly_the_documented_names() -> None:
    import lifecycle.testing

    assert set(lifecycle.testing.__all__) == TESTING_DOCUMENTED
    for name in TESTING_DOCUMENTED:
        value = getattr(lifecycle.testing, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert inspect.getdoc(value), f"lifecycle.testing.{name} has no docstring"


def test_the_pytest_plugin_provides_exactly_the_documented_fixtures() -> None:
    import lifecycle.pytest_plugin

    assert set(lifecycle.pytest_plugin.__all__) == PLUGIN_FIXTURES
    for name in PLUGIN_FIXTURES:
        assert getattr(lifecycle.pytest_plugin, name).__doc__, f"fixture {name} has no docstring"


def test_the_adapter_modules_are_reachable_from_import_lifecycle_alone() -> None:
    import subprocess
    import sys

    code = (
        "import lifecycle\n"
        "print(lifecycle.fastapi.provide.__module__, lifecycle.starlette.health_routes.__name__,"
        " lifecycle.httpx.DeadlineTransport.__name__, lifecycle.testing.lifespan_client.__name__)\n"
        "try:\n"
        "    lifecycle.nothing\n"
        "except AttributeError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.splitlines() == [
        "lifecycle.fastapi health_routes DeadlineTransport lifespan_client",
        "module 'lifecycle' has no attribute 'nothing'",
    ]
