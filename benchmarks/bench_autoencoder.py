"""VAE encode and decode time, fluxforge against diffusers 0.42.1, side by side in one run.

The real FLUX.2 autoencoder config (84M parameters) with random weights. The two implementations alternate
and the report is the ratio of medians, since this machine is shared and noisy.

    python benchmarks/bench_autoencoder.py [--size 256] [--dtype bfloat16] [--repeats 3]
"""

from __future__ import annotations

import argparse

import torch
from diffusers import AutoencoderKLFlux2
from sidebyside import fastest_dtype, side_by_side  # noqa: E402  (benchmarks/, on sys.path when run as a script)

from fluxforge.config import AutoencoderConfig
from fluxforge.model.autoencoder import AutoEncoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        help="default: bf16 where the CPU has it natively, else fp32",
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dtype = fastest_dtype(args.dtype)
    torch.manual_seed(0)
    ref = AutoencoderKLFlux2().to(dtype).eval()
    ours = AutoEncoder(AutoencoderConfig()).to(dtype).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.rand(1, 3, args.size, args.size, dtype=dtype) * 2 - 1
    z = torch.randn(1, 32, args.size // 8, args.size // 8, dtype=dtype)
    cases = {
        "encode": (lambda: ref.encode(x).latent_dist.mode(), lambda: ours.encode(x)),
        "decode": (lambda: ref.decode(z).sample, lambda: ours.decode(z)),
    }
    print(f"{args.size}x{args.size} {dtype} threads={torch.get_num_threads()}")
    with torch.inference_mode():
        for name, (theirs_fn, ours_fn) in cases.items():
            expected, got = theirs_fn(), ours_fn()  # both compute the same thing
            err = (expected.float() - got.float()).abs().max().item()
            a, b = side_by_side(theirs_fn, ours_fn, args.repeats)
            print(
                f"{name}  diffusers {a * 1e3:7.0f} ms   fluxforge {b * 1e3:7.0f} ms   "
                f"speed-up {a / b:4.2f}x   max abs diff {err:.2g}"
            )


if __name__ == "__main__":
    main()
