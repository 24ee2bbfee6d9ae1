"""cpu_bound worker handlers in an importable module, as a process pool needs them.

tests/test_workers.py runs both forms: the decorator, which rebinds ``crunch`` to its pool,
and the call, which leaves ``square`` bound to the function.
"""

from __future__ import annotations

import os

import lifecycle

lc = lifecycle.Lifecycle()


@lc.worker(concurrency=2, cpu_bound=True)
def crunch(n: int) -> tuple[int, int]:
    """Sum the squares below ``n``, in a worker process; return it and the process id."""
    return sum(i * i for i in range(n)), os.getpid()


def square(n: int) -> tuple[int, int]:
    return n * n, os.getpid()


squares = lc.worker(square, cpu_bound=True)
