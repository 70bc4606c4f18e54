"""FLUX.2 text conditioning: a truncated language model whose hidden states become the DiT's text tokens.

klein reads Qwen3 (`hidden_states` 9, 18, 27 of 36 layers); dev reads the language model of Mistral Small
3.x (10, 20, 30 of 40), without its vision tower, projector or lm_head. `hidden_states[k]` is the output of
decoder layer k, so only the first max(out_layers) layers are built, loaded and run.

The decoder stack is written here in plain torch, operation for operation as transformers 5 computes it
(the tests compare against transformers at 0.0 in fp32), so that fluxforge never imports transformers:

    x = embed(ids)                                   [B, L, Dm]
    per layer:  h = rmsnorm(x)
                q, k, v = h Wq, h Wk, h Wv            heads of Dh; Qwen3 RMS-normalises q and k per head
                q, k = rope(q), rope(k)               rotate-half RoPE, theta from the config, fp32 tables
                x = x + sdpa(q, k, v, causal & padding mask) Wo     (K/V heads repeated for GQA)
                x = x + W2(silu(h' W1) * h' W3)       with h' = rmsnorm(x)
    rmsnorm(x) = w * (x / sqrt(mean(x^2) + eps)) in fp32, cast back before the gain

transformers applies the final RMSNorm to the last entry of `hidden_states` only, so the truncated model
keeps that norm only when its deepest layer is also the checkpoint's last one (tiny test models).

Per token the features are layer-major: [h_k1 | h_k2 | h_k3], each Dm wide, giving [B, L, len(out_layers)·Dm].
Prompts are tokenized as diffusers' Flux2KleinPipeline (Qwen3 chat template, one prompt at a time) and
Flux2Pipeline (the processor's template, system message, whole batch) do, padded to max_sequence_length; the
padding tokens stay in the sequence and the DiT attends to them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fluxforge.config import LanguageConfig, TextEncoderKind
from fluxforge.tokenizer import ChatTokenizer, Tokens

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


def language_config(config: Any) -> LanguageConfig:
    """A LanguageConfig from itself, a config.json dict, or a transformers config object (`to_dict()`)."""
    if isinstance(config, LanguageConfig):
        return config
    if not isinstance(config, Mapping):
        config = config.to_dict()
    return LanguageConfig.from_dict(config)


# ---------------------------------------------------------------------------------------------------------
# Network


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, c: LanguageConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        bias = c.attention_bias
        self.q_proj = nn.Linear(c.hidden_size, self.heads * c.head_dim, bias=bias)
        self.k_proj = nn.Linear(c.hidden_size, self.kv_heads * c.head_dim, bias=bias)
        self.v_proj = nn.Linear(c.hidden_size, self.kv_heads * c.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * c.head_dim, c.hidden_size, bias=bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, -1, self.head_dim)  # [B, L, H, Dh]
        k = self.k_proj(x).view(b, n, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, L, Dh]
        v = self.v_proj(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        extra = {}
        groups = self.heads // self.kv_heads
        if groups > 1:
            # transformers lets SDPA broadcast the K/V heads only without a mask; with one, it repeats them
            # (the two are different kernels, so the same choice is made here).
            if mask is None and self.head_dim <= 256:
                extra["enable_gqa"] = True
            else:
                k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=0.0,
            scale=self.head_dim**-0.5,
            is_causal=mask is None and n > 1,
            **extra,
        )
        out = out.transpose(1, 2).contiguous().reshape(b, n, -1).contiguous()
        return self.o_proj(out)


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    """[B, Hkv, L, Dh] -> [B, Hkv * groups, L, Dh], each K/V head repeated for its group of query heads."""
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


class MLP(nn.Module):
    def __init__(self, c: LanguageConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: LanguageConfig) -> None:
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextEncoder(nn.Module):
    """The first max(out_layers) decoder layers of a Qwen3 or Mistral language model.

    Built from the *full* checkpoint's config (a `LanguageConfig`, its config.json as a dict, or a
    transformers config), on any device including meta; load it with `load_state_dict(tensors,
    assign=True, strict=True)`, reading each key from the first name in `checkpoint_keys()` that the
    checkpoint has. Cast tensors before loading rather than calling `.to(dtype)` afterwards: that would
    also round the RoPE frequencies, which stay in float32 as in transformers.
    """

    def __init__(self, config: Any, out_layers: Sequence[int]) -> None:
        super().__init__()
        c = language_config(config)
        out_layers = tuple(out_layers)
        if not out_layers:
            raise ValueError("out_layers must not be empty")
        if not all(1 <= k <= c.num_hidden_layers for k in out_layers):
            raise ValueError(
                f"out_layers {out_layers} must lie in 1..{c.num_hidden_layers}: the {c.kind} checkpoint has "
                f"{c.num_hidden_layers} decoder layers and hidden_states[k] is the output of layer k"
            )
        self.config = c
        self.kind: TextEncoderKind = c.kind
        self.out_layers = out_layers
        self.hidden_size = c.hidden_size
        depth = max(out_layers)
        # Given an empty table, nn.Embedding skips its random init (every weight comes from the checkpoint):
        # normal_ on the meta device would import torch's compiler stack (1.4 s).
        self.embed_tokens = nn.Embedding(
            c.vocab_size, c.hidden_size, _weight=torch.empty(c.vocab_size, c.hidden_size)
        )
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(depth))
        # The full model's hidden_states[depth] is the raw output of layer `depth`; only the last entry gets
        # the final norm, so it exists here only when that entry is one of ours.
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps) if depth == c.num_hidden_layers else None
        # A non-persistent buffer that load_state_dict never fills: real even when built on meta.
        with torch.device("cpu"):
            dims = torch.arange(0, c.head_dim, 2, dtype=torch.float)
            inv_freq = 1.0 / (c.rope_theta ** (dims / c.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @property
    def feature_dim(self) -> int:
        return len(self.out_layers) * self.hidden_size

    def checkpoint_keys(self) -> dict[str, tuple[str, ...]]:
        """Each state_dict key of this module -> the checkpoint names it may be stored as, preferred first."""
        prefixes = _CHECKPOINT_PREFIXES[self.kind]
        return {key: tuple(prefix + key for prefix in prefixes) for key in self.state_dict()}

    def _mask(self, attention_mask: Tensor, n: int) -> Tensor | None:
        """[B, 1, L, L] bool (True = attend): causal, padding keys masked; None when SDPA's own causal mask
        is the same (no padding), which transformers then uses."""
        padding = attention_mask.to(torch.bool)
        window = self.config.sliding_window
        local = window is not None and n >= window
        if not local and padding.sum() == padding.numel():
            return None
        q = torch.arange(n, device=padding.device)[:, None]
        kv = torch.arange(n, device=padding.device)[None, :]
        allowed = kv <= q
        if window is not None:
            allowed = allowed & (kv > q - window)
        return allowed[None, None] & padding[:, None, None, :]

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, L] token ids and mask -> [B, L, len(out_layers) * Dm] in the weights' dtype."""
        n = input_ids.shape[1]
        x = self.embed_tokens(input_ids)
        positions = torch.arange(n, device=x.device)[None]  # [1, L]
        freqs = positions[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)  # [1, L, Dh]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = self._mask(attention_mask.to(x.device), n)
        wanted, hidden = set(self.out_layers), {}
        for i, layer in enumerate(self.layers, start=1):
            x = layer(x, cos, sin, mask)
            if i in wanted:
                hidden[i] = x
        if self.norm is not None:
            hidden[len(self.layers)] = self.norm(x)
        return torch.stack([hidden[k] for k in self.out_layers], dim=2).flatten(
            2
        )  # [B, L, n, Dm] -> [B, L, n*Dm]


