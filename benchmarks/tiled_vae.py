"""Peak memory and time of a 2048 x 2048 VAE decode, whole and tiled, with the real FLUX.2 VAE config
(random weights). Each mode runs in a child process of its own, so that peaks do not mix; the peak is the
child's maximum RSS beyond what it held once the VAE and the latents were built.

    python benchmarks/tiled_vae.py [--size 2048] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
from fluxforge.config import AutoencoderConfig
from fluxforge.model.autoencoder import AutoEncoder
from fluxforge.tiling import decode_tokens_tiled
size, dtype, mode = int(sys.argv[1]), getattr(torch, sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
vae = AutoEncoder(AutoencoderConfig()).to(dtype).eval()
h = w = size // 16
tokens = torch.randn(1, h * w, 128, dtype=dtype)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
with torch.no_grad():
    out = decode_tokens_tiled(vae, tokens, h, w) if mode == "tiled" else vae.decode_tokens(tokens, h, w)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
torch.save(out, sys.argv[4])
print(json.dumps({"mode": mode, "seconds": seconds, "peak_mib": (peak - before) / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for mode in ("whole", "tiled"):
            path = f"{tmp}/{mode}.pt"
            run = subprocess.run(
                [sys.executable, "-c", CHILD, str(args.size), args.dtype, mode, path],
                capture_output=True,
                text=True,
                check=True,
            )
            results[mode] = json.loads(run.stdout.strip().splitlines()[-1])
            results[mode]["out"] = path
            r = results[mode]
            print(
                f"{args.size}x{args.size} {mode:5s}: {r['seconds']:.1f} s, "
                f"peak {r['peak_mib']:.0f} MiB beyond the model"
            )
        diff = (
            torch.load(results["tiled"]["out"]).float() - torch.load(results["whole"]["out"]).float()
        ).abs()
        print(
            f"tiled against whole (random weights, so an upper bound): mean {diff.mean():.4f}, "
            f"max {diff.max():.3f}"
        )


if __name__ == "__main__":
    main()
