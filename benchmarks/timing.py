"""Median wall-clock time of a callable, shared by the benchmark scripts."""

import statistics
import time


def median_seconds(fn, *, warmup: int = 3, repeats: int = 20) -> float:
    """Call `fn()` `warmup` times, then `repeats` times; return the median seconds per call.

    `fn` must block until its result is ready (block_until_ready for JAX; torch CPU ops are synchronous).
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
