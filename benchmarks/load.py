"""Peak memory of loading a FLUX.2 checkpoint, and of loading it and making one picture, against diffusers.

A random klein-shaped checkpoint in the diffusers layout (klein 4B's block counts and head dim at a smaller
width, the real VAE config, a Qwen3 of klein's 36 layers read at 9, 18, 27, narrower) is built in a child
process and saved to a temporary folder. Each case then runs in a process of its own and reports its peak
RSS (`ru_maxrss`); the parent never imports torch, because a child's `ru_maxrss` starts at its parent's peak.
Printed: each peak minus that of a bare `import torch, transformers` process, divided by the size of the
weights each library loads (fluxforge skips the text encoder's unread layers) and by the size on disk.

    python benchmarks/load.py [--width 640] [--dtype float32] [--size 64]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()
PROMPT = "a red fox in the snow"
LAYERS = (9, 18, 27)


def build(folder: Path, width: int) -> None:
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    sys.path.insert(0, str(HERE.parents[1] / "tests"))
    from tiny_text import qwen3_tokenizer

    torch.manual_seed(0)
    text = Qwen3Config(
        vocab_size=512,  # the byte tokenizer's tokens fit; a 151936-row table would be most of the file
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=36,  # as Qwen3-4B and -8B: layers 28-36 are never read by FLUX.2
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    )
    Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
        vae=AutoencoderKLFlux2().eval(),
        text_encoder=Qwen3ForCausalLM(text).eval(),
        tokenizer=qwen3_tokenizer(),
        transformer=Flux2Transformer2DModel(
            num_layers=5,
            num_single_layers=20,
            num_attention_heads=width // 128,
            attention_head_dim=128,
            joint_attention_dim=3 * 256,
            guidance_embeds=False,
        ).eval(),
        is_distilled=True,
    ).save_pretrained(folder)


def fluxforge_reads(folder: Path) -> int:
    """Bytes in fp32 of the tensors fluxforge loads: all of the transformer and VAE, and the text encoder's
    embedding and first 27 layers (diffusers loads all 36 and the LM head)."""
    from fluxforge import files

    f = files.find(folder, dtype="float32")
    return sum(
        part.tensors.nbytes(None, keys)
        for part, keys in (
            (f.transformer, None),
            (f.vae, None),
            (f.text, [k for k in f.text.tensors if f.text.read(k)]),
        )
    )


def case(name: str, folder: Path, dtype: str, size: int) -> None:
    """One measurement, in this (child) process."""
    import torch
    import transformers  # noqa: F401  (in every case, as in the baseline)

    torch.set_num_threads(2)
    if name.startswith("fluxforge"):
        import fluxforge as ff

        if name == "fluxforge-load":
            ff.load(folder, dtype=dtype)
        else:
            pipe = ff.Pipeline.from_pretrained(folder, dtype=dtype)
            pipe.generate(PROMPT, width=size, height=size, seed=0)
    elif name.startswith("diffusers"):
        from diffusers import Flux2KleinPipeline

        pipe = Flux2KleinPipeline.from_pretrained(folder, torch_dtype=getattr(torch, dtype))
        if name == "diffusers-generate":
            pipe(
                prompt=PROMPT,
                width=size,
                height=size,
                num_inference_steps=4,
                generator=torch.Generator().manual_seed(0),
                text_encoder_out_layers=LAYERS,
            )
    print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def run(*args: str) -> dict:
    done = subprocess.run([sys.executable, str(HERE), *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=640, help="transformer width (multiple of 128)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--size", type=int, default=64, help="side of the one generated picture")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, folder = args.child
        if name == "build":
            build(Path(folder), args.width)
            print(json.dumps({"read_fp32": fluxforge_reads(Path(folder))}))
        else:
            case(name, Path(folder), args.dtype, args.size)
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "klein"
        read = run("--child", "build", str(folder), "--width", str(args.width))["read_fp32"]
        on_disk = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
        half = args.dtype != "float32"  # the checkpoint is fp32
        weights = {"fluxforge": read // 2 if half else read, "diffusers": on_disk // 2 if half else on_disk}
        common = ["--dtype", args.dtype, "--size", str(args.size)]
        base = run("--child", "baseline", str(folder), *common)["peak_kib"]
        print(
            f"checkpoint: {on_disk / 2**20:,.0f} MiB on disk (fp32); weights as loaded in {args.dtype}: "
            f"fluxforge {weights['fluxforge'] / 2**20:,.0f} MiB, "
            f"diffusers {weights['diffusers'] / 2**20:,.0f} MiB; "
            f"bare `import torch, transformers`: {base / 1024:,.0f} MiB peak RSS"
        )
        print(f"{'case':<20}{'peak - bare (MiB)':>20}{'/ own weights':>16}{'/ size on disk':>16}")
        extra = {}
        for name in ("fluxforge-load", "diffusers-load", "fluxforge-generate", "diffusers-generate"):
            extra[name] = (run("--child", name, str(folder), *common)["peak_kib"] - base) * 1024
            own = extra[name] / weights[name.split("-")[0]]
            print(f"{name:<20}{extra[name] / 2**20:>20,.0f}{own:>16.2f}{extra[name] / on_disk:>16.2f}")
        ratio = extra["diffusers-generate"] / extra["fluxforge-generate"]
        print(f"load + generate: diffusers holds {ratio:.2f}x what fluxforge holds beyond the interpreter")


if __name__ == "__main__":
    main()
