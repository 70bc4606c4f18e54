"""Model configurations and the registry of known FLUX.2 variants.

Every config is a frozen dataclass validated on construction. Field names follow the diffusers
`config.json` files, so a config round-trips through `from_dict` / `to_dict` unchanged. Variants are
looked up by exact name (`get_variant("flux.2-klein-4b")`) and adjusted with `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Literal


def _from_dict(cls, data: dict[str, Any], what: str):
    """Build `cls` from a config dict, ignoring bookkeeping keys (`_class_name`, ...) and keys the class
    does not use, but rejecting values of the wrong kind with the key named."""
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key in known and known[key].init:
            if isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid {what} config: {exc}") from None


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class TransformerConfig:
    """The FLUX.2 MMDiT (diffusers `Flux2Transformer2DModel`)."""

    patch_size: int = 1  # only sizes proj_out (patch² · out_channels); the tokens are already 2x2 patches
    in_channels: int = 128  # token channels = 4 x VAE latent channels
    out_channels: int | None = None  # None -> in_channels
    num_layers: int = 8  # double-stream blocks
    num_single_layers: int = 48  # single-stream (parallel) blocks
    attention_head_dim: int = 128  # Dh
    num_attention_heads: int = 48  # H; inner dim D = H * Dh
    joint_attention_dim: int = 15360  # text feature width = len(text layers) x LLM hidden size
    timestep_guidance_channels: int = 256  # sinusoid width of the timestep / guidance embedding
    mlp_ratio: float = 3.0  # MLP hidden = int(D * mlp_ratio)
    axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)  # RoPE dims of the (T, H, W, L) axes; sum = Dh
    rope_theta: int = 2000
    eps: float = 1e-6  # every LayerNorm, QK RMSNorm and the final norm
    guidance_embeds: bool = True  # dev embeds the guidance scale; klein does not

    def __post_init__(self) -> None:
        for name in (
            "patch_size",
            "in_channels",
            "num_attention_heads",
            "attention_head_dim",
            "joint_attention_dim",
            "timestep_guidance_channels",
        ):
            _require(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        _require(self.num_layers >= 0 and self.num_single_layers >= 0, "block counts must be >= 0")
        _require(self.timestep_guidance_channels % 2 == 0, "timestep_guidance_channels must be even")
        _require(
            sum(self.axes_dims_rope) == self.attention_head_dim,
            f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim {self.attention_head_dim}",
        )
        _require(all(d % 2 == 0 for d in self.axes_dims_rope), "every RoPE axis width must be even")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.inner_dim * self.mlp_ratio)

    @property
    def output_channels(self) -> int:
        return self.patch_size**2 * (self.out_channels or self.in_channels)

    def same_architecture(self, other: TransformerConfig) -> bool:
        """Equal networks, however the config spells them (out_channels None or equal to in_channels)."""
        return dataclasses.replace(self, out_channels=self.output_channels) == dataclasses.replace(
            other, out_channels=other.output_channels
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransformerConfig:
        return _from_dict(cls, data, "transformer")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "axes_dims_rope": list(self.axes_dims_rope)}


@dataclass(frozen=True)
class AutoencoderConfig:
    """The FLUX.2 KL autoencoder (diffusers `AutoencoderKLFlux2`)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # encoder channels per resolution
    decoder_block_out_channels: tuple[int, ...] | None = None  # None -> block_out_channels
    layers_per_block: int = 2  # resnets per encoder block; decoder blocks have one more
    latent_channels: int = 32
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    batch_norm_eps: float = 1e-4  # latent statistics: z' = (z - mean) / sqrt(var + eps)
    batch_norm_momentum: float = 0.1
    patch_size: tuple[int, int] = (2, 2)  # latents are patchified 2x2 before they become tokens
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    act_fn: str = "silu"

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        _require(n > 0, "block_out_channels must not be empty")
        _require(
            self.down_block_types == ("DownEncoderBlock2D",) * n,
            f"down_block_types must be {n} x DownEncoderBlock2D, got {self.down_block_types}",
        )
        _require(
            self.up_block_types == ("UpDecoderBlock2D",) * len(self.decoder_channels),
            f"up_block_types must be {len(self.decoder_channels)} x UpDecoderBlock2D, "
            f"got {self.up_block_types}",
        )
        _require(self.act_fn == "silu", f"act_fn must be 'silu', got {self.act_fn!r}")
        for c in (*self.block_out_channels, *self.decoder_channels):
            _require(
                c % self.norm_num_groups == 0,
                f"channel count {c} is not divisible by norm_num_groups {self.norm_num_groups}",
            )
        _require(len(self.patch_size) == 2, f"patch_size must be (ph, pw), got {self.patch_size}")

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        return self.decoder_block_out_channels or self.block_out_channels

    @property
    def spatial_scale(self) -> int:
        """Pixels per latent pixel (8 for the real VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def token_channels(self) -> int:
        """Channels of a packed token: latent channels x patch area (128 for the real VAE)."""
        return self.latent_channels * self.patch_size[0] * self.patch_size[1]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AutoencoderConfig:
        return _from_dict(cls, data, "autoencoder")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


TextEncoderKind = Literal["qwen3", "mistral3"]


@dataclass(frozen=True)
class TextEncoderConfig:
    """Which language model feeds the DiT, and which of its hidden states are used."""

    kind: TextEncoderKind  # "qwen3" (klein) or "mistral3" (dev, language part only)
    hidden_size: int  # LLM hidden size Dm
    num_hidden_layers: int  # decoder layers in the full checkpoint
    out_layers: tuple[int, ...]  # hidden_states indices stacked per token into [L, len(out_layers) * Dm]
    source: str  # the checkpoint the official weights come from, for messages

    def __post_init__(self) -> None:
        _require(self.kind in ("qwen3", "mistral3"), f"unknown text encoder kind {self.kind!r}")
        _require(len(self.out_layers) > 0, "out_layers must not be empty")
        _require(
            all(1 <= k <= self.num_hidden_layers for k in self.out_layers),
            f"out_layers {self.out_layers} must lie in 1..{self.num_hidden_layers}",
        )

    @property
    def layers_to_load(self) -> int:
        """Decoder layers that are loaded and run: the deepest one whose output is used."""
        return max(self.out_layers)

    @property
    def feature_dim(self) -> int:
        return len(self.out_layers) * self.hidden_size


@dataclass(frozen=True)
class LanguageConfig:
    """The decoder-only language model of a text encoder, read from its config.json. Keys absent from the
    file take transformers' defaults for that model type (`save_pretrained` writes only what differs)."""

    kind: TextEncoderKind
    vocab_size: int
    hidden_size: int  # Dm
    intermediate_size: int  # MLP hidden
    num_hidden_layers: int  # in the full checkpoint
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # Dh
    rms_norm_eps: float
    rope_theta: float
    attention_bias: bool  # Qwen3 may have q/k/v/o biases; Mistral never does
    sliding_window: int | None  # Mistral's local attention; None for full attention

    @property
    def qk_norm(self) -> bool:
        return self.kind == "qwen3"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LanguageConfig:
        model_type = data.get("model_type")
        if model_type == "mistral3":
            text = data.get("text_config")
            if not isinstance(text, Mapping):
                raise ValueError("a mistral3 config needs its text_config (the language model's settings)")
            return cls._read("mistral3", text)
        if model_type == "mistral":
            return cls._read("mistral3", data)
        if model_type == "qwen3":
            return cls._read("qwen3", data)
        raise ValueError(
            f"unsupported text encoder config with model_type {model_type!r}: expected a Qwen3 (klein) or "
            "Mistral 3 / Mistral (dev) config"
        )

    @classmethod
    def _read(cls, kind: TextEncoderKind, d: Mapping[str, Any]) -> LanguageConfig:
        defaults = _QWEN3_DEFAULTS if kind == "qwen3" else _MISTRAL_DEFAULTS
        get = {**defaults, **{k: v for k, v in d.items() if v is not None or k == "sliding_window"}}.get
        hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(
                f"RoPE type {rope_type!r} is not supported (FLUX.2's text encoders use 'default')"
            )
        layers = int(get("num_hidden_layers"))
        sliding = get("sliding_window")
        if kind == "qwen3":  # Qwen3 slides only from max_window_layers on, and only with use_sliding_window
            slides = get("use_sliding_window") and get("sliding_window") is not None
            types = d.get("layer_types") or [
                "sliding_attention" if slides and i >= get("max_window_layers") else "full_attention"
                for i in range(layers)
            ]
            if "sliding_attention" in types:
                raise ValueError("Qwen3 sliding-window attention layers are not supported")
            sliding = None
        return cls(
            kind=kind,
            vocab_size=int(get("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(get("intermediate_size")),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads),
            rms_norm_eps=float(get("rms_norm_eps")),
            rope_theta=float(rope.get("rope_theta", get("rope_theta"))),
            attention_bias=bool(get("attention_bias")) if kind == "qwen3" else False,
            sliding_window=None if sliding is None else int(sliding),
        )


_QWEN3_DEFAULTS = dict(  # transformers' Qwen3Config
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=22016,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    attention_bias=False,
    use_sliding_window=False,
    max_window_layers=28,
    sliding_window=None,
)
_MISTRAL_DEFAULTS = dict(  # transformers' MistralConfig
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=None,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    sliding_window=4096,
)


@dataclass(frozen=True)
class SchedulerConfig:
    """The flow-matching schedule (diffusers `FlowMatchEulerDiscreteScheduler`, as FLUX.2 uses it). The
    defaults are that class's, so a scheduler_config.json reads the same here; FLUX.2's own configs
    (`FLUX2_SCHEDULER`) use dynamic shifting."""

    num_train_timesteps: int = 1000  # timestep = sigma x this; the DiT is given timestep / this
    shift: float = 1.0  # static shift sigma' = s*sigma / (1 + (s-1)*sigma), used without dynamic shifting
    use_dynamic_shifting: bool = False  # shift by mu, which depends on the image size and step count
    time_shift_type: Literal["exponential", "linear"] = "exponential"

    def __post_init__(self) -> None:
        _require(self.num_train_timesteps > 0, "num_train_timesteps must be positive")
        _require(self.shift > 0, f"shift must be positive, got {self.shift}")
        _require(
            self.time_shift_type in ("exponential", "linear"), f"bad time_shift_type {self.time_shift_type!r}"
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SchedulerConfig:
        unsupported = [
            k
            for k in (
                "use_karras_sigmas",
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "invert_sigmas",
                "shift_terminal",
                "stochastic_sampling",
            )
            if data.get(k)
        ]
        if unsupported:
            raise ValueError(f"scheduler options {unsupported} are not used by FLUX.2 and not supported")
        return _from_dict(cls, data, "scheduler")


FLUX2_SCHEDULER = SchedulerConfig(shift=3.0, use_dynamic_shifting=True)

GuidanceMode = Literal["embedded", "cfg", "none"]


@dataclass(frozen=True)
class PipelineDefaults:
    """What a generation uses when the request leaves a setting out."""

    steps: int
    guidance: float | None  # None: the variant takes no guidance scale
    guidance_mode: GuidanceMode  # embedded (dev), classifier-free (base models), none (distilled klein)
    distilled: bool  # step- and guidance-distilled weights (diffusers `is_distilled`)
    reference_kv: bool = False  # reference tokens are cached as per-layer K/V (klein 9B KV)
    max_sequence_length: int = 512  # text tokens, padded; padding takes part in attention
    size: int | None = None  # output side in pixels when none is asked; None -> 128 latent pixels (1024)

    def __post_init__(self) -> None:
        _require(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        _require(
            self.guidance_mode in ("embedded", "cfg", "none"), f"bad guidance_mode {self.guidance_mode!r}"
        )
        _require(
            (self.guidance is None) == (self.guidance_mode == "none"),
            "guidance must be None exactly when guidance_mode is 'none'",
        )
        _require(self.max_sequence_length >= 1, "max_sequence_length must be >= 1")
        _require(self.size is None or self.size > 0, f"size must be positive, got {self.size}")


@dataclass(frozen=True)
class Variant:
    """One FLUX.2 model: its networks and its generation defaults."""

    name: str
    transformer: TransformerConfig
    text_encoder: TextEncoderConfig
    defaults: PipelineDefaults
    vae: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    scheduler: SchedulerConfig = FLUX2_SCHEDULER
    pipeline_class: str = "Flux2KleinPipeline"  # the diffusers pipeline with the same behaviour

    def __post_init__(self) -> None:
        # Width agreements between networks (text features, token channels) are checked on the files at
        # load time, where a custom-size checkpoint replaces some of these configs.
        _require(
            self.transformer.guidance_embeds == (self.defaults.guidance_mode == "embedded"),
            f"{self.name}: guidance_embeds must go with guidance_mode 'embedded'",
        )

    @property
    def family(self) -> str:
        """The variant without its size: flux.2-dev, flux.2-klein, flux.2-klein-base or flux.2-klein-kv."""
        if self.pipeline_class == "Flux2Pipeline":
            return "flux.2-dev"
        if self.defaults.reference_kv:
            return "flux.2-klein-kv"
        return "flux.2-klein" if self.defaults.distilled else "flux.2-klein-base"


def _klein_transformer(layers: int, single_layers: int, heads: int, text_hidden: int) -> TransformerConfig:
    return TransformerConfig(
        num_layers=layers,
        num_single_layers=single_layers,
        num_attention_heads=heads,
        joint_attention_dim=3 * text_hidden,
        guidance_embeds=False,
    )


QWEN3_4B = TextEncoderConfig("qwen3", 2560, 36, (9, 18, 27), "Qwen/Qwen3-4B")
QWEN3_8B = TextEncoderConfig("qwen3", 4096, 36, (9, 18, 27), "Qwen/Qwen3-8B")
MISTRAL_SMALL = TextEncoderConfig(
    "mistral3", 5120, 40, (10, 20, 30), "mistralai/Mistral-Small-3.2-24B-Instruct-2506"
)

# Distilled klein: 4 steps without guidance (BFL's published settings). Base klein: 50 steps with CFG.
DISTILLED = PipelineDefaults(steps=4, guidance=None, guidance_mode="none", distilled=True)
BASE = PipelineDefaults(steps=50, guidance=4.0, guidance_mode="cfg", distilled=False)
KV = PipelineDefaults(steps=4, guidance=None, guidance_mode="none", distilled=True, reference_kv=True)

# The built-in demo (fluxforge/demo): a tiny klein-base-like model trained in this repository on 64 x 64
# procedural scenes by tools/train_demo.py. Its frozen text encoder is a 2-layer Qwen3 whose hidden states
# 1 and 2 are both used; 40 tokens hold the chat template and the longest caption.
DEMO = Variant(
    "fluxforge-demo",
    TransformerConfig(
        in_channels=16,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=128,
        axes_dims_rope=(8, 8, 8, 8),
        guidance_embeds=False,
    ),
    TextEncoderConfig("qwen3", 64, 2, (1, 2), "fluxforge (built in)"),
    PipelineDefaults(
        steps=12, guidance=4.0, guidance_mode="cfg", distilled=False, max_sequence_length=40, size=64
    ),
    vae=AutoencoderConfig(
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        mid_block_add_attention=False,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
    ),
    # 64 tokens need less shift towards high noise than FLUX.2's megapixel images.
    scheduler=SchedulerConfig(shift=2.0),
)

_KLEIN_4B = _klein_transformer(5, 20, 24, 2560)
_KLEIN_9B = _klein_transformer(8, 24, 32, 4096)

VARIANTS: MappingProxyType[str, Variant] = MappingProxyType(
    {
        v.name: v
        for v in (
            Variant(
                "flux.2-dev",
                TransformerConfig(),
                MISTRAL_SMALL,
                PipelineDefaults(steps=50, guidance=4.0, guidance_mode="embedded", distilled=True),
                pipeline_class="Flux2Pipeline",
            ),
            Variant("flux.2-klein-4b", _KLEIN_4B, QWEN3_4B, DISTILLED),
            Variant("flux.2-klein-9b", _KLEIN_9B, QWEN3_8B, DISTILLED),
            Variant("flux.2-klein-base-4b", _KLEIN_4B, QWEN3_4B, BASE),
            Variant("flux.2-klein-base-9b", _KLEIN_9B, QWEN3_8B, BASE),
            Variant("flux.2-klein-9b-kv", _KLEIN_9B, QWEN3_8B, KV, pipeline_class="Flux2KleinKVPipeline"),
            DEMO,
        )
    }
)


def get_variant(name: str) -> Variant:
    """The registered variant with exactly this name; a ValueError suggests the closest names."""
    try:
        return VARIANTS[name]
    except KeyError:
        close = difflib.get_close_matches(name.lower(), VARIANTS, n=2, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown variant {name!r}.{hint} Known variants: {', '.join(VARIANTS)}.") from None
