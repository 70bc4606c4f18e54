"""Seconds per image of `Pipeline.generate` against the diffusers 0.42.1 pipelines, side by side in one run.

Cases: text-to-image, 1 reference, 4 references (Flux2KleinPipeline), and the KV variant with 4 references
(Flux2KleinKVPipeline), then the KV variant against the plain one within each library. One random klein
checkpoint, small but with the real structure: head dim 128 and the real RoPE axes, the VAE's 8x spatial
factor (4 levels) and 32 latent channels, a Qwen3 text encoder read at three layers, 512 text tokens. It is
built with diffusers, saved as a klein and as a klein KV folder (the same weights), and both libraries load
it from disk. Each case times a whole call, prompt to PIL image, the two alternating (medians), after
checking that both give the same image for the same seed: the final latents before the VAE and the decoded
pixels. fluxforge's caches are emptied before each of its calls, so that every call does all its work. In
bf16 the latents are equal and the pixels differ by the rounding of fluxforge's channels-last VAE; --dtype
float32 is the exact mode.

The text encoder's vocabulary is cut to the byte tokenizer's size: diffusers computes the LM head and
fluxforge does not, and at this width a 151936-row head would dwarf everything else and flatter fluxforge.

    python benchmarks/generate.py [--dtype bfloat16] [--size 256] [--steps 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinKVPipeline,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
)
from diffusers.utils import logging as diffusers_logging
from transformers import Qwen3Config, Qwen3ForCausalLM
from transformers.utils import logging as transformers_logging

import fluxforge as ff

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from sidebyside import fastest_dtype, side_by_side  # noqa: E402  (benchmarks/, on sys.path when run as a script)
from tiny_text import qwen3_tokenizer  # noqa: E402

PROMPT = "a red fox in the snow, golden hour, 35mm photograph"
TEXT_LAYERS = (2, 4, 6)  # an 8-layer Qwen3 is too shallow for diffusers' default: both libraries are told


def build(folder: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """Random weights (each module's default init), saved as a klein folder and as a klein KV folder, and
    (the same weights) as a klein base folder in folder / "base"."""
    torch.manual_seed(0)
    text = Qwen3Config(
        vocab_size=512,  # the byte tokenizer's 256 bytes and a few special tokens fit
        hidden_size=args.text_hidden,
        intermediate_size=3 * args.text_hidden,
        num_hidden_layers=8,
        num_attention_heads=args.text_hidden // 64,
        num_key_value_heads=2,
        head_dim=64,
    )
    parts = dict(
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential"
        ),
        vae=AutoencoderKLFlux2(
            block_out_channels=(32, 64, 128, 128), layers_per_block=getattr(args, "vae_layers", 1)
        ).eval(),
        text_encoder=Qwen3ForCausalLM(text).eval(),
        tokenizer=qwen3_tokenizer(),
        transformer=Flux2Transformer2DModel(
            num_layers=args.double,
            num_single_layers=args.single,
            num_attention_heads=args.heads,
            attention_head_dim=128,
            joint_attention_dim=3 * args.text_hidden,
            guidance_embeds=False,
        ).eval(),
    )
    Flux2KleinPipeline(**parts, is_distilled=True).save_pretrained(folder / "klein")
    Flux2KleinKVPipeline(**parts).save_pretrained(folder / "kv")
    Flux2KleinPipeline(**parts, is_distilled=False).save_pretrained(folder / "base")
    return folder / "klein", folder / "kv"


def model_options(parser: argparse.ArgumentParser, text_hidden: int) -> None:
    """The checkpoint's shape, as `build` reads it."""
    parser.add_argument("--heads", type=int, default=4, help="transformer heads of 128 channels")
    parser.add_argument("--double", type=int, default=2, help="double-stream blocks")
    parser.add_argument("--single", type=int, default=4, help="single-stream blocks")
    parser.add_argument("--text-hidden", type=int, default=text_hidden, help="Qwen3 width")
    parser.add_argument("--vae-layers", type=int, default=1, help="the VAE's resnet blocks per level")


def quiet() -> None:
    """No progress bars, and not diffusers' "guidance is ignored" notice for distilled models."""
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def picture(size: int, seed: int) -> PIL.Image.Image:
    """Smooth random colours, so that the VAE sees an image rather than pixel noise."""
    gen = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, 8, 8, generator=gen)
    big = torch.nn.functional.interpolate(small, size=(size, size), mode="bicubic").clamp(0, 1)
    return PIL.Image.fromarray((big[0].permute(1, 2, 0) * 255).to(torch.uint8).numpy())


Theirs = Flux2KleinPipeline | Flux2KleinKVPipeline
Pair = tuple[Theirs, ff.Pipeline]  # the same checkpoint loaded by both libraries


