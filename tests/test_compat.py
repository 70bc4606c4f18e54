"""The diffusers facades against the diffusers 0.42.1 pipelines on tiny random checkpoints saved to folders:
the same signatures, the same outputs (fp32, within 1e-5) for the same inputs, generators and latents, and
the errors a porting user sees."""

from __future__ import annotations

import inspect
import logging

import diffusers
import numpy as np
import pytest
import torch
from conftest import KLEIN_DIT, LAYERS, assert_close, gens, picture, saved
from diffusers import FlowMatchEulerDiscreteScheduler
from tiny import tiny_diffusers_transformer, tiny_diffusers_vae

from fluxforge import compat

KW = dict(max_sequence_length=32, text_encoder_out_layers=LAYERS)  # both sides get these
REFERENCE_FACADES = ("dev", "klein", "kv")


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    torch.manual_seed(0)
    theirs = diffusers.Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_diffusers_vae(),
        text_encoder=None,
        tokenizer=None,
        transformer=tiny_diffusers_transformer(**{**KLEIN_DIT, "guidance_embeds": True}),
    )
    return saved(theirs, tmp_path_factory.mktemp("dev"), compat.Flux2Pipeline)


@pytest.fixture
def facades(request):
    """One facade per reference-conditioning pipeline, by name."""
    return {name: request.getfixturevalue(name)[1] for name in REFERENCE_FACADES}


def both(theirs, ours, make_generator, **kwargs):
    """Call diffusers and the facade with the same arguments and fresh, equally seeded generators."""
    extra = KW if ours.pipeline.components.text_encoder is not None else {}
    expected = theirs(generator=make_generator(), **kwargs, **extra)
    got = ours(generator=make_generator(), **kwargs, **extra)
    if kwargs.get("return_dict", True):
        assert isinstance(got, compat.Flux2PipelineOutput)
        return expected.images, got.images
    assert isinstance(got, tuple) and len(got) == 1
    return expected[0], got[0]


