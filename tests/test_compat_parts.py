"""What ported diffusers code reaches for on a FLUX.2 pipeline, through fluxforge.compat on tiny checkpoints:
diffusers' own docstring examples with only the import changed, the attributes and parts (scheduler, image
and mask processors, progress bar, interrupt), model offload (every move recorded), and LoRA through the
loader methods, against diffusers 0.42.1."""

from __future__ import annotations

import importlib
import logging
import re

import diffusers
import numpy as np
import pytest
import torch
from conftest import KLEIN_DIT, assert_close, parts, picture
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
from test_compat import KW
from test_lora import diffusers_lora, in_blocks
from tiny import tiny_diffusers_transformer, tiny_diffusers_vae
from tiny_text import mistral3_tokenizer, randomize_, tiny_mistral3_config
from transformers import Mistral3ForConditionalGeneration

from fluxforge import compat


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------
# diffusers' docstring examples, only the import changed (and the hub, the network and CUDA made local)


def examples() -> list[tuple[str, str]]:
    out = []
    for name in (
        "pipeline_flux2",
        "pipeline_flux2_klein",
        "pipeline_flux2_klein_kv",
        "pipeline_flux2_klein_inpaint",
    ):
        doc = importlib.import_module(f"diffusers.pipelines.flux2.{name}").EXAMPLE_DOC_STRING
        for i, block in enumerate(re.findall(r"```py\n(.*?)```", doc, re.S)):
            lines = [re.sub(r"^\s*(>>>|\.\.\.) ?", "", line) for line in block.splitlines()]
            out.append((f"{name}-{i}", "\n".join(line for line in lines if line.strip())))
    return out


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The hub ids of the examples, as tiny local folders of the same kind."""
    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    mistral = Mistral3ForConditionalGeneration(tiny_mistral3_config(num_text_layers=31))
    dev = diffusers.Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_diffusers_vae(),
        text_encoder=randomize_(mistral),
        tokenizer=mistral3_tokenizer(),
        transformer=tiny_diffusers_transformer(**{**KLEIN_DIT, "guidance_embeds": True}),
    )
    pipes = {
        "black-forest-labs/FLUX.2-dev": dev,
        "black-forest-labs/FLUX.2-klein-base-9B": diffusers.Flux2KleinPipeline(**parts()),
        "black-forest-labs/FLUX.2-klein-9b-kv": diffusers.Flux2KleinKVPipeline(**parts()),
    }
    folders = {}
    for hub_id, pipe in pipes.items():
        folders[hub_id] = root / hub_id.split("/")[1]
        pipe.save_pretrained(folders[hub_id])
    return folders


def local(code: str, folders: dict) -> str:
    code = code.replace("from diffusers import", "from fluxforge.compat import")
    code = code.replace("from diffusers.utils import load_image", "")
    code = code.replace('pipe.to("cuda")', 'pipe.to("cpu")')
    for hub_id, folder in folders.items():
        code = code.replace(f'"{hub_id}"', repr(str(folder)))
    return code


def load_image(url: str):
    """The examples' network images, as local pictures: a white-on-black mask for mask URLs."""
    if "mask" in url:
        mask = np.zeros((48, 64, 3), np.uint8)
        mask[12:36, 16:48] = 255
        return __import__("PIL.Image").Image.fromarray(mask)
    return picture(64, 48, len(url))


@pytest.mark.parametrize("name,code", examples())
def test_docstring_examples(name, code, hub, tmp_path, monkeypatch):
    """Each example as diffusers 0.42.1 prints it. Those that pass the prompt positionally are broken in
    diffusers too (the first positional argument is image=): they get fluxforge's teaching error, and with
    the prompt passed by name, as that error says, they run."""
    monkeypatch.chdir(tmp_path)
    picture(64, 48, 3).save("reference.png")
    code = local(code, hub)
    scope = {"load_image": load_image}
    positional = re.search(r"pipe\(\s*(prompt\s*,|\")", code)
    if positional:
        with pytest.raises(TypeError, match="pass the prompt by name"):
            exec(code, scope)
        code = re.sub(r"pipe\((prompt|\"[^\"]*\")", r"pipe(prompt=\1", code)
    exec(code, dict(scope))
    saved_files = list(tmp_path.glob("*.png"))
    assert len(saved_files) == 2  # the reference and the example's output
    output = [f for f in saved_files if f.name != "reference.png"][0]
    assert __import__("PIL.Image").Image.open(output).size[0] > 0


# ---------------------------------------------------------------------------------------------------------
# Attributes


