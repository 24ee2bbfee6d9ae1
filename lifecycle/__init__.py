"""Structured-concurrency lifecycle for ASGI services.

Services start in dependency order and stop in reverse, background work is bounded and
accounted for, requests carry deadlines, and shutdown drains gracefully. The public API is
exactly what this module re-exports; everything in a ``_private`` module is an implementation
detail.
"""

# Imports are grouped by capability, each block reading as that capability's public API,
# rather than sorted alphabetically:
# ruff: noqa: I001

from .exceptions import GraphError as GraphError
from .exceptions import JobAbandoned as JobAbandoned
from .exceptions import LifecycleError as LifecycleError
from .exceptions import PoolClosed as PoolClosed
from .exceptions import QueueEmpty as QueueEmpty
from .exceptions import QueueFull as QueueFull
from .exceptions import ServiceNotRunning as ServiceNotRunning
from .exceptions import ShutdownError as ShutdownError
from .exceptions import StartupError as StartupError

# -- service graph (lifecycle/_kernel.py, lifecycle/_lifecycle.py) -----------------------
from ._lifecycle import Lifecycle as Lifecycle
from ._kernel import Service as Service
from ._kernel import Services as Services
from ._timeline import LifecycleState as LifecycleState
from ._timeline import ServiceState as ServiceState
from ._timeline import Timeline as Timeline
from ._timeline import TimelineEntry as TimelineEntry

# -- health (lifecycle/_health.py) ---------------------------------------------------------
from ._health import HEALTH_JSON as HEALTH_JSON
from ._health import CheckResult as CheckResult
from ._health import CheckSpec as CheckSpec
from ._health import check as check
from ._health import ComponentHealth as ComponentHealth
from ._health import HealthCheck as HealthCheck
from ._health import HealthCheckStatistics as HealthCheckStatistics
from ._health import HealthMonitor as HealthMonitor
from ._health import HealthReport as HealthReport
from ._health import HealthStatus as HealthStatus

# -- background work (lifecycle/_workers.py) ----------------------------------------------
from ._workers import BackgroundStatistics as BackgroundStatistics
from ._workers import BackgroundTask as BackgroundTask
from ._workers import PeriodicJob as PeriodicJob
from ._workers import PeriodicState as PeriodicState
from ._workers import PeriodicStatistics as PeriodicStatistics
from ._workers import PoolState as PoolState
from ._workers import SupervisorState as SupervisorState
from ._workers import WorkerPool as WorkerPool
from ._workers import WorkerStatistics as WorkerStatistics

# -- toolkit (lifecycle/_toolkit.py) ------------------------------------------------------
from ._toolkit import as_completed as as_completed
from ._toolkit import bounded_map as bounded_map
from ._toolkit import first_completed as first_completed
from ._toolkit import gather as gather
from ._toolkit import race as race
from ._toolkit import retry as retry
from ._toolkit import shield as shield
from ._queue import PriorityQueue as PriorityQueue
from ._queue import PriorityQueueStatistics as PriorityQueueStatistics
from ._leaks import LeakTracker as LeakTracker
from ._leaks import TrackedObject as TrackedObject

# anyio's primitives, re-exported unchanged (not wrapped):
from anyio import TASK_STATUS_IGNORED as TASK_STATUS_IGNORED
from anyio import CancelScope as CancelScope
from anyio import CapacityLimiter as CapacityLimiter
from anyio import CapacityLimiterStatistics as CapacityLimiterStatistics
from anyio import ClosedResourceError as ClosedResourceError
from anyio import Condition as Condition
from anyio import EndOfStream as EndOfStream
from anyio import Event as Event
from anyio import Lock as Lock
from anyio import Semaphore as Semaphore
from anyio import TaskHandle as TaskHandle
from anyio import create_memory_object_stream as create_memory_object_stream
from anyio import create_task_group as create_task_group
from anyio import current_effective_deadline as current_effective_deadline
from anyio import fail_after as fail_after
from anyio import fail_at as fail_at
from anyio import from_thread as from_thread
from anyio import move_on_after as move_on_after
from anyio import move_on_at as move_on_at
from anyio import to_process as to_process
from anyio import to_thread as to_thread
from anyio.abc import TaskGroup as TaskGroup
from anyio.abc import TaskStatus as TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream as MemoryObjectReceiveStream
from anyio.streams.memory import MemoryObjectSendStream as MemoryObjectSendStream

# -- deadlines and admission control (lifecycle/_deadline.py, lifecycle/_admission.py) ----
from ._admission import OVERLOADED_TYPE as OVERLOADED_TYPE
from ._admission import AdmissionStatistics as AdmissionStatistics
from ._admission import ConcurrencyLimitMiddleware as ConcurrencyLimitMiddleware
from ._deadline import DEADLINE_EXPIRED_HEADER as DEADLINE_EXPIRED_HEADER
from ._deadline import DEADLINE_EXPIRED_TYPE as DEADLINE_EXPIRED_TYPE
from ._deadline import DEFAULT_BUDGET_HEADERS as DEFAULT_BUDGET_HEADERS
from ._deadline import DEFAULT_EXEMPT_PATHS as DEFAULT_EXEMPT_PATHS
from ._deadline import MALFORMED_BUDGET_TYPE as MALFORMED_BUDGET_TYPE
from .exceptions import DeadlineExceeded as DeadlineExceeded
from ._deadline import DeadlineMiddleware as DeadlineMiddleware
from ._deadline import DeadlineStatistics as DeadlineStatistics
from ._deadline import current_deadline as current_deadline
from ._deadline import deadline_scope as deadline_scope
from ._deadline import remaining as remaining
from ._deadline import request_timeout as request_timeout

# -- observability (lifecycle/_metrics.py, lifecycle/_tracing.py) --------------------------
# prometheus-client and opentelemetry-api are imported only when metrics or tracing are
# enabled, so these names cost nothing without them.
from ._metrics import DEFAULT_BUCKETS as DEFAULT_BUCKETS
from ._metrics import LifecycleMetrics as LifecycleMetrics
from ._metrics import instrument_metrics as instrument_metrics
from ._tracing import TRACER_NAME as TRACER_NAME
from ._tracing import LifecycleTracing as LifecycleTracing
from ._tracing import instrument_tracing as instrument_tracing

# -- the adapter modules, reachable as attributes (lifecycle.fastapi.provide) ---------------
# Imported on first use, so that `import lifecycle` needs none of their extras.
_ADAPTERS = frozenset({"fastapi", "starlette", "httpx", "testing", "pytest_plugin"})


def __getattr__(name: str) -> object:
    if name in _ADAPTERS:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
