"""Leak tracking: which tasks and resources are still alive when they should be gone.

A `LeakTracker` holds only weak references, so tracking never keeps anything alive. Weakref
callbacks can run at any allocation (whenever the garbage collector collects a cycle), including
while the tracker itself is iterating or updating its table; so a callback only appends the dead
entry's key to a deque, and the table is pruned from that deque at the tracker's own calls.
"""

from __future__ import annotations

import itertools
import sys
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, final

import anyio

__all__ = ["LeakTracker", "TrackedObject"]

T = TypeVar("T")


@dataclass(frozen=True)
class TrackedObject:
    """A task or resource a `LeakTracker` watches, as `LeakTracker.alive` reports it.

    Attributes:
        name: The name it was tracked under.
        kind: ``"task"`` for a task (alive until it finishes) or ``"resource"`` for any other
            object (alive until it is garbage-collected or untracked).
        site: Where it was tracked: ``"path/to/file.py:42 in function"``.
    """

    name: str
    kind: Literal["task", "resource"]
    site: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name!r} (tracked at {self.site})"


@final
class _Ref(weakref.ref[Any]):
    __slots__ = ("key",)

    key: int


@final
class _Entry:
    __slots__ = ("is_alive", "object_id", "record", "ref")

    def __init__(
        self, record: TrackedObject, ref: _Ref, object_id: int, is_alive: Callable[[Any], bool]
    ) -> None:
        self.record = record
        self.ref = ref
        self.object_id = object_id
        self.is_alive = is_alive


def _always(_: object) -> bool:
    return True


def _handle_running(handle: anyio.TaskHandle[Any]) -> bool:
    return handle.status in (anyio.TaskHandle.Status.PENDING, anyio.TaskHandle.Status.CANCELLING)


def _coroutine_running(coro: Any) -> bool:
    # A finished coroutine (or generator-based one) has no frame any more.
    for attribute in ("cr_frame", "gi_frame"):
        if hasattr(coro, attribute):
            return getattr(coro, attribute) is not None
    return True


def _site(depth: int) -> str:
    """Describe the frame ``depth`` levels above the caller of this function."""
    try:
        frame = sys._getframe(depth + 1)
    except ValueError:
        return "<unknown>"
    code = frame.f_code
    return f"{code.co_filename}:{frame.f_lineno} in {code.co_qualname}"


def _check_stacklevel(stacklevel: object) -> int:
    if isinstance(stacklevel, bool) or not isinstance(stacklevel, int) or stacklevel < 1:
        raise ValueError(
            f"stacklevel={stacklevel!r}: pass 1 for the caller's line, 2 for its caller's, ..."
        )
    return stacklevel


class LeakTracker:
    """Track tasks and resources by name and creation site; report those still alive.

    Track what should be gone by some point (the end of a request, of a test, of shutdown) and
    ask at that point which of it is still alive::

        tracker = LeakTracker()
        connection = tracker.track(await pool.connect(), name="db connection")
        tracker.track(tg.start_soon(poll), name="poller")
        ...
        for leak in tracker.alive():
            logger.warning("still alive: %s", leak)

    A resource counts as alive until it is garbage-collected or passed to `untrack` (for
    example once it is closed, if something may still hold it); a task, until it finishes.
    The tracker holds weak references only, so it never keeps anything alive itself, and it is
    safe when tracked objects die during garbage collection, even mid-report.
    """

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}
        self._keys_by_id: dict[int, int] = {}
        self._keys = itertools.count()
        self._dead: deque[int] = deque()
        dead = self._dead

        def on_death(ref: _Ref) -> None:  # may run inside any allocation: append only
            dead.append(ref.key)

        self._on_death = on_death

    def __repr__(self) -> str:
        return f"<LeakTracker tracking {len(self._entries)}>"

    def track(self, obj: T, *, name: str | None = None, stacklevel: int = 1) -> T:
        """Watch ``obj`` and return it, so creation and tracking can be one expression.

        An `anyio.TaskHandle` (what ``TaskGroup.start_soon`` returns) is tracked as a task,
        alive until the task finishes; anything else as a resource, alive until it is
        garbage-collected or untracked. Tracking an object already tracked does nothing.

        Args:
            obj: The object; it must support weak references.
            name: What to call it in reports; defaults to the task's name or the object's type.
            stacklevel: Which frame is the creation site: 1 for the caller of `track`, 2 for
                its caller (for helpers that track on their caller's behalf), and so on.

        Returns:
            ``obj`` itself.

        Raises:
            TypeError: ``obj`` cannot be weakly referenced (an int, a str, a tuple, an object
                of a class with ``__slots__`` and no ``__weakref__``).
        """
        _check_stacklevel(stacklevel)
        if isinstance(obj, anyio.TaskHandle):
            self._add(obj, name or obj.name, "task", _handle_running, stacklevel)
        else:
            self._add(obj, name or type(obj).__qualname__, "resource", _always, stacklevel)
        return obj

    def track_current_task(self, *, name: str | None = None, stacklevel: int = 1) -> None:
        """Watch the calling task; it counts as alive until it finishes.

        Args:
            name: What to call it in reports; defaults to the task's own name.
            stacklevel: Which frame is the creation site, as for `track`.
        """
        _check_stacklevel(stacklevel)
        task = anyio.get_current_task()
        self._add(
            task.coro, name or task.name or repr(task), "task", _coroutine_running, stacklevel
        )

    def untrack(self, obj: object) -> None:
        """Stop watching ``obj``; nothing happens if it is not tracked.

        Args:
            obj: An object passed to `track` before.
        """
        self._prune()
        key = self._keys_by_id.get(id(obj))
        if key is not None and self._entries[key].ref() is obj:
            del self._keys_by_id[id(obj)]
            del self._entries[key]

    def alive(self) -> tuple[TrackedObject, ...]:
        """Report the tracked tasks and resources still alive, in the order they were tracked.

        Returns:
            One `TrackedObject` for each; an empty tuple when nothing tracked is alive.
        """
        self._prune()
        report: list[TrackedObject] = []
        for entry in list(self._entries.values()):
            obj = entry.ref()
            if obj is not None and entry.is_alive(obj):
                report.append(entry.record)
        return tuple(report)

    def _add(
        self,
        obj: object,
        name: str,
        kind: Literal["task", "resource"],
        is_alive: Callable[[Any], bool],
        stacklevel: int,
    ) -> None:
        self._prune()
        key = self._keys_by_id.get(id(obj))
        if key is not None and self._entries[key].ref() is obj:
            return
        key = next(self._keys)
        try:
            ref = _Ref(obj, self._on_death)
        except TypeError:
            raise TypeError(
                f"LeakTracker cannot track {name!r}: {type(obj).__qualname__!r} objects do not "
                f"support weak references. Track the object that owns it instead, or give its "
                f"class a '__weakref__' slot."
            ) from None
        ref.key = key
        site = _site(stacklevel + 1)  # above _add: its public caller, then that one's caller
        self._entries[key] = _Entry(TrackedObject(name, kind, site), ref, id(obj), is_alive)
        self._keys_by_id[id(obj)] = key

    def _prune(self) -> None:
        dead = self._dead
        while dead:
            key = dead.popleft()
            entry = self._entries.pop(key, None)
            # The id may already belong to a newer object tracked under another key.
            if entry is not None and self._keys_by_id.get(entry.object_id) == key:
                del self._keys_by_id[entry.object_id]
