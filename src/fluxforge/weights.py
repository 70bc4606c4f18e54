"""Find, check and load FLUX.2 checkpoints.

Layouts read:
  * a diffusers folder: model_index.json, transformer/, vae/, text_encoder/, tokenizer/, each with a
    config.json and one safetensors file or shards listed by an index (`*.safetensors.index.json`);
  * BFL single files: the transformer (keys optionally prefixed `model.diffusion_model.`) and the
    autoencoder `ae.safetensors`, renamed by the rules in `fluxforge.bfl`.

Loading is strict and all-or-nothing. Every module is built on the meta device; every key and shape is
checked against the file headers *before* any tensor data is read, and all problems are reported in one
`CheckpointError` that names the file and the variant it looked like. Tensors are then read one by one,
cast straight to the requested dtype and device, and assigned, so nothing is materialised twice and a
failed load leaves no half-loaded module behind.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from fluxforge import bfl, dtypes, hub
from fluxforge.checkpoint import Source, Tensors, load_module, stored_dtype
from fluxforge.config import (
    DEMO,
    VARIANTS,
    AutoencoderConfig,
    SchedulerConfig,
    TextEncoderConfig,
    TransformerConfig,
    Variant,
    get_variant,
)
from fluxforge.errors import CheckpointError
from fluxforge.model.autoencoder import AutoEncoder
from fluxforge.model.text import LanguageConfig, TextEncoder
from fluxforge.model.transformer import Flux2Transformer
from fluxforge.tokenizer import ChatTokenizer

log = logging.getLogger(__name__)

PathLike = str | Path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError("file not found", path=str(path)) from None
    except ValueError as exc:
        raise CheckpointError(f"invalid JSON ({exc})", path=str(path)) from None
    if not isinstance(data, dict):
        raise CheckpointError("expected a JSON object", path=str(path))
    return data


# ---------------------------------------------------------------------------------------------------------
# Variant detection


_FLUX1_HINT = (
    "This looks like a FLUX.1 checkpoint; fluxforge runs FLUX.2 only "
    "(dev, klein 4B/9B, klein base 4B/9B, klein 9B KV)."
)


def _family_of_model_index(index: dict[str, Any], where: Path) -> str:
    cls = index.get("_class_name")
    if cls == "Flux2Pipeline":
        return "flux.2-dev"
    if cls == "Flux2KleinKVPipeline":
        return "flux.2-klein-kv"
    if cls in ("Flux2KleinPipeline", "Flux2KleinInpaintPipeline", "Flux2KleinImg2ImgPipeline"):
        return "flux.2-klein" if index.get("is_distilled") else "flux.2-klein-base"
    hint = f" {_FLUX1_HINT}" if cls and str(cls).startswith("Flux") else ""
    raise CheckpointError(
        f"model_index.json names pipeline {cls!r}, which is not a FLUX.2 pipeline.{hint}", path=str(where)
    )


def _family_of_filename(name: str, guidance_embeds: bool) -> str:
    if guidance_embeds:
        return "flux.2-dev"
    lower = name.lower()
    if "kv" in lower.replace(".safetensors", "").split("-"):
        return "flux.2-klein-kv"
    return "flux.2-klein-base" if "base" in lower else "flux.2-klein"


def _variant_for(family: str, transformer: TransformerConfig) -> Variant:
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


def _resolve_variant(family: str, cfg: TransformerConfig, chosen: Variant | None, where: Path) -> Variant:
    """The detected variant, or the one asked for when the files really hold its transformer."""
    detected = _variant_for(family, cfg)
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


# What diffusers' FLUX.2 pipelines read when their call does not say (text_encoder_out_layers=).
DIFFUSERS_TEXT_LAYERS = MappingProxyType({"qwen3": (9, 18, 27), "mistral3": (10, 20, 30)})


def _fit_text_config(
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
# Components


@dataclass
class Components:
    """What `load` returns: the networks of one FLUX.2 model and the variant they were recognised as."""

    variant: Variant
    transformer: Flux2Transformer
    vae: AutoEncoder | None = None
    text_encoder: TextEncoder | None = None
    tokenizer: ChatTokenizer | None = None
    text_encoder_path: Path | None = None  # where the text encoder came from, to rebuild it for other layers
    dtype: dtypes.DtypeChoice | None = None  # the dtype of each network, and why


def load_transformer_folder(
    folder: PathLike,
    family: str | None,
    *,
    dtype=None,
    device="cpu",
    variant: Variant | None = None,
    tensors: Tensors | None = None,
) -> tuple[Flux2Transformer, Variant]:
    """A diffusers `transformer/` folder; `tensors`: its headers, when the caller has read them."""
    folder = Path(folder)
    config = _read_json(folder / "config.json")
    cls = config.get("_class_name")
    if cls != "Flux2Transformer2DModel":
        hint = f" {_FLUX1_HINT}" if cls == "FluxTransformer2DModel" else ""
        raise CheckpointError(
            f"config.json describes {cls!r}, not a Flux2Transformer2DModel.{hint}",
            path=str(folder / "config.json"),
        )
    try:
        cfg = TransformerConfig.from_dict(config)
    except ValueError as exc:
        raise CheckpointError(str(exc), path=str(folder / "config.json")) from None
    family = family or ("flux.2-dev" if cfg.guidance_embeds else "flux.2-klein")
    variant = _resolve_variant(family, cfg, variant, folder)
    tensors = Tensors.from_folder(folder, "diffusion_pytorch_model") if tensors is None else tensors
    model = load_module(
        lambda: Flux2Transformer(cfg),
        tensors,
        dtype=dtype or stored_dtype(tensors),
        device=device,
        what="transformer",
        variant=variant.name,
    )
    return model, variant


def load_transformer_file(
    path: PathLike,
    *,
    dtype=None,
    device="cpu",
    variant: Variant | None = None,
    tensors: Tensors | None = None,
) -> tuple[Flux2Transformer, Variant]:
    """A BFL transformer file; `tensors`: its headers, when the caller has read them."""
    path = Path(path)
    tensors = Tensors.from_file(path) if tensors is None else tensors
    prefix = bfl.transformer_prefix(tensors)
    if prefix is None:
        flux1 = bfl.looks_like_flux1(tensors)
        raise CheckpointError(
            _FLUX1_HINT
            if flux1
            else "not a FLUX.2 transformer: the key single_stream_modulation.lin.weight (optionally prefixed "
            "model.diffusion_model.) is missing. For a diffusers folder, pass the folder itself.",
            path=str(path),
        )
    cfg = bfl.transformer_config(tensors, prefix)
    variant = _resolve_variant(_family_of_filename(path.name, cfg.guidance_embeds), cfg, variant, path)
    model = load_module(
        lambda: Flux2Transformer(cfg),
        tensors,
        bfl.transformer_plan(cfg, prefix),
        dtype=dtype or stored_dtype(tensors),
        device=device,
        what="transformer",
        variant=variant.name,
    )
    return model, variant


def load_vae(
    path: PathLike, *, dtype=None, device="cpu", variant: str | None = None, tensors: Tensors | None = None
) -> AutoEncoder:
    """A diffusers `vae/` folder, or BFL's `ae.safetensors`; `tensors`: its headers, if already read."""
    path = Path(path)
    tensors = _vae_tensors(path) if tensors is None else tensors
    if path.is_dir():
        config_path = path / "config.json"
        config = _read_json(config_path)
        if config.get("_class_name") not in (None, "AutoencoderKLFlux2"):
            hint = f" {_FLUX1_HINT}" if config.get("_class_name") == "AutoencoderKL" else ""
            raise CheckpointError(
                f"config.json describes {config.get('_class_name')!r}, not AutoencoderKLFlux2.{hint}",
                path=str(config_path),
            )
        try:
            cfg = AutoencoderConfig.from_dict(config)
        except ValueError as exc:
            raise CheckpointError(str(exc), path=str(config_path)) from None
        plan = None
    else:
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
        cfg = bfl.vae_config(tensors)
        plan = bfl.vae_plan(cfg, tensors)
    return load_module(
        lambda: AutoEncoder(cfg),
        tensors,
        plan,
        dtype=dtype or stored_dtype(tensors),
        device=device,
        what="autoencoder",
        variant=variant,
    )


