"""dtype="auto": the stored dtype where the device computes it natively, float32 where it is emulated, never
below the stored precision; explicit dtypes are obeyed (with a warning where emulated); the facades load
as diffusers does."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
from conftest import parts
from diffusers import Flux2KleinPipeline

import fluxforge as ff
from fluxforge import compat, dtypes

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    """A tiny klein stored in bfloat16, as the real klein checkpoints are."""
    folder = tmp_path_factory.mktemp("bf16")
    pipe = Flux2KleinPipeline(**parts(), is_distilled=True).to(torch.bfloat16)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def fp32_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp32")
    Flux2KleinPipeline(**parts(), is_distilled=True).save_pretrained(folder)
    return folder


def network_dtypes(c: ff.Components) -> set[torch.dtype]:
    return {next(m.parameters()).dtype for m in (c.transformer, c.vae, c.text_encoder)}


@pytest.mark.parametrize("native", [False, True], ids=["emulated", "native"])
def test_auto_keeps_bf16_only_where_native(bf16_folder, monkeypatch, native):
    monkeypatch.setattr(dtypes, "native", lambda dtype, device: native or dtype == torch.float32)
    c = ff.load(bf16_folder)
    assert network_dtypes(c) == {torch.bfloat16 if native else torch.float32}
    assert ("emulates; float32 is exact" in c.dtype.reason) != native
    # The float32 copy is the stored bf16 values, exactly.
    stored = ff.load(bf16_folder, dtype="stored").transformer.x_embedder.weight
    assert stored.dtype == torch.bfloat16 and torch.equal(
        c.transformer.x_embedder.weight.to(stored.dtype), stored
    )


def test_auto_never_lowers_fp32(fp32_folder, monkeypatch):
    monkeypatch.setattr(dtypes, "native", lambda dtype, device: True)  # even where bf16 would be native
    c = ff.load(fp32_folder)
    assert network_dtypes(c) == {torch.float32} and c.dtype.reason.startswith("as stored")
    assert ff.load(fp32_folder, dtype=None).dtype.dtypes == c.dtype.dtypes  # None means auto


def test_auto_keeps_bf16_when_fp32_would_not_fit(bf16_folder, monkeypatch, caplog):
    monkeypatch.setattr(dtypes, "native", lambda dtype, device: dtype == torch.float32)
    monkeypatch.setattr(dtypes, "_free_bytes", lambda device: 1024)
    with caplog.at_level(logging.WARNING, logger="fluxforge.dtypes"):
        c = ff.load(bf16_folder)
    assert network_dtypes(c) == {torch.bfloat16}
    (record,) = [r for r in caplog.records if r.name == "fluxforge.dtypes"]
    assert "would not fit" in record.getMessage() and "slower than float32" in record.getMessage()
    assert "float32 would not fit in memory" in c.dtype.reason


def test_explicit_bf16_where_emulated_works_with_one_warning(fp32_folder, monkeypatch, caplog):
    monkeypatch.setattr(dtypes, "native", lambda dtype, device: dtype == torch.float32)
    with caplog.at_level(logging.WARNING, logger="fluxforge.dtypes"):
        pipe = ff.Pipeline.from_pretrained(fp32_folder, dtype="bfloat16")
    assert len([r for r in caplog.records if r.name == "fluxforge.dtypes"]) == 1
    assert "bfloat16 is not native" in caplog.records[-1].getMessage()
    result = pipe.generate("a fox", width=32, height=32, steps=1, seed=0, max_sequence_length=16)
    assert result.info["dtype"] == "bfloat16" and result.info["dtype_reason"] == "bfloat16 as asked"


def test_result_info_says_which_dtype_and_why(bf16_folder):
    pipe = ff.Pipeline.from_pretrained(bf16_folder)
    info = pipe.generate("a fox", width=32, height=32, steps=1, seed=0, max_sequence_length=16).info
    expected = "bfloat16" if dtypes.native(torch.bfloat16, CPU) else "float32"
    assert info["dtype"] == expected and info["dtype_reason"] == pipe.components.dtype.reason


def test_emulation_switches_are_honoured():
    """ATEN_CPU_CAPABILITY=avx2 (how an AMX Xeon stands in for an AVX2 EPYC) makes bf16 emulated."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    code = "import torch; from fluxforge import dtypes; "
    code += "print(dtypes.native(torch.bfloat16, torch.device('cpu')))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_facades_load_as_diffusers_does(bf16_folder):
    """diffusers with no torch_dtype: its transformer and VAE in float32, the text encoder as stored."""
    theirs = Flux2KleinPipeline.from_pretrained(bf16_folder)
    ours = compat.Flux2KleinPipeline.from_pretrained(bf16_folder).pipeline
    assert theirs.transformer.dtype == ours.transformer.dtype == torch.float32
    assert theirs.vae.dtype == next(ours.vae.parameters()).dtype == torch.float32
    assert (
        theirs.text_encoder.dtype == ours.components.text_encoder.embed_tokens.weight.dtype == torch.bfloat16
    )
    for given in (dict(dtype=torch.bfloat16), dict(torch_dtype=torch.bfloat16)):
        pipe = compat.Flux2KleinPipeline.from_pretrained(bf16_folder, **given).pipeline
        assert network_dtypes(pipe.components) == {torch.bfloat16}


def test_bad_dtype_names_fail_before_loading(fp32_folder):
    with pytest.raises(ValueError, match="dtype must be 'auto', 'stored', a torch dtype or one of"):
        ff.load(fp32_folder, dtype="half-ish")
    with pytest.raises(ValueError, match="unknown networks \\['unet'\\]"):
        ff.load(fp32_folder, dtype={"unet": "float32"})
