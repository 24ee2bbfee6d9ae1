"""Per-item cost of `lifecycle.bounded_map` against what people write instead.

Each implementation maps an async function over 20,000 items with at most ``limit`` calls at
once and collects the results; the function does one checkpoint (a stand-in for an await
that does I/O), so the numbers are the machinery's overhead plus one trip through the
scheduler. Measured in the same run, on asyncio and trio, best of several rounds:

* ``bounded_map``: ``limit`` worker tasks pulling items from one iterator.
* ``TaskGroup + CapacityLimiter``: the hand-written loop, a task per item, each entering the
  limiter (all tasks are spawned up front, as the loop is usually written).
* ``... spawned on admission``: the same, but the loop acquires the limiter before spawning
  each task, so at most ``limit`` tasks exist (the careful version of the hand-written loop).
* ``aiometer.amap``: aiometer's ``amap`` with ``max_at_once=limit`` (it yields results in
  completion order; collecting them does not reorder them, which flatters it slightly).
* ``sequential loop``: ``[await fn(x) for x in items]``, the cost of the work itself with no
  concurrency at all, for reference.

Ratios are the baseline's cost over ``bounded_map``'s: 10x means ``bounded_map`` is ten times
cheaper per item.

Run: ``.venv/bin/python benchmarks/toolkit.py`` (both backends; ``--backend trio`` for one).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiometer
import anyio
import anyio.lowlevel

from lifecycle import bounded_map

ITEMS = 20_000
LIMITS = (10, 100)
ROUNDS = 3


async def work(x: int) -> int:
    await anyio.lowlevel.checkpoint()
    return x


async def with_bounded_map(items: Sequence[int], limit: int) -> list[int]:
    return await bounded_map(work, items, limit=limit)


async def with_task_group_and_limiter(items: Sequence[int], limit: int) -> list[int]:
    limiter = anyio.CapacityLimiter(limit)
    results: list[int] = [0] * len(items)

    async def run(index: int, item: int) -> None:
        async with limiter:
            results[index] = await work(item)

    async with anyio.create_task_group() as tg:
        for index, item in enumerate(items):
            tg.start_soon(run, index, item)
    return results


async def with_task_group_spawned_on_admission(items: Sequence[int], limit: int) -> list[int]:
    limiter = anyio.CapacityLimiter(limit)
    results: list[int] = [0] * len(items)

    async def run(index: int, item: int, token: object) -> None:
        try:
            results[index] = await work(item)
        finally:
            limiter.release_on_behalf_of(token)

    async with anyio.create_task_group() as tg:
        for index, item in enumerate(items):
            token = object()
            await limiter.acquire_on_behalf_of(token)
            tg.start_soon(run, index, item, token)
    return results


async def with_aiometer(items: Sequence[int], limit: int) -> list[int]:
    async with aiometer.amap(work, items, max_at_once=limit) as completed:
        return [result async for result in completed]


async def sequential(items: Sequence[int], limit: int) -> list[int]:
    return [await work(item) for item in items]


Implementation = Callable[[Sequence[int], int], Awaitable[list[int]]]

IMPLEMENTATIONS: list[tuple[str, Implementation]] = [
    ("bounded_map", with_bounded_map),
    ("TaskGroup + CapacityLimiter", with_task_group_and_limiter),
    ("  ... spawned on admission", with_task_group_spawned_on_admission),
    ("aiometer.amap", with_aiometer),
    ("sequential loop (no concurrency)", sequential),
]


async def measure(limit: int) -> dict[str, float]:
    """Best per-item seconds of each implementation, rounds interleaved to share any drift."""
    items = list(range(ITEMS))
    best = {name: float("inf") for name, _ in IMPLEMENTATIONS}
    for _ in range(ROUNDS):
        for name, implementation in IMPLEMENTATIONS:
            began = time.perf_counter()
            results = await implementation(items, limit)
            elapsed = time.perf_counter() - began
            if sorted(results) != items:
                raise AssertionError(f"{name} returned wrong results")
            best[name] = min(best[name], elapsed / ITEMS)
    return best


def report(backend: str, limit: int, best: dict[str, float]) -> None:
    ours = best["bounded_map"]
    print(f"\n{backend}, limit={limit}")
    for name, _ in IMPLEMENTATIONS:
        cost = best[name]
        ratio = "" if name == "bounded_map" else f"{cost / ours:6.2f}x"
        print(f"  {name:<34} {cost * 1e6:8.2f} us/item  {ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], action="append")
    backends = parser.parse_args().backend or ["asyncio", "trio"]
    print(
        f"bounded_map per-item cost: {ITEMS:,} items, fn = one checkpoint, best of {ROUNDS}; "
        f"ratio = baseline cost / bounded_map cost"
    )
    for backend in backends:
        for limit in LIMITS:
            best: dict[str, Any] = anyio.run(measure, limit, backend=backend)
            report(backend, limit, best)


if __name__ == "__main__":
    main()
