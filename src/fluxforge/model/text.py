"""FLUX.2 text conditioning: a truncated language model whose hidden states become the DiT's text tokens.

klein reads Qwen3 (`hidden_states` 9, 18, 27 of 36 layers); dev reads the language model of Mistral Small
3.x (10, 20, 30 of 40), without its vision tower, projector or lm_head. `hidden_states[k]` is the output of
decoder layer k, so only the first max(out_layers) layers are built, loaded and run. transformers applies the
final RMSNorm to the last entry of `hidden_states` only, so the truncated model keeps that norm only when its
deepest layer is also the checkpoint's last one (tiny test models); otherwise it is removed and never loaded.

Per token the features are layer-major: [h_k1 | h_k2 | h_k3], each Dm wide, giving [B, L, len(out_layers)·Dm].
Prompts are tokenized as diffusers' Flux2KleinPipeline (Qwen3 chat template, one prompt at a time) and
Flux2Pipeline (Pixtral processor, system message, whole batch) do, padded to max_sequence_length; the padding
tokens stay in the sequence and the DiT attends to them.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn
from transformers import MistralModel, PretrainedConfig, Qwen3Model

from fluxforge.config import TextEncoderKind

# dev's system prompt, byte for byte as BFL and diffusers send it (the newline after "object" is part of it).
SYSTEM_MESSAGE = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on object "
    "relationships, object\nattribution and actions without speculation."
)

# Where the language model's tensors live in a checkpoint, most likely layout first. Mistral 3 files on the
# hub and those saved by transformers 5.x (which converts back on save) use `language_model.model.`; a
# state_dict taken from a transformers 5.x model in memory uses `model.language_model.`.
_CHECKPOINT_PREFIXES: MappingProxyType[str, tuple[str, ...]] = MappingProxyType(
    {
        "qwen3": ("model.",),
        "mistral3": ("language_model.model.", "model.language_model."),
    }
)


def _language_config(config: PretrainedConfig) -> tuple[TextEncoderKind, PretrainedConfig]:
    """The encoder kind and the config of the decoder-only language model inside `config`."""
    model_type = getattr(config, "model_type", None)
    if model_type == "qwen3":
        return "qwen3", config
    if model_type == "mistral3":
        config = config.text_config
        model_type = config.model_type
    if model_type == "mistral":
        return "mistral3", config
    raise ValueError(
        f"unsupported text encoder config with model_type {model_type!r}: expected a Qwen3 (klein) or "
        "Mistral 3 / Mistral (dev) config"
    )


class TextEncoder(nn.Module):
    """The first max(out_layers) decoder layers of a Qwen3 or Mistral language model.

    Built from the *full* checkpoint's transformers config, on any device including meta; load it with
    `load_state_dict(tensors, assign=True, strict=True)`, reading each key from the first name in
    `checkpoint_keys()` that the checkpoint has. Cast tensors before loading rather than calling `.to(dtype)`
    afterwards: that would also round the RoPE frequencies, which transformers keeps in float32.
    """

    def __init__(self, config: PretrainedConfig, out_layers: Sequence[int]) -> None:
        super().__init__()
        kind, full = _language_config(config)
        out_layers = tuple(out_layers)
        num_layers = full.num_hidden_layers
        if not out_layers:
            raise ValueError("out_layers must not be empty")
        if not all(1 <= k <= num_layers for k in out_layers):
            raise ValueError(
                f"out_layers {out_layers} must lie in 1..{num_layers}: the {kind} checkpoint has "
                f"{num_layers} decoder layers and hidden_states[k] is the output of layer k"
            )
        self.kind: TextEncoderKind = kind
        self.out_layers = out_layers
        self.hidden_size: int = full.hidden_size

        depth = max(out_layers)
        truncated = copy.deepcopy(full)
        truncated.num_hidden_layers = depth
        if getattr(truncated, "layer_types", None) is not None:
            truncated.layer_types = truncated.layer_types[:depth]
        self.lm: Qwen3Model | MistralModel = (Qwen3Model if kind == "qwen3" else MistralModel)(truncated)
        if depth < num_layers:
            # The full model's hidden_states[depth] is the raw output of layer `depth`; only the last entry,
            # which here would be ours, gets the final norm.
            self.lm.norm = nn.Identity()
        # The RoPE frequencies are non-persistent buffers that load_state_dict never fills, so they must be
        # real even when the rest of the model is built on the meta device.
        with torch.device("cpu"):
            self.lm.rotary_emb = type(self.lm.rotary_emb)(truncated)

    @property
    def feature_dim(self) -> int:
        return len(self.out_layers) * self.hidden_size

    def checkpoint_keys(self) -> dict[str, tuple[str, ...]]:
        """Each state_dict key of this module -> the checkpoint names it may be stored as, preferred first."""
        prefixes = _CHECKPOINT_PREFIXES[self.kind]
        return {
            key: tuple(prefix + key.removeprefix("lm.") for prefix in prefixes) for key in self.state_dict()
        }

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, L] token ids and mask -> [B, L, len(out_layers) * Dm] in the weights' dtype."""
        out = self.lm(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True
        )
        hidden = torch.stack([out.hidden_states[k] for k in self.out_layers], dim=2)  # [B, L, n, Dm]
        return hidden.flatten(2)


