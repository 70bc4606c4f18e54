"""Train the built-in demo model (variant `fluxforge-demo`) from scratch on procedural scenes, on the CPU.

    python tools/train_demo.py --threads 2           # writes src/fluxforge/demo/weights/ (about an hour)
    python tools/train_demo.py --out /tmp/demo --vae-minutes 1 --dit-minutes 2 --decoder-minutes 1   # smoke
    python tools/train_demo.py --resume-dit --dit-minutes 10     # more DiT training on the packaged weights

Stages, all from one seed:
  1. tokenizer: byte-level BPE (Qwen2 style) built offline, with one merged token per caption word;
  2. text encoder: a 2-layer Qwen3 at a fixed random initialisation, never trained: its hidden states keep
     every word apart, and the DiT learns to read them;
  3. VAE (`AutoencoderKLFlux2` layout): L1 + MSE reconstruction with a small KL term, then the latent
     statistics (`bn.running_mean` / `running_var`) measured on fresh scenes;
  4. DiT (`Flux2Transformer2DModel` layout): rectified flow, x_s = (1 - s) x0 + s noise, target noise - x0,
     s logit-normal, on packed normalized tokens with the pipeline's position ids; edit examples append
     their references with T = 10, 20; 10% of captions are dropped for classifier-free guidance; the
     tokens the shape covers weigh 1 + 8 x their share of shape pixels in the loss (without that, the
     model learned backgrounds and positions but got the shape's colour right only 70% of the time);
  5. decoder: the VAE decoder alone, on the frozen encoder's latents, until its colours are exact. It does not
     change the latents, so `--decoder-only` can rerun it on a finished folder.

The packaged weights are one run of `python tools/train_demo.py --threads 2` on this project's 2-core
machine: 58 minutes, 1294 VAE, 7609 DiT and 7653 decoder steps.

Stages are budgeted in wall-clock minutes, so the number of steps depends on the machine; the folder is
rewritten after the VAE stage and every few minutes of DiT training, so an interrupted run leaves a usable
checkpoint. Everything runs through fluxforge's own networks and helpers, the ones the pipeline samples with.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from torch import Tensor
from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM

from fluxforge.conditioning import REFERENCE_T_STEP, grid_ids
from fluxforge.config import DEMO
from fluxforge.demo import DEMO_PATH, data
from fluxforge.model.autoencoder import AutoEncoder, patchify
from fluxforge.model.text import TextEmbeddings, TextEncoder, encode_prompts
from fluxforge.model.transformer import Flux2Transformer
from fluxforge.tokenizer import ChatTokenizer
from fluxforge.weights import load, load_vae

QWEN3_CHAT_TEMPLATE = (  # Qwen3's template, reduced to what klein uses: user turns, thinking off
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
# Share of each task in DiT batches; the rest is text-to-image.
EDIT_SHARES = {"recolour": 0.2, "move": 0.15, "combine": 0.15}
DROP_CAPTION = 0.1


def build_tokenizer() -> Qwen2TokenizerFast:
    """A Qwen2-style byte-level BPE tokenizer, trained offline on the caption vocabulary: every caption
    word after a space is one token ("a red circle" is three), and any other text still tokenizes, byte by
    byte. The BPE trainer orders the merges so that no word's merges break another's."""
    corpus = " ".join((*data.VOCABULARY, "user", "assistant"))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator([corpus, " " + corpus], trainer)
    learned = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2TokenizerFast(
        vocab=learned["vocab"],
        merges=[tuple(m) for m in learned["merges"]],
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    specials = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def build_text_encoder(vocab_size: int, seed: int) -> Qwen3ForCausalLM:
    te = DEMO.text_encoder
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=te.hidden_size,
        intermediate_size=2 * te.hidden_size,
        num_hidden_layers=te.num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=te.hidden_size // 4,
        max_position_embeddings=DEMO.defaults.max_sequence_length,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        # Unit-scale embeddings: with the default std 0.02 the hidden states would be tiny next to the DiT's
        # other inputs and the first steps of training would only rescale them.
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
    return model.eval()


def frozen_encoder(model: Qwen3ForCausalLM) -> TextEncoder:
    encoder = TextEncoder(model.config, DEMO.text_encoder.out_layers)
    state = {k: v for k, v in model.state_dict().items() if k.startswith("model.")}
    encoder.load_state_dict({"lm." + k.removeprefix("model."): v for k, v in state.items()}, strict=True)
    return encoder.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------
# Data


def batch_pixels(scenes: list[data.Scene]) -> Tensor:
    return torch.from_numpy(np.stack([data.to_array(s.render()) for s in scenes]))


def vae_batch(rng: np.random.Generator, n: int) -> Tensor:
    return batch_pixels([data.random_scene(rng) for _ in range(n)])


def dit_examples(rng: np.random.Generator, n: int) -> list[data.Example]:
    """One task for the whole batch, so every example has the same number of reference tokens."""
    u, task = rng.random(), None
    for name, share in EDIT_SHARES.items():
        if u < share:
            task = name
            break
        u -= share
    if task is None:
        return [data.text_to_image(rng) for _ in range(n)]
    return [data.EDITS[task](rng, data.random_scene(rng)) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------
# Training


def vae_loss(vae: AutoEncoder, x: Tensor) -> Tensor:
    moments = vae.encoder(x)
    if vae.quant_conv is not None:
        moments = vae.quant_conv(moments)
    mean, logvar = moments.float().chunk(2, dim=1)
    logvar = logvar.clamp(-20.0, 10.0)
    z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
    recon = vae.decode(z).float()
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
    return (recon - x).abs().mean() + (recon - x).square().mean() + 1e-4 * kl


def train_vae(vae: AutoEncoder, rng: np.random.Generator, minutes: float, batch: int) -> int:
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    end, step = time.monotonic() + 60 * minutes, 0
    while time.monotonic() < end:
        x = vae_batch(rng, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = vae_loss(vae, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            print(f"vae step {step} loss {loss.item():.4f}", flush=True)
    vae.eval().requires_grad_(False)
    return step


def train_decoder(vae: AutoEncoder, rng: np.random.Generator, minutes: float, batch: int) -> int:
    """Go on training the decoder alone. The encoder and the latent statistics stay as they are, so a DiT
    trained on this VAE's latents stays valid; the decoder learns the exact palette colours, which the
    joint stage leaves a little off (yellow drifting to orange)."""
    params = [*vae.decoder.parameters(), *(vae.post_quant_conv.parameters() if vae.post_quant_conv else ())]
    for p in params:
        p.requires_grad_(True)
    vae.decoder.train()
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    end, step = time.monotonic() + 60 * minutes, 0
    while time.monotonic() < end:
        x = vae_batch(rng, batch)
        with torch.no_grad():
            moments = vae.encoder(x)
            if vae.quant_conv is not None:
                moments = vae.quant_conv(moments)
            mean, logvar = moments.chunk(2, dim=1)
            z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar.clamp(-20.0, 10.0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            recon = vae.decode(z).float()
        loss = (recon - x).abs().mean() + (recon - x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            print(f"decoder step {step} loss {loss.item():.4f}", flush=True)
    vae.eval().requires_grad_(False)
    return step


@torch.no_grad()
def set_latent_stats(vae: AutoEncoder, rng: np.random.Generator, n: int = 512) -> None:
    """The `bn` statistics that make normalized tokens zero-mean, unit-variance per channel."""
    z = torch.cat([patchify(vae.encode(vae_batch(rng, 64)), vae.config.patch_size) for _ in range(n // 64)])
    vae.bn.running_mean.copy_(z.mean(dim=(0, 2, 3)))
    vae.bn.running_var.copy_(z.var(dim=(0, 2, 3)))


class TextCache:
    """Caption -> DiT text tokens [1, L, D]: the encoder is frozen and captions repeat."""

    def __init__(self, encoder: TextEncoder, tokenizer: Qwen2TokenizerFast) -> None:
        self.encoder, self.cache = encoder, dict[str, Tensor]()
        self.tokenizer = ChatTokenizer.from_transformers(tokenizer)

    def __call__(self, captions: list[str]) -> Tensor:
        new = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if new:
            out = encode_prompts(self.encoder, self.tokenizer, new, DEMO.defaults.max_sequence_length)
            self.cache.update(zip(new, out.embeds.split(1), strict=True))
        return torch.cat([self.cache[c] for c in captions])


def dit_step(
    model: Flux2Transformer,
    vae: AutoEncoder,
    text: TextCache,
    examples: list[data.Example],
    rng: np.random.Generator,
    foreground_weight: float = 0.0,
) -> Tensor:
    """The rectified-flow loss of one batch. With `foreground_weight` w, a token's squared error counts
    1 + w * (its share of shape pixels) times: the shape covers about 6% of the tokens, so a plain mean
    spends nearly all of the loss on backgrounds and learns the shape's colour last."""
    n = len(examples)
    captions = ["" if rng.random() < DROP_CAPTION else e.caption for e in examples]
    with torch.no_grad():
        targets = batch_pixels([e.target for e in examples])
        x0 = vae.encode_tokens(targets)  # [B, 64, 16]
        refs = [
            vae.encode_tokens(batch_pixels([e.references[k] for e in examples]))
            for k in range(len(examples[0].references))
        ]
        txt = text(captions)
    side = data.SIZE // (vae.config.spatial_scale * vae.config.patch_size[0])
    img_ids = grid_ids(side, side)
    ids = torch.cat([img_ids, *(grid_ids(side, side, REFERENCE_T_STEP * (k + 1)) for k in range(len(refs)))])
    sigma = torch.sigmoid(torch.randn(n))  # logit-normal: most steps where the picture's layout is decided
    noise = torch.randn_like(x0)
    s = sigma.view(n, 1, 1)
    xt = (1 - s) * x0 + s * noise
    txt_ids = torch.zeros(txt.shape[1], 4, dtype=torch.int64)
    txt_ids[:, 3] = torch.arange(txt.shape[1])
    embeddings = TextEmbeddings(txt, txt_ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.cat([xt, *refs], dim=1), embeddings.embeds, sigma, ids, embeddings.ids)
    error = (out[:, : x0.shape[1]].float() - (noise - x0)).square().mean(-1)  # [B, tokens]
    weight = 1.0 + foreground_weight * shape_share(targets, [e.target.background for e in examples])
    return (weight * error).sum() / weight.sum()


