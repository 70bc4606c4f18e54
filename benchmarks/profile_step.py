"""Where one transformer step's time goes, at FLUX.2 widths: the share of matrix products, attention and
the rest (RoPE, modulation, norms, copies), from torch.profiler over a few forwards.

    python benchmarks/profile_step.py [--heads 24] [--layers 2] [--single-layers 4] [--tokens 1024]
                                      [--dtype bfloat16]

Defaults: klein 4B's width (24 heads of 128 = 3072) with fewer blocks (the shares are per block), 1024 image
and 512 text tokens, the fastest dtype this CPU computes natively.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from bench_transformer import config_of, size_options, step_inputs
from sidebyside import fastest_dtype  # noqa: E402  (benchmarks/, on sys.path as a script)

from fluxforge.config import TransformerConfig
from fluxforge.model.transformer import Flux2Transformer

GROUPS = {
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul"),
    "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size_options(parser, heads=24, repeats=3)
    args = parser.parse_args()
    dtype = fastest_dtype(args.dtype)
    config = TransformerConfig.from_dict(config_of(args, text_width=3 * 2560))
    with torch.device("meta"):
        model = Flux2Transformer(config)
    model = model.to_empty(device="cpu").to(dtype).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    img, txt, t, img_ids, txt_ids = step_inputs(args, dtype, config.in_channels, config.joint_attention_dim)
    side = int(args.tokens**0.5)
    with torch.inference_mode():
        model(img, txt, t, img_ids, txt_ids)  # warm-up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.repeats):
                model(img, txt, t, img_ids, txt_ids)
    self_us: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        self_us[event.key] += event.self_cpu_time_total
    total = sum(self_us.values())
    shares = {group: sum(v for k, v in self_us.items() if k.startswith(names)) / total
              for group, names in GROUPS.items()}  # fmt: skip
    seconds = total / args.repeats / 1e6
    print(f"D={config.inner_dim} double={args.layers} single={args.single_layers} img={side * side} "
          f"txt={args.text} dtype={dtype} threads={torch.get_num_threads()}; {seconds:.2f} s per forward "
          "under the profiler")  # fmt: skip
    for group, share in shares.items():
        print(f"  {group:18s} {share:6.1%}")
    print(f"  {'everything else':18s} {1 - sum(shares.values()):6.1%}; its largest ops:")
    grouped = tuple(n for names in GROUPS.values() for n in names)
    rest = sorted(((v, k) for k, v in self_us.items() if not k.startswith(grouped)), reverse=True)[:6]
    for v, k in rest:
        print(f"    {k:32s} {v / total:6.1%}")


if __name__ == "__main__":
    main()