def run_theirs(
    pipe: Theirs,
    images: list[PIL.Image.Image],
    args: argparse.Namespace,
    output_type: str = "pil",
    on_step: Callable[..., dict] | None = None,
) -> Any:
    """One diffusers call, prompt to images (PIL by default)."""
    return pipe(
        image=images or None,
        prompt=PROMPT,
        height=args.size,
        width=args.size,
        num_inference_steps=args.steps,
        generator=torch.Generator().manual_seed(0),
        output_type=output_type,
        callback_on_step_end=on_step,
        text_encoder_out_layers=TEXT_LAYERS,
    ).images


def run_ours(
    pipe: ff.Pipeline, images: list[PIL.Image.Image], args: argparse.Namespace
) -> ff.GenerationResult:
    pipe.caches.clear()  # every call cold, as diffusers' are: serving.py measures what the caches save
    return pipe.generate(
        PROMPT, references=images, height=args.size, width=args.size, steps=args.steps, seed=0
    )


def difference(
    theirs: Theirs, ours: ff.Pipeline, images: list[PIL.Image.Image], args: argparse.Namespace
) -> str:
    """How far apart the two results are: the final packed latents (before the VAE) and the decoded
    pixels in [0, 1]."""
    latents = []
    expected = run_theirs(
        theirs, images, args, "pt", lambda pipe, i, t, kw: latents.append(kw["latents"]) or {}
    )
    got = run_ours(ours, images, args)
    latent_err = (latents[-1].float() - got.latents.float()).abs().max().item()
    pixel_err = (expected.float() - (got.pixels.float() / 2 + 0.5).clamp(0, 1)).abs()
    return (
        f"latents {latent_err:.2g}, pixels {pixel_err.max().item():.2g} (mean {pixel_err.mean().item():.2g})"
    )


def report(klein: Pair, kv: Pair, refs: list[PIL.Image.Image], args: argparse.Namespace) -> None:
    """Check and time every case, then the KV variant against the plain one within each library."""
    for pipe in (klein[0], kv[0]):
        pipe.set_progress_bar_config(disable=True)
    cases = {
        "text-to-image": (klein, []),
        "1 reference": (klein, refs[:1]),
        "4 references": (klein, refs),
        "KV, 4 references": (kv, refs),
    }
    print(f"{'':18s} {'diffusers':>10s} {'fluxforge':>10s} {'speed-up':>9s}   same image? max abs diff")
    for name, ((theirs, ours), images) in cases.items():
        diff = difference(theirs, ours, images, args)
        a, b = side_by_side(
            partial(run_theirs, theirs, images, args), partial(run_ours, ours, images, args), args.repeats
        )
        print(f"{name:18s} {a:8.2f} s {b:8.2f} s {a / b:8.2f}x   {diff}")

    # The KV goal is a ratio within one library, so time the two variants against each other too.
    for library, run, plain, cached in (
        ("fluxforge", run_ours, klein[1], kv[1]),
        ("diffusers", run_theirs, klein[0], kv[0]),
    ):
        a, b = side_by_side(partial(run, plain, refs, args), partial(run, cached, refs, args), args.repeats)
        print(f"{library} KV against plain, 4 references: {a:.2f} s / {b:.2f} s = {a / b:.2f}x faster")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        help="default: bf16 where the CPU has it natively, else fp32",
    )
    parser.add_argument("--size", type=int, default=256, help="output and reference side in pixels")
    parser.add_argument("--steps", type=int, default=4)
    model_options(parser, text_hidden=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    quiet()
    dtype = fastest_dtype(args.dtype)
    refs = [picture(args.size, seed) for seed in range(4)]
    print(
        f"D={args.heads * 128} double={args.double} single={args.single} text=Qwen3 8x{args.text_hidden} "
        f"out {args.size}x{args.size} refs {args.size}x{args.size} steps={args.steps} {dtype} "
        f"threads={torch.get_num_threads()} repeats={args.repeats}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        klein_dir, kv_dir = build(Path(tmp), args)
        klein = (
            Flux2KleinPipeline.from_pretrained(klein_dir, dtype=dtype),
            ff.Pipeline.from_pretrained(klein_dir, dtype=dtype, text_encoder_out_layers=TEXT_LAYERS),
        )
        kv = (
            Flux2KleinKVPipeline.from_pretrained(kv_dir, dtype=dtype),
            ff.Pipeline.from_pretrained(kv_dir, dtype=dtype, text_encoder_out_layers=TEXT_LAYERS),
        )
        report(klein, kv, refs, args)  # while the folder exists: loaded weights may map its files


if __name__ == "__main__":
    main()