def embeds(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 16, 48, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------
# Signatures


def parameters(function) -> list[tuple[str, object]]:
    """(name, default) in order, without self and **kwargs; list defaults as tuples (ours avoid mutables)."""
    out = []
    for p in inspect.signature(function).parameters.values():
        if p.name != "self" and p.kind != inspect.Parameter.VAR_KEYWORD:
            out.append((p.name, tuple(p.default) if isinstance(p.default, list) else p.default))
    return out


@pytest.mark.parametrize(
    "name", ["Flux2Pipeline", "Flux2KleinPipeline", "Flux2KleinKVPipeline", "Flux2KleinInpaintPipeline"]
)
def test_signature_is_diffusers(name):
    assert parameters(getattr(compat, name).__call__) == parameters(getattr(diffusers, name).__call__)


def test_img2img_signature_is_the_development_branch_plus_image_reference():
    klein = dict(parameters(diffusers.Flux2KleinPipeline.__call__))
    upstream = ["image", "prompt", "strength", "height", "width", "num_inference_steps", "sigmas"]
    upstream += ["guidance_scale", "num_images_per_prompt", "generator", "latents", "prompt_embeds"]
    upstream += ["negative_prompt_embeds", "output_type", "return_dict", "attention_kwargs"]
    upstream += ["callback_on_step_end", "callback_on_step_end_tensor_inputs", "max_sequence_length"]
    upstream += ["text_encoder_out_layers"]
    expected = [(n, 0.8 if n == "strength" else klein[n]) for n in upstream] + [("image_reference", None)]
    assert parameters(compat.Flux2KleinImg2ImgPipeline.__call__) == expected
    kind = inspect.signature(compat.Flux2KleinImg2ImgPipeline.__call__).parameters["image_reference"].kind
    assert kind == inspect.Parameter.KEYWORD_ONLY


# ---------------------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("output_type", ["latent", "pt", "np", "pil"])
def test_klein_distilled_outputs(klein, output_type, caplog):
    theirs, ours = klein
    with caplog.at_level(logging.WARNING, logger="fluxforge.compat"):
        expected, got = both(
            theirs,
            ours,
            lambda: gens(7, 1)[0],
            prompt="a dog is dancing",
            height=32,
            width=48,
            num_inference_steps=3,
            output_type=output_type,
        )
    assert "Guidance scale 4.0 is ignored for step-wise distilled models." in caplog.text
    if output_type == "pil":
        assert [im.size for im in got] == [(48, 32)]
        np.testing.assert_array_equal(np.array(got[0]), np.array(expected[0]))
    elif output_type == "np":
        assert isinstance(got, np.ndarray) and got.shape == (1, 32, 48, 3)
        assert np.abs(got - expected).max() <= 1e-5
    else:
        assert got.shape == ((1, 1, 16, 24) if output_type == "latent" else (1, 3, 32, 48))
        assert_close(got, expected)


def test_klein_base_cfg_with_list_prompts_and_generators(klein_base):
    theirs, ours = klein_base
    kwargs = dict(
        prompt=["a red circle", "a blue square"],
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=3.5,
        num_images_per_prompt=2,
        output_type="latent",
        return_dict=False,
    )
    expected, got = both(theirs, ours, lambda: gens(11, 4), **kwargs)
    assert got.shape == (4, 1, 16, 16)
    assert_close(got, expected)
    (no_cfg,) = ours(**{**kwargs, "guidance_scale": 1.0}, generator=gens(11, 4), **KW)
    assert (no_cfg - got).abs().max() > 1e-3  # the guidance scale reached the model


def test_base_cfg_with_prompt_embeds(klein_base):
    """Two prompt embeddings and no negative ones: the empty negative prompt serves both."""
    theirs, ours = klein_base
    kwargs = dict(prompt_embeds=embeds(2, 4), height=32, width=32, num_inference_steps=2, guidance_scale=3.0)
    expected, got = both(theirs, ours, lambda: gens(1, 2), output_type="latent", **kwargs)
    assert_close(got, expected)


def test_one_generator_for_a_batch(klein_base):
    theirs, ours = klein_base
    expected, got = both(
        theirs,
        ours,
        lambda: gens(5, 1)[0],
        prompt="a tree",
        height=32,
        width=32,
        num_inference_steps=2,
        num_images_per_prompt=3,
        output_type="pt",
    )
    assert got.shape == (3, 3, 32, 32)
    assert_close(got, expected)
    assert (got[0] - got[1]).abs().max() > 1e-3  # one draw for the whole batch, not one seed repeated


def test_user_latents(klein):
    theirs, ours = klein
    latents = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(3))
    kwargs = dict(prompt=["a", "b"], height=32, width=48, num_inference_steps=2, latents=latents)
    expected, got = both(theirs, ours, lambda: None, output_type="latent", **kwargs)
    assert_close(got, expected)
    drawn = ours(**kwargs, generator=gens(0, 2), output_type="latent", **KW).images
    assert (drawn - got).abs().max() == 0  # given latents win over the generator, as in diffusers


