"""Black Forest Labs' single-file checkpoints: key rename rules and configs inferred from tensor shapes.

fluxforge modules use the diffusers parameter names. A *plan* maps each module key to its BFL source key
and the reshaping on the way in (fused qkv rows split in three, the final modulation's (shift; scale)
halves swapped to (scale; shift), 1x1 attention convs squeezed to Linear weights). The rules are those
of FLUX2_FACTS.md 6.2 (transformer) and 6.3 (autoencoder).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from fluxforge.checkpoint import Source
from fluxforge.config import AutoencoderConfig, TransformerConfig
from fluxforge.errors import CheckpointError

PREFIXES = ("", "model.diffusion_model.")  # plain BFL files; ComfyUI-style prefixed files
_DETECT = "single_stream_modulation.lin.weight"

# ---------------------------------------------------------------------------------------------------------
# Transformer

_TOP = {
    "x_embedder.weight": "img_in.weight",
    "context_embedder.weight": "txt_in.weight",
    "time_guidance_embed.timestep_embedder.linear_1.weight": "time_in.in_layer.weight",
    "time_guidance_embed.timestep_embedder.linear_2.weight": "time_in.out_layer.weight",
    "time_guidance_embed.guidance_embedder.linear_1.weight": "guidance_in.in_layer.weight",
    "time_guidance_embed.guidance_embedder.linear_2.weight": "guidance_in.out_layer.weight",
    "double_stream_modulation_img.linear.weight": "double_stream_modulation_img.lin.weight",
    "double_stream_modulation_txt.linear.weight": "double_stream_modulation_txt.lin.weight",
    "single_stream_modulation.linear.weight": "single_stream_modulation.lin.weight",
    "proj_out.weight": "final_layer.linear.weight",
}
_DOUBLE = {  # transformer_blocks.{i}.<key> -> double_blocks.{i}.<key>, with the qkv row block if fused
    "attn.to_q.weight": ("img_attn.qkv.weight", 0),
    "attn.to_k.weight": ("img_attn.qkv.weight", 1),
    "attn.to_v.weight": ("img_attn.qkv.weight", 2),
    "attn.add_q_proj.weight": ("txt_attn.qkv.weight", 0),
    "attn.add_k_proj.weight": ("txt_attn.qkv.weight", 1),
    "attn.add_v_proj.weight": ("txt_attn.qkv.weight", 2),
    "attn.norm_q.weight": ("img_attn.norm.query_norm.scale", None),
    "attn.norm_k.weight": ("img_attn.norm.key_norm.scale", None),
    "attn.norm_added_q.weight": ("txt_attn.norm.query_norm.scale", None),
    "attn.norm_added_k.weight": ("txt_attn.norm.key_norm.scale", None),
    "attn.to_out.0.weight": ("img_attn.proj.weight", None),
    "attn.to_add_out.weight": ("txt_attn.proj.weight", None),
    "ff.linear_in.weight": ("img_mlp.0.weight", None),
    "ff.linear_out.weight": ("img_mlp.2.weight", None),
    "ff_context.linear_in.weight": ("txt_mlp.0.weight", None),
    "ff_context.linear_out.weight": ("txt_mlp.2.weight", None),
}
_SINGLE = {
    "attn.to_qkv_mlp_proj.weight": "linear1.weight",
    "attn.to_out.weight": "linear2.weight",
    "attn.norm_q.weight": "norm.query_norm.scale",
    "attn.norm_k.weight": "norm.key_norm.scale",
}


def transformer_prefix(keys: Mapping[str, Any]) -> str | None:
    """The key prefix of a BFL FLUX.2 transformer file, or None when it is not one."""
    return next((p for p in PREFIXES if p + _DETECT in keys), None)


def looks_like_flux1(keys: Mapping[str, Any]) -> bool:
    return any(
        p + k in keys
        for p in PREFIXES
        for k in ("double_blocks.0.img_mod.lin.weight", "vector_in.in_layer.weight")
    )


def transformer_source(key: str, prefix: str = "") -> Source:
    """The BFL source of one diffusers transformer key."""
    if key in _TOP:
        return Source(prefix + _TOP[key])
    if key == "norm_out.linear.weight":
        return Source(prefix + "final_layer.adaLN_modulation.1.weight", swap_halves=True)
    if m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", key):
        name, part = _DOUBLE[m[2]]
        return Source(f"{prefix}double_blocks.{m[1]}.{name}", part=None if part is None else (part, 3))
    if m := re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", key):
        return Source(f"{prefix}single_blocks.{m[1]}.{_SINGLE[m[2]]}")
    raise KeyError(key)


def transformer_plan(cfg: TransformerConfig, prefix: str = "") -> dict:
    # Imported here: the shape rules of this module serve `fluxforge info`, which builds no network.
    from fluxforge.model.transformer import Flux2Transformer

    with torch.device("meta"):
        keys = Flux2Transformer(cfg).state_dict().keys()
    return {k: transformer_source(k, prefix) for k in keys}


def _shape(keys: Mapping[str, Any], key: str, path_hint: str) -> tuple[int, ...]:
    try:
        return tuple(keys[key].shape)
    except KeyError:
        where = getattr(keys, "where", None)  # checkpoint.Tensors knows its file
        raise CheckpointError(
            f"cannot size the {path_hint}: the key {key} is missing",
            path=str(where) if where else None,
            missing=[key],
        ) from None


def _count(keys: Mapping[str, Any], pattern: str) -> int:
    found = {int(m[1]) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def transformer_config(keys: Mapping[str, Any], prefix: str = "") -> TransformerConfig:
    """Read the architecture off the tensor shapes. RoPE settings are not stored: every FLUX.2 model
    splits the head dim in four equal axes with theta 2000."""
    p = prefix
    dim, in_channels = _shape(keys, p + "img_in.weight", "transformer")
    head_dim = (
        _shape(keys, p + "double_blocks.0.img_attn.norm.query_norm.scale", "transformer")[0]
        if (p + "double_blocks.0.img_attn.norm.query_norm.scale" in keys)
        else _shape(keys, p + "single_blocks.0.norm.query_norm.scale", "transformer")[0]
    )
    mlp_in = _shape(keys, p + "single_blocks.0.linear1.weight", "transformer")[0]  # 3D + 2 * mlp hidden
    out_channels = _shape(keys, p + "final_layer.linear.weight", "transformer")[0]
    try:
        return TransformerConfig(
            in_channels=in_channels,
            out_channels=None if out_channels == in_channels else out_channels,
            num_layers=_count(keys, re.escape(p) + r"double_blocks\.(\d+)\."),
            num_single_layers=_count(keys, re.escape(p) + r"single_blocks\.(\d+)\."),
            attention_head_dim=head_dim,
            num_attention_heads=dim // head_dim,
            joint_attention_dim=_shape(keys, p + "txt_in.weight", "transformer")[1],
            timestep_guidance_channels=_shape(keys, p + "time_in.in_layer.weight", "transformer")[1],
            mlp_ratio=(mlp_in - 3 * dim) / 2 / dim,
            axes_dims_rope=(head_dim // 4,) * 4,
            guidance_embeds=p + "guidance_in.in_layer.weight" in keys,
        )
    except ValueError as exc:
        raise CheckpointError(f"the tensor shapes do not describe a FLUX.2 transformer ({exc})") from None


# ---------------------------------------------------------------------------------------------------------
# Autoencoder

_VAE_RULES = [  # (diffusers pattern, BFL replacement), applied in order to the diffusers key
    (r"^quant_conv\.", "encoder.quant_conv."),
    (r"^post_quant_conv\.", "decoder.post_quant_conv."),
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_(q|k|v)\.", r"\1.mid.attn_1.\2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
]


def vae_source(key: str, num_up_blocks: int, nested_quant_convs: bool = True) -> Source:
    if not nested_quant_convs and key.startswith(("quant_conv.", "post_quant_conv.")):
        return Source(key)  # LDM-style files keep them at the top level
    bfl_key = key
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)", key):
        b = num_up_blocks - 1 - int(m[1])  # BFL numbers the up blocks from the highest resolution
        bfl_key = (
            f"decoder.up.{b}.block.{m[3]}.{m[4]}" if m[2] == "resnets" else f"decoder.up.{b}.upsample.{m[4]}"
        )
    for pattern, repl in _VAE_RULES:
        bfl_key = re.sub(pattern, repl, bfl_key)
    squeeze = bool(re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", bfl_key))
    return Source(bfl_key, squeeze=squeeze)


def vae_plan(cfg: AutoencoderConfig, keys: Mapping[str, Any] | None = None) -> dict:
    """BFL nests quant_conv in the encoder and post_quant_conv in the decoder; LDM-style conversions of
    the same weights keep them at the top level. Both are read; `keys` tells which this file has."""
    from fluxforge.model.autoencoder import AutoEncoder  # as in transformer_plan

    nested = keys is None or "quant_conv.weight" not in keys
    with torch.device("meta"):
        module_keys = AutoEncoder(cfg).state_dict().keys()
    return {k: vae_source(k, len(cfg.decoder_channels), nested) for k in module_keys}


def vae_config(keys: Mapping[str, Any]) -> AutoencoderConfig:
    """Read the autoencoder's architecture off the tensor shapes. GroupNorm's group count is not stored;
    FLUX.2 uses 32."""
    down = _count(keys, r"encoder\.down\.(\d+)\.")
    up = _count(keys, r"decoder\.up\.(\d+)\.")
    enc = tuple(_shape(keys, f"encoder.down.{i}.block.0.conv1.weight", "autoencoder")[0] for i in range(down))
    dec = tuple(_shape(keys, f"decoder.up.{b}.block.0.conv2.weight", "autoencoder")[0] for b in range(up))
    try:
        return AutoencoderConfig(
            in_channels=_shape(keys, "encoder.conv_in.weight", "autoencoder")[1],
            out_channels=_shape(keys, "decoder.conv_out.weight", "autoencoder")[0],
            block_out_channels=enc,
            decoder_block_out_channels=None if dec == enc else dec,
            layers_per_block=_count(keys, r"encoder\.down\.0\.block\.(\d+)\."),
            latent_channels=_shape(keys, "encoder.conv_out.weight", "autoencoder")[0] // 2,
            use_quant_conv="encoder.quant_conv.weight" in keys or "quant_conv.weight" in keys,
            use_post_quant_conv="decoder.post_quant_conv.weight" in keys or "post_quant_conv.weight" in keys,
            mid_block_add_attention="encoder.mid.attn_1.norm.weight" in keys,
            up_block_types=("UpDecoderBlock2D",) * up,
            down_block_types=("DownEncoderBlock2D",) * down,
        )
    except ValueError as exc:
        raise CheckpointError(f"the tensor shapes do not describe a FLUX.2 autoencoder ({exc})") from None
