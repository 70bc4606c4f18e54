"""Helpers shared by the test files: the tiny klein checkpoint's parts, and how latents are compared.

The tiny Qwen3 has 28 decoder layers, so that diffusers' default text layers (9, 18, 27) exist in it and
fluxforge picks the same ones by itself for an encoder of unofficial size (no text_encoder_out_layers needed).
"""

from __future__ import annotations

import diffusers
import PIL.Image
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tiny import TINY_DIT, tiny_diffusers_transformer, tiny_diffusers_vae
from tiny_text import qwen3_tokenizer, randomize_, tiny_qwen3_config
from transformers import Qwen3ForCausalLM

import fluxforge as ff
from fluxforge import compat

TOL = 1e-5  # fp32 parity: the largest absolute difference allowed in latents
TEXT_DEPTH = 28  # decoder layers of the tiny Qwen3
LAYERS = (9, 18, 27)  # diffusers' default text layers, which fluxforge picks for this depth
KLEIN_DIT = {**TINY_DIT, "joint_attention_dim": 3 * 16, "guidance_embeds": False}  # 3 layers x hidden 16


def parts() -> dict:
    """Fresh components of a tiny klein (the same weights every call), for diffusers' pipelines."""
    torch.manual_seed(0)
    return dict(
        transformer=tiny_diffusers_transformer(**KLEIN_DIT),
        vae=tiny_diffusers_vae(),
        text_encoder=randomize_(Qwen3ForCausalLM(tiny_qwen3_config(TEXT_DEPTH))),
        tokenizer=qwen3_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    """Same shape, and no element further apart than `tol` (absolute)."""
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= tol


def gens(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + b) for b in range(n)]


def picture(width: int, height: int, seed: int) -> PIL.Image.Image:
    gen = torch.Generator().manual_seed(seed)
    data = (torch.rand(height, width, 3, generator=gen) * 255).to(torch.uint8).numpy()
    return PIL.Image.fromarray(data)


# ---------------------------------------------------------------------------------------------------------
# diffusers' klein pipelines saved to folders, each with the facade loaded from it (one per test module)


def saved(theirs, folder, facade):
    theirs.save_pretrained(folder)
    return theirs, facade.from_pretrained(folder)


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    theirs = diffusers.Flux2KleinPipeline(**parts(), is_distilled=True)
    return saved(theirs, tmp_path_factory.mktemp("klein"), compat.Flux2KleinPipeline)


@pytest.fixture(scope="module")
def klein_base(tmp_path_factory):
    theirs = diffusers.Flux2KleinPipeline(**parts())
    return saved(theirs, tmp_path_factory.mktemp("base"), compat.Flux2KleinPipeline)


@pytest.fixture(scope="module")
def kv(tmp_path_factory):
    return saved(
        diffusers.Flux2KleinKVPipeline(**parts()), tmp_path_factory.mktemp("kv"), compat.Flux2KleinKVPipeline
    )


# The same saved folders loaded as fluxforge's own Pipeline (for the batching and cache tests)


@pytest.fixture(scope="module")
def klein_pipeline(tmp_path_factory):
    theirs = diffusers.Flux2KleinPipeline(**parts(), is_distilled=True)
    return saved(theirs, tmp_path_factory.mktemp("klein"), ff.Pipeline)[1]


@pytest.fixture(scope="module")
def base_pipeline(tmp_path_factory):
    return saved(diffusers.Flux2KleinPipeline(**parts()), tmp_path_factory.mktemp("base"), ff.Pipeline)[1]


@pytest.fixture(scope="module")
def kv_pipeline(tmp_path_factory):
    return saved(diffusers.Flux2KleinKVPipeline(**parts()), tmp_path_factory.mktemp("kv"), ff.Pipeline)[1]


@pytest.fixture(scope="module")
def inpaint(tmp_path_factory):
    theirs = diffusers.Flux2KleinInpaintPipeline(**parts())  # a base model: guidance_scale 8 runs CFG
    return saved(theirs, tmp_path_factory.mktemp("inpaint"), compat.Flux2KleinInpaintPipeline)