def _vae_tensors(path: Path) -> Tensors:
    return Tensors.from_folder(path, "diffusion_pytorch_model") if path.is_dir() else Tensors.from_file(path)


def _text_encoder_files(folder: Path) -> tuple[LanguageConfig, Tensors]:
    config_path = folder / "config.json"
    try:
        lm = LanguageConfig.from_dict(_read_json(config_path))
    except ValueError as exc:
        raise CheckpointError(f"not a FLUX.2 text encoder ({exc})", path=str(config_path)) from None
    return lm, Tensors.from_folder(folder, "model")


def _text_plan(
    lm: LanguageConfig, text_cfg: TextEncoderConfig, tensors: Tensors, variant: Variant, where: Path
):
    """The module-key plan for the layers used, and which checkpoint keys are deliberately left unread."""
    try:
        with torch.device("meta"):
            candidates = TextEncoder(lm, text_cfg.out_layers).checkpoint_keys()
    except ValueError as exc:
        raise CheckpointError(str(exc), path=str(where), variant=variant.name) from None
    plan = {k: Source(next((c for c in names if c in tensors), names[0])) for k, names in candidates.items()}
    depth = text_cfg.layers_to_load

    def ignore(key: str) -> bool:  # the parts of the checkpoint the DiT never sees
        if re.search(r"(^|\.)(lm_head|vision_tower|multi_modal_projector)\.", key):
            return True
        if m := re.search(r"\blayers\.(\d+)\.", key):
            return int(m[1]) >= depth
        return bool(re.search(r"(^|\.)norm\.", key))  # the final norm, used only after the last layer

    return plan, ignore


