"""Which dtype a network computes in: the one it is stored in where the device computes it natively.

`dtype="auto"` (the default everywhere) keeps each network's stored dtype when the device has native
arithmetic for it, and otherwise takes the nearest dtype it has, which is float32: it never computes in less
precision than the files hold, so fp32 files (the demo, the tests' checkpoints) run in fp32 on every machine.
Native means:

  CPU   bfloat16 with AVX-512 BF16 or AMX (Intel Xeon 4th gen and later, AMD Zen 4 and later), float16 with
        AVX-512 FP16 or AMX-FP16, both only where torch and oneDNN may use them (`ATEN_CPU_CAPABILITY`,
        `ONEDNN_MAX_CPU_ISA` can forbid it). Without them oneDNN emulates bf16 GEMMs, about 30x slower than
        fp32 on an AVX2 EPYC; with AMX bf16 runs about 6x faster than fp32.
  CUDA  float16 always; bfloat16 from compute capability 8.0 (Ampere).
  MPS   both.

Where the float32 copy would not fit in the device's free memory, the stored half-precision dtype is kept
and a warning says so, with the measured cost of that choice.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
AUTO, STORED = "auto", "stored"  # the two rules that are not a dtype
DtypeRule = torch.dtype | str | None  # a dtype or its name, "auto" (None means the same), or "stored"


def resolve_dtype(dtype: DtypeRule) -> torch.dtype | str:
    """A torch dtype, or AUTO / STORED; names are checked here so a typo fails before anything loads."""
    if dtype is None:
        return AUTO
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES.values():
            raise ValueError(f"dtype {dtype} is not one fluxforge computes in (float32, bfloat16, float16)")
        return dtype
    if dtype in (AUTO, STORED):
        return dtype
    try:
        return DTYPE_NAMES[dtype]
    except (KeyError, TypeError):
        raise ValueError(
            f"dtype must be 'auto', 'stored', a torch dtype or one of {', '.join(DTYPE_NAMES)}; got {dtype!r}"
        ) from None


def name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((li for li in text.splitlines() if li.startswith(("flags", "Features"))), "")
    return frozenset(line.partition(":")[2].split())


def _cpu_isa_allows(half: str) -> bool:
    """Whether torch's kernels and oneDNN may use the CPU's half-precision instructions."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):
        return False  # ATEN_CPU_CAPABILITY=avx2 or an older CPU
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    return isa == "ALL" or "AMX" in isa or half in isa


def native(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `device` computes `dtype` with its own arithmetic (see the module docstring)."""
    if dtype in (torch.float32, torch.float64):
        return True
    if device.type == "cuda":
        return dtype == torch.float16 or torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        flags = _cpu_flags()
        if dtype == torch.bfloat16:
            return bool({"avx512_bf16", "amx_bf16"} & flags) and _cpu_isa_allows("BF16")
        return bool({"avx512_fp16", "amx_fp16"} & flags) and _cpu_isa_allows("FP16")
    return device.type == "mps"


def describe_cpu() -> str:
    flags = _cpu_flags()
    best = next((f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags), None)
    kernels = torch.backends.cpu.get_cpu_capability()
    return f"this CPU ({best.upper() if best else 'no AVX2'}, torch kernels {kernels})"


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype each network was loaded in, and why, for `fluxforge info` and results' `info`."""

    dtypes: Mapping[str, torch.dtype]  # network -> dtype it computes in
    reason: str

    def summary(self) -> str:
        kinds = sorted({name(d) for d in self.dtypes.values()})
        return f"{'/'.join(kinds)} ({self.reason})"


def choose(
    rule: torch.dtype | str,
    stored: Mapping[str, torch.dtype],
    fp32_bytes: int,
    device: torch.device,
) -> DtypeChoice:
    """The dtype of each network under `rule` (a dtype, AUTO or STORED), given the dtypes they are stored in
    and the size of all of them in fp32."""
    if isinstance(rule, torch.dtype):
        if not native(rule, device):
            log.warning(
                "%s is not native on %s: it is emulated, and runs much slower than float32 here; "
                "dtype='auto' picks the fastest dtype that keeps the stored precision",
                name(rule),
                describe_cpu() if device.type == "cpu" else device,
            )
        return DtypeChoice(dict.fromkeys(stored, rule), f"{name(rule)} as asked")
    if rule == STORED:
        return DtypeChoice(dict(stored), "as stored")
    emulated = sorted({name(d) for d in stored.values() if not native(d, device)})
    if not emulated:
        return DtypeChoice(dict(stored), f"as stored, native on {_where(device)}")
    free = _free_bytes(device)
    if free is not None and fp32_bytes > 0.9 * free:
        slow = ", ".join(
            f"{d} {_slowdown(DTYPE_NAMES[d], device):.0f}x slower than float32" for d in emulated
        )
        log.warning(
            "keeping %s: the float32 copy (%.1f GiB) would not fit in the %.1f GiB free on %s, where it is "
            "emulated (measured: %s)",
            "/".join(emulated),
            fp32_bytes / 2**30,
            free / 2**30,
            _where(device),
            slow,
        )
        return DtypeChoice(dict(stored), f"as stored: float32 would not fit in memory; {slow} here")
    dtypes = {k: d if native(d, device) else torch.float32 for k, d in stored.items()}
    return DtypeChoice(
        dtypes, f"stored in {'/'.join(emulated)}, which {_where(device)} emulates; float32 is exact"
    )


def _where(device: torch.device) -> str:
    return describe_cpu() if device.type == "cpu" else str(device)


def _free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _slowdown(dtype: torch.dtype, device: torch.device, n: int = 256) -> float:
    """How many times slower a square matmul runs in `dtype` than in float32 here (best of 3 each)."""

    def best(dt: torch.dtype) -> float:
        a = torch.randn(n, n, device=device).to(dt)
        torch.mm(a, a)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            torch.mm(a, a)
            times.append(time.perf_counter() - start)
        return min(times)

    return best(dtype) / best(torch.float32)
