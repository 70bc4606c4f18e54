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
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoProcessor, AutoTokenizer

from fluxforge import bfl
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
from fluxforge.model.text import TextEncoder
from fluxforge.model.transformer import Flux2Transformer

log = logging.getLogger(__name__)

PathLike = str | Path

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(
            f"dtype must be a torch dtype or one of {', '.join(_DTYPES)}; got {dtype!r}"
        ) from None


# ---------------------------------------------------------------------------------------------------------
# Safetensors files


@dataclass(frozen=True)
class _Entry:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name, e.g. "BF16"


class Tensors(Mapping[str, _Entry]):
    """The tensors of one checkpoint (a file, or shards): key -> file, shape, dtype from the headers."""

    def __init__(self, entries: dict[str, _Entry], where: Path) -> None:
        self._entries = entries
        self.where = where

    def __getitem__(self, key: str) -> _Entry:
        return self._entries[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def from_file(cls, path: PathLike) -> Tensors:
        path = Path(path)
        return cls(_read_header(path), path)

    @classmethod
    def from_folder(cls, folder: PathLike, stem: str) -> Tensors:
        """`{stem}.safetensors`, or the shards named by `{stem}.safetensors.index.json`."""
        folder = Path(folder)
        single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
        if single.is_file():
            return cls.from_file(single)
        if not index.is_file():
            found = sorted(p.name for p in folder.glob("*.safetensors*")) if folder.is_dir() else []
            raise CheckpointError(
                f"no weights in {folder}: expected {single.name} or {index.name}"
                + (f" (found {', '.join(found)})" if found else ""),
                path=str(folder),
            )
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"unreadable shard index ({exc})", path=str(index)) from None
        shards = sorted(set(weight_map.values()))
        absent = [s for s in shards if not (folder / s).is_file()]
        if absent:
            raise CheckpointError(
                f"{len(absent)} of {len(shards)} shards named by the index are missing: {', '.join(absent)}",
                path=str(index),
                missing=[k for k, s in weight_map.items() if s in absent],
            )
        entries: dict[str, _Entry] = {}
        for shard in shards:
            entries.update(_read_header(folder / shard))
        listed_elsewhere = [k for k, s in weight_map.items() if k not in entries or entries[k].file.name != s]
        if listed_elsewhere:
            raise CheckpointError(
                "the shard index names tensors that are not in the shard it points to",
                path=str(index),
                missing=listed_elsewhere,
            )
        return cls(entries, index)

    def read(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """The named tensors one at a time, in the order asked, each file opened once: the caller can
        convert and drop each before the next is read, so peak memory stays near the result's size."""
        with ExitStack() as stack:
            handles: dict[Path, Any] = {}
            for key in keys:
                file = self._entries[key].file
                if file not in handles:
                    handles[file] = stack.enter_context(safe_open(file, framework="pt", device="cpu"))
                yield key, handles[file].get_tensor(key)


def _read_header(path: Path) -> dict[str, _Entry]:
    if not path.is_file():
        raise CheckpointError("file not found", path=str(path))
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            entries = {}
            for key in f.keys():
                view = f.get_slice(key)
                entries[key] = _Entry(path, tuple(view.get_shape()), view.get_dtype())
            return entries
    except SafetensorError as exc:
        raise CheckpointError(
            f"not a readable safetensors file ({exc}); it may be truncated or still downloading",
            path=str(path),
        ) from None


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
# Strict loading of one module


@dataclass(frozen=True)
class Source:
    """Where one module tensor comes from in a checkpoint, and how it is reshaped on the way."""

    key: str
    part: tuple[int, int] | None = None  # (i, n): the i-th of n equal row blocks of a fused weight
    swap_halves: bool = False  # exchange the two row halves: BFL (shift; scale) -> (scale; shift)
    squeeze: bool = False  # 1x1 conv [C, C, 1, 1] -> Linear [C, C]

    def shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        if self.part is not None:
            stored = (stored[0] // self.part[1], *stored[1:])
        return stored[:2] if self.squeeze else stored

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        if self.part is not None:
            t = t.chunk(self.part[1], dim=0)[self.part[0]]
        if self.swap_halves:
            a, b = t.chunk(2, dim=0)
            t = torch.cat([b, a], dim=0)
        return t.flatten(1) if self.squeeze else t


Plan = dict[str, Source]  # module key -> source
_OPTIONAL = ("num_batches_tracked",)  # BatchNorm's counter: absent from BFL files, rebuilt as 0


def load_module(
    build: Callable[[], nn.Module],
    tensors: Tensors,
    plan: Plan | None = None,
    *,
    ignore: Callable[[str], bool] = lambda key: False,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    what: str,
    variant: str | None = None,
) -> nn.Module:
    """Build a module on the meta device and fill it strictly from `tensors`.

    `plan` maps module keys to their sources (identity when None). Checkpoint keys that no source uses
    are errors unless `ignore(key)`. Floating tensors are cast to `dtype` (None: as stored)."""
    with torch.device("meta"):
        module = build()
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    plan = plan if plan is not None else {k: Source(k) for k in expected}
    missing, mismatched = [], []
    for key, shape in expected.items():
        src = plan.get(key)
        if src is None or src.key not in tensors:
            if not key.endswith(_OPTIONAL):
                missing.append(src.key if src else key)
            continue
        got = src.shape(tensors[src.key].shape)
        if got != shape:
            mismatched.append(f"{src.key}: file has {list(tensors[src.key].shape)}, expected {list(shape)}")
    used = {src.key for src in plan.values()}
    unexpected = sorted(k for k in tensors if k not in used and not ignore(k))
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"the {what} weights do not fit the {what} of this model",
            path=str(tensors.where),
            variant=variant,
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
        )
    consumers: dict[str, list[tuple[str, Source]]] = {}  # source key -> the module keys it fills
    for key, src in plan.items():
        if key in expected and src.key in tensors:
            consumers.setdefault(src.key, []).append((key, src))
    state = {}
    for source_key, raw in tensors.read(sorted(consumers)):
        for key, src in consumers[source_key]:
            t = src.apply(raw)
            # Always a fresh allocation: safetensors buffers are only 8-byte aligned, and BLAS kernels
            # sum in a different order on unaligned memory (results then differ in the last bits).
            cast = dtype if dtype is not None and t.is_floating_point() else None
            state[key] = t.to(device=device, dtype=cast, copy=True)
        del raw
    for key in expected.keys() - state.keys():  # optional counters
        state[key] = torch.zeros((), dtype=torch.long, device=device)
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def stored_dtype(tensors: Tensors) -> torch.dtype:
    """The floating dtype most of the checkpoint's tensors are stored in."""
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
    counts: dict[torch.dtype, int] = {}
    for entry in tensors.values():
        if entry.dtype in names:
            counts[names[entry.dtype]] = counts.get(names[entry.dtype], 0) + 1
    return max(counts, key=counts.__getitem__) if counts else torch.float32


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


def _fit_text_config(variant: Variant, hf_config: Any) -> TextEncoderConfig:
    """The variant's text-encoder settings for the language model actually on disk. Official sizes use
    the variant's layers; other sizes use the same relative depths (k/4 of the stack for k = 1, 2, 3, which
    gives (9, 18, 27) for Qwen3's 36 layers and (10, 20, 30) for Mistral's 40)."""
    text = getattr(hf_config, "text_config", hf_config)
    hidden, layers = int(text.hidden_size), int(text.num_hidden_layers)
    te = variant.text_encoder
    if (hidden, layers) == (te.hidden_size, te.num_hidden_layers):
        return te
    n = len(te.out_layers)
    out_layers = tuple(sorted({max(1, round(layers * (i + 1) / (n + 1))) for i in range(n)}))
    return dataclasses.replace(te, hidden_size=hidden, num_hidden_layers=layers, out_layers=out_layers)


# ---------------------------------------------------------------------------------------------------------
# Components


@dataclass
class Components:
    """What `load` returns: the networks of one FLUX.2 model and the variant they were recognised as."""

    variant: Variant
    transformer: Flux2Transformer
    vae: AutoEncoder | None = None
    text_encoder: TextEncoder | None = None
    tokenizer: Any = None


def load_transformer_folder(
    folder: PathLike, family: str | None, *, dtype=None, device="cpu", variant: Variant | None = None
) -> tuple[Flux2Transformer, Variant]:
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
    tensors = Tensors.from_folder(folder, "diffusion_pytorch_model")
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
    path: PathLike, *, dtype=None, device="cpu", variant: Variant | None = None
) -> tuple[Flux2Transformer, Variant]:
    path = Path(path)
    tensors = Tensors.from_file(path)
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