def load_text_encoder(
    folder: PathLike,
    variant: Variant,
    *,
    out_layers: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    files: tuple[LanguageConfig, Tensors] | None = None,
) -> tuple[TextEncoder, TextEncoderConfig]:
    """A transformers folder (config.json + model*.safetensors): only the decoder layers whose hidden
    states are used are read; deeper layers, the LM head and any vision tower are skipped. `out_layers`
    None: the variant's, or diffusers' default for an unofficial depth (`_fit_text_config`). `files`: the
    config and headers, when the caller has read them."""
    folder = Path(folder)
    lm, tensors = _text_encoder_files(folder) if files is None else files
    text_cfg = _fit_text_config(variant, lm, out_layers, folder)
    plan, ignore = _text_plan(lm, text_cfg, tensors, variant, folder)
    encoder = load_module(
        lambda: TextEncoder(lm, text_cfg.out_layers),
        tensors,
        plan,
        ignore=ignore,
        dtype=dtype or stored_dtype(tensors),
        device=device,
        what="text encoder",
        variant=variant.name,
    )
    return encoder.to(device), text_cfg  # .to moves the RoPE table, which is not in the checkpoint


def load_tokenizer(folder: PathLike) -> ChatTokenizer:
    """The text encoder's tokenizer.json and chat template (klein: Qwen's; dev: the Pixtral processor's)."""
    return ChatTokenizer.from_folder(folder)


