"""Wall-clock time of callables, shared by the benchmark scripts.

Every callable must block until its result is ready (block_until_ready for JAX; torch CPU ops are synchronous).
"""

import statistics
import time


def seconds(fn) -> float:
    """Wall-clock seconds of one call of `fn()`."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternating_seconds(runs: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each named callable, called in turn once per repetition after one untimed call each, so that
    the host's drift hits all of them alike: {name: [seconds per repetition]}."""
    for fn in runs.values():
        fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(seconds(fn))
    return times


def paired_ratio(times: list[float], reference: list[float]) -> float:
    """Median over repetitions of times[i] / reference[i], two lists from one `alternating_seconds` call."""
    return statistics.median(a / b for a, b in zip(times, reference))
