"""Load FLUX.2 checkpoints: `fluxforge.files` reads and checks the files, this module builds the networks.

Loading is strict and all-or-nothing. Every module is built on the meta device; every key and shape is
checked against the file headers *before* any tensor data is read, and all problems are reported in one
`CheckpointError` that names the file and the variant it looked like. Tensors are then read one by one,
cast straight to the requested dtype and device, and assigned, so nothing is materialised twice and a
failed load leaves no half-loaded module behind.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fluxforge import bfl, dtypes, files
from fluxforge.checkpoint import Source, load_module, stored_dtype
from fluxforge.config import TextEncoderConfig, Variant
from fluxforge.errors import CheckpointError
from fluxforge.model.autoencoder import AutoEncoder
from fluxforge.model.text import TextEncoder
from fluxforge.model.transformer import Flux2Transformer
from fluxforge.tokenizer import ChatTokenizer

log = logging.getLogger(__name__)

PathLike = str | Path


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


def build_transformer(
    f: files.TransformerFiles, variant: Variant, *, dtype=None, device="cpu"
) -> Flux2Transformer:
    plan = None if f.bfl_prefix is None else bfl.transformer_plan(f.config, f.bfl_prefix)
    return load_module(
        lambda: Flux2Transformer(f.config),
        f.tensors,
        plan,
        dtype=dtype or stored_dtype(f.tensors),
        device=device,
        what="transformer",
        variant=variant.name,
    )


def build_vae(f: files.VaeFiles, *, dtype=None, device="cpu", variant: str | None = None) -> AutoEncoder:
    return load_module(
        lambda: AutoEncoder(f.config),
        f.tensors,
        bfl.vae_plan(f.config, f.tensors) if f.bfl else None,
        dtype=dtype or stored_dtype(f.tensors),
        device=device,
        what="autoencoder",
        variant=variant,
    )


def build_text_encoder(f: files.TextFiles, variant: Variant, *, dtype=None, device="cpu") -> TextEncoder:
    """Only the decoder layers whose hidden states are used are read; deeper layers, the LM head and any
    vision tower are skipped (`TextFiles.read`)."""
    try:
        with torch.device("meta"):
            candidates = TextEncoder(f.language, f.layers.out_layers).checkpoint_keys()
    except ValueError as exc:
        raise CheckpointError(str(exc), path=str(f.folder), variant=variant.name) from None
    plan = {
        k: Source(next((c for c in names if c in f.tensors), names[0])) for k, names in candidates.items()
    }
    encoder = load_module(
        lambda: TextEncoder(f.language, f.layers.out_layers),
        f.tensors,
        plan,
        ignore=lambda key: not f.read(key),
        dtype=dtype or stored_dtype(f.tensors),
        device=device,
        what="text encoder",
        variant=variant.name,
    )
    return encoder.to(device)  # .to moves the RoPE table, which is not in the checkpoint


def load_transformer_folder(
    folder: PathLike, family: str | None, *, dtype=None, device="cpu", variant: Variant | None = None
) -> tuple[Flux2Transformer, Variant]:
    """A diffusers `transformer/` folder alone; `family` None: klein, or dev with a guidance embedder."""
    f = files.transformer_folder(Path(folder))
    family = family or ("flux.2-dev" if f.config.guidance_embeds else "flux.2-klein")
    variant = files.resolve_variant(family, f.config, variant, Path(folder))
    return build_transformer(f, variant, dtype=dtype, device=device), variant


def load_transformer_file(
    path: PathLike, *, dtype=None, device="cpu", variant: Variant | None = None
) -> tuple[Flux2Transformer, Variant]:
    """A BFL transformer file alone; its family comes from its guidance embedder and name."""
    path = Path(path)
    f = files.transformer_file(path)
    family = files.family_of_filename(path.name, f.config.guidance_embeds)
    variant = files.resolve_variant(family, f.config, variant, path)
    return build_transformer(f, variant, dtype=dtype, device=device), variant


def load_vae(path: PathLike, *, dtype=None, device="cpu", variant: str | None = None) -> AutoEncoder:
    """A diffusers `vae/` folder, or BFL's `ae.safetensors`."""
    return build_vae(files.vae_path(Path(path)), dtype=dtype, device=device, variant=variant)


def load_text_encoder(
    folder: PathLike,
    variant: Variant,
    *,
    out_layers: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> tuple[TextEncoder, TextEncoderConfig]:
    """A transformers folder (config.json + model*.safetensors) alone. `out_layers` None: the variant's, or
    diffusers' default for an unofficial depth (`files.fit_text_config`)."""
    f = files.text_folder(Path(folder), Path(folder), variant, out_layers)
    return build_text_encoder(f, variant, dtype=dtype, device=device), f.layers


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
    f = files.find(path, vae, text_encoder, device, dtype, variant, text_encoder_out_layers)
    choice, variant = f.dtype, f.variant
    components = Components(
        variant,
        build_transformer(f.transformer, variant, dtype=choice.dtypes["transformer"], device=device),
        dtype=choice,
    )
    if f.vae is not None:
        components.vae = build_vae(f.vae, dtype=choice.dtypes["vae"], device=device, variant=variant.name)
    if f.text is not None:
        components.text_encoder = build_text_encoder(
            f.text, variant, dtype=choice.dtypes["text_encoder"], device=device
        )
        components.text_encoder_path = f.text.folder
        components.tokenizer = load_tokenizer(f.text.tokenizer)
    log.info("loaded %s from %s in %s", variant.name, f.path, choice.summary())
    return components
