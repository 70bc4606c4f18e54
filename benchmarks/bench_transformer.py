"""Transformer forward time, fluxforge against diffusers 0.42.1, side by side in one run.

The machine is shared and noisy, so the two implementations alternate and the report is the ratio of
medians. Weights are random; sizes are a scaled-down klein (head dim 128 as in every FLUX.2 model).

    python benchmarks/bench_transformer.py [--dtype bfloat16] [--heads 8] [--tokens 1024] [--repeats 7]
"""

from __future__ import annotations

import argparse

import torch
from diffusers import Flux2Transformer2DModel
from sidebyside import fastest_dtype, side_by_side  # noqa: E402  (benchmarks/, on sys.path when run as a script)

from fluxforge.config import TransformerConfig
from fluxforge.model.transformer import Flux2Transformer


def grid_ids(h: int, w: int, t: int = 0) -> torch.Tensor:
    hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([torch.full_like(hh, t), hh, ww, torch.zeros_like(hh)], dim=-1).reshape(-1, 4)


def size_options(parser: argparse.ArgumentParser, heads: int = 8, repeats: int = 7) -> None:
    """The model and input sizes the transformer benchmarks take."""
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        help="default: bf16 where the CPU has it natively, else fp32",
    )
    parser.add_argument("--heads", type=int, default=heads)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--single-layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024, help="noisy image tokens (a square grid)")
    parser.add_argument("--text", type=int, default=512, help="text tokens")
    parser.add_argument("--repeats", type=int, default=repeats)


def config_of(args: argparse.Namespace, text_width: int = 3 * 512) -> dict:
    """diffusers' Flux2Transformer2DModel arguments for these sizes (head dim 128, as every FLUX.2 model)."""
    return dict(
        num_layers=args.layers,
        num_single_layers=args.single_layers,
        num_attention_heads=args.heads,
        joint_attention_dim=text_width,
        guidance_embeds=False,
    )


def pair(args: argparse.Namespace, dtype: torch.dtype) -> tuple[Flux2Transformer2DModel, Flux2Transformer]:
    """diffusers' transformer with random weights, and fluxforge's with the same weights."""
    torch.manual_seed(0)
    ref = Flux2Transformer2DModel(**config_of(args)).to(dtype).eval()
    ours = Flux2Transformer(TransformerConfig.from_dict(dict(ref.config))).to(dtype).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def step_inputs(args: argparse.Namespace, dtype: torch.dtype, channels: int = 128, text_width: int = 3 * 512):
    """(img, txt, t, img_ids, txt_ids) of one step: a square grid of --tokens and --text text tokens."""
    side = int(args.tokens**0.5)
    txt_ids = torch.zeros(args.text, 4, dtype=torch.long)
    txt_ids[:, 3] = torch.arange(args.text)
    img = torch.randn(1, side * side, channels, dtype=dtype)
    txt = torch.randn(1, args.text, text_width, dtype=dtype)
    return img, txt, torch.tensor([0.7]), grid_ids(side, side), txt_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size_options(parser)
    parser.add_argument("--refs", type=int, default=1, help="reference images of the same size, for KV")
    args = parser.parse_args()
    dtype = fastest_dtype(args.dtype)
    ref, ours = pair(args, dtype)
    img, txt, t, img_ids, txt_ids = step_inputs(args, dtype)
    side = int(args.tokens**0.5)
    ref_ids = torch.cat([grid_ids(side, side, t=10 * (i + 1)) for i in range(args.refs)])
    refs = torch.randn(1, ref_ids.shape[0], 128, dtype=dtype)
    joint, joint_ids = torch.cat([img, refs], 1), torch.cat([img_ids, ref_ids])  # the references follow

    cases = {
        "text-to-image step": (
            lambda: ref(img, txt, t, img_ids, txt_ids, return_dict=False),
            lambda: ours(img, txt, t, img_ids, txt_ids),
        ),
        f"step with {args.refs} reference(s)": (
            lambda: ref(joint, txt, t, joint_ids, txt_ids, return_dict=False),
            lambda: ours(joint, txt, t, joint_ids, txt_ids, out_tokens=img.shape[1]),
        ),
    }
    print(
        f"D={ref.inner_dim} double={args.layers} single={args.single_layers} img={side * side} "
        f"txt={args.text} dtype={dtype} threads={torch.get_num_threads()}"
    )
    with torch.inference_mode():
        for name, (theirs_fn, ours_fn) in cases.items():
            a, b = side_by_side(theirs_fn, ours_fn, args.repeats)
            print(
                f"{name:28s} diffusers {a * 1e3:8.1f} ms   fluxforge {b * 1e3:8.1f} ms   "
                f"speed-up {a / b:5.2f}x"
            )

        # Reference KV: later steps reuse the cached reference K/V instead of recomputing reference tokens.
        kv = ours.forward_extract(
            torch.cat([refs, img], 1), txt, t, torch.cat([ref_ids, img_ids]), txt_ids, ref_ids.shape[0]
        ).reference_kv
        a, b = side_by_side(
            lambda: ours(joint, txt, t, joint_ids, txt_ids, out_tokens=img.shape[1]),
            lambda: ours(img, txt, t, img_ids, txt_ids, reference_kv=kv),
            args.repeats,
        )
        print(
            f"{'fluxforge KV cached step':28s} full refs {a * 1e3:8.1f} ms   cached    {b * 1e3:8.1f} ms   "
            f"speed-up {a / b:5.2f}x  (cache {kv.nbytes / 2**20:.1f} MiB)"
        )


if __name__ == "__main__":
    main()
