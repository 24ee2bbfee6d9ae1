"""Worker pool benchmarks, each against a baseline measured in the same run.

(a) 100,000 no-op jobs through a pool (concurrency 8, queue 1,000) against a raw anyio
    memory stream with 8 consumer tasks: time ratio (target <= 1.3).
(b) Peak memory while an unthrottled producer submits jobs carrying 10 KB each far faster
    than 8 consumers (5 ms per job) process them: the pool (queue 100) against an unbounded
    ``asyncio.Queue``. tracemalloc peaks are printed for both.
(c) The jobs of (a) through the same pool with Prometheus metrics enabled
    (`lifecycle.instrument_metrics`) against the pool without them: time ratio (target <= 1.1).

Run: ``.venv/bin/python benchmarks/workers.py`` (``--backend trio`` for (a) on trio).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import tracemalloc

import anyio

from lifecycle import Lifecycle, instrument_metrics

JOBS = 100_000


async def pool_noop(jobs: int, *, metrics: bool = False) -> float:
    lc = Lifecycle()

    @lc.worker(concurrency=8, queue_size=1000, drain_timeout=None)
    async def handle(job: int) -> None:
        pass

    if metrics:
        from prometheus_client import CollectorRegistry

        instrument_metrics(lc, registry=CollectorRegistry())
    async with lc.run():
        began = time.perf_counter()
        for job in range(jobs):
            await handle.submit(job)
    # Leaving run() drains the queue: every job has completed here.
    elapsed = time.perf_counter() - began
    assert handle.statistics().completed == jobs
    return elapsed


async def raw_stream_noop(jobs: int) -> float:
    send, receive = anyio.create_memory_object_stream[int](1000)
    done = 0

    async def consumer(stream: anyio.abc.ObjectReceiveStream[int]) -> None:
        nonlocal done
        async with stream:
            async for _ in stream:
                done += 1

    began = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(consumer, receive.clone())
        receive.close()
        async with send:
            for job in range(jobs):
                await send.send(job)
    elapsed = time.perf_counter() - began
    assert done == jobs
    return elapsed


async def bench_throughput(rounds: int) -> None:
    import sniffio

    backend = sniffio.current_async_library()
    await pool_noop(5_000)  # warm up
    await pool_noop(5_000, metrics=True)
    await raw_stream_noop(5_000)
    # Each round measures the three variants back to back and the ratios are taken within
    # the round, so that the machine's speed drifting between rounds cancels out.
    ours, base, measured = [], [], []
    for round_number in range(rounds):
        variants = [("pool", False), ("raw", None), ("pool", True)]
        if round_number % 2:
            variants.reverse()  # alternate the order, so no variant always runs first
        for kind, metrics in variants:
            if kind == "raw":
                base.append(await raw_stream_noop(JOBS))
            elif metrics:
                measured.append(await pool_noop(JOBS, metrics=True))
            else:
                ours.append(await pool_noop(JOBS))
    pool_ratio = statistics.median(o / b for o, b in zip(ours, base, strict=True))
    metrics_ratio = statistics.median(m / o for m, o in zip(measured, ours, strict=True))
    pool_t, raw_t = statistics.median(ours), statistics.median(base)
    metrics_t = statistics.median(measured)
    print(
        f"[{backend}] (a) {JOBS:,} no-op jobs, concurrency 8, queue 1,000: pool "
        f"{pool_t * 1e6 / JOBS:.2f} us/job, raw memory stream + 8 consumers "
        f"{raw_t * 1e6 / JOBS:.2f} us/job; ratio {pool_ratio:.2f} (median of {rounds} "
        f"paired rounds; target <= 1.3)"
    )
    print(
        f"[{backend}] (c) the same jobs with Prometheus metrics enabled: "
        f"{metrics_t * 1e6 / JOBS:.2f} us/job against {pool_t * 1e6 / JOBS:.2f} us/job without; "
        f"ratio {metrics_ratio:.3f} (median of {rounds} paired rounds; target <= 1.1)"
    )


PAYLOAD = 10_000
FLOOD = 3_000
WORK = 0.005  # seconds a consumer spends on one job


async def flood_pool() -> tuple[int, float]:
    lc = Lifecycle()

    @lc.worker(concurrency=8, queue_size=100, drain_timeout=None)
    async def handle(job: bytes) -> None:
        await anyio.sleep(WORK)

    async with lc.run():
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        began = time.perf_counter()
        for _ in range(FLOOD):
            await handle.submit(bytes(PAYLOAD))
        produced = time.perf_counter() - began
    _, peak = tracemalloc.get_traced_memory()
    return peak - base, produced


async def flood_unbounded_queue() -> tuple[int, float]:
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def consumer() -> None:
        while True:
            item = await queue.get()
            if item is None:
                return
            await asyncio.sleep(WORK)

    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    consumers = [asyncio.create_task(consumer()) for _ in range(8)]
    began = time.perf_counter()
    for _ in range(FLOOD):
        queue.put_nowait(bytes(PAYLOAD))
        await asyncio.sleep(0)
    produced = time.perf_counter() - began
    for _ in consumers:
        queue.put_nowait(None)
    await asyncio.gather(*consumers)
    _, peak = tracemalloc.get_traced_memory()
    return peak - base, produced


async def bench_memory() -> None:
    tracemalloc.start()
    try:
        pool_peak, pool_produced = await flood_pool()
        queue_peak, queue_produced = await flood_unbounded_queue()
    finally:
        tracemalloc.stop()
    consume_rate = 8 / WORK
    print(
        f"[asyncio] (b) {FLOOD:,} jobs x {PAYLOAD // 1000} KB, "
        f"8 consumers x {WORK * 1000:.0f} ms/job "
        f"(<= {consume_rate:,.0f} jobs/s): unbounded asyncio.Queue producer ran at "
        f"{FLOOD / queue_produced:,.0f} jobs/s "
        f"({FLOOD / queue_produced / consume_rate:.0f}x the consumers) and peaked at "
        f"{queue_peak / 1e6:.1f} MB; the pool (queue 100) held the producer to "
        f"{FLOOD / pool_produced:,.0f} jobs/s and peaked at {pool_peak / 1e6:.1f} MB "
        f"({queue_peak / max(pool_peak, 1):.0f}x less)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["asyncio", "trio", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    for backend in ["asyncio", "trio"] if args.backend == "both" else [args.backend]:
        anyio.run(bench_throughput, args.rounds, backend=backend)
    anyio.run(bench_memory, backend="asyncio")