@pytest.mark.parametrize("kind", ["pil", "numpy", "tensor"])
@pytest.mark.parametrize("height", [None, 48])
def test_references_of_different_sizes(klein, kind, height):
    """diffusers takes PIL references only; ours take arrays and tensors of the same pixels too. A side left
    out is the first reference's."""
    theirs, ours = klein
    refs = [picture(90, 70, 1), picture(64, 120, 2)]
    as_kind = {
        "pil": lambda im: im,
        "numpy": np.array,
        "tensor": lambda im: torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255,
    }[kind]
    kwargs = dict(prompt="put them together", height=height, num_inference_steps=2, output_type="latent")
    expected = theirs(image=refs, generator=gens(5, 1)[0], **kwargs, **KW).images
    got = ours(image=[as_kind(r) for r in refs], generator=gens(5, 1)[0], **kwargs, **KW).images
    assert got.shape == (1, 1, (height or 68) // 2, 44)  # 88 px wide: the first reference, floored to 4
    assert_close(got, expected)


def test_kv_with_references(kv):
    theirs, ours = kv
    refs = [picture(64, 64, 3), picture(80, 64, 4)]
    expected, got = both(
        theirs,
        ours,
        lambda: gens(2, 1)[0],
        image=refs,
        prompt="the same, in green",
        height=32,
        width=32,
        num_images_per_prompt=2,
        output_type="latent",
    )
    assert got.shape == (2, 1, 16, 16)
    assert_close(got, expected)


@pytest.mark.parametrize("strength,steps", [(1.0, 4), (0.6, 5), (0.3, 4)])
def test_inpainting_with_a_reference(inpaint, strength, steps):
    theirs, ours = inpaint
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 32, 48)
    mask[..., 8:24, 12:40] = 1.0
    expected, got = both(
        theirs,
        ours,
        lambda: gens(4, 1)[0],
        prompt="a hat",
        image=image,
        mask_image=mask,
        image_reference=picture(64, 72, 9),
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=4.0,  # at the default 8.0, CFG grows fp32 rounding to 1.3e-5 on latents up to 4.6
        output_type="latent",
    )
    assert_close(got, expected)


def test_inpainting_batch_with_latents_and_two_references(inpaint, caplog):
    """latents= are the start point in diffusers' inpainting (nothing mixed in); two references of one size
    follow the source image; height/width are ignored with a warning."""
    theirs, ours = inpaint
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    kwargs = dict(
        prompt="a hat",
        image=picture(32, 32, 5),
        mask_image=picture(32, 32, 6).convert("L"),
        image_reference=[picture(64, 64, 7), picture(64, 64, 8)],
        strength=0.5,
        num_inference_steps=4,
        num_images_per_prompt=3,  # not 2, which diffusers would read as one reference per image
        latents=latents,
        output_type="pt",
    )
    expected = theirs(**kwargs, **KW).images
    with caplog.at_level(logging.WARNING, logger="fluxforge.compat"):
        got = ours(**kwargs, height=64, width=64, **KW).images
    assert got.shape == (3, 3, 32, 32)
    assert_close(got, expected)
    assert "height/width are ignored by Flux2KleinInpaintPipeline" in caplog.text


def test_dev_with_prompt_embeds_and_guidance(dev):
    theirs, ours = dev
    kwargs = dict(prompt_embeds=embeds(2, 1), height=32, width=32, num_inference_steps=3, guidance_scale=5.0)
    expected, got = both(theirs, ours, lambda: gens(6, 2), output_type="latent", **kwargs)
    assert got.shape == (2, 64, 4)  # dev's "latent" is the packed normalized tokens
    assert_close(got, expected)
    expected, got = both(
        theirs, ours, lambda: gens(6, 2), output_type="pt", image=picture(64, 80, 1), **kwargs
    )
    assert_close(got, expected)


@pytest.mark.parametrize("name", ["klein_base", "inpaint"])
def test_step_callback_sees_what_diffusers_shows(name, request):
    theirs, ours = request.getfixturevalue(name)
    kwargs = dict(prompt="a hat", num_inference_steps=5, output_type="latent")
    if name == "inpaint":  # 3 of 5 steps run: i counts from 0 and t starts late in the schedule
        kwargs |= dict(image=picture(32, 32, 1), mask_image=torch.ones(1, 1, 32, 32), strength=0.6)
        kwargs |= dict(guidance_scale=4.0)  # see test_inpainting_with_a_reference
    else:
        kwargs |= dict(height=32, width=32)
    seen: dict[str, list] = {"theirs": [], "ours": []}

    def recorder(side):
        def callback(pipe, i, t, tensors):
            assert pipe is (theirs if side == "theirs" else ours)
            seen[side].append((i, float(t), tensors["latents"].clone()))
            return tensors

        return callback

    for side, pipe in (("theirs", theirs), ("ours", ours)):
        pipe(generator=gens(1, 1)[0], callback_on_step_end=recorder(side), **kwargs, **KW)
    assert [(i, t) for i, t, _ in seen["ours"]] == [(i, t) for i, t, _ in seen["theirs"]]
    assert len(seen["ours"]) == (3 if name == "inpaint" else 5)
    for (_, _, a), (_, _, b) in zip(seen["ours"], seen["theirs"], strict=True):
        assert_close(a, b)


