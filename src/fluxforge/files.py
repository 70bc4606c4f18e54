"""What a FLUX.2 checkpoint holds, read from its configs and tensor headers alone.

`find` resolves the path (a folder, a BFL file, a hub id), reads every config and safetensors header,
recognises the variant, fits the text layers, chooses the dtypes and checks that the networks belong
together, all before a byte of tensor data is read and without building a network: `fluxforge info` stops
here, and `fluxforge.load` builds the networks from what it returns.

Layouts read:
  * a diffusers folder: model_index.json, transformer/, vae/, text_encoder/, tokenizer/, each with a
    config.json and one safetensors file or shards listed by an index (`*.safetensors.index.json`);
  * BFL single files: the transformer (keys optionally prefixed `model.diffusion_model.`) and the
    autoencoder `ae.safetensors`, whose configs are read off the tensor shapes (`fluxforge.bfl`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from fluxforge import bfl, dtypes, hub
from fluxforge.checkpoint import Tensors, stored_dtype
from fluxforge.config import (
    DEMO,
    VARIANTS,
    AutoencoderConfig,
    LanguageConfig,
    SchedulerConfig,
    TextEncoderConfig,
    TransformerConfig,
    Variant,
    get_variant,
)
from fluxforge.errors import CheckpointError

PathLike = str | Path
NETWORKS = ("transformer", "vae", "text_encoder")
# What diffusers' FLUX.2 pipelines read when their call does not say (text_encoder_out_layers=).
DIFFUSERS_TEXT_LAYERS = MappingProxyType({"qwen3": (9, 18, 27), "mistral3": (10, 20, 30)})


@dataclass(frozen=True)
class TransformerFiles:
    tensors: Tensors
    config: TransformerConfig
    bfl_prefix: str | None  # None: diffusers names; else a BFL file whose keys start with this


@dataclass(frozen=True)
class VaeFiles:
    path: Path
    tensors: Tensors
    config: AutoencoderConfig
    bfl: bool  # BFL's ae.safetensors names (renamed by bfl.vae_plan)


@dataclass(frozen=True)
class TextFiles:
    folder: Path
    tokenizer: Path  # the tokenizer's folder
    tensors: Tensors
    language: LanguageConfig
    layers: TextEncoderConfig  # which hidden states are read

    def read(self, key: str) -> bool:
        """Whether the checkpoint key is one the truncated encoder loads: not the LM head, the vision tower,
        the projector, the layers past the deepest one used, or the final norm (used after the last)."""
        if re.search(r"(^|\.)(lm_head|vision_tower|multi_modal_projector)\.", key):
            return False
        if m := re.search(r"\blayers\.(\d+)\.", key):
            return int(m[1]) < self.layers.layers_to_load
        return (
            not re.search(r"(^|\.)norm\.", key)
            or self.layers.layers_to_load == self.language.num_hidden_layers
        )


@dataclass(frozen=True)
class ModelFiles:
    """A model's files, checked, with its variant (its configs filled in from the files) and dtypes."""

    path: Path
    variant: Variant
    transformer: TransformerFiles
    vae: VaeFiles | None
    text: TextFiles | None
    dtype: dtypes.DtypeChoice

    def parameters(self) -> dict[str, int]:
        """Per network, the parameters it is built with (the text encoder's only for the layers read)."""

        def count(tensors: Tensors, keep=lambda key: True) -> int:
            return sum(
                math.prod(e.shape) for k, e in tensors.items() if e.torch_dtype.is_floating_point and keep(k)
            )

        out = {"transformer": count(self.transformer.tensors)}
        if self.vae is not None:  # the latent statistics are buffers, not parameters
            out["vae"] = count(self.vae.tensors, lambda k: not k.startswith("bn."))
        if self.text is not None:
            out["text_encoder"] = count(self.text.tensors, self.text.read)
        return out