def load_vae(path: PathLike, *, dtype=None, device="cpu", variant: str | None = None) -> AutoEncoder:
    """A diffusers `vae/` folder, or BFL's `ae.safetensors`."""
    path = Path(path)
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
        tensors = Tensors.from_folder(path, "diffusion_pytorch_model")
        plan = None
    else:
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


def load_text_encoder(
    folder: PathLike, variant: Variant, *, dtype=None, device="cpu"
) -> tuple[TextEncoder, TextEncoderConfig]:
    """A transformers folder (config.json + model*.safetensors): only the decoder layers whose hidden
    states the variant uses are read; deeper layers, the LM head and any vision tower are skipped."""
    folder = Path(folder)
    try:
        hf_config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"not a transformers text-encoder folder ({exc})", path=str(folder)) from None
    text_cfg = _fit_text_config(variant, hf_config)
    tensors = Tensors.from_folder(folder, "model")
    try:
        with torch.device("meta"):
            candidates = TextEncoder(hf_config, text_cfg.out_layers).checkpoint_keys()
    except ValueError as exc:
        raise CheckpointError(str(exc), path=str(folder), variant=variant.name) from None
    plan = {k: Source(next((c for c in names if c in tensors), names[0])) for k, names in candidates.items()}
    depth = text_cfg.layers_to_load

    def ignore(key: str) -> bool:  # the parts of the checkpoint the DiT never sees
        if re.search(r"(^|\.)(lm_head|vision_tower|multi_modal_projector)\.", key):
            return True
        if m := re.search(r"\blayers\.(\d+)\.", key):
            return int(m[1]) >= depth
        return bool(re.search(r"(^|\.)norm\.", key))  # the final norm, used only after the last layer

    encoder = load_module(
        lambda: TextEncoder(hf_config, text_cfg.out_layers),
        tensors,
        plan,
        ignore=ignore,
        dtype=dtype or stored_dtype(tensors),
        device=device,
        what="text encoder",
        variant=variant.name,
    )
    return encoder.to(device), text_cfg  # .to moves the RoPE tables, which are not in the checkpoint


