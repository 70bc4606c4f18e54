"""Text encoders of any depth (layers chosen at load, rebuilt for the facades' call-time layers, parity with
diffusers), model names as users type them (hub ids, from a cache laid out as the hub's), and the negative
prompt rule."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import pytest
from conftest import LAYERS, assert_close, gens, parts
from diffusers import Flux2KleinPipeline
from tiny_text import randomize_, tiny_qwen3_config
from transformers import Qwen3ForCausalLM

import fluxforge as ff
from fluxforge import CheckpointError, compat

COMMON = dict(max_sequence_length=32)


@pytest.fixture(scope="module")
def shallow(tmp_path_factory):
    """A klein whose text encoder has 3 layers, all three read: joint_attention_dim = 3 x hidden."""
    folder = tmp_path_factory.mktemp("shallow")
    components = {**parts(), "text_encoder": randomize_(Qwen3ForCausalLM(tiny_qwen3_config(3)))}
    pipe = Flux2KleinPipeline(**components, is_distilled=True)
    pipe.save_pretrained(folder)
    return pipe, folder


def test_a_shallow_encoder_asks_for_its_layers(shallow):
    with pytest.raises(CheckpointError, match=r"3 decoder layers, fewer than diffusers' default layers"):
        ff.load(shallow[1])


def test_layers_at_load_time_match_diffusers(shallow):
    theirs, folder = shallow
    ours = ff.Pipeline.from_pretrained(folder, text_encoder_out_layers=(1, 2, 3))
    assert ours.variant.text_encoder.out_layers == (1, 2, 3)
    call = dict(prompt="a fox", height=32, width=32, num_inference_steps=2, output_type="latent", **COMMON)
    call["text_encoder_out_layers"] = (1, 2, 3)
    expected = theirs(**call, generator=gens(3, 1)[0]).images
    got = compat.Flux2KleinPipeline(ours)(**call, generator=gens(3, 1)[0]).images
    assert_close(got, expected)


def test_cli_text_layers(shallow, tmp_path):
    command = [sys.executable, "-m", "fluxforge", "info", str(shallow[1]), "--text-layers", "1,2,3"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "hidden states 1, 2, 3 of 3" in done.stdout


def test_facade_rebuilds_the_encoder_for_other_layers(tmp_path, caplog):
    theirs = Flux2KleinPipeline(**parts(), is_distilled=True)
    theirs.save_pretrained(tmp_path)
    facade = compat.Flux2KleinPipeline.from_pretrained(tmp_path)
    assert facade.pipeline.components.text_encoder.out_layers == LAYERS
    call = dict(prompt="a fox", height=32, width=32, num_inference_steps=2, output_type="latent", **COMMON)
    for _ in range(2):  # the second call finds the rebuilt encoder
        with caplog.at_level(logging.INFO, logger="fluxforge.compat"):
            got = facade(**call, generator=gens(5, 1)[0], text_encoder_out_layers=(2, 4, 6)).images
        expected = theirs(**call, generator=gens(5, 1)[0], text_encoder_out_layers=(2, 4, 6)).images
        assert_close(got, expected)
    assert len([r for r in caplog.records if "rebuilding the text encoder" in r.getMessage()]) == 1
    assert len(facade.pipeline.components.text_encoder.layers) == 6


def test_negative_prompt_needs_guidance_above_one(tmp_path):
    Flux2KleinPipeline(**parts()).save_pretrained(tmp_path)  # a base model: CFG when guidance > 1
    pipe = ff.Pipeline.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"runs when guidance > 1 \(guidance is 1\): raise guidance above 1"):
        pipe.generate("a fox", negative_prompt="blurry", guidance=1.0, width=32, height=32, **COMMON)
    result = pipe.generate("a fox", guidance=1.0, width=32, height=32, steps=1, seed=0, **COMMON)
    assert "negative_prompt" not in result.metadata(0)


def hub_cache(tmp_path, folder) -> tuple[dict, str]:
    """A cache laid out as the hub's, holding one snapshot of `folder` as black-forest-labs/FLUX.2-tiny."""
    repo = tmp_path / "hub" / "models--black-forest-labs--FLUX.2-tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    return env, str(repo / "snapshots" / commit)


def test_hub_id_from_the_local_cache_offline(tmp_path):
    Flux2KleinPipeline(**parts(), is_distilled=True).save_pretrained(tmp_path / "model")
    env, snapshot = hub_cache(tmp_path, tmp_path / "model")
    code = (
        "import fluxforge as ff, sys; from fluxforge import compat\n"
        "c = ff.load('black-forest-labs/FLUX.2-tiny'); print(c.variant.family)\n"
        "p = compat.Flux2KleinPipeline.from_pretrained('black-forest-labs/FLUX.2-tiny'); print('facade ok')\n"
        "try:\n    ff.load('black-forest-labs/FLUX.2-missing')\n"
        "except ff.CheckpointError as e:\n    print(str(e).splitlines()[0])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["flux.2-klein", "facade ok"]
    assert lines[2].startswith("'black-forest-labs/FLUX.2-missing' is no local path, and it cannot be had")
    assert "holds no snapshot of it" in lines[2]


def test_a_local_folder_wins_over_a_hub_id(tmp_path, monkeypatch):
    Flux2KleinPipeline(**parts(), is_distilled=True).save_pretrained(tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("asked the hub for a local folder")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    assert ff.load("org/name").variant.family == "flux.2-klein"
