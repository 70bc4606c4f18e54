"""Every bad request gets the error a user can act on, and none of them reaches the model."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import parts, picture
from diffusers import Flux2KleinPipeline
from test_pipeline import saved

import fluxforge as ff

COMMON = dict(max_sequence_length=32)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    distilled = saved(Flux2KleinPipeline(**parts(), is_distilled=True), tmp_path_factory.mktemp("d"))[1]
    base = saved(Flux2KleinPipeline(**parts()), tmp_path_factory.mktemp("b"))[1]
    return distilled, base


@pytest.fixture
def pipe(pipes, monkeypatch):
    """The distilled tiny klein, with a transformer that fails the test if anything reaches it."""
    distilled = pipes[0]

    def forbidden(*args, **kwargs):
        raise AssertionError("a bad request reached the model")

    monkeypatch.setattr(type(distilled.transformer), "forward", forbidden)
    monkeypatch.setattr(type(distilled.vae), "encode_tokens", forbidden)
    return distilled


INIT = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
MASK = torch.ones(1, 1, 32, 32)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (
            dict(strength=0.5),
            ValueError,
            r"strength= needs init_image=: .*Reference images \(references=\) are never",
        ),
        (dict(mask=MASK), ValueError, r"mask= needs init_image=: inpainting repaints part of an init image"),
        (dict(init_image=INIT), ValueError, r"img2img needs strength= in \(0, 1\]"),
        (dict(init_image=INIT, strength=0.0), ValueError, r"strength must be in \(0, 1\], got 0.0"),
        (dict(init_image=INIT, strength=1.5), ValueError, r"strength must be in \(0, 1\], got 1.5"),
        (dict(init_image=INIT, strength="0.5"), TypeError, r"strength must be a number in \(0, 1\], got str"),
        (
            dict(init_image=INIT, mask=torch.zeros(1, 1, 32, 32)),
            ValueError,
            r"mask= marks nothing to repaint",
        ),
        (dict(steps=0), ValueError, r"steps must be in \[1, 1000\], got 0"),
        (dict(steps=2.5), TypeError, r"steps must be an int, got float"),
        (
            dict(width=8, height=32),
            ValueError,
            r"width/height: 8x32 is too small; each side must be at least 16 px",
        ),
        (dict(width=4000, height=4000), ValueError, r"width/height: 4000x4000 is 16.0 MP; at most 4 MP"),
        (dict(width=512, height=32), ValueError, r"aspect ratio above 8:1"),
        (
            dict(width=13, height=38),
            ValueError,
            r"12x36 \(given 13x38, rounded down to multiples of 4\) is too small",
        ),
        (dict(references=[picture(64, 64, 0)] * 11), ValueError, r"references: 11 given; at most 10"),
        (
            dict(references=[picture(12, 64, 0)]),
            ValueError,
            r"references\[0\] is 12x64; each side must be at ",
        ),
        (
            dict(references=[picture(20, 200, 0)]),
            ValueError,
            r"references\[0\] is 20x200, an aspect ratio above",
        ),
        (dict(references=[3]), TypeError, r"references\[0\]"),
        (dict(references="fox.png"), ValueError, r"references\[0\]: no file at 'fox.png'"),
        (
            dict(guidance=3.0),
            ValueError,
            r"is guidance-distilled and takes no guidance scale; leave guidance out",
        ),
        (dict(negative_prompt="blurry"), ValueError, r"negative_prompt needs classifier-free guidance"),
        (dict(num_images=0), ValueError, r"num_images must be in \[1, 16\], got 0"),
        (
            dict(num_images=9, prompt=["a", "b"]),
            ValueError,
            r"2 prompts x num_images=9 is 18 images; at most 16",
        ),
        (dict(seed=-1), ValueError, r"seed must be in \[0, "),
        (dict(seed=1, noise=torch.zeros(1, 4, 8, 8)), ValueError, r"seed= cannot be combined with noise="),
        (
            dict(noise=torch.zeros(1, 4, 8, 9), width=32, height=32),
            ValueError,
            r"noise must be \[1, 4, 8, 8\]",
        ),
        (dict(prompt=None), TypeError, r"generate\(\) needs a prompt"),
        (dict(prompt=["ok", 3]), TypeError, r"prompt must be a str or a non-empty list of str"),
        (dict(strenght=0.5), TypeError, r"unexpected keyword argument 'strenght'; did you mean 'strength'\?"),
        (
            dict(image=INIT),
            TypeError,
            r"'image': an input image is either references=\[...\] \(reference cond",
        ),
        (dict(num_inference_steps=4), TypeError, r"'num_inference_steps': use steps="),
        (dict(guidance_scale=4.0), TypeError, r"'guidance_scale': use guidance="),
        (dict(sigmas=[1.0, 0.5, 0.5]), ValueError, r"sigmas must decrease strictly, from noise towards"),
        (dict(sigmas=[1.5, 0.5]), ValueError, r"sigmas must lie in \(0, 1\] \(1 is pure noise"),
        (dict(sigmas=[1.0, float("nan")]), ValueError, r"sigmas must lie in \(0, 1\]"),
        (dict(sigmas=[]), ValueError, r"sigmas must hold 1 to 1000 noise levels, got 0"),
        (dict(sigmas="1.0"), TypeError, r"sigmas must be a sequence of numbers"),
    ],
)
def test_bad_requests(pipe, kwargs, error, message):
    kwargs = {"prompt": "a fox", **kwargs}
    with pytest.raises(error, match=message):
        pipe.generate(**kwargs, **COMMON)


def test_base_model_takes_guidance_and_a_negative_prompt(pipes):
    base = pipes[1]
    result = base.generate(
        "a fox",
        negative_prompt="blurry",
        guidance=3.0,
        width=32,
        height=32,
        steps=1,
        seed=0,
        decode=False,
        **COMMON,
    )
    assert result.info["guidance"] == 3.0 and result.info["negative_prompt"] == "blurry"
    with pytest.raises(ValueError, match=r"guidance must be in \[0, 30\], got 31"):
        base.generate("a fox", guidance=31, **COMMON)


def test_sizes_are_rounded_down_and_reported(pipes):
    result = pipes[0].generate("a fox", width=41, height=34, steps=1, seed=0, decode=False, **COMMON)
    assert (result.info["width"], result.info["height"]) == (40, 32)


def test_text_encoder_is_needed_for_prompts(pipes):
    bare = ff.Pipeline(ff.Components(pipes[0].variant, pipes[0].transformer, pipes[0].vae))
    with pytest.raises(ValueError, match="loaded without a text encoder: load it with text_encoder="):
        bare.generate("a fox", width=32, height=32, steps=1, **COMMON)
    embeds = torch.zeros(1, 8, 48)
    assert bare.generate(
        prompt_embeds=embeds, width=32, height=32, steps=1, seed=0, decode=False
    ).latents.shape == (
        1,
        64,
        4,
    )


def test_progress_and_cancel(pipes):
    seen = []
    pipes[0].generate(
        "a fox",
        width=32,
        height=32,
        steps=3,
        seed=0,
        decode=False,
        on_step=lambda s: seen.append((s.step, s.total, tuple(s.denoised.shape))),
        **COMMON,
    )
    assert seen == [(1, 3, (1, 64, 4)), (2, 3, (1, 64, 4)), (3, 3, (1, 64, 4))]
    cancel = threading.Event()
    with pytest.raises(ff.GenerationCancelled, match="cancelled after 1 of 3 steps"):
        pipes[0].generate(
            "a fox",
            width=32,
            height=32,
            steps=3,
            seed=0,
            cancel=cancel,
            on_step=lambda s: cancel.set(),
            **COMMON,
        )


def test_inputs_of_every_kind(pipes, tmp_path):
    """PIL, numpy, tensor, path and bytes give the same reference."""
    image = picture(64, 48, 5)
    path = tmp_path / "ref.png"
    image.save(path)
    array = np.array(image)
    results = [
        pipes[0].generate("a fox", references=[ref], steps=1, seed=0, decode=False, **COMMON).latents
        for ref in (
            image,
            array,
            torch.from_numpy(array).permute(2, 0, 1).float() / 255,
            str(path),
            path.read_bytes(),
        )
    ]
    for other in results[1:]:
        assert torch.equal(other, results[0])


def test_saved_png_carries_the_settings(pipes, tmp_path):
    from fluxforge.images import read_png_metadata

    result = pipes[0].generate("a red fox", width=32, height=32, steps=2, seed=42, **COMMON)
    (path,) = result.save(tmp_path / "fox.png")
    meta = read_png_metadata(path)
    assert meta["prompt"] == "a red fox" and meta["seed"] == 42 and meta["steps"] == 2
    assert meta["mode"] == "text-to-image" and meta["variant"] == "flux.2-klein-custom"


def test_each_saved_image_carries_its_own_prompt_and_seed(pipes, tmp_path):
    from fluxforge.images import read_png_metadata

    result = pipes[0].generate(
        ["a fox", "a cat"], num_images=2, width=32, height=32, steps=1, seed=7, **COMMON
    )
    paths = result.save(tmp_path / "batch.png")
    metas = [read_png_metadata(p) for p in paths]
    assert [(m["prompt"], m["seed"]) for m in metas] == [
        ("a fox", 7),
        ("a fox", 8),
        ("a cat", 9),
        ("a cat", 10),
    ]
    assert [p.name for p in paths] == ["batch-0.png", "batch-1.png", "batch-2.png", "batch-3.png"]
