"""Timing two implementations of the same thing on a shared, noisy machine: alternate them, take medians;
and the dtype a benchmark runs in by default: the fastest the CPU computes natively."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from fluxforge.dtypes import describe_cpu, name, native


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of `fn` over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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


def fastest_dtype(asked: str | None) -> torch.dtype:
    """`asked`, else bf16 where the CPU computes it natively (AMX, AVX-512 BF16) and fp32 where bf16 is
    emulated (AVX2: about 30x slower); printed, so every figure says which dtype it ran in and why."""
    if asked is not None:
        print(f"dtype {asked} (as asked)")
        return getattr(torch, asked)
    fast = torch.bfloat16 if native(torch.bfloat16, torch.device("cpu")) else torch.float32
    print(f"dtype {name(fast)}: the fastest that {describe_cpu()} computes natively")
    return fast