def test_img2img_at_full_strength_is_text_to_image(klein):
    theirs, ours = klein
    img2img = compat.Flux2KleinImg2ImgPipeline(ours.pipeline)
    init = picture(32, 48, 3)
    t2i = ours(
        prompt="a boat",
        height=48,
        width=32,
        num_inference_steps=3,
        output_type="latent",
        generator=gens(9, 1)[0],
        **KW,
    ).images
    i2i = img2img(
        init, "a boat", 1.0, num_inference_steps=3, output_type="latent", generator=gens(9, 1)[0], **KW
    )
    assert torch.equal(i2i.images, t2i)


def test_img2img_maps_to_one_request(klein):
    _, ours = klein
    img2img = compat.Flux2KleinImg2ImgPipeline(ours.pipeline)
    init, ref = picture(32, 32, 3), picture(64, 48, 4)
    got = img2img(
        image=init,
        prompt="a boat",
        strength=0.5,
        num_inference_steps=4,
        image_reference=ref,
        output_type="latent",
        generator=gens(9, 1)[0],
        **KW,
    ).images
    direct = ours.pipeline.generate(
        "a boat",
        init_image=init,
        references=[ref],
        strength=0.5,
        steps=4,
        generator=gens(9, 1)[0],
        max_sequence_length=32,
        decode=False,
    )
    t2i = ours(
        prompt="a boat",
        height=32,
        width=32,
        num_inference_steps=4,
        output_type="latent",
        generator=gens(9, 1)[0],
        **KW,
    ).images
    assert direct.info["mode"] == "img2img" and direct.info["steps"] == 2
    assert_close(got, compat.Flux2KleinPipeline(ours.pipeline)._output(direct, "latent", False)[0], tol=0)
    assert (got - t2i).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("facade", REFERENCE_FACADES)
@pytest.mark.parametrize(
    "kwargs,fix",
    [
        (dict(strength=0.6), "To start from an image and keep part of it"),
        (dict(denoising_strength=0.6), "To start from an image and keep part of it"),
        (dict(init_image=np.zeros((64, 64, 3), np.uint8)), "To start from an image and keep part of it"),
        (dict(mask_image=np.zeros((64, 64), np.uint8)), "To repaint part of an image"),
    ],
)
def test_img2img_arguments_on_a_reference_pipeline(facades, facade, kwargs, fix):
    pipe = facades[facade]
    with pytest.raises(TypeError) as error:
        pipe(image=picture(64, 64, 1), prompt="a cat", **kwargs)
    message = str(error.value)
    name = next(iter(kwargs))
    assert message.startswith(
        f"{type(pipe).__name__}.__call__() got an unexpected keyword argument {name!r}: "
    )
    assert (
        "image= here is reference conditioning: each image becomes extra attention tokens and nothing "
        in message
    )
    assert fix in message and "fluxforge.Pipeline.generate(init_image=..., " in message
    # The facades that run the model: img2img runs klein and KV, inpainting klein only.
    named = "Flux2KleinImg2ImgPipeline(image=..., strength=...)" in message
    assert named == (facade != "dev" and name != "mask_image")
    named = "Flux2KleinInpaintPipeline(image=..., mask_image=..., strength=...)" in message
    assert named == (facade == "klein" and name == "mask_image")


