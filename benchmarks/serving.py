"""What a server repeats, against diffusers 0.42.1 side by side in one run: the same references with new
prompts on klein KV, repeated prompts, base klein with CFG; with fluxforge's cache counters.

    python benchmarks/serving.py [--dtype float32] [--repeats 3] [--size 256] [--ref-size 512] [--only KV]

The checkpoint is generate.py's random klein (saved as klein, klein KV and klein base, the same weights),
with the proportions that decide these results: the text encoder costs per token about 0.75x the
transformer (Qwen3 8 x 384 against 2 + 4 blocks of width 512, as Qwen3-4B's 27 used layers against klein
4B), and the references (512 x 512) are larger than the output (256 x 256), as in edits. fp32 by default:
the targets are stated for a CPU without native bf16.

The VAE (channels 32, 64, 128, 128, one resnet block per level) encodes the 4 references in 184 GFLOP, 0.37
of the transformer's first KV step (491 GFLOP); in klein 9B KV that share is 0.056 (4.5 of 80 TFLOP,
counted with torch's FlopCounterMode on the real configs), and in the setting issue 10 measured, 1.0 (the
VAE 5.2 s against 5 s). The timed share depends on the CPU (kv_stages.py measures it): 0.53 on an Intel
Xeon with AMX, 0.28 on an AMD EPYC (Zen 5); --vae-layers N gives the VAE N resnet blocks per level, and the
issue's share is near --vae-layers 2 to 3 on that Xeon (0.77, 1.31) and --vae-layers 4 on that EPYC (1.09).
How much a cached reference saves moves with that share.

"floor" for cached references: the unavoidable stages of that same fluxforge call, from its own timings:
the new prompt's text encoding, the denoising steps (with the cached reference K/V) and the decode; the
rest of the call (validation, image preparation and hashing, cache lookups) is the overhead over it.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import Flux2KleinKVPipeline, Flux2KleinPipeline
from generate import TEXT_LAYERS, build, model_options, picture, quiet
from sidebyside import fastest_dtype, side_by_side

import fluxforge as ff

PROMPTS = itertools.count()


def new_prompt() -> str:
    return f"a red fox in the snow, golden hour, 35mm photograph, take {next(PROMPTS)}"


def theirs_call(pipe, args, prompt: str, images=None, steps=None, guidance=None) -> None:
    extra = {} if guidance is None else {"guidance_scale": guidance}
    pipe(
        image=images or None,
        prompt=prompt,
        height=args.size,
        width=args.size,
        num_inference_steps=steps or args.steps,
        generator=torch.Generator().manual_seed(0),
        text_encoder_out_layers=TEXT_LAYERS,
        **extra,
    )


def ours_call(pipe: ff.Pipeline, args, prompt: str, images=None, steps=None) -> ff.GenerationResult:
    return pipe.generate(
        prompt, references=images or (), width=args.size, height=args.size, steps=steps or args.steps, seed=0
    )


ONLY: list[str] = []  # --only: the scenarios whose names hold one of these


def row(name: str, theirs: Callable[[], object], ours: Callable[[], object], repeats: int) -> float | None:
    if ONLY and not any(part in name for part in ONLY):
        return None
    a, b = side_by_side(theirs, ours, repeats)
    print(f"{name:52s} {a:8.2f} s {b:8.2f} s {a / b:8.2f}x", flush=True)
    return a / b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="float32")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--ref-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", action="append", default=[], help="run the scenarios whose names hold this")
    model_options(parser, text_hidden=384)
    args = parser.parse_args()
    ONLY.extend(args.only)
    quiet()
    dtype = fastest_dtype(args.dtype)
    refs = [picture(args.ref_size, seed) for seed in range(4)]
    print(
        f"D={args.heads * 128} double={args.double} single={args.single} text=Qwen3 8x{args.text_hidden} "
        f"VAE layers per block {args.vae_layers} "
        f"out {args.size}x{args.size} refs {args.ref_size}x{args.ref_size} steps={args.steps} {dtype} "
        f"threads={torch.get_num_threads()} repeats={args.repeats} (medians, alternating)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        klein_dir, kv_dir = build(Path(tmp), args)
        base_dir = Path(tmp) / "base"
        load = dict(dtype=dtype, text_encoder_out_layers=TEXT_LAYERS)
        theirs = {
            "klein": Flux2KleinPipeline.from_pretrained(klein_dir, dtype=dtype),
            "kv": Flux2KleinKVPipeline.from_pretrained(kv_dir, dtype=dtype),
            "base": Flux2KleinPipeline.from_pretrained(base_dir, dtype=dtype),
        }
        for pipe in theirs.values():
            pipe.set_progress_bar_config(disable=True)
        ours = {name: ff.Pipeline.from_pretrained(folder, **load) for name, folder in
                (("klein", klein_dir), ("kv", kv_dir), ("base", base_dir))}  # fmt: skip
        print(f"{'':52s} {'diffusers':>10s} {'fluxforge':>10s} {'speed-up':>9s}")

        # Cold: every cache emptied before each call (what every request cost before the caches).
        def cold(pipe, *a, **k):
            pipe.caches.clear()
            return ours_call(pipe, args, *a, **k)

        row("text-to-image, cold", lambda: theirs_call(theirs["klein"], args, new_prompt()),
            lambda: cold(ours["klein"], new_prompt()), args.repeats)  # fmt: skip
        row("4 references, cold", lambda: theirs_call(theirs["klein"], args, new_prompt(), refs),
            lambda: cold(ours["klein"], new_prompt(), refs), args.repeats)  # fmt: skip
        row("KV, 4 references, cold", lambda: theirs_call(theirs["kv"], args, new_prompt(), refs),
            lambda: cold(ours["kv"], new_prompt(), refs), args.repeats)  # fmt: skip

        # Warm references, a new prompt every call.
        kv = ours["kv"]
        kv.caches.clear()
        ours_call(kv, args, new_prompt(), refs)
        results: list[ff.GenerationResult] = []
        row("KV, 4 cached references, new prompt",
            lambda: theirs_call(theirs["kv"], args, new_prompt(), refs),
            lambda: results.append(ours_call(kv, args, new_prompt(), refs)), args.repeats)  # fmt: skip
        if results:  # the row ran (not skipped by --only)
            # the median call by its own total, as the row's time is a median (one call may be disturbed)
            median = sorted(results, key=lambda r: sum(r.info["timings"].values()))[len(results) // 2]
            t = median.info["timings"]
            floor = t["text"] + t["denoise"] + t["decode"]
            total = sum(t.values())
            print(f"  cache counters of that call: {median.info['cache']}")
            print(
                f"  its floor (text {t['text']:.2f} + denoise {t['denoise']:.2f} + decode {t['decode']:.2f}) "
                f"{floor:.2f} s; the call {total:.2f} s = floor + {total / floor - 1:.1%}"
            )

        def four_prompts(call):
            def run():
                kv.caches.clear()
                for _ in range(4):
                    call()

            return run

        row("KV, 4 prompts on the same 4 references (1st cold)",
            four_prompts(lambda: theirs_call(theirs["kv"], args, new_prompt(), refs)),
            four_prompts(lambda: ours_call(kv, args, new_prompt(), refs)), args.repeats)  # fmt: skip

        # The same prompt again (the text encoder does not run).
        ours["klein"].caches.clear()
        row("text-to-image, repeated prompt", lambda: theirs_call(theirs["klein"], args, "a fox"),
            lambda: ours_call(ours["klein"], args, "a fox"), args.repeats)  # fmt: skip

        # Base klein with CFG: the empty negative prompt is encoded once; batched CFG on and off.
        base = ours["base"]
        for steps in (4, 28):
            for batched in (False, True):
                base.batch_cfg = batched
                row(f"base klein, CFG, {steps} steps, new prompt, batched CFG {'on' if batched else 'off'}",
                    lambda s=steps: theirs_call(theirs["base"], args, new_prompt(), steps=s, guidance=4.0),
                    lambda s=steps: ours_call(base, args, new_prompt(), steps=s),
                    max(1, args.repeats - (steps > 4)))  # fmt: skip
        base.batch_cfg = False
        print("cache totals:", {name: p.caches.stats() for name, p in ours.items()})


if __name__ == "__main__":
    main()