# ---------------------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class TextEmbeddings:
    embeds: Tensor  # [B, L, len(out_layers) * Dm], the DiT's text tokens
    ids: Tensor  # [L, 4] int64 position ids (T, H, W, L) = (0, 0, 0, l); only the sequence axis varies


def tokenize_qwen3(tokenizer: ChatTokenizer, prompts: Sequence[str], max_sequence_length: int) -> Tokens:
    """klein: each prompt as a lone user turn of the Qwen3 chat template, thinking switched off."""
    texts = tokenizer.render(
        [[{"role": "user", "content": prompt}] for prompt in prompts],
        add_generation_prompt=True,
        enable_thinking=False,
    )
    # One call pads and truncates every text on its own, exactly like diffusers' per-prompt calls.
    return tokenizer.encode(texts, max_sequence_length)


def tokenize_mistral3(tokenizer: ChatTokenizer, prompts: Sequence[str], max_sequence_length: int) -> Tokens:
    """dev: system message plus one user turn per prompt, through the processor's chat template, the whole
    batch at once; special tokens are added only when the rendered text does not start with BOS."""
    # "[IMG]" in a prompt would become an image placeholder that the processor validates against images.
    conversations = [
        [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE}]},
            {"role": "user", "content": [{"type": "text", "text": prompt.replace("[IMG]", "")}]},
        ]
        for prompt in prompts
    ]
    texts = tokenizer.render(conversations, add_generation_prompt=False)
    bos = tokenizer.special_tokens.get("bos_token")
    starts_with_bos = bos is not None and texts[0].startswith(bos)
    return tokenizer.encode(texts, max_sequence_length, add_special_tokens=not starts_with_bos)


def text_ids(length: int) -> Tensor:
    """[L, 4] int64 position ids (0, 0, 0, l) of L text tokens."""
    ids = torch.zeros(length, 4, dtype=torch.int64)
    ids[:, 3] = torch.arange(length)
    return ids


@torch.no_grad()
def encode_prompts(
    encoder: TextEncoder,
    tokenizer: ChatTokenizer,
    prompts: str | Sequence[str],
    max_sequence_length: int = 512,
    dtype: torch.dtype | None = None,
    num_images_per_prompt: int = 1,
) -> TextEmbeddings:
    """Prompts -> DiT text tokens as diffusers' `encode_prompt` gives them.

    `dtype` defaults to the encoder's. Each prompt is repeated `num_images_per_prompt` times in place
    (p0, p0, ..., p1, p1, ...). The result stays on the encoder's device.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    tokenize = tokenize_qwen3 if encoder.kind == "qwen3" else tokenize_mistral3
    tokens = tokenize(tokenizer, prompts, max_sequence_length)
    weight = encoder.embed_tokens.weight
    embeds = encoder(tokens.input_ids.to(weight.device), tokens.attention_mask.to(weight.device))
    embeds = embeds.to(dtype or weight.dtype).repeat_interleave(num_images_per_prompt, dim=0)
    return TextEmbeddings(embeds, text_ids(embeds.shape[1]).to(weight.device))
