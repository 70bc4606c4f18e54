"""Timing two implementations of the same thing on a shared, noisy machine: alternate them, take medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def side_by_side(
    theirs: Callable[[], object], ours: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Median seconds of `theirs` and `ours`, run alternately after one warm-up each, so that drift in
    the machine's load hits both alike."""
    theirs(), ours()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((theirs, times[0]), (ours, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])