def load(
    path: PathLike,
    vae: PathLike | None = None,
    text_encoder: PathLike | None = None,
    device: torch.device | str = "cpu",
    dtype: dtypes.DtypeRule | Mapping[str, dtypes.DtypeRule] = "auto",
    variant: str | Variant | None = None,
    text_encoder_out_layers: Sequence[int] | None = None,
) -> Components:
    """Load a FLUX.2 model and recognise which variant it is.

    `path` is a diffusers-layout folder (model_index.json, transformer/, vae/, text_encoder/, tokenizer/),
    a BFL transformer file, or a hub repository id ("black-forest-labs/FLUX.2-klein-4B", see `fluxforge.hub`)
    when no such local path exists. `vae=` (BFL `ae.safetensors` or a diffusers `vae/` folder) and
    `text_encoder=` (a transformers folder with its tokenizer) add or replace those components.

    `dtype`: "auto" (None too) keeps each network's stored dtype where the device computes it natively and
    takes float32 where it does not (`fluxforge.dtypes`); "stored" keeps what the files hold; a dtype casts
    everything to it; a mapping sets it per network ("transformer", "vae", "text_encoder").
    `variant` overrides detection (a registered name or a `Variant`); detection reads model_index.json, the
    configs and the tensor shapes, and for BFL files the file name ('base', 'kv'), since distilled and base
    weights have the same shapes. `text_encoder_out_layers` chooses the text encoder's hidden states."""
    path = hub.resolve(path)
    device = torch.device(device)
    rules = _dtype_rules(dtype)
    chosen = get_variant(variant) if isinstance(variant, str) else variant
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
        family = _family_of_model_index(_read_json(index_path), index_path)
        scheduler = _scheduler_config(path / "scheduler" / "scheduler_config.json")
        transformer_tensors = Tensors.from_folder(path / "transformer", "diffusion_pytorch_model")
        vae = vae if vae is not None else (path / "vae" if (path / "vae").is_dir() else None)
        if text_encoder is None and (path / "text_encoder").is_dir():
            text_encoder, tokenizer_folder = path / "text_encoder", path / "tokenizer"
        else:
            tokenizer_folder = text_encoder
    elif path.is_file():
        family = scheduler = None
        transformer_tensors = Tensors.from_file(path)
        tokenizer_folder = text_encoder
    else:
        raise CheckpointError("no such file or folder", path=str(path))
    vae = Path(vae) if vae is not None else None
    text_encoder = Path(text_encoder) if text_encoder is not None else None

    # Every header first: the dtypes are chosen for the whole model (they must fit in memory together).
    parts = {"transformer": transformer_tensors}
    if vae is not None:
        parts["vae"] = _vae_tensors(vae)
    if text_encoder is not None:
        lm, parts["text_encoder"] = _text_encoder_files(text_encoder)
    choice = _choose_dtypes(rules, parts, device)

    if path.is_dir():
        model, found_variant = load_transformer_folder(
            path / "transformer",
            family,
            dtype=choice.dtypes["transformer"],
            device=device,
            variant=chosen,
            tensors=parts["transformer"],
        )
    else:
        model, found_variant = load_transformer_file(
            path,
            dtype=choice.dtypes["transformer"],
            device=device,
            variant=chosen,
            tensors=parts["transformer"],
        )
    if scheduler is not None:
        found_variant = dataclasses.replace(found_variant, scheduler=scheduler)
    components = Components(found_variant, model, dtype=choice)
    if vae is not None:
        components.vae = load_vae(
            vae, dtype=choice.dtypes["vae"], device=device, variant=found_variant.name, tensors=parts["vae"]
        )
        _agree(
            model.config.in_channels,
            components.vae.config.token_channels,
            "transformer in_channels",
            "autoencoder token channels (latent channels x 4)",
            vae,
            found_variant,
        )
        components.variant = dataclasses.replace(components.variant, vae=components.vae.config)
    if text_encoder is not None:
        text_cfg = _fit_text_config(components.variant, lm, text_encoder_out_layers, text_encoder)
        width, hidden = model.config.joint_attention_dim, text_cfg.hidden_size
        hint = (
            f"; pass text_encoder_out_layers= with {width // hidden} layers"
            if width % hidden == 0 and text_encoder_out_layers is None
            else ""
        )
        _agree(
            width,
            text_cfg.feature_dim,
            "transformer joint_attention_dim",
            f"text features ({len(text_cfg.out_layers)} layers {text_cfg.out_layers} x {hidden})",
            text_encoder,
            found_variant,
            hint,
        )
        encoder, text_cfg = load_text_encoder(
            text_encoder,
            components.variant,
            out_layers=text_cfg.out_layers,
            dtype=choice.dtypes["text_encoder"],
            device=device,
            files=(lm, parts["text_encoder"]),
        )
        components.text_encoder, components.text_encoder_path = encoder, text_encoder
        components.tokenizer = load_tokenizer(tokenizer_folder)
        components.variant = dataclasses.replace(components.variant, text_encoder=text_cfg)
    log.info("loaded %s from %s in %s", components.variant.name, path, choice.summary())
    return components


_NETWORKS = ("transformer", "vae", "text_encoder")


def _dtype_rules(dtype: Any) -> dict[str, torch.dtype | str]:
    if isinstance(dtype, Mapping):
        unknown = sorted(set(dtype) - set(_NETWORKS))
        if unknown:
            raise ValueError(
                f"dtype: unknown networks {unknown}; a dtype mapping takes {', '.join(_NETWORKS)}"
            )
        return {k: dtypes.resolve_dtype(dtype.get(k)) for k in _NETWORKS}
    rule = dtypes.resolve_dtype(dtype)
    return dict.fromkeys(_NETWORKS, rule)


def _choose_dtypes(rules: dict, parts: dict[str, Tensors], device: torch.device) -> dtypes.DtypeChoice:
    """One choice per distinct rule, each over the networks it covers."""
    groups = {rule: [k for k in parts if rules[k] == rule] for rule in dict.fromkeys(rules[k] for k in parts)}
    chosen, reasons = {}, []
    for rule, names in groups.items():
        stored = {k: stored_dtype(parts[k]) for k in names}
        fp32 = sum(parts[k].nbytes(torch.float32) for k in names)
        choice = dtypes.choose(rule, stored, fp32, device)
        chosen.update(choice.dtypes)
        reasons.append(choice.reason if len(groups) == 1 else f"{', '.join(names)} {choice.reason}")
    return dtypes.DtypeChoice(chosen, "; ".join(reasons))


def _scheduler_config(path: Path) -> SchedulerConfig | None:
    """The folder's own schedule (None: the variant's). FLUX.2 repos use dynamic exponential shifting."""
    if not path.is_file():
        return None
    try:
        return SchedulerConfig.from_dict(_read_json(path))
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
