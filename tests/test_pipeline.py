"""Pipeline parity with the diffusers 0.42.1 pipelines on tiny random checkpoints (fp32, latents within
1e-5), and the img2img properties diffusers 0.42.1 has no pipeline for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import KLEIN_DIT, LAYERS, assert_close, gens, parts, picture
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinInpaintPipeline,
    Flux2KleinKVPipeline,
    Flux2KleinPipeline,
    Flux2Pipeline,
)
from tiny import tiny_diffusers_transformer, tiny_diffusers_vae

import fluxforge as ff

COMMON = dict(max_sequence_length=32)


def saved(pipe, folder: Path):
    pipe.save_pretrained(folder)
    return pipe, ff.Pipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    return saved(Flux2KleinPipeline(**parts(), is_distilled=True), tmp_path_factory.mktemp("klein"))


@pytest.fixture(scope="module")
def klein_base(tmp_path_factory):
    return saved(Flux2KleinPipeline(**parts()), tmp_path_factory.mktemp("base"))


def raw_latents(ours: ff.Pipeline, result: ff.GenerationResult) -> torch.Tensor:
    """Our packed normalized latents as the klein pipelines' output_type='latent' (raw VAE latents)."""
    from fluxforge.model.autoencoder import unpack, unpatchify

    h, w = result.info["height"] // ours.pixels_per_token, result.info["width"] // ours.pixels_per_token
    return unpatchify(ours.vae.denormalize(unpack(result.latents, h, w)), (2, 2))


def test_distilled_text_to_image(klein):
    theirs, ours = klein
    assert ours.variant.family == "flux.2-klein"
    expected = theirs(
        prompt="a dog is dancing",
        height=32,
        width=48,
        num_inference_steps=3,
        generator=gens(7, 1)[0],
        output_type="latent",
        text_encoder_out_layers=LAYERS,
        **COMMON,
    ).images
    got = ours.generate("a dog is dancing", width=48, height=32, steps=3, seed=7, decode=False, **COMMON)
    assert got.info["mode"] == "text-to-image" and got.seeds == [7]
    assert_close(raw_latents(ours, got), expected)


def test_custom_sigmas(klein):
    theirs, ours = klein
    sigmas = [1.0, 0.7, 0.35]  # diffusers still takes the dynamic shift from num_inference_steps
    expected = theirs(
        prompt="a dog",
        height=32,
        width=32,
        num_inference_steps=6,
        sigmas=sigmas,
        generator=gens(3, 1)[0],
        output_type="latent",
        text_encoder_out_layers=LAYERS,
        **COMMON,
    ).images
    got = ours.generate("a dog", width=32, height=32, steps=6, sigmas=sigmas, seed=3, decode=False, **COMMON)
    assert got.info["steps"] == 3
    assert_close(raw_latents(ours, got), expected)


def test_decoded_images_match(klein):
    theirs, ours = klein
    expected = theirs(
        prompt="a cat",
        height=32,
        width=32,
        num_inference_steps=2,
        generator=gens(1, 1)[0],
        output_type="pt",
        text_encoder_out_layers=LAYERS,
        **COMMON,
    ).images
    got = ours.generate("a cat", width=32, height=32, steps=2, seed=1, **COMMON)
    assert_close((got.pixels / 2 + 0.5).clamp(0, 1), expected)
    assert got.images[0].size == (32, 32)


def test_base_with_cfg(klein_base):
    theirs, ours = klein_base
    assert ours.variant.family == "flux.2-klein-base"
    expected = theirs(
        prompt="a red cube",
        height=32,
        width=32,
        num_inference_steps=3,
        guidance_scale=3.5,
        generator=gens(3, 1)[0],
        output_type="latent",
        text_encoder_out_layers=LAYERS,
        **COMMON,
    ).images
    got = ours.generate(
        "a red cube", width=32, height=32, steps=3, guidance=3.5, seed=3, decode=False, **COMMON
    )
    assert_close(raw_latents(ours, got), expected)
    no_cfg = ours.generate(
        "a red cube", width=32, height=32, steps=3, guidance=1.0, seed=3, decode=False, **COMMON
    )
    assert (no_cfg.latents - got.latents).abs().max() > 1e-3  # CFG really ran


