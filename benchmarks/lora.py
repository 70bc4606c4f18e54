"""LoRA speed: one transformer step of the base model, with an unfused LoRA and with it fused, for fluxforge
and for diffusers 0.42.1 + PEFT, side by side in one run (ratios of medians; the machine is noisy).

The LoRA is rank 16 on every Linear of a scaled-down klein (head dim 128 as in every FLUX.2 model), in
diffusers' key layout, so both libraries load the same file.

    python benchmarks/lora.py [--dtype bfloat16] [--heads 8] [--tokens 1024] [--rank 16] [--repeats 7]
"""

from __future__ import annotations

import argparse

import torch
from bench_transformer import pair, size_options, step_inputs
from diffusers import Flux2KleinPipeline
from sidebyside import fastest_dtype, side_by_side  # noqa: E402  (benchmarks/, on sys.path as a script)

from fluxforge.lora import LoraSet, read_lora


def lora_file(model: torch.nn.Module, rank: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            out[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=gen) * 0.02
            out[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=gen) * 0.02
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size_options(parser)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    dtype = fastest_dtype(args.dtype)
    ref, ours = pair(args, dtype)
    state = {k: v.to(dtype) for k, v in lora_file(ref, args.rank).items()}
    img, txt, t, img_ids, txt_ids = step_inputs(args, dtype)
    side = int(args.tokens**0.5)

    def theirs() -> object:
        return ref(img, txt, t, img_ids, txt_ids, return_dict=False)

    def mine() -> object:
        return ours(img, txt, t, img_ids, txt_ids)

    print(
        f"D={ref.inner_dim} double={args.layers} single={args.single_layers} img={side * side} "
        f"txt={args.text} rank={args.rank} dtype={dtype} threads={torch.get_num_threads()}"
    )
    rows = []
    with torch.inference_mode():
        rows.append(("base model", *side_by_side(theirs, mine, args.repeats)))
        pipe = Flux2KleinPipeline(
            transformer=ref, vae=None, text_encoder=None, tokenizer=None, scheduler=None
        )
        pipe.load_lora_weights(dict(state))
        loras = LoraSet(ours)
        loras.add(read_lora(state, ours, "bench"))
        rows.append(("LoRA, unfused", *side_by_side(theirs, mine, args.repeats)))
        pipe.fuse_lora()
        loras.fuse()
        rows.append(("LoRA, fused", *side_by_side(theirs, mine, args.repeats)))
    base_theirs, base_ours = rows[0][1], rows[0][2]
    for name, a, b in rows:
        print(
            f"{name:16s} diffusers {a * 1e3:8.1f} ms ({a / base_theirs:4.2f}x its base)   "
            f"fluxforge {b * 1e3:8.1f} ms ({b / base_ours:4.2f}x its base)   fluxforge speed-up {a / b:5.2f}x"
        )


if __name__ == "__main__":
    main()
