"""Service states and the start/stop timeline of one run."""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

__all__ = ["LifecycleState", "ServiceState", "Timeline", "TimelineEntry"]


class ServiceState(enum.Enum):
    """Where one service is in its life during a run.

    ``PENDING -> STARTING -> RUNNING -> STOPPING -> STOPPED``, with ``FAILED`` reachable from
    ``STARTING`` (the start raised or timed out), ``RUNNING`` (a long-running service crashed)
    and ``STOPPING`` (the cleanup raised or timed out). A start cancelled before it
    completed (another service failed, startup was abandoned or cancelled from outside) ends
    ``CANCELLED``: the service never ran, and nothing of it is cleaned up.
    """

    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"
    CANCELLED = "cancelled"


class LifecycleState(enum.Enum):
    """Where a whole `Lifecycle` is: idle, starting, running, stopping, stopped or failed."""

    IDLE = "idle"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True)
class TimelineEntry:
    """What happened to one service during a run.

    Times are seconds since the run began, measured with `time.perf_counter` (real time,
    also under a test's virtual clock); ``None`` where the phase never happened.

    Attributes:
        service: The service's name.
        state: Its state when the timeline was taken.
        started: Whether its start succeeded (it ran, whatever happened after).
        start_began: When its start began.
        start_ended: When its start finished, successfully or not.
        stop_began: When its cleanup began.
        stop_ended: When its cleanup finished (or was cut off).
        error: A one-line description of what went wrong, if anything did.
    """

    service: str
    state: ServiceState
    started: bool = False
    start_began: float | None = None
    start_ended: float | None = None
    stop_began: float | None = None
    stop_ended: float | None = None
    error: str | None = None

    @property
    def start_duration(self) -> float | None:
        """Seconds the start took, or ``None`` if it never finished."""
        if self.start_began is None or self.start_ended is None:
            return None
        return self.start_ended - self.start_began

    @property
    def stop_duration(self) -> float | None:
        """Seconds the cleanup took, or ``None`` if it never finished."""
        if self.stop_began is None or self.stop_ended is None:
            return None
        return self.stop_ended - self.stop_began


@dataclass(frozen=True)
class Timeline:
    """The start/stop timeline of one run, in declaration order.

    ``str(timeline)`` renders a table and `gantt` a chart; `start_order` and `stop_order` give
    the order in which services finished starting and began stopping, and `slowest_chain` the
    dependency chain that decided how long startup took.

    Attributes:
        entries: One entry per service, in declaration order.
        slowest_chain: The names along the dependency chain whose starts ended last, each
            gated by the one before it; empty when nothing started.
    """

    entries: tuple[TimelineEntry, ...]
    slowest_chain: tuple[str, ...] = ()

    def __iter__(self) -> Iterator[TimelineEntry]:
        return iter(self.entries)

    def __getitem__(self, service: str) -> TimelineEntry:
        for entry in self.entries:
            if entry.service == service:
                return entry
        raise KeyError(service)

    @property
    def start_order(self) -> list[str]:
        """Services whose start succeeded, in the order they became running."""
        started = [e for e in self.entries if e.started]
        return [e.service for e in sorted(started, key=lambda e: e.start_ended or 0.0)]

    @property
    def stop_order(self) -> list[str]:
        """Services whose cleanup ran, in the order the cleanups began."""
        stopped = [e for e in self.entries if e.stop_began is not None]
        return [e.service for e in sorted(stopped, key=lambda e: e.stop_began or 0.0)]

    def render(self) -> str:
        """Render the timeline as a fixed-width text table (times in milliseconds)."""
        header = ("service", "state", "start at", "start took", "stop at", "stop took", "error")
        rows: list[Sequence[str]] = [header]
        rows.extend(
            (
                e.service,
                e.state.value,
                _ms(e.start_began),
                _ms(e.start_duration),
                _ms(e.stop_began),
                _ms(e.stop_duration),
                e.error or "",
            )
            for e in self.entries
        )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = []
        for row in rows:
            cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
            lines.append("  ".join(cells).rstrip())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()

    def gantt(self, width: int = 60) -> str:
        """Render the run as a text Gantt chart: one bar per start, then one per cleanup.

        Startup and shutdown are drawn as two charts, each scaled to its own time span (a
        service may run for days between them, which would flatten both to a dot). Bars are
        ordered by when they began; a failed phase ends in ``x``, one still in progress in
        ``>``, and the reason follows the bar::

            startup: 11.0ms
              settings |==                  |     1.0ms
              db       | ===================|    10.0ms
              cache    | ==========         |     5.0ms
            shutdown: 20.0ms, began at 80.0ms
              cache    |=========x          |    10.0ms  failed: TimeoutError: ...
              db       |          ========  |     8.0ms
              settings |                  ==|     2.0ms

        Args:
            width: Columns of the bars.

        Returns:
            The chart, one line per row, without a trailing newline.

        Raises:
            ValueError: ``width`` is not an integer of at least 10.
        """
        if isinstance(width, bool) or not isinstance(width, int) or width < 10:
            raise ValueError(f"width must be an integer of at least 10 columns, not {width!r}.")
        names = max((len(e.service) for e in self.entries), default=0)
        starts = [
            (e, e.start_began, e.start_ended, _start_note(e))
            for e in self.entries
            if e.start_began is not None
        ]
        stops = [
            (e, e.stop_began, e.stop_ended, _stop_note(e))
            for e in self.entries
            if e.stop_began is not None
        ]
        if not starts:
            return "No service has begun to start."
        lines = _chart("startup", starts, names, width)
        if stops:
            lines += _chart("shutdown", stops, names, width)
        return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}ms"


_Bar = tuple[TimelineEntry, float, float | None, str]  # entry, began, ended, note


def _start_note(entry: TimelineEntry) -> str:
    if entry.start_ended is None:
        return "starting"
    if entry.started:
        return ""
    return f"failed: {entry.error}" if entry.error else "cancelled"


def _stop_note(entry: TimelineEntry) -> str:
    if entry.stop_ended is None:
        return "stopping"
    return f"failed: {entry.error}" if entry.state is ServiceState.FAILED and entry.error else ""


def _chart(title: str, bars: list[_Bar], names: int, width: int) -> list[str]:
    """One chart: a title line, then a bar per entry, scaled to the span of the bars."""
    bars = sorted(bars, key=lambda bar: bar[1])
    begin = min(bar[1] for bar in bars)
    end = max(max(b, e or 0.0) for _, b, e, _ in bars)
    span = end - begin
    header = f"{title}: {_ms(span)}"
    if title != "startup":
        header += f", began at {_ms(begin)}"
    lines = [header]
    for entry, began, ended, note in bars:
        finish = end if ended is None else ended
        if span > 0:
            # The epsilon keeps float noise (0.09 - 0.08 < 0.01) from shifting a column.
            first = min(width - 1, int((began - begin) / span * width + 1e-9))
            last = max(first + 1, min(width, math.ceil((finish - begin) / span * width - 1e-9)))
        else:
            first, last = 0, 1
        cells = ["="] * (last - first)
        if ended is None:
            cells[-1] = ">"
        elif note.startswith(("failed", "cancelled")):
            cells[-1] = "x"
        bar = " " * first + "".join(cells) + " " * (width - last)
        took = "" if ended is None else _ms(ended - began)
        row = f"  {entry.service.ljust(names)} |{bar}| {took:>9}"
        lines.append(f"{row}  {note}" if note else row)
    return lines
