"""LeakTracker: what is still alive, where it came from, and garbage-collection safety."""

from __future__ import annotations

import gc
import inspect
from typing import Any

import anyio
import pytest

from lifecycle import LeakTracker, TrackedObject

pytestmark = pytest.mark.anyio


class Connection:
    def __init__(self) -> None:
        self.partner: Any = None


class Slotted:
    __slots__ = ("value",)


def here(offset: int = 0) -> str:
    """``file:line`` of the caller's line, plus ``offset`` lines."""
    frame = inspect.currentframe()
    assert frame is not None
    assert frame.f_back is not None
    return f"{__file__}:{frame.f_back.f_lineno + offset}"


def test_a_resource_is_alive_until_it_is_collected_and_names_its_site() -> None:
    tracker = LeakTracker()
    site = here(1)
    connection = tracker.track(Connection(), name="db connection")
    assert tracker.alive() == (
        TrackedObject(
            "db connection",
            "resource",
            f"{site} in test_a_resource_is_alive_until_it_is_collected_and_names_its_site",
        ),
    )
    assert "resource 'db connection' (tracked at " in str(tracker.alive()[0])
    del connection
    assert tracker.alive() == ()


def test_objects_in_reference_cycles_are_gone_once_collected() -> None:
    tracker = LeakTracker()
    a, b = Connection(), Connection()
    a.partner, b.partner = b, a
    tracker.track(a)
    tracker.track(b)
    assert [leak.name for leak in tracker.alive()] == ["Connection", "Connection"]
    del a, b
    gc.collect()
    assert tracker.alive() == ()


def test_stacklevel_points_at_the_helpers_caller() -> None:
    tracker = LeakTracker()

    def open_connection() -> Connection:
        return tracker.track(Connection(), stacklevel=2)

    site = here(1)
    connection = open_connection()
    assert tracker.alive()[0].site.startswith(site + " in ")
    assert connection is not None


def test_objects_without_weak_references_are_rejected_cleanly() -> None:
    tracker = LeakTracker()
    for obj in (42, "text", (1, 2), Slotted()):
        with pytest.raises(TypeError, match="do not support weak references"):
            tracker.track(obj)
    assert tracker.alive() == ()
    with pytest.raises(TypeError, match="'Slotted' objects"):
        tracker.track(Slotted(), name="slotted")


def test_untrack_and_tracking_twice() -> None:
    tracker = LeakTracker()
    connection = tracker.track(Connection(), name="first")
    tracker.track(connection, name="second")  # already tracked: nothing changes
    assert [leak.name for leak in tracker.alive()] == ["first"]
    tracker.untrack(connection)
    tracker.untrack(connection)  # not tracked any more: nothing happens
    assert tracker.alive() == ()
    assert connection is not None


async def test_a_task_is_alive_until_it_finishes() -> None:
    tracker = LeakTracker()
    release = anyio.Event()
    async with anyio.create_task_group() as tg:
        handle = tracker.track(tg.start_soon(release.wait), name="poller")
        await anyio.wait_all_tasks_blocked()
        [leak] = tracker.alive()
        assert (leak.name, leak.kind) == ("poller", "task")
        release.set()
    assert tracker.alive() == ()  # finished, though the handle is still referenced
    assert handle.status is anyio.TaskHandle.Status.FINISHED


async def test_the_current_task_can_track_itself() -> None:
    tracker = LeakTracker()
    release = anyio.Event()

    async def worker() -> None:
        tracker.track_current_task(name="worker")
        await release.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(worker)
        await anyio.wait_all_tasks_blocked()
        assert [(leak.name, leak.kind) for leak in tracker.alive()] == [("worker", "task")]
        assert "in test_the_current_task_can_track_itself.<locals>.worker" in (
            tracker.alive()[0].site
        )
        release.set()
    assert tracker.alive() == ()


def test_objects_dying_during_garbage_collection_mid_report_are_safe() -> None:
    # With the collector running at nearly every allocation, tracked objects in reference
    # cycles die while the tracker is adding entries and building reports.
    tracker = LeakTracker()
    kept = [tracker.track(Connection(), name="kept") for _ in range(50)]
    thresholds = gc.get_threshold()
    gc.set_threshold(1, 1, 1)
    try:
        for _ in range(200):
            for _ in range(20):
                a, b = Connection(), Connection()
                a.partner, b.partner = b, a
                tracker.track(a, name="cycle")
                tracker.track(b, name="cycle")
            del a, b
            report = tracker.alive()
            assert sum(leak.name == "kept" for leak in report) == 50
    finally:
        gc.set_threshold(*thresholds)
    gc.collect()
    assert [leak.name for leak in tracker.alive()] == ["kept"] * 50
    assert len(kept) == 50