def test_references_of_different_sizes(klein):
    theirs, ours = klein
    refs = [picture(90, 70, 1), picture(64, 120, 2)]
    expected = theirs(
        image=refs,
        prompt="put them together",
        num_inference_steps=2,
        generator=gens(5, 1)[0],
        output_type="latent",
        text_encoder_out_layers=LAYERS,
        **COMMON,
    ).images
    got = ours.generate("put them together", references=refs, steps=2, seed=5, decode=False, **COMMON)
    assert got.info["mode"] == "references" and got.info["num_references"] == 2
    assert (got.info["width"], got.info["height"]) == (88, 68)  # the first reference, floored to 4 px
    assert_close(raw_latents(ours, got), expected)


def test_list_prompts_with_several_images_each(klein_base):
    theirs, ours = klein_base
    prompts = ["a red circle", "a blue square"]
    expected = theirs(
        prompt=prompts,
        height=32,
        width=32,
        num_inference_steps=2,
        num_images_per_prompt=2,
        generator=gens(11, 4),
        output_type="latent",
        text_encoder_out_layers=LAYERS,
        **COMMON,
    ).images
    got = ours.generate(prompts, width=32, height=32, steps=2, num_images=2, seed=11, decode=False, **COMMON)
    assert got.seeds == [11, 12, 13, 14]
    assert_close(raw_latents(ours, got), expected)
    alone = ours.generate("a blue square", width=32, height=32, steps=2, seed=13, decode=False, **COMMON)
    # Every image is reproducible alone from its seed: the same noise, the same result up to the rounding
    # of batched against single matrix products (amplified by CFG over the steps).
    assert_close(alone.latents, got.latents[2:3], tol=1e-4)


def test_kv_variant_with_references(tmp_path):
    kv_parts = parts()
    theirs, ours = saved(Flux2KleinKVPipeline(**kv_parts), tmp_path)
    assert ours.variant.family == "flux.2-klein-kv"
    refs = [picture(64, 64, 3), picture(80, 64, 4)]
    expected = theirs(
        image=refs,
        prompt="the same, in green",
        height=32,
        width=32,
        num_inference_steps=3,
        generator=gens(2, 1)[0],
        output_type="latent",
        text_encoder_out_layers=LAYERS,
        **COMMON,
    ).images
    got = ours.generate(
        "the same, in green", references=refs, width=32, height=32, steps=3, seed=2, decode=False, **COMMON
    )
    assert_close(raw_latents(ours, got), expected)


@pytest.mark.parametrize("strength,steps", [(1.0, 4), (0.6, 5), (0.3, 4)])
def test_inpainting_with_a_reference(tmp_path, strength, steps):
    theirs, ours = saved(Flux2KleinInpaintPipeline(**parts()), tmp_path)
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 32, 48, generator=gen)
    mask = torch.zeros(1, 1, 32, 48)
    mask[..., 8:24, 12:40] = 1.0
    reference = picture(64, 72, 9)
    expected = theirs(
        prompt="a hat",
        image=image,
        mask_image=mask,
        image_reference=reference,
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=4.0,
        generator=gens(4, 1)[0],
        output_type="latent",
        text_encoder_out_layers=LAYERS,
        **COMMON,
    ).images
    got = ours.generate(
        "a hat",
        init_image=image,
        mask=mask,
        references=[reference],
        strength=strength,
        steps=steps,
        guidance=4.0,
        seed=4,
        decode=False,
        **COMMON,
    )
    assert got.info["mode"] == "inpaint" and got.info["steps"] == -(-steps * strength // 1)
    assert_close(raw_latents(ours, got), expected)


def test_dev_with_prompt_embeds_and_guidance(tmp_path):
    transformer = tiny_diffusers_transformer(**{**KLEIN_DIT, "guidance_embeds": True})
    theirs = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_diffusers_vae(),
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
    )
    theirs.save_pretrained(tmp_path)
    ours = ff.Pipeline.from_pretrained(tmp_path)
    assert ours.variant.family == "flux.2-dev"
    embeds = torch.randn(1, 16, 48, generator=torch.Generator().manual_seed(1))
    expected = theirs(
        prompt_embeds=embeds,
        height=32,
        width=32,
        num_inference_steps=3,
        guidance_scale=5.0,
        generator=gens(6, 1)[0],
        output_type="latent",
    ).images
    got = ours.generate(
        prompt_embeds=embeds, width=32, height=32, steps=3, guidance=5.0, seed=6, decode=False
    )
    assert_close(got.latents, expected)  # dev's "latent" output is the packed normalized tokens