def test_attributes_are_diffusers(klein_base):
    theirs, ours = klein_base
    assert ours.vae_scale_factor == theirs.vae_scale_factor
    assert set(ours.components) == set(theirs.components)
    assert ours.transformer is ours.pipeline.transformer and ours.vae is ours.pipeline.vae
    assert ours.text_encoder is ours.pipeline.components.text_encoder
    assert ours.tokenizer is ours.pipeline.components.tokenizer
    assert ours.model_cpu_offload_seq == theirs.model_cpu_offload_seq
    assert ours.interrupt is False and ours.num_timesteps is None
    for key in ("shift", "use_dynamic_shifting", "time_shift_type", "num_train_timesteps"):
        assert ours.scheduler.config[key] == theirs.scheduler.config[key]
        assert getattr(ours.scheduler.config, key) == getattr(theirs.scheduler.config, key)
    kwargs = dict(prompt="a fox", height=32, width=32, num_inference_steps=3, guidance_scale=4.0, **KW)
    theirs(generator=generator(), **kwargs)
    ours(generator=generator(), **kwargs)
    assert ours.num_timesteps == theirs.num_timesteps == 3
    assert ours.guidance_scale == theirs.guidance_scale == 4.0
    assert ours.do_classifier_free_guidance is theirs.do_classifier_free_guidance is True
    assert_close(ours.scheduler.timesteps, theirs.scheduler.timesteps, 1e-3)
    assert_close(ours.scheduler.sigmas, theirs.scheduler.sigmas, 1e-6)
    ours.scheduler.set_timesteps(5, image_seq_len=64)  # as the FLUX.2 pipelines call it
    theirs.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 5, 5), mu=_mu(64, 5))
    assert_close(ours.scheduler.sigmas, theirs.scheduler.sigmas, 1e-6)


def _mu(tokens: int, steps: int) -> float:
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    return compute_empirical_mu(tokens, steps)


def test_interrupt_skips_the_remaining_steps_as_in_diffusers(klein):
    theirs, ours = klein

    def stop_after_two(pipe, i, t, kwargs):
        if i == 1:
            pipe._interrupt = True
        return kwargs

    kwargs = dict(prompt="a fox", height=32, width=32, num_inference_steps=4, output_type="pt", **KW)
    expected = theirs(generator=generator(), callback_on_step_end=stop_after_two, **kwargs).images
    got = ours(generator=generator(), callback_on_step_end=stop_after_two, **kwargs).images
    full = ours(generator=generator(), **kwargs).images
    assert_close(got, expected)
    assert (got - full).abs().max() > 1e-3  # it did stop early


def test_progress_bar_as_configured(klein, capsys):
    _, ours = klein
    kwargs = dict(prompt="a fox", height=32, width=32, num_inference_steps=2, output_type="latent", **KW)
    ours.set_progress_bar_config(disable=True)
    ours(**kwargs)
    assert "it/s" not in capsys.readouterr().err
    ours.set_progress_bar_config(desc="denoising")
    ours(**kwargs)
    err = capsys.readouterr().err
    assert "denoising" in err and "2/2" in err
    ours.set_progress_bar_config(disable=True)


def test_a_prompt_passed_first_beside_image_teaches(kv):
    _, ours = kv
    with pytest.raises(TypeError) as err:
        ours("A cat dressed like a wizard", image=picture(32, 32, 1))
    message = str(err.value)
    assert "first positional argument, which is image=" in message
    assert "pipe(prompt='A cat dressed like a wizard', image=...)" in message


# ---------------------------------------------------------------------------------------------------------
# Image and mask processors against diffusers'


def test_image_processor_matches_diffusers(inpaint):
    theirs, ours = inpaint
    image = picture(50, 37, 4)
    array = np.asarray(picture(40, 24, 5)).astype(np.float32) / 255
    for ours_p, theirs_p in ((ours.image_processor, theirs.image_processor),
                             (ours.mask_processor, theirs.mask_processor)):  # fmt: skip
        assert torch.equal(ours_p.preprocess(image), theirs_p.preprocess(image))
        assert torch.equal(ours_p.preprocess(image, 32, 48), theirs_p.preprocess(image, 32, 48))
        if ours_p is ours.image_processor:
            assert torch.equal(ours_p.preprocess(array[None]), theirs_p.preprocess(array[None]))
            tensor = torch.from_numpy(array).permute(2, 0, 1)[None]
            assert torch.equal(ours_p.preprocess(tensor, 16, 32), theirs_p.preprocess(tensor, 16, 32))
    pixels = torch.rand(2, 3, 16, 24) * 2 - 1
    for kind in ("pt", "np"):
        assert np.array_equal(
            np.asarray(ours.image_processor.postprocess(pixels, kind)),
            np.asarray(theirs.image_processor.postprocess(pixels, kind)),
        )
    pils = zip(
        ours.image_processor.postprocess(pixels), theirs.image_processor.postprocess(pixels), strict=True
    )
    for a, b in pils:
        assert a.tobytes() == b.tobytes()
    mask = load_image("mask")
    assert ours.mask_processor.blur(mask, blur_factor=12).tobytes() == (
        theirs.mask_processor.blur(mask, blur_factor=12).tobytes()
    )
    assert isinstance(theirs.mask_processor, Flux2ImageProcessor)


