"""images.py against diffusers 0.42.1: the pixels its FLUX.2 pipelines hand the VAE, their masks and outputs.

The pipelines themselves are the oracle. Flux2KleinPipeline and Flux2KleinInpaintPipeline are built from tiny
random models with a VAE of four levels (so sizes are floored to 16, as for the real model) and run up to
the point where they encode: `_encode_vae_image` records its input (and the inpaint pipeline's
`prepare_mask_latents` records the mask) and stops the call. Everything is compared with `torch.equal`,
memory layout included, since the VAE's convolutions may round differently on another layout.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein_inpaint import Flux2KleinInpaintPipeline
from diffusers.utils import load_image as diffusers_load_image
from tiny import tiny_diffusers_transformer, tiny_diffusers_vae

from fluxforge.images import (
    load_image,
    load_mask,
    prepare_init_image,
    prepare_reference,
    read_png_metadata,
    save_png,
    to_pil,
    to_pixels,
)


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """uint8 (H, W, 3): a gradient with noise, so that every resize filter leaves its own trace."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, width)[None, :, None] + np.linspace(0, 50, height)[:, None, None]
    return np.clip(ramp + rng.integers(0, 56, (height, width, 3)), 0, 255).astype(np.uint8)


def blobs(width: int, height: int, seed: int = 1) -> np.ndarray:
    """float64 (H, W) in [0, 1]: soft random blobs, many values near the 0.5 threshold, a band right on it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    field = np.zeros((height, width))
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(5, 20)
        field += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r**2))
    field[10:14] = 0.5  # exactly on the threshold: repaint
    return np.clip(field, 0, 1)


# ---------------------------------------------------------------------------------------------------------
# The diffusers pipelines, stopped at the VAE


class _Stop(Exception):
    pass


def _tiny_pipeline(cls):
    # Four levels: vae_scale_factor 8, so images are floored to 16 px as for the real model. 32 latent
    # channels as the real VAE: the mask processor passes tensors with that many channels through as
    # latents, so with the tiny tests' single latent channel every one-channel mask tensor would skip it.
    levels = 4
    vae = tiny_diffusers_vae(
        block_out_channels=(4,) * levels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        latent_channels=32,
    )
    scheduler = FlowMatchEulerDiscreteScheduler()
    transformer = tiny_diffusers_transformer(in_channels=128)
    return cls(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer)


@pytest.fixture(scope="module")
def klein() -> Flux2KleinPipeline:
    pipe = _tiny_pipeline(Flux2KleinPipeline)
    assert pipe.vae_scale_factor * 2 == 16
    # Its size checks (min side 64, aspect 8) are the fluxforge pipeline's business, not images.py's.
    pipe.image_processor.check_image_input = lambda image: image
    return pipe


@pytest.fixture(scope="module")
def inpaint() -> Flux2KleinInpaintPipeline:
    return _tiny_pipeline(Flux2KleinInpaintPipeline)


def klein_reference_pixels(pipe: Flux2KleinPipeline, image: PIL.Image.Image) -> torch.Tensor:
    """What Flux2KleinPipeline encodes for one reference image."""
    seen = []

    def encode(image, generator):
        seen.append(image)
        raise _Stop

    pipe._encode_vae_image = encode
    with pytest.raises(_Stop):
        pipe(image=image, prompt_embeds=torch.zeros(1, 4, 32), num_inference_steps=1, guidance_scale=1.0)
    return seen[0]


def inpaint_inputs(pipe: Flux2KleinInpaintPipeline, image, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """The source pixels Flux2KleinInpaintPipeline encodes and the processed mask (before it is pooled
    to the token grid)."""
    seen = {}

    def encode(image, generator):
        seen["pixels"] = image
        return torch.zeros(1, 128, image.shape[2] // 16, image.shape[3] // 16)

    def mask_latents(mask, *args, **kwargs):
        seen["mask"] = mask
        raise _Stop

    pipe._encode_vae_image = encode
    pipe.prepare_mask_latents = mask_latents
    with pytest.raises(_Stop):
        pipe(
            image=image,
            mask_image=mask,
            prompt_embeds=torch.zeros(1, 4, 32),
            num_inference_steps=2,
            guidance_scale=1.0,
            strength=1.0,
        )
    return seen["pixels"], seen["mask"]


def assert_same_tensor(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert torch.equal(ours, theirs), f"max difference {(ours - theirs).abs().max().item()}"
    assert ours.stride() == theirs.stride(), "same values, but another memory layout than diffusers'"


# ---------------------------------------------------------------------------------------------------------
# load_image: every kind of input


def png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


RGB = photo(40, 30)
RGBA = np.concatenate([RGB, np.random.default_rng(2).integers(0, 256, (30, 40, 1), dtype=np.uint8)], -1)
FLOAT = RGB.astype(np.float32) / 255  # rounds back to RGB exactly
CHW = torch.from_numpy(FLOAT).permute(2, 0, 1)

COLOUR_INPUTS = {
    "pil-rgb": lambda tmp: PIL.Image.fromarray(RGB),
    "pil-rgba": lambda tmp: PIL.Image.fromarray(RGBA),  # alpha dropped, not composited (as diffusers)
    "numpy-uint8": lambda tmp: RGB,
    "numpy-float32": lambda tmp: FLOAT,
    "numpy-float64": lambda tmp: FLOAT.astype(np.float64),
    "numpy-1hwc": lambda tmp: FLOAT[None],
    "numpy-rgba-uint8": lambda tmp: RGBA,
    "torch-chw": lambda tmp: CHW,
    "torch-1chw": lambda tmp: CHW[None],
    "torch-chw-float16": lambda tmp: CHW.half(),
    "torch-chw-uint8": lambda tmp: torch.from_numpy(RGB).permute(2, 0, 1),
    "torch-rgba": lambda tmp: torch.from_numpy(RGBA.astype(np.float32) / 255).permute(2, 0, 1),
    "path-str": lambda tmp: _saved(tmp, RGB, "a.png"),
    "path-pathlike": lambda tmp: Path(_saved(tmp, RGBA, "b.png")),
    "bytes": lambda tmp: png_bytes(PIL.Image.fromarray(RGB)),
}


def _saved(tmp: Path, array: np.ndarray, name: str) -> str:
    PIL.Image.fromarray(array).save(tmp / name)
    return str(tmp / name)


@pytest.mark.parametrize("kind", COLOUR_INPUTS)
def test_every_input_kind_gives_the_same_picture(kind, tmp_path):
    image = load_image(COLOUR_INPUTS[kind](tmp_path))
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.array(image), RGB)


GRAY = RGB[..., 0]
GRAY_INPUTS = {
    "pil-l": lambda: PIL.Image.fromarray(GRAY),
    "numpy-hw": lambda: GRAY,
    "numpy-hw1-float": lambda: GRAY[..., None] / 255,
    "torch-hw-float": lambda: torch.from_numpy(GRAY / 255),
    "torch-1hw-uint8": lambda: torch.from_numpy(GRAY)[None],
}


@pytest.mark.parametrize("kind", GRAY_INPUTS)
def test_gray_inputs_become_gray_rgb(kind):
    image = load_image(GRAY_INPUTS[kind]())
    np.testing.assert_array_equal(np.array(image), np.repeat(GRAY[..., None], 3, axis=-1))


def test_float_inputs_round_as_diffusers_makes_pil_images():
    # Values on the rounding boundaries (k + 0.5) / 255 and random ones: truncation or x * 256 would differ.
    rng = np.random.default_rng(3)
    values = np.concatenate([(np.arange(255) + 0.5) / 255, rng.uniform(0, 1, 30 * 40 * 3 - 255)])
    array = values.reshape(30, 40, 3)
    expected = VaeImageProcessor.numpy_to_pil(array[None])[0]
    np.testing.assert_array_equal(np.array(load_image(array)), np.array(expected))

    for tensor in (torch.from_numpy(array).permute(2, 0, 1).float(), torch.rand(3, 30, 40).bfloat16()):
        expected = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(tensor[None]))[0]
        np.testing.assert_array_equal(np.array(load_image(tensor)), np.array(expected))


def test_files_are_turned_upright_as_diffusers_load_image_does(tmp_path):
    image = PIL.Image.fromarray(RGB)
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    ours = load_image(tmp_path / "phone.jpg")
    assert ours.size == (30, 40)
    np.testing.assert_array_equal(np.array(ours), np.array(diffusers_load_image(str(tmp_path / "phone.jpg"))))
    raw = (tmp_path / "phone.jpg").read_bytes()
    np.testing.assert_array_equal(np.array(load_image(raw)), np.array(ours))
    # An image object is used as given, as the diffusers pipelines do.
    assert load_image(PIL.Image.open(tmp_path / "phone.jpg")).size == (40, 30)


def truncated_png() -> bytes:
    data = png_bytes(PIL.Image.fromarray(photo(64, 64)))
    return data[: len(data) // 2]


BAD_INPUTS = {
    "int": (3, TypeError, "must be an image, got int; pass a PIL image, a numpy array, a torch tensor"),
    "list": ([PIL.Image.fromarray(RGB)], TypeError, "got list; pass one image (a PIL image"),
    "5-d": (torch.rand(1, 1, 3, 8, 8), ValueError, "has 5 dimensions"),
    "batch": (torch.rand(2, 3, 8, 8), ValueError, "holds a batch of 2 images"),
    "numpy-batch": (np.zeros((3, 8, 8, 3), np.uint8), ValueError, "holds a batch of 3 images"),
    "minus-one-to-one": (torch.rand(3, 8, 8) * 2 - 1, ValueError, "float images must be in [0, 1]"),
    "0-255-floats": (RGB.astype(np.float32), ValueError, "float images must be in [0, 1]"),
    "nan": (torch.full((3, 8, 8), float("nan")), ValueError, "float images must be in [0, 1]"),
    "int64": (RGB.astype(np.int64), TypeError, "has dtype int64"),
    "channels-last-tensor": (torch.rand(8, 9, 3), ValueError, "looks channels-last"),
    "channels-first-numpy": (np.zeros((3, 8, 9), np.uint8), ValueError, "looks channels-first"),
    "two-channels": (np.zeros((8, 9, 2), np.uint8), ValueError, "has 2 channels"),
    "empty-array": (np.zeros((0, 9, 3), np.uint8), ValueError, "is empty"),
    "missing-path": ("/no/such/picture.png", ValueError, "no file at '/no/such/picture.png'"),
    "url": ("https://example.com/a.png", ValueError, "is a URL"),
    "garbage-bytes": (b"not an image at all", ValueError, "the bytes could not be read as an image"),
    "empty-bytes": (b"", ValueError, "the bytes are empty"),
    "truncated-png": (truncated_png(), ValueError, "the bytes could not be read as an image"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_say_which_parameter_and_what_to_do(case):
    value, error, fragment = BAD_INPUTS[case]
    with pytest.raises(error) as info:
        load_image(value, param="references[2]")
    message = str(info.value)
    assert message.startswith("references[2]"), message
    assert fragment in message, message
    assert "pass" in message, message  # says what to do instead


def test_a_directory_or_a_text_file_is_not_an_image(tmp_path):
    with pytest.raises(ValueError, match="no file at"):
        load_image(tmp_path, param="init_image")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"^init_image: '.*notes.txt' could not be read as an image"):
        load_image(tmp_path / "notes.txt", param="init_image")


# ---------------------------------------------------------------------------------------------------------
# References: exactly what Flux2KleinPipeline encodes

REFERENCE_SIZES = [(90, 70), (64, 64), (200, 33), (1500, 900), (1025, 1024), (2000, 250), (37, 1100)]


@pytest.mark.parametrize("size", REFERENCE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_reference_pixels_match_klein(klein, size):
    image = PIL.Image.fromarray(photo(*size))
    theirs = klein_reference_pixels(klein, image)
    assert_same_tensor(to_pixels(prepare_reference(image)), theirs)
    # The same from any kind of input, e.g. the uint8 array.
    assert_same_tensor(to_pixels(prepare_reference(np.array(image))), theirs)


@pytest.mark.parametrize("mode", ["RGBA", "P", "L"])
def test_reference_keeps_the_image_mode_until_the_end_like_klein(klein, mode):
    # Above the area cap, so that the resize sees the mode: RGBA resizes premultiplied, P with nearest.
    image = PIL.Image.fromarray(RGBA).resize((1200, 1000)).convert(mode)
    theirs = klein_reference_pixels(klein, image)
    prepared = prepare_reference(image)
    assert prepared.mode == "RGB"
    assert_same_tensor(to_pixels(prepared), theirs)


def test_reference_too_small_after_flooring_says_so():
    with pytest.raises(ValueError, match=r"^references\[0\] is 15x300; each side must be at least 16 px"):
        prepare_reference(PIL.Image.fromarray(photo(15, 300)), param="references[0]")


# ---------------------------------------------------------------------------------------------------------
# Init image and mask: exactly what Flux2KleinInpaintPipeline encodes and blends with

PICTURE = photo(90, 70, seed=4)
FLOAT_PICTURE = np.random.default_rng(5).uniform(0, 1, (70, 90, 3))  # not on the uint8 grid
INIT_INPUTS = {
    "pil": lambda: PIL.Image.fromarray(PICTURE),
    "pil-rgba": lambda: PIL.Image.fromarray(RGBA).resize((90, 70)),
    "pil-over-cap": lambda: PIL.Image.fromarray(photo(1500, 900)),
    "torch-1chw": lambda: torch.from_numpy(FLOAT_PICTURE).permute(2, 0, 1)[None].float(),
    "torch-chw": lambda: torch.from_numpy(FLOAT_PICTURE).permute(2, 0, 1).float(),
    "torch-over-cap": lambda: torch.rand(1, 3, 1100, 1000, generator=torch.Generator().manual_seed(0)),
    "numpy-float64": lambda: FLOAT_PICTURE,
    "numpy-float32": lambda: FLOAT_PICTURE.astype(np.float32),
}


@pytest.mark.parametrize("kind", INIT_INPUTS)
def test_init_image_pixels_match_inpaint(inpaint, kind):
    image = INIT_INPUTS[kind]()
    height, width = image.shape[-2:] if isinstance(image, torch.Tensor) else np.shape(image)[:2]
    mask = np.zeros((height, width))  # the pipeline needs one; its own check is below
    theirs, _ = inpaint_inputs(inpaint, image, mask)
    assert_same_tensor(prepare_init_image(image), theirs)


def test_init_image_floats_are_not_rounded_to_uint8():
    ours = prepare_init_image(FLOAT_PICTURE.astype(np.float32))
    rounded = prepare_init_image(load_image(FLOAT_PICTURE))
    assert ours.shape == rounded.shape == (1, 3, 64, 80)
    assert not torch.equal(ours, rounded)


def test_init_image_at_a_given_size():
    image = PIL.Image.fromarray(PICTURE)
    assert_same_tensor(prepare_init_image(image, (80, 64)), prepare_init_image(image))
    assert prepare_init_image(image, (48, 96)).shape == (1, 3, 96, 48)


MASK = blobs(90, 70)
MASK_INPUTS = {
    "pil-l": lambda: PIL.Image.fromarray((MASK * 255).round().astype(np.uint8)),
    "pil-rgb": lambda: PIL.Image.fromarray(
        np.stack([MASK * 255, MASK * 200, MASK * 100], -1).astype(np.uint8)
    ),
    # Colour from the pattern, alpha random: resized premultiplied, as RGBA always is in Pillow.
    "pil-rgba": lambda: PIL.Image.fromarray(
        np.concatenate([np.repeat(MASK[..., None] * 255, 3, -1), photo(90, 70, seed=6)[..., :1]], -1).astype(
            np.uint8
        )
    ),
    "pil-1": lambda: PIL.Image.fromarray(MASK >= 0.4),
    "numpy-hw-float64": lambda: MASK,
    "numpy-hw1-float32": lambda: MASK[..., None].astype(np.float32),
    "torch-11hw": lambda: torch.from_numpy(MASK).float()[None, None],
    "torch-1hw": lambda: torch.from_numpy(MASK).float()[None],
    "torch-hw": lambda: torch.from_numpy(MASK).float(),
}


@pytest.mark.parametrize("kind", MASK_INPUTS)
def test_mask_matches_inpaint(inpaint, kind):
    mask = MASK_INPUTS[kind]()
    _, theirs = inpaint_inputs(inpaint, PIL.Image.fromarray(PICTURE), mask)
    ours = load_mask(mask, (80, 64))
    assert ours.shape == theirs.shape == (1, 1, 64, 80)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, theirs.float())
    assert 0.1 < ours.mean() < 0.9, "the pattern should be non-trivial"


def test_mask_from_uint8_and_bool_arrays():
    # diffusers would call any uint8 value >= 1 "repaint"; here uint8 means 0..255 as everywhere else.
    as_float = load_mask(MASK, (80, 64))
    assert torch.equal(load_mask((MASK * 255).round().astype(np.uint8), (80, 64)), as_float)
    assert torch.equal(load_mask(torch.from_numpy(MASK >= 0.5), (80, 64)), as_float)


def test_alpha_marks_the_repaint_area_when_asked():
    alpha = np.where(MASK >= 0.5, 0, 255).astype(np.uint8)  # transparent = repaint
    rgba = PIL.Image.fromarray(np.concatenate([photo(90, 70), alpha[..., None]], -1))
    white_is_repaint = PIL.Image.fromarray(255 - alpha)
    expected = load_mask(white_is_repaint, (80, 64))
    assert torch.equal(load_mask(rgba, (80, 64), alpha_is_repaint=True), expected)
    assert torch.equal(load_mask(np.array(rgba), (80, 64), alpha_is_repaint=True), expected)
    # Without the flag, an RGBA mask is read as diffusers reads it: by its colour.
    assert not torch.equal(load_mask(rgba, (80, 64)), expected)


def test_alpha_flag_needs_an_alpha_channel():
    with pytest.raises(
        ValueError, match=r"^mask: alpha_is_repaint needs an image with an alpha channel, got mode RGB;"
    ):
        load_mask(PIL.Image.fromarray(PICTURE), (80, 64), alpha_is_repaint=True)


def test_a_mask_that_keeps_everything_is_allowed():
    assert torch.equal(load_mask(np.zeros((70, 90)), (80, 64)), torch.zeros(1, 1, 64, 80))


@pytest.mark.parametrize(
    "mask, fragment",
    [
        (np.zeros((70, 90, 3)), "has 3 channels (shape (70, 90, 3)); a mask array or tensor has one"),
        (torch.zeros(1, 3, 70, 90), "has 3 channels"),
        (torch.zeros(1, 1, 1, 70, 90), "has 5 dimensions"),
        (torch.zeros(2, 1, 70, 90), "holds a batch of 2 images"),
        (np.full((70, 90), 255.0), "float images must be in [0, 1]"),
    ],
)
def test_bad_masks_name_the_parameter(mask, fragment):
    with pytest.raises(ValueError) as info:
        load_mask(mask, (80, 64), param="mask_image")
    assert str(info.value).startswith("mask_image"), str(info.value)
    assert fragment in str(info.value), str(info.value)


# ---------------------------------------------------------------------------------------------------------
# Output


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_to_pil_matches_diffusers_postprocess(dtype):
    pixels = (torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(0)) * 0.8).to(dtype)
    theirs = VaeImageProcessor().postprocess(pixels, output_type="pil")
    ours = to_pil(pixels)
    assert len(ours) == 2
    for a, b in zip(ours, theirs, strict=True):
        assert a.mode == b.mode == "RGB"
        np.testing.assert_array_equal(np.array(a), np.array(b))


def test_to_pil_rejects_other_shapes():
    with pytest.raises(ValueError, match=r"pixels must be a \[B, 3, H, W\] tensor, got \(3, 8, 8\)"):
        to_pil(torch.zeros(3, 8, 8))
    with pytest.raises(TypeError, match="pixels must be a torch tensor, got ndarray"):
        to_pil(np.zeros((1, 3, 8, 8)))


# ---------------------------------------------------------------------------------------------------------
# PNG metadata

METADATA = {
    "prompt": "a red fox in the snow, 雪の中の狐",
    "negative_prompt": "blurry",
    "mode": "inpaint",
    "variant": "flux.2-klein-4b",
    "width": 1024,
    "height": 768,
    "steps": 4,
    "guidance": 1.0,
    "strength": 0.8,
    "seed": 42,
    "references": ["fox.png"],
}


def test_png_metadata_round_trips(tmp_path):
    image = PIL.Image.fromarray(RGB)
    save_png(image, tmp_path / "out.png", METADATA)
    assert read_png_metadata(tmp_path / "out.png") == METADATA
    with PIL.Image.open(tmp_path / "out.png") as saved:
        np.testing.assert_array_equal(np.array(saved), RGB)
        assert saved.text["parameters"] == (
            "a red fox in the snow, 雪の中の狐\n"
            "Negative prompt: blurry\n"
            "Steps: 4, CFG scale: 1.0, Seed: 42, Size: 1024x768, Model: flux.2-klein-4b, "
            "Denoising strength: 0.8, Mode: inpaint"
        )
    # The JSON is ASCII, so it sits in a plain tEXt chunk that every PNG reader understands.
    assert b"tEXtfluxforge\x00{" in (tmp_path / "out.png").read_bytes()


def test_png_metadata_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="metadata must hold only JSON values"):
        save_png(PIL.Image.fromarray(RGB), tmp_path / "out.png", {"seed": torch.tensor(3)})


def test_reading_metadata_from_a_png_without_it(tmp_path):
    PIL.Image.fromarray(RGB).save(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="has no 'fluxforge' text chunk"):
        read_png_metadata(tmp_path / "plain.png")