# ---------------------------------------------------------------------------------------------------------
# img2img


def test_img2img_at_full_strength_is_text_to_image(klein):
    _, ours = klein
    init = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    t2i = ours.generate("a boat", width=32, height=32, steps=3, seed=9, decode=False, **COMMON)
    i2i = ours.generate("a boat", init_image=init, strength=1.0, steps=3, seed=9, decode=False, **COMMON)
    assert i2i.info["mode"] == "img2img" and i2i.info["steps"] == 3
    assert torch.equal(i2i.latents, t2i.latents)


def test_img2img_starts_from_the_noised_init_image(klein, monkeypatch):
    _, ours = klein
    init = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    seen = []
    forward = type(ours.transformer).forward
    monkeypatch.setattr(
        type(ours.transformer),
        "forward",
        lambda self, img, *a, **k: seen.append(img.clone()) or forward(self, img, *a, **k),
    )
    got = ours.generate("a boat", init_image=init, strength=0.5, steps=4, seed=9, decode=False, **COMMON)
    assert got.info["steps"] == 2 and len(seen) == 2

    from fluxforge.sampling import make_schedule

    schedule = make_schedule(4, 64, ours.variant.scheduler)
    x0 = ours.vae.encode_tokens(init * 2 - 1)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9)).flatten(2).transpose(1, 2)
    sigma = schedule.sigmas[2]
    assert_close(seen[0], sigma * noise + (1 - sigma) * x0)


# ---------------------------------------------------------------------------------------------------------
# Devices. No GPU here: the meta device stands in, since an op that mixes a meta tensor with a CPU one
# raises; so every input of every mode must reach the model's device. (The text encoder is bypassed with
# prompt_embeds: transformers' attention mask reads values, which meta tensors do not have.)


@pytest.mark.parametrize("cls", [Flux2KleinPipeline, Flux2KleinKVPipeline])
def test_every_input_follows_the_model_to_its_device(cls, tmp_path):
    cls(**parts()).save_pretrained(tmp_path)
    on_meta = ff.Pipeline.from_pretrained(tmp_path, device="meta")
    moved = ff.Pipeline.from_pretrained(tmp_path).to("meta")
    assert on_meta.device.type == moved.device.type == "meta"
    embeds = torch.randn(1, 8, 48)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1.0
    modes = {
        "text-to-image": {},
        "references": dict(references=[picture(48, 32, 1), picture(32, 32, 2)]),
        "img2img": dict(init_image=picture(32, 32, 3), strength=0.5),
        "inpaint": dict(init_image=picture(32, 32, 3), mask=mask, references=[picture(32, 32, 1)]),
    }
    for pipe in (on_meta, moved):
        for mode, inputs in modes.items():
            got = pipe.generate(
                prompt_embeds=embeds,
                negative_prompt_embeds=embeds,  # base klein: CFG
                width=32,
                height=32,
                steps=2,
                seed=0,
                decode=False,
                **inputs,
            )
            assert got.info["mode"] == mode and got.latents.device.type == "meta", mode


def test_to_casts_every_network(tmp_path):
    """A pipeline of its own (the module fixture is shared): to() casts and moves every network."""
    Flux2KleinPipeline(**parts(), is_distilled=True).save_pretrained(tmp_path)
    pipe = ff.Pipeline.from_pretrained(tmp_path)
    assert pipe.to(dtype="bfloat16") is pipe
    for module in (pipe.transformer, pipe.vae, pipe.components.text_encoder):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    assert pipe.to(dtype=torch.float32).transformer.dtype == torch.float32
    with pytest.raises(ValueError, match="takes a dtype, got 'auto'"):
        pipe.to(dtype="auto")