# ---------------------------------------------------------------------------------------------------------
# Offload


def test_model_offload_moves_each_network_for_its_stage(klein, tmp_path, monkeypatch):
    theirs, _ = klein
    theirs.save_pretrained(tmp_path)
    pipe = compat.Flux2KleinPipeline.from_pretrained(tmp_path)
    kwargs = dict(
        prompt="a fox", image=picture(32, 32, 1), height=32, width=32, num_inference_steps=2, output_type="pt"
    )
    expected = pipe(generator=generator(), **kwargs, **KW).images
    moves: list[tuple[str, str]] = []
    for name in ("text_encoder", "transformer", "vae"):
        module = getattr(pipe, name)
        original = module.to

        def record(*args, _name=name, _to=original, **kw):
            moves.append((_name, str(args[0] if args else kw.get("device"))))
            return _to(*args, **kw)

        monkeypatch.setattr(module, "to", record)
    pipe.enable_model_cpu_offload(device="cpu")  # the target device is a parameter: driven on the CPU here
    moves.clear()
    got = pipe(generator=generator(), **kwargs, **KW).images
    assert torch.equal(got, expected)
    stages = [name for i, (name, _) in enumerate(moves) if i % 2 == 0]
    assert stages == ["text_encoder", "vae", "transformer", "vae"]  # in, then back, per stage
    assert all(device == "cpu" for _, device in moves)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has an accelerator")
def test_offload_without_an_accelerator_changes_nothing_and_says_so_once(klein, caplog):
    from fluxforge import offload

    offload.say_no_accelerator.cache_clear()
    _, ours = klein
    with caplog.at_level(logging.WARNING):
        ours.enable_model_cpu_offload()
        ours.enable_model_cpu_offload()
    assert ours.pipeline.offload is None
    said = [r for r in caplog.records if "no accelerator" in r.getMessage()]
    assert len(said) == 1 and "changes nothing" in said[0].getMessage()


# ---------------------------------------------------------------------------------------------------------
# LoRA through diffusers' loader methods


@pytest.fixture
def lora_pair(tmp_path):
    """diffusers' distilled klein and the facade on the same folder, and two LoRA files for them."""
    theirs = diffusers.Flux2KleinPipeline(**parts(), is_distilled=True)
    theirs.save_pretrained(tmp_path / "model")
    ours = compat.Flux2KleinPipeline.from_pretrained(tmp_path / "model")
    from safetensors.torch import save_file

    files = []
    for seed, where in ((1, lambda n: True), (2, in_blocks)):
        state = {
            f"transformer.{k}": v
            for k, v in diffusers_lora(theirs.transformer, seed=seed, where=where).items()
        }
        files.append(tmp_path / f"lora{seed}.safetensors")
        save_file(state, files[-1])
    return theirs, ours, files


def test_lora_loader_methods_match_diffusers(lora_pair):
    theirs, ours, (one, two) = lora_pair
    kwargs = dict(prompt="a fox", height=32, width=32, num_inference_steps=2, output_type="pt", **KW)
    base = ours(generator=generator(), **kwargs).images

    def both(**extra):
        expected = theirs(generator=generator(), **kwargs, **extra).images
        got = ours(generator=generator(), **kwargs, **extra).images
        assert_close(got, expected)
        return got

    for pipe in (theirs, ours):
        pipe.load_lora_weights(str(one.parent), weight_name=one.name, adapter_name="one")
        pipe.load_lora_weights(str(two), adapter_name="two")
    assert ours.get_active_adapters() == theirs.get_active_adapters() == ["two"]
    assert ours.get_list_adapters() == theirs.get_list_adapters()
    only_two = both()
    assert (only_two - base).abs().max() > 1e-3
    for pipe in (theirs, ours):
        pipe.set_adapters(["one", "two"], adapter_weights=[0.8, -0.5])
    both()
    both(attention_kwargs={"scale": 0.5})
    for pipe in (theirs, ours):
        pipe.fuse_lora(lora_scale=0.7)
    both()
    for pipe in (theirs, ours):
        pipe.unfuse_lora()
        pipe.set_adapters(["one"], adapter_weights=[0.8])
    both()
    for pipe in (theirs, ours):
        pipe.unload_lora_weights()
    assert ours.get_list_adapters() == {}
    assert torch.equal(ours(generator=generator(), **kwargs).images, base)


def test_attention_kwargs_scale_on_fused_lora_is_an_error(lora_pair):
    _, ours, (one, _) = lora_pair
    ours.load_lora_weights(str(one))
    ours.fuse_lora()
    with pytest.raises(ValueError, match="fused into the weights; unfuse them"):
        ours(prompt="a", height=32, width=32, num_inference_steps=1, attention_kwargs={"scale": 0.5}, **KW)
    with pytest.raises(FileNotFoundError, match="does not download LoRAs"):
        ours.load_lora_weights("someone/flux2-lora")
