"""Startup benchmarks for the service graph.

(a) 200 services in 20 independent chains of depth 10, each start taking 20 ms: wall time
    divided by the critical path (10 x 20 ms). 1.0 is ideal; a sequential starter is 20x.
(b) 1,000 services that do no work: start+stop cost per service in microseconds, and its
    ratio to starting (and then cancelling) 1,000 bare tasks with ``TaskGroup.start`` in the
    same run.

Run: ``.venv/bin/python benchmarks/startup.py`` (both backends; ``--backend asyncio`` for one).
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import sniffio
from anyio.abc import TaskStatus

from lifecycle import Lifecycle


def chains(count: int, depth: int, delay: float) -> Lifecycle:
    lc = Lifecycle(startup_timeout=None, shutdown_timeout=None)
    for c in range(count):
        for d in range(depth):
            name = f"c{c}d{d}"

            async def service(**deps: Any) -> AsyncIterator[None]:
                await anyio.sleep(delay)
                yield None

            params = [] if d == 0 else [f"c{c}d{d - 1}"]
            service.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
                [inspect.Parameter(p, inspect.Parameter.KEYWORD_ONLY) for p in params]
            )
            lc.service(name=name)(service)
    return lc


def noop_services(count: int) -> Lifecycle:
    lc = Lifecycle(startup_timeout=None, shutdown_timeout=None)
    for i in range(count):

        async def service() -> AsyncIterator[None]:
            yield None

        lc.service(name=f"s{i}")(service)
    return lc


async def bench_chains() -> tuple[float, float]:
    """Return (lifecycle, floor): wall time over the critical path for the 200 services, and
    for 20 plain tasks each sleeping 10 x 20 ms (what the event loop's timers alone cost)."""
    lc = chains(20, 10, 0.020)
    began = time.perf_counter()
    async with lc.run():
        elapsed = time.perf_counter() - began

    async def plain_chain() -> None:
        for _ in range(10):
            await anyio.sleep(0.020)

    began = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(plain_chain)
    floor = time.perf_counter() - began
    return elapsed / (10 * 0.020), floor / (10 * 0.020)


async def bench_noop(count: int) -> tuple[float, float]:
    """Return (lifecycle seconds, bare TaskGroup.start seconds) for ``count`` services."""
    lc = noop_services(count)
    began = time.perf_counter()
    async with lc.run():
        pass
    ours = time.perf_counter() - began

    async def bare(*, task_status: TaskStatus[None]) -> None:
        task_status.started()
        await anyio.sleep_forever()

    began = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(count):
            await tg.start(bare)
        tg.cancel_scope.cancel()
    baseline = time.perf_counter() - began
    return ours, baseline


async def main(rounds: int) -> None:
    backend = sniffio.current_async_library()
    runs = [await bench_chains() for _ in range(5)]
    ratios = [r for r, _ in runs]
    floor = statistics.median(f for _, f in runs)
    print(
        f"[{backend}] (a) 200 services, 20 chains x depth 10 x 20 ms: wall / critical path = "
        f"{statistics.median(ratios):.3f} (median of {len(runs)}: "
        f"{', '.join(f'{r:.3f}' for r in ratios)}; target <= 1.15, a sequential starter is "
        f"20); plain sleeping tasks in the same run: {floor:.3f}"
    )
    count = 1000
    await bench_noop(count)  # warm up
    samples = [await bench_noop(count) for _ in range(rounds)]
    ours = statistics.median(s[0] for s in samples)
    base = statistics.median(s[1] for s in samples)
    print(
        f"[{backend}] (b) {count} no-op services: start+stop {ours / count * 1e6:.1f} "
        f"us/service; bare TaskGroup.start+cancel {base / count * 1e6:.1f} us/task; ratio "
        f"{ours / base:.2f}x (median of {rounds}; target <= 3x)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["asyncio", "trio", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    backends = ["asyncio", "trio"] if args.backend == "both" else [args.backend]
    for backend in backends:
        anyio.run(main, args.rounds, backend=backend)