def load_tokenizer(folder: PathLike, kind: str) -> Any:
    """klein: the Qwen2 tokenizer; dev: the Pixtral processor (it carries the chat template)."""
    try:
        if kind == "mistral3":
            return AutoProcessor.from_pretrained(folder, local_files_only=True)
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except ImportError as exc:  # transformers' PixtralProcessor needs torchvision
        raise ImportError(
            f"the dev tokenizer in {folder} is a Pixtral processor, which transformers builds only with "
            f"torchvision installed (pip install torchvision). {exc}"
        ) from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load the tokenizer ({exc})", path=str(folder)) from None


def load(
    path: PathLike,
    vae: PathLike | None = None,
    text_encoder: PathLike | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    variant: str | Variant | None = None,
) -> Components:
    """Load a FLUX.2 model and recognise which variant it is.

    `path` is a diffusers-layout folder (model_index.json, transformer/, vae/, text_encoder/, tokenizer/)
    or a BFL transformer file. `vae=` (BFL `ae.safetensors` or a diffusers `vae/` folder) and
    `text_encoder=` (a transformers folder with its tokenizer) add or replace those components. `dtype`
    None keeps each component's stored dtype. `variant` overrides detection (a registered name or a
    `Variant`); detection reads model_index.json, the configs and the tensor shapes, and for BFL files
    the file name ('base', 'kv'), since distilled and base weights have the same shapes."""
    path = Path(path)
    dtype = resolve_dtype(dtype)
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
        model, found_variant = load_transformer_folder(
            path / "transformer", family, dtype=dtype, device=device, variant=chosen
        )
        vae = vae if vae is not None else (path / "vae" if (path / "vae").is_dir() else None)
        if text_encoder is None and (path / "text_encoder").is_dir():
            text_encoder, tokenizer_folder = path / "text_encoder", path / "tokenizer"
        else:
            tokenizer_folder = text_encoder
    elif path.is_file():
        model, found_variant = load_transformer_file(path, dtype=dtype, device=device, variant=chosen)
        scheduler = None
        tokenizer_folder = text_encoder
    else:
        raise CheckpointError("no such file or folder", path=str(path))

    if scheduler is not None:
        found_variant = dataclasses.replace(found_variant, scheduler=scheduler)
    components = Components(found_variant, model)
    if vae is not None:
        components.vae = load_vae(vae, dtype=dtype, device=device, variant=found_variant.name)
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
        encoder, text_cfg = load_text_encoder(text_encoder, components.variant, dtype=dtype, device=device)
        _agree(
            model.config.joint_attention_dim,
            encoder.feature_dim,
            "transformer joint_attention_dim",
            f"text features ({len(text_cfg.out_layers)} layers x {text_cfg.hidden_size})",
            text_encoder,
            found_variant,
        )
        components.text_encoder = encoder
        components.tokenizer = load_tokenizer(tokenizer_folder, text_cfg.kind)
        components.variant = dataclasses.replace(components.variant, text_encoder=text_cfg)
    log.info("loaded %s from %s", components.variant.name, path)
    return components


def _scheduler_config(path: Path) -> SchedulerConfig | None:
    """The folder's own schedule (None: the variant's). FLUX.2 repos use dynamic exponential shifting."""
    if not path.is_file():
        return None
    try:
        return SchedulerConfig.from_dict(_read_json(path))
    except ValueError as exc:
        raise CheckpointError(str(exc), path=str(path)) from None


def _agree(a: int, b: int, what_a: str, what_b: str, where: PathLike, variant: Variant) -> None:
    if a != b:
        raise CheckpointError(
            f"these files do not belong together: {what_a} is {a} but {what_b} is {b}",
            path=str(where),
            variant=variant.name,
        )