def find(
    path: PathLike,
    vae: PathLike | None = None,
    text_encoder: PathLike | None = None,
    device: torch.device | str = "cpu",
    dtype: dtypes.DtypeRule | Mapping[str, dtypes.DtypeRule] = "auto",
    variant: str | Variant | None = None,
    text_encoder_out_layers: Sequence[int] | None = None,
) -> ModelFiles:
    """Everything `fluxforge.load` needs to know before it reads tensor data; see `fluxforge.load`."""
    path = hub.resolve(path)
    rules = _dtype_rules(dtype)
    chosen = get_variant(variant) if isinstance(variant, str) else variant
    scheduler = None
    if path.is_dir():
        index_path = path / "model_index.json"
        if not index_path.is_file() and (path / "config.json").is_file() and path.parent != path:
            raise CheckpointError(
                "this is one component of a diffusers model (it has a config.json but no model_index.json); "
                f"pass the model folder that contains it: {path.parent}",
                path=str(path),
            )
        if not index_path.is_file():
            found = sorted(p.name for p in path.iterdir())[:10]
            raise CheckpointError(
                "not a diffusers-layout folder: model_index.json is missing"
                + (f" (found: {', '.join(found)})" if found else " (the folder is empty)")
                + ". Pass a diffusers FLUX.2 folder, or a BFL transformer .safetensors file with vae=.",
                path=str(path),
            )
        family = family_of_model_index(read_json(index_path), index_path)
        scheduler = _scheduler_config(path / "scheduler" / "scheduler_config.json")
        transformer = transformer_folder(path / "transformer")
        found_variant = resolve_variant(family, transformer.config, chosen, path / "transformer")
        vae = vae if vae is not None else (path / "vae" if (path / "vae").is_dir() else None)
        if text_encoder is None and (path / "text_encoder").is_dir():
            text_encoder, tokenizer = path / "text_encoder", path / "tokenizer"
        else:
            tokenizer = text_encoder
    elif path.is_file():
        transformer = transformer_file(path)
        family = family_of_filename(path.name, transformer.config.guidance_embeds)
        found_variant = resolve_variant(family, transformer.config, chosen, path)
        tokenizer = text_encoder
    else:
        raise CheckpointError("no such file or folder", path=str(path))
    if scheduler is not None:
        found_variant = dataclasses.replace(found_variant, scheduler=scheduler)

    vae_files = vae_path(Path(vae)) if vae is not None else None
    if vae_files is not None:
        _agree(
            transformer.config.in_channels,
            vae_files.config.token_channels,
            "transformer in_channels",
            "autoencoder token channels (latent channels x 4)",
            vae_files.path,
            found_variant,
        )
        found_variant = dataclasses.replace(found_variant, vae=vae_files.config)
    text = None
    if text_encoder is not None:
        text = text_folder(Path(text_encoder), Path(tokenizer), found_variant, text_encoder_out_layers)
        width, hidden = transformer.config.joint_attention_dim, text.layers.hidden_size
        hint = (
            f"; pass text_encoder_out_layers= with {width // hidden} layers"
            if width % hidden == 0 and text_encoder_out_layers is None
            else ""
        )
        _agree(
            width,
            text.layers.feature_dim,
            "transformer joint_attention_dim",
            f"text features ({len(text.layers.out_layers)} layers {text.layers.out_layers} x {hidden})",
            text.folder,
            found_variant,
            hint,
        )
        found_variant = dataclasses.replace(found_variant, text_encoder=text.layers)

    # The dtypes are chosen for the whole model at once: together they must fit in memory.
    parts = {"transformer": (transformer.tensors, None)}
    if vae_files is not None:
        parts["vae"] = (vae_files.tensors, None)
    if text is not None:
        parts["text_encoder"] = (text.tensors, [k for k in text.tensors if text.read(k)])
    stored = {k: stored_dtype(tensors) for k, (tensors, _) in parts.items()}
    fp32 = {k: tensors.nbytes(torch.float32, keys) for k, (tensors, keys) in parts.items()}
    choice = _choose_dtypes(rules, stored, fp32, torch.device(device))
    return ModelFiles(path, found_variant, transformer, vae_files, text, choice)


# ---------------------------------------------------------------------------------------------------------
# One network's files


def transformer_folder(folder: Path) -> TransformerFiles:
    """A diffusers `transformer/` folder."""
    config = read_json(folder / "config.json")
    cls = config.get("_class_name")
    if cls != "Flux2Transformer2DModel":
        hint = f" {FLUX1_HINT}" if cls == "FluxTransformer2DModel" else ""
        raise CheckpointError(
            f"config.json describes {cls!r}, not a Flux2Transformer2DModel.{hint}",
            path=str(folder / "config.json"),
        )
    try:
        cfg = TransformerConfig.from_dict(config)
    except ValueError as exc:
        raise CheckpointError(str(exc), path=str(folder / "config.json")) from None
    return TransformerFiles(Tensors.from_folder(folder, "diffusion_pytorch_model"), cfg, None)


def transformer_file(path: Path) -> TransformerFiles:
    """A BFL transformer file; its config is read off the tensor shapes."""
    tensors = Tensors.from_file(path)
    prefix = bfl.transformer_prefix(tensors)
    if prefix is None:
        raise CheckpointError(
            FLUX1_HINT
            if bfl.looks_like_flux1(tensors)
            else "not a FLUX.2 transformer: the key single_stream_modulation.lin.weight (optionally prefixed "
            "model.diffusion_model.) is missing. For a diffusers folder, pass the folder itself.",
            path=str(path),
        )
    return TransformerFiles(tensors, bfl.transformer_config(tensors, prefix), prefix)