@pytest.mark.parametrize(
    "facade,kwargs,message",
    [
        (
            "klein",
            dict(num_inference_step=3),
            "argument 'num_inference_step'; did you mean 'num_inference_steps'?",
        ),
        (
            "klein",
            dict(negative_prompt="blurry"),
            'take no negative prompt text (they use ""): pass negative_',
        ),
        ("klein", dict(image_reference=None), "reference images go in image= here"),
        (
            "kv",
            dict(guidance_scale=2.0),
            "the klein KV model is guidance-distilled and takes no guidance_scale",
        ),
        ("dev", dict(negative_prompt_embeds=None), "FLUX.2 [dev] is guidance-distilled: guidance_scale is"),
        ("inpaint", dict(mask=None), "'mask': the mask is mask_image= (white = repaint, black = keep)"),
        ("inpaint", dict(init_image=None), "'init_image': the image to start from is image= here"),
        ("inpaint", dict(guidance_scal=2.0), "did you mean 'guidance_scale'?"),
        ("inpaint", dict(xyzzy=1), "got an unexpected keyword argument 'xyzzy'"),
    ],
)
def test_unknown_arguments(facade, kwargs, message, request):
    pipe = request.getfixturevalue(facade)[1]
    with pytest.raises(TypeError) as error:
        pipe(prompt="a cat", **kwargs)
    assert message in str(error.value)


CALLS = {  # a valid small call per facade, which each case below spoils in one way
    "klein": lambda: dict(prompt="a cat", height=32, width=32, num_inference_steps=1, **KW),
    "dev": lambda: dict(prompt_embeds=embeds(1, 0), height=32, width=32, num_inference_steps=1),
    "inpaint": lambda: dict(prompt="a cat", num_inference_steps=1, **KW),
}


@pytest.mark.parametrize(
    "facade,kwargs,error,message",
    [
        (
            "klein",
            dict(text_encoder_out_layers=(9, 18, 29)),
            ValueError,
            "text_encoder_out_layers=(9, 18, 29): each must be a layer 1..28 of this qwen3 text encoder",
        ),
        (
            "klein",
            dict(text_encoder_out_layers=(9, 18)),
            ValueError,
            "gives 32 text features, but the transformer takes 48 (3 layers of 16)",
        ),
        ("klein", dict(attention_kwargs={"joint": 1}), NotImplementedError, "fluxforge has no attention"),
        (
            "inpaint",
            dict(padding_mask_crop=8),
            NotImplementedError,
            "padding_mask_crop: fluxforge inpaints the",
        ),
        ("dev", dict(caption_upsample_temperature=0.7), NotImplementedError, "does not rewrite prompts"),
        (
            "klein",
            dict(output_type="numpy"),
            ValueError,
            "output_type must be one of 'pil', 'np', 'pt', 'latent'",
        ),
        (
            "klein",
            dict(callback_on_step_end_tensor_inputs=["prompt_embeds"]),
            NotImplementedError,
            "only 'latents'",
        ),
        ("klein", dict(callback_on_step_end_tensor_inputs=["noise"]), ValueError, "but found ['noise']"),
        ("klein", dict(callback_on_step_end=3), TypeError, "callback_on_step_end must be callable, got int"),
        (
            "klein",
            dict(image="a cat", prompt=None),
            TypeError,
            "image='a cat' looks like a prompt: the first positional",
        ),
        (
            "klein",
            dict(generator=gens(0, 2)),
            ValueError,
            "2 generators given for 1 images; pass one per image",
        ),
        (
            "inpaint",
            dict(image=picture(32, 32, 1)),
            ValueError,
            "needs image= (the picture to repaint) and mask_",
        ),
        (
            "inpaint",
            dict(image=[picture(32, 32, 1)] * 2, mask_image=picture(32, 32, 2)),
            ValueError,
            "image: got a list of 2 images; pass one image to repaint, which every image of the batch shares",
        ),
        (
            "inpaint",
            dict(
                image=picture(32, 32, 1),
                mask_image=picture(32, 32, 2),
                num_images_per_prompt=2,
                image_reference=[picture(64, 64, 1)] * 2,
            ),
            ValueError,
            "image_reference: 2 images for a batch of 2; diffusers would give image k to image k of the "
            "batch",
        ),
    ],
)
def test_refused_arguments(facade, kwargs, error, message, request):
    pipe = request.getfixturevalue(facade)[1]
    with pytest.raises(error) as caught:
        pipe(**{**CALLS[facade](), **kwargs})
    assert message in str(caught.value)