@dataclass(frozen=True)
class Tokens:
    input_ids: Tensor  # [B, L] int64, L = max_sequence_length
    attention_mask: Tensor  # [B, L], 1 for prompt tokens, 0 for padding


@dataclass(frozen=True)
class TextEmbeddings:
    embeds: Tensor  # [B, L, len(out_layers) * Dm], the DiT's text tokens
    ids: Tensor  # [L, 4] int64 position ids (T, H, W, L) = (0, 0, 0, l); only the sequence axis varies


def tokenize_qwen3(tokenizer: Any, prompts: Sequence[str], max_sequence_length: int) -> Tokens:
    """klein: each prompt as a lone user turn of the Qwen3 chat template, thinking switched off."""
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,
        )
        for prompt in prompts
    ]
    # One call pads and truncates every text on its own, exactly like diffusers' per-prompt calls.
    batch = tokenizer(
        texts, return_tensors="pt", padding="max_length", truncation=True, max_length=max_sequence_length
    )
    return Tokens(batch["input_ids"], batch["attention_mask"])


def tokenize_mistral3(processor: Any, prompts: Sequence[str], max_sequence_length: int) -> Tokens:
    """dev: system message plus one user turn per prompt, through the Pixtral processor's chat template."""
    # "[IMG]" in a prompt would become an image placeholder that the processor validates against images.
    conversations = [
        [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE}]},
            {"role": "user", "content": [{"type": "text", "text": prompt.replace("[IMG]", "")}]},
        ]
        for prompt in prompts
    ]
    batch = processor.apply_chat_template(
        conversations,
        add_generation_prompt=False,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        padding="max_length",
        truncation=True,
        max_length=max_sequence_length,
    )
    return Tokens(batch["input_ids"], batch["attention_mask"])


def text_ids(length: int) -> Tensor:
    """[L, 4] int64 position ids (0, 0, 0, l) of L text tokens."""
    ids = torch.zeros(length, 4, dtype=torch.int64)
    ids[:, 3] = torch.arange(length)
    return ids


@torch.no_grad()
def encode_prompts(
    encoder: TextEncoder,
    tokenizer: Any,
    prompts: str | Sequence[str],
    max_sequence_length: int = 512,
    dtype: torch.dtype | None = None,
    num_images_per_prompt: int = 1,
) -> TextEmbeddings:
    """Prompts -> DiT text tokens as diffusers' `encode_prompt` gives them.

    `tokenizer` is the Qwen2 tokenizer for klein and the Pixtral processor (`AutoProcessor`) for dev.
    `dtype` defaults to the encoder's. Each prompt is repeated `num_images_per_prompt` times in place
    (p0, p0, ..., p1, p1, ...). The result stays on the encoder's device.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    tokenize = tokenize_qwen3 if encoder.kind == "qwen3" else tokenize_mistral3
    tokens = tokenize(tokenizer, prompts, max_sequence_length)
    weight = encoder.lm.embed_tokens.weight
    embeds = encoder(tokens.input_ids.to(weight.device), tokens.attention_mask.to(weight.device))
    embeds = embeds.to(dtype or weight.dtype).repeat_interleave(num_images_per_prompt, dim=0)
    return TextEmbeddings(embeds, text_ids(embeds.shape[1]).to(weight.device))