def vae_path(path: Path) -> VaeFiles:
    """A diffusers `vae/` folder, or BFL's `ae.safetensors`."""
    if path.is_dir():
        config_path = path / "config.json"
        config = read_json(config_path)
        if config.get("_class_name") not in (None, "AutoencoderKLFlux2"):
            hint = f" {FLUX1_HINT}" if config.get("_class_name") == "AutoencoderKL" else ""
            raise CheckpointError(
                f"config.json describes {config.get('_class_name')!r}, not AutoencoderKLFlux2.{hint}",
                path=str(config_path),
            )
        try:
            cfg = AutoencoderConfig.from_dict(config)
        except ValueError as exc:
            raise CheckpointError(str(exc), path=str(config_path)) from None
        return VaeFiles(path, Tensors.from_folder(path, "diffusion_pytorch_model"), cfg, bfl=False)
    tensors = Tensors.from_file(path)
    if "bn.running_mean" not in tensors or "encoder.conv_in.weight" not in tensors:
        raise CheckpointError(
            "not a FLUX.2 autoencoder: expected the encoder.* and bn.running_mean keys of BFL's "
            "ae.safetensors"
            + (
                " (this looks like a FLUX.1 autoencoder, which has no bn statistics)"
                if "encoder.conv_in.weight" in tensors
                else ""
            ),
            path=str(path),
        )
    return VaeFiles(path, tensors, bfl.vae_config(tensors), bfl=True)


def text_folder(
    folder: Path, tokenizer: Path, variant: Variant, out_layers: Sequence[int] | None = None
) -> TextFiles:
    """A transformers text-encoder folder (config.json + model*.safetensors) and the layers to read."""
    config_path = folder / "config.json"
    try:
        language = LanguageConfig.from_dict(read_json(config_path))
    except ValueError as exc:
        raise CheckpointError(f"not a FLUX.2 text encoder ({exc})", path=str(config_path)) from None
    layers = fit_text_config(variant, language, out_layers, folder)
    return TextFiles(folder, tokenizer, Tensors.from_folder(folder, "model"), language, layers)


def fit_text_config(
    variant: Variant, lm: LanguageConfig, out_layers: Sequence[int] | None, where: Path
) -> TextEncoderConfig:
    """The variant's text-encoder settings for the language model actually on disk. `out_layers` given:
    those. Otherwise the official encoders use the variant's layers, and any other depth diffusers' default
    layers when the encoder is deep enough for them."""
    te = variant.text_encoder

    def sized(layers: tuple[int, ...]) -> TextEncoderConfig:
        size = dict(kind=lm.kind, hidden_size=lm.hidden_size, num_hidden_layers=lm.num_hidden_layers)
        return dataclasses.replace(te, **size, out_layers=layers)

    if out_layers is not None:
        layers = tuple(out_layers)
        if (
            not layers
            or not all(isinstance(k, int) and not isinstance(k, bool) for k in layers)
            or not all(1 <= k <= lm.num_hidden_layers for k in layers)
        ):
            raise ValueError(
                f"text_encoder_out_layers={out_layers!r}: each must be a layer 1..{lm.num_hidden_layers} "
                f"of this {lm.kind} text encoder (hidden_states[k] is the output of layer k)"
            )
        return sized(layers)
    if (lm.kind, lm.hidden_size, lm.num_hidden_layers) == (te.kind, te.hidden_size, te.num_hidden_layers):
        return te
    default = DIFFUSERS_TEXT_LAYERS[lm.kind]
    if max(default) > lm.num_hidden_layers:
        raise CheckpointError(
            f"the text encoder has {lm.num_hidden_layers} decoder layers, fewer than diffusers' default "
            f"layers {default} need: say which hidden states the transformer was trained on with "
            "text_encoder_out_layers=(...) (--text-layers in the CLI), as many layers as its text features "
            f"are wide in multiples of {lm.hidden_size}",
            path=str(where),
            variant=variant.name,
        )
    return sized(default)


# ---------------------------------------------------------------------------------------------------------
# Variant detection


FLUX1_HINT = (
    "This looks like a FLUX.1 checkpoint; fluxforge runs FLUX.2 only "
    "(dev, klein 4B/9B, klein base 4B/9B, klein 9B KV)."
)


