"""diffusers 0.42.1's klein KV call split into its stages, on serving.py's checkpoint: how the setting
compares with the one issue 10 measured (the VAE encodes the 4 references in about the time of the first,
extracting step; a later step costs 2x a step without references), and the speed-up that removing all
reference work from diffusers' own call would give (its "ideal" ratio: no VAE encode, every step a cached
one).

    python benchmarks/kv_stages.py [--vae-layers 2] [--repeats 3]

Each stage is timed where it runs, inside diffusers' call: forward hooks on its transformer time each step
(the first, extracting step apart) and a wrapper on its `prepare_image_latents` times the VAE encode of the
references; medians over the repeats. The rest (text encoding, decode, the pipeline's own work) is what the
call's time leaves.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import Flux2KleinKVPipeline, Flux2KleinPipeline
from generate import TEXT_LAYERS, build, model_options, picture, quiet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--ref-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    model_options(parser, text_hidden=384)
    args = parser.parse_args()
    quiet()
    refs = [picture(args.ref_size, seed) for seed in range(4)]
    with tempfile.TemporaryDirectory() as tmp:
        klein_dir, kv_dir = build(Path(tmp), args)
        kv = Flux2KleinKVPipeline.from_pretrained(kv_dir, dtype=torch.float32)
        plain = Flux2KleinPipeline.from_pretrained(klein_dir, dtype=torch.float32)
        for pipe in (kv, plain):
            pipe.set_progress_bar_config(disable=True)

        steps: list[float] = []
        for model in (kv.transformer, plain.transformer):
            model.register_forward_pre_hook(lambda *_: steps.append(-time.perf_counter()))
            model.register_forward_hook(lambda *_: steps.append(steps.pop() + time.perf_counter()))
        encodes: list[float] = []
        encode = kv.prepare_image_latents

        def timed_encode(*a, **k):
            start = time.perf_counter()
            out = encode(*a, **k)
            encodes.append(time.perf_counter() - start)
            return out

        kv.prepare_image_latents = timed_encode

        def call(pipe, images) -> list[float]:
            steps.clear()
            encodes.clear()
            start = time.perf_counter()
            pipe(image=images, prompt="a red fox", height=args.size, width=args.size, num_inference_steps=4,
                 generator=torch.Generator().manual_seed(0), text_encoder_out_layers=TEXT_LAYERS)  # fmt: skip
            return [time.perf_counter() - start, sum(encodes), *steps]

        call(kv, refs)  # warm-up
        runs = {name: [call(pipe, images) for _ in range(args.repeats)]
                for name, pipe, images in (("kv", kv, refs), ("plain", plain, None))}  # fmt: skip
    med = statistics.median
    total = med(r[0] for r in runs["kv"])
    vae = med(r[1] for r in runs["kv"])
    extract = med(r[2] for r in runs["kv"])
    later = med(t for r in runs["kv"] for t in r[3:])
    no_ref = med(t for r in runs["plain"] for t in r[2:])
    rest = total - vae - extract - 3 * later
    ideal = total / (rest + 4 * later)
    print(f"fp32, threads={torch.get_num_threads()}, VAE layers per block {args.vae_layers}, "
          f"medians of {args.repeats}")  # fmt: skip
    print(f"KV call, 4 steps: {total:.2f} s = VAE encode of the 4 references {vae:.2f} + extract step "
          f"{extract:.2f} + 3 x later step {later:.3f} + text, decode and the rest {rest:.2f}; "
          f"a step without references {no_ref:.3f} s")  # fmt: skip
    print(f"VAE / extract step {vae / extract:.2f} (issue 10: 1.04); later / no-reference step "
          f"{later / no_ref:.2f} (issue 10: 2.0); diffusers' call over its own floor (text + 4 later steps + "
          f"decode) {ideal:.2f}x (issue 10's figures: 3.48x)")  # fmt: skip


if __name__ == "__main__":
    main()
