"""Prompt encoding, fluxforge against diffusers 0.42.1, side by side in one run; and the weights the
truncated encoders never load, counted on the meta device for the real Qwen3-4B / 8B and Mistral Small.

diffusers runs the whole causal LM (every layer and the LM head, for all 512 tokens) and keeps three
hidden states; fluxforge runs only up to the deepest layer used. Weights are random and the width is
scaled down so the run fits this machine; the layer count and vocabulary are Qwen3's.

    python benchmarks/bench_text_encoder.py [--hidden 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import Flux2KleinPipeline
from transformers import Mistral3ForConditionalGeneration, Qwen3Config, Qwen3ForCausalLM

from fluxforge.config import MISTRAL_SMALL, QWEN3_4B, QWEN3_8B
from fluxforge.model.text import TextEncoder, encode_prompts
from fluxforge.tokenizer import ChatTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from sidebyside import fastest_dtype, side_by_side  # noqa: E402  (benchmarks/, on sys.path when run as a script)
from tiny_text import qwen3_tokenizer, real_mistral_small_config, real_qwen3_config  # noqa: E402

PROMPTS = ["a red fox in the snow, golden hour, 35mm photograph"]


def real_sizes() -> None:
    configs = {
        "Qwen3-4B (klein 4B)": (real_qwen3_config("4B"), QWEN3_4B.out_layers),
        "Qwen3-8B (klein 9B)": (real_qwen3_config("8B"), QWEN3_8B.out_layers),
        "Mistral Small 3.x (dev)": (real_mistral_small_config(), MISTRAL_SMALL.out_layers),
    }
    for name, (config, layers) in configs.items():
        full_class = Qwen3ForCausalLM if isinstance(config, Qwen3Config) else Mistral3ForConditionalGeneration
        with torch.device("meta"):
            full = full_class(config)
            ours = TextEncoder(config, layers)
        n_full = sum(p.numel() for p in full.parameters())
        n_ours = sum(p.numel() for p in ours.parameters())
        print(
            f"{name:24s} full model {n_full / 1e9:6.2f} B params   loaded {n_ours / 1e9:6.2f} B   "
            f"({100 * (1 - n_ours / n_full):.0f}% never read)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        help="default: bf16 where this CPU has it natively, else fp32",
    )
    args = parser.parse_args()
    dtype = fastest_dtype(args.dtype)
    real_sizes()

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=151936,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=36,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=4,
        head_dim=64,
    )
    full = Qwen3ForCausalLM._from_config(config, dtype=dtype).eval()  # as from_pretrained: RoPE stays fp32
    tokenizer = qwen3_tokenizer()
    chat_tokenizer = ChatTokenizer.from_transformers(tokenizer)
    pipe = Flux2KleinPipeline(
        scheduler=None, vae=None, text_encoder=full, tokenizer=tokenizer, transformer=None
    )
    with torch.device("meta"):
        ours = TextEncoder(config, QWEN3_4B.out_layers)
    state = {k: full.state_dict()[names[0]] for k, names in ours.checkpoint_keys().items()}
    ours.load_state_dict(state, assign=True, strict=True)

    def theirs_fn():
        layers = QWEN3_4B.out_layers
        return pipe.encode_prompt(PROMPTS, max_sequence_length=512, text_encoder_out_layers=layers)[0]

    def ours_fn():
        return encode_prompts(ours, chat_tokenizer, PROMPTS, max_sequence_length=512).embeds

    with torch.inference_mode():
        assert torch.equal(theirs_fn(), ours_fn())  # same numbers, not merely close
        a, b = side_by_side(theirs_fn, ours_fn, args.repeats)
    print(
        f"encode 1 prompt, 512 tokens, Qwen3 36 layers, hidden {args.hidden}, {dtype}: "
        f"diffusers {a * 1e3:.0f} ms   fluxforge {b * 1e3:.0f} ms   speed-up {a / b:.2f}x"
    )


if __name__ == "__main__":
    main()