def family_of_model_index(index: dict[str, Any], where: Path) -> str:
    cls = index.get("_class_name")
    if cls == "Flux2Pipeline":
        return "flux.2-dev"
    if cls == "Flux2KleinKVPipeline":
        return "flux.2-klein-kv"
    if cls in ("Flux2KleinPipeline", "Flux2KleinInpaintPipeline", "Flux2KleinImg2ImgPipeline"):
        return "flux.2-klein" if index.get("is_distilled") else "flux.2-klein-base"
    hint = f" {FLUX1_HINT}" if cls and str(cls).startswith("Flux") else ""
    raise CheckpointError(
        f"model_index.json names pipeline {cls!r}, which is not a FLUX.2 pipeline.{hint}", path=str(where)
    )


def family_of_filename(name: str, guidance_embeds: bool) -> str:
    if guidance_embeds:
        return "flux.2-dev"
    lower = name.lower()
    if "kv" in lower.replace(".safetensors", "").split("-"):
        return "flux.2-klein-kv"
    return "flux.2-klein-base" if "base" in lower else "flux.2-klein"


def variant_for(family: str, transformer: TransformerConfig) -> Variant:
    """The registered variant of `family` whose transformer is `transformer`; otherwise the family's
    first registered variant with the file's own transformer config ('custom' size)."""
    members = [v for v in VARIANTS.values() if v.family == family]
    for v in members:
        if v.transformer.same_architecture(transformer):
            return v
    # A custom size is an official model resized; the demo's small defaults (size, steps) would not suit it.
    official = [v for v in members if v is not DEMO]
    closest = min(official, key=lambda v: abs(v.transformer.inner_dim - transformer.inner_dim))
    return dataclasses.replace(closest, name=f"{family}-custom", transformer=transformer)


def _describe(cfg: TransformerConfig) -> str:
    guidance = "with" if cfg.guidance_embeds else "without"
    return (
        f"{cfg.num_layers} double + {cfg.num_single_layers} single blocks, width {cfg.inner_dim}, "
        f"text features {cfg.joint_attention_dim}, {guidance} guidance embedder"
    )


def resolve_variant(family: str, cfg: TransformerConfig, chosen: Variant | None, where: Path) -> Variant:
    """The detected variant, or the one asked for when the files really hold its transformer."""
    detected = variant_for(family, cfg)
    if chosen is None:
        return detected
    if not chosen.transformer.same_architecture(cfg):
        raise CheckpointError(
            f"variant {chosen.name!r} was asked for, but the files hold another transformer: "
            f"{_describe(cfg)}; {chosen.name} has {_describe(chosen.transformer)}",
            path=str(where),
            variant=detected.name,
        )
    return chosen


# ---------------------------------------------------------------------------------------------------------
# Small helpers


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError("file not found", path=str(path)) from None
    except ValueError as exc:
        raise CheckpointError(f"invalid JSON ({exc})", path=str(path)) from None
    if not isinstance(data, dict):
        raise CheckpointError("expected a JSON object", path=str(path))
    return data


def _scheduler_config(path: Path) -> SchedulerConfig | None:
    """The folder's own schedule (None: the variant's). FLUX.2 repos use dynamic exponential shifting."""
    if not path.is_file():
        return None
    try:
        return SchedulerConfig.from_dict(read_json(path))
    except ValueError as exc:
        raise CheckpointError(str(exc), path=str(path)) from None


def _agree(
    a: int, b: int, what_a: str, what_b: str, where: PathLike, variant: Variant, hint: str = ""
) -> None:
    if a != b:
        raise CheckpointError(
            f"these files do not belong together: {what_a} is {a} but {what_b} is {b}{hint}",
            path=str(where),
            variant=variant.name,
        )


def _dtype_rules(dtype: Any) -> dict[str, torch.dtype | str]:
    if isinstance(dtype, Mapping):
        unknown = sorted(set(dtype) - set(NETWORKS))
        if unknown:
            raise ValueError(
                f"dtype: unknown networks {unknown}; a dtype mapping takes {', '.join(NETWORKS)}"
            )
        return {k: dtypes.resolve_dtype(dtype.get(k)) for k in NETWORKS}
    return dict.fromkeys(NETWORKS, dtypes.resolve_dtype(dtype))


def _choose_dtypes(
    rules: dict, stored: dict[str, torch.dtype], fp32: dict[str, int], device: torch.device
) -> dtypes.DtypeChoice:
    """One choice per distinct rule, each over the networks it covers (`fp32`: their bytes in float32)."""
    groups = {
        rule: [k for k in stored if rules[k] == rule] for rule in dict.fromkeys(rules[k] for k in stored)
    }
    chosen, reasons = {}, []
    for rule, names in groups.items():
        choice = dtypes.choose(rule, {k: stored[k] for k in names}, sum(fp32[k] for k in names), device)
        chosen.update(choice.dtypes)
        reasons.append(choice.reason if len(groups) == 1 else f"{', '.join(names)} {choice.reason}")
    return dtypes.DtypeChoice(chosen, "; ".join(reasons))
