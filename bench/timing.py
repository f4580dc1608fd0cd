"""Shared by the benchmarks: time a callable the same way everywhere."""

import time


def best_of(repeats, fn):
    """The fastest of `repeats` runs, in seconds (the least disturbed by the rest of the machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
