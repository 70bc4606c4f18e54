"""torch.compile on the transformer: one denoising step compiled against eager, and how far apart they are.

    python benchmarks/compile.py [--dtype float32] [--heads 8] [--tokens 1024] [--repeats 7] [--mode default]

The model is bench_transformer.py's (random weights, head dim 128, 2 + 4 blocks, 512 text tokens). The
compiled module is the transformer (inductor, its C++ backend on a CPU), for the step's fixed shapes; the
first call's compile time is printed apart. It is worth keeping only if faster and within 1e-5 of eager.

Measured (AMD EPYC, AVX-512 BF16): fp32 1.13x (D = 512, 256 + 512 tokens) and 1.05x (D = 1024, 1024 + 512),
within 1.2e-6 of eager; bf16 1.02x. A whole 4-step klein call at D = 512 with it: 1.06-1.11x, 9.5e-7 from
eager. But on the parity tests' tiny klein, the compiled steps land 5e-5 from the eager ones (its fused
norms and RoPE round differently, and that model amplifies rounding), past the 1e-5 the pipeline keeps, and
each new shape compiles for 9-25 s first. So the pipeline does not offer it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_transformer import pair, size_options, step_inputs  # noqa: E402
from sidebyside import fastest_dtype, timed  # noqa: E402

from fluxforge.dtypes import describe_cpu  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size_options(parser)
    parser.add_argument("--mode", default="default", help="torch.compile mode (default, max-autotune, ...)")
    args = parser.parse_args()
    dtype = fastest_dtype(args.dtype)
    _, model = pair(args, dtype)
    inputs = step_inputs(args, dtype)
    compiled = torch.compile(model, mode=args.mode, dynamic=False)
    with torch.no_grad():
        eager_out = model(*inputs)
        start = time.perf_counter()
        compiled_out = compiled(*inputs)
        compile_s = time.perf_counter() - start
        diff = (compiled_out.float() - eager_out.float()).abs().max().item()
        eager = timed(lambda: model(*inputs), args.repeats)
        fast = timed(lambda: compiled(*inputs), args.repeats)
    print(f"{describe_cpu()}, {dtype}, D={args.heads * 128}, {args.tokens} image + {args.text} text tokens")
    print(f"first compiled call (compiling) {compile_s:.1f} s")
    print(f"step: eager {eager * 1000:.1f} ms, compiled {fast * 1000:.1f} ms, {eager / fast:.2f}x")
    print(f"max |compiled - eager| {diff:.2e} (output magnitude {eager_out.abs().max().item():.2f})")
    keep = eager / fast > 1.0 and diff <= 1e-5
    print("keep it:", "yes" if keep else "no (slower, or further than 1e-5 from eager)")


if __name__ == "__main__":
    main()
