"""What a live preview costs against a denoising step, at the real FLUX.2 sizes (random weights).

    python benchmarks/preview.py [--size 1024] [--dtype float32] [--repeats 5]

The VAE has the real FLUX.2 config (32 latent channels, 128-512 channels per level). The step is the
klein 4B transformer's (dim 3072, 5 double + 20 single blocks) on SIZE x SIZE pixels and 512 text tokens:
a full 25-block forward takes minutes on a CPU, so one forward is timed with 0 blocks, 1 double block and 1
single block, and the full step is that base plus 5 and 20 times each block's share (blocks are identical
in shape, so their times add up). Reported: the preview per step (the linear latent->RGB map plus its JPEG,
as the server's worker makes it), the one-time fit of the map at start-up, and a full VAE decode for
comparison (what a preview per step would cost done naively).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from sidebyside import fastest_dtype, timed

from fluxforge.conditioning import grid_ids
from fluxforge.config import AutoencoderConfig, get_variant
from fluxforge.model.autoencoder import AutoEncoder
from fluxforge.model.text import text_ids
from fluxforge.model.transformer import Flux2Transformer
from fluxforge.preview import Previewer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = fastest_dtype(args.dtype)
    h = w = args.size // 16

    vae = AutoEncoder(AutoencoderConfig()).to(dtype).eval()
    start = time.perf_counter()
    previewer = Previewer.fit(vae)
    fit = time.perf_counter() - start
    tokens = torch.randn(1, h * w, 128, dtype=dtype)
    preview = timed(lambda: previewer.jpeg(tokens, h, w), args.repeats)
    with torch.no_grad():
        decode = timed(lambda: vae.decode_tokens(tokens, h, w), 1)

    config = get_variant("flux.2-klein-4b").transformer
    txt = torch.randn(1, 512, config.joint_attention_dim, dtype=dtype)
    img = torch.randn(1, h * w, config.in_channels, dtype=dtype)
    t = torch.full((1,), 0.5, dtype=dtype)
    ids_img, ids_txt = grid_ids(h, w), text_ids(512)

    def forward_time(double: int, single: int) -> float:
        model = Flux2Transformer(dataclasses.replace(config, num_layers=double, num_single_layers=single))
        model = model.to(dtype).eval()
        with torch.no_grad():
            return timed(lambda: model(img, txt, t, ids_img, ids_txt, None), 1)

    base, one_double, one_single = forward_time(0, 0), forward_time(1, 0), forward_time(0, 1)
    step = base + config.num_layers * (one_double - base) + config.num_single_layers * (one_single - base)
    print(f"{args.size}x{args.size}, {h * w} image tokens + 512 text tokens, {dtype}")
    print(
        f"  klein 4B step: {step:.1f} s  (0 blocks {base:.2f} s, +1 double {one_double - base:.2f} s, "
        f"+1 single {one_single - base:.2f} s)"
    )
    print(
        f"  preview per step: {preview * 1e3:.1f} ms = {preview / step:.3%} of a step "
        f"({2 * h}x{2 * w} JPEG, {len(previewer.jpeg(tokens, h, w))} bytes)"
    )
    print(f"  fitting the preview map once at start-up: {fit:.2f} s")
    print(f"  a full VAE decode instead: {decode:.1f} s = {decode / step:.0%} of a step")


if __name__ == "__main__":
    main()