def test_start_latents_need_an_init_image(klein):
    with pytest.raises(ValueError, match="start_latents= needs init_image=: it replaces the noised init"):
        klein[1].pipeline.generate("a", width=32, height=32, start_latents=torch.zeros(1, 4, 8, 8))


def test_img2img_needs_an_image(klein):
    with pytest.raises(ValueError, match=r"Flux2KleinImg2ImgPipeline needs image= \(the init image\); for"):
        compat.Flux2KleinImg2ImgPipeline(klein[1].pipeline)(prompt="a cat", **KW)


def test_callback_cannot_replace_latents(klein):
    def callback(pipe, i, t, tensors):
        return {"latents": tensors["latents"] + 1}

    with pytest.raises(
        NotImplementedError, match="returned a changed 'latents'; fluxforge.compat cannot feed"
    ):
        klein[1](prompt="a", height=32, width=32, num_inference_steps=2, callback_on_step_end=callback, **KW)


def test_from_pretrained_checks_the_model_family(klein, kv, dev, tmp_path):
    folders = {}
    for name, (theirs, _) in (("klein", klein), ("kv", kv), ("dev", dev)):
        folders[name] = tmp_path / name
        theirs.save_pretrained(folders[name])
    cases = [
        (
            compat.Flux2KleinKVPipeline,
            "klein",
            "Flux2KleinKVPipeline runs FLUX.2 [klein] KV models, and "
            "flux.2-klein-custom is FLUX.2 [klein]: load it with Flux2KleinPipeline",
        ),
        (compat.Flux2KleinPipeline, "kv", "is FLUX.2 [klein] KV: load it with Flux2KleinKVPipeline"),
        (
            compat.Flux2KleinInpaintPipeline,
            "dev",
            "is FLUX.2 [dev]: load it with Flux2Pipeline for references, "
            "or inpaint with fluxforge.Pipeline.generate(init_image=..., mask=..., strength=...)",
        ),
        (compat.Flux2Pipeline, "klein", "Flux2Pipeline runs FLUX.2 [dev] models"),
    ]
    for facade, folder, message in cases:
        with pytest.raises(ValueError) as error:
            facade.from_pretrained(folders[folder])
        assert message in str(error.value)
    assert compat.Flux2KleinImg2ImgPipeline.from_pretrained(
        folders["kv"]
    ).pipeline.variant.defaults.reference_kv


def test_from_pretrained_arguments(klein, tmp_path):
    klein[0].save_pretrained(tmp_path)
    pipe = compat.Flux2KleinPipeline.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert pipe.pipeline.transformer.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="pass dtype= or its older name torch_dtype=, not both"):
        compat.Flux2KleinPipeline.from_pretrained(tmp_path, dtype="float32", torch_dtype=torch.float32)
    with pytest.raises(
        TypeError,
        match=r"from_pretrained\(\) got an unexpected keyword argument 'torch_dtpye'; "
        r"did you mean 'torch_dtype'\?",
    ):
        compat.Flux2KleinPipeline.from_pretrained(tmp_path, torch_dtpye=torch.float32)
    with pytest.raises(TypeError, match=r"wraps a fluxforge.Pipeline, got str; load a model with"):
        compat.Flux2KleinPipeline(str(tmp_path))


def test_to_device_and_dtype_as_in_diffusers(klein, tmp_path):
    klein[0].save_pretrained(tmp_path)
    pipe = compat.Flux2KleinPipeline.from_pretrained(tmp_path)
    assert pipe.to(torch.bfloat16) is pipe and pipe.dtype == torch.bfloat16
    assert pipe.to("meta", torch.float32) is pipe
    assert (pipe.device.type, pipe.dtype) == ("meta", torch.float32)
    assert next(pipe.pipeline.vae.parameters()).device.type == "meta"
    with pytest.raises(TypeError, match=r"takes one device and one dtype"):
        pipe.to("cpu", "meta")
    with pytest.raises(NotImplementedError, match=r"not layer by layer; use pipe.enable_model_cpu_offload"):
        pipe.enable_sequential_cpu_offload()