def shape_share(pixels: Tensor, backgrounds: list[str]) -> Tensor:
    """[B, tokens]: the share of each DiT token's pixels that belong to the shape, in token order, from the
    rendered scenes [B, 3, H, W] (every pixel not of the background's exact colour)."""
    colours = np.array([data.COLOURS[b] for b in backgrounds], dtype=np.float32) / 127.5 - 1.0  # as to_array
    shape = (pixels != torch.from_numpy(colours)[:, :, None, None]).any(1, keepdim=True).float()
    return F.avg_pool2d(shape, data.TOKEN).flatten(1)


def train_dit(
    model: Flux2Transformer,
    vae: AutoEncoder,
    text: TextCache,
    rng: np.random.Generator,
    minutes: float,
    batch: int,
    save: Callable[[], None],
    peak_lr: float = 5e-4,
    foreground_weight: float = 0.0,
) -> int:
    model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.01)
    start = time.monotonic()
    end, next_save, step, avg = start + 60 * minutes, start + 300, 0, None
    while (now := time.monotonic()) < end:
        # Warm up for 100 steps, then cosine-decay over the time budget (not a step count: the speed varies).
        progress = (now - start) / (end - start)
        lr = peak_lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        loss = dit_step(model, vae, text, dit_examples(rng, batch), rng, foreground_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if step % 50 == 0:
            print(f"dit step {step} loss {avg:.4f} lr {lr:.2e} {now - start:.0f}s", flush=True)
        if now > next_save:
            save()
            next_save = now + 300
    model.eval().requires_grad_(False)
    return step


# ---------------------------------------------------------------------------------------------------------
# Saving in the diffusers layout


def save_module(folder: Path, module: Flux2Transformer | AutoEncoder, class_name: str) -> None:
    """A diffusers model folder: config.json and fp32 weights (the golden test runs in fp32)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": class_name, "_diffusers_version": "0.42.1", **module.config.to_dict()}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().float().contiguous() for k, v in module.state_dict().items()}
    save_file(state, folder / "diffusion_pytorch_model.safetensors")


def save_folder(
    out: Path,
    model: Flux2Transformer,
    vae: AutoEncoder,
    text_encoder: Qwen3ForCausalLM,
    tokenizer: Qwen2TokenizerFast,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    index = {
        "_class_name": "Flux2KleinPipeline",
        "_diffusers_version": "0.42.1",
        "is_distilled": DEMO.defaults.distilled,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3ForCausalLM"],
        "tokenizer": ["transformers", "Qwen2TokenizerFast"],
        "transformer": ["diffusers", "Flux2Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLFlux2"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    scheduler = {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "num_train_timesteps": DEMO.scheduler.num_train_timesteps,
        "shift": DEMO.scheduler.shift,
        "use_dynamic_shifting": DEMO.scheduler.use_dynamic_shifting,
    }
    save_module(out / "transformer", model, "Flux2Transformer2DModel")
    save_module(out / "vae", vae, "AutoencoderKLFlux2")
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
    text_encoder.save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(out / "tokenizer")
    print(f"saved {out}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEMO_PATH)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-minutes", type=float, default=6.0)
    parser.add_argument("--dit-minutes", type=float, default=42.0)
    parser.add_argument("--decoder-minutes", type=float, default=10.0)
    parser.add_argument(
        "--decoder-only",
        action="store_true",
        help="only the decoder stage, on the VAE already in --out (it can run beside a DiT stage)",
    )
    parser.add_argument(
        "--resume-dit",
        action="store_true",
        help="go on training the DiT in --out for --dit-minutes, from a peak learning rate of --resume-lr",
    )
    parser.add_argument("--resume-lr", type=float, default=2e-4)
    parser.add_argument(
        "--foreground-weight",
        type=float,
        default=8.0,
        help="extra loss weight of the tokens the shape covers (see dit_step; 0 is a plain mean)",
    )
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--dit-batch", type=int, default=32)
    # One thread by default: on a busy machine a descheduled OpenMP thread stalls every op of the others
    # (measured here: 2 threads next to another job ran 10x slower than 1 thread).
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    started = time.monotonic()
    if args.decoder_only:
        vae = load_vae(args.out / "vae", dtype=torch.float32)
        steps = train_decoder(vae, rng, args.decoder_minutes, args.vae_batch)
        save_module(args.out / "vae", vae, "AutoencoderKLFlux2")
        print(f"done: {steps} decoder steps in {(time.monotonic() - started) / 60:.1f} min")
        return
    if args.resume_dit:
        parts = load(args.out, dtype=torch.float32)
        assert parts.vae is not None and parts.text_encoder is not None

        def save_transformer() -> None:
            save_module(args.out / "transformer", parts.transformer, "Flux2Transformer2DModel")

        text = TextCache(parts.text_encoder, parts.tokenizer)
        steps = train_dit(
            parts.transformer,
            parts.vae,
            text,
            rng,
            args.dit_minutes,
            args.dit_batch,
            save_transformer,
            args.resume_lr,
            args.foreground_weight,
        )
        save_transformer()
        print(f"done: {steps} more DiT steps in {(time.monotonic() - started) / 60:.1f} min")
        return

    tokenizer = build_tokenizer()
    text_model = build_text_encoder(len(tokenizer), args.seed)
    text = TextCache(frozen_encoder(text_model), tokenizer)

    vae = AutoEncoder(DEMO.vae)
    transformer = Flux2Transformer(DEMO.transformer)
    vae_steps = train_vae(vae, rng, args.vae_minutes, args.vae_batch)
    set_latent_stats(vae, rng)
    save_folder(args.out, transformer, vae, text_model, tokenizer)

    def save() -> None:
        save_folder(args.out, transformer, vae, text_model, tokenizer)

    dit_steps = train_dit(
        transformer, vae, text, rng, args.dit_minutes, args.dit_batch, save, 5e-4, args.foreground_weight
    )
    decoder_steps = train_decoder(vae, rng, args.decoder_minutes, args.vae_batch)
    save()
    minutes = (time.monotonic() - started) / 60
    print(f"done: {vae_steps} VAE, {dit_steps} DiT, {decoder_steps} decoder steps in {minutes:.1f} min")


if __name__ == "__main__":
    main()
