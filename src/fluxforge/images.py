"""Image input and output: load any image the API accepts, size it for the VAE, write PNGs with metadata.

Inputs (`ImageInput`): PIL images, numpy arrays (H, W) / (H, W, C), torch tensors (H, W) / (C, H, W) /
(1, C, H, W), file paths and encoded bytes. Arrays and tensors hold uint8 in 0..255 or floats in [0, 1], as
the diffusers FLUX.2 docstrings promise; anything else is refused with the parameter named.

Each step reproduces diffusers 0.42.1 bit for bit (tests/test_images.py runs its pipelines as the oracle):
* reference (Flux2KleinPipeline): cap the area with LANCZOS, floor to 16, center crop
* init image (Flux2KleinInpaintPipeline): cap the area, then floor to 16 by resizing; LANCZOS for pictures,
  nearest for float arrays and tensors, which are never rounded to uint8
* mask (its mask processor): resized the same way, made grayscale, then >= 0.5 -> 1 (repaint), else 0
* VAE input: [1, 3, H, W] float32, x / 255 then 2x - 1; output (`postprocess`): x / 2 + 0.5, clamp,
  round(x * 255)
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import PIL.Image
import PIL.ImageOps
import PIL.PngImagePlugin
import torch
import torch.nn.functional as F

from fluxforge.errors import InputTooLarge

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor | str | os.PathLike | bytes
Picture = TypeVar("Picture", PIL.Image.Image, torch.Tensor)

_KINDS = "a PIL image, a numpy array, a torch tensor, a file path or encoded image bytes"
_CHANNELS = (1, 3, 4)  # gray, RGB, RGBA
_METADATA_KEY = "fluxforge"


def load_image(image: ImageInput, *, param: str = "image") -> PIL.Image.Image:
    """Any accepted input as an RGB PIL image. Float arrays become uint8 as diffusers' `numpy_to_pil` does
    (round(x * 255)), so a tensor and the PIL image diffusers would make of it give the same result."""
    return _as_pil(image, param).convert("RGB")


def check_input_size(image: ImageInput, max_pixels: int, *, param: str = "image") -> None:
    """Refuse an input image of more than `max_pixels`, reading only its header: a small file can hold a
    huge picture (a decompression bomb), so bytes and files are measured before they are decoded."""
    if isinstance(image, PIL.Image.Image):
        width, height = image.size
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        shape = tuple(image.shape)
        hw = shape[-2:] if len(shape) in (2, 4) or (len(shape) == 3 and shape[0] in _CHANNELS) else shape[:2]
        height, width = (int(v) for v in hw)
    elif isinstance(image, (bytes, str, os.PathLike)):
        if isinstance(image, bytes):
            source: Any = io.BytesIO(image)
        elif Path(os.fsdecode(image)).is_file():
            source = os.fsdecode(image)
        else:
            return  # load_image names the problem
        try:
            with warnings.catch_warnings():  # Pillow warns of a bomb; this refuses it below instead
                warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
                with PIL.Image.open(source) as picture:  # lazy: the header only
                    width, height = picture.size
        except PIL.Image.DecompressionBombError:
            width = height = None
        except (OSError, SyntaxError, ValueError):
            return  # not an image: load_image says so
        if width is None:
            raise InputTooLarge(f"{param}: the image is a decompression bomb (far above {max_pixels} px)")
    else:
        return
    if width * height > max_pixels:
        raise InputTooLarge(
            f"{param} is {width}x{height} = {width * height / 1e6:.1f} MP; input images may have at most "
            f"{max_pixels / 1e6:.1f} MP ({max_pixels} px): scale it down before sending it"
        )


def to_pixels(image: PIL.Image.Image) -> torch.Tensor:
    """[1, 3, H, W] float32 in [-1, 1]: uint8 / 255, then 2x - 1, as `Flux2ImageProcessor.preprocess`."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    bhwc = np.stack([np.array(image).astype(np.float32) / 255.0])
    # A permuted view, not a contiguous copy: diffusers hands the VAE this channels-last layout, and
    # convolutions may round differently on another layout.
    return 2.0 * torch.from_numpy(bhwc).permute(0, 3, 1, 2) - 1.0


def resize_exact(image: Picture, size: tuple[int, int]) -> Picture:
    """Resize to exactly `size` = (width, height), ignoring the aspect ratio, as `VaeImageProcessor.resize`:
    PIL images with LANCZOS, tensors [B, C, H, W] with nearest neighbour."""
    width, height = size
    if isinstance(image, PIL.Image.Image):
        return image.resize((width, height), PIL.Image.Resampling.LANCZOS)
    return F.interpolate(image, size=(height, width))


def prepare_reference(
    image: ImageInput, *, max_pixels: int = 1024**2, multiple: int = 16, param: str = "image"
) -> PIL.Image.Image:
    """A reference image as Flux2KleinPipeline feeds it to the VAE (before `to_pixels`): scaled down to
    `max_pixels` if larger, floored to `multiple`, then center-cropped (no resize) to that size.

    A PIL image keeps its mode until the end, as in diffusers: resizing RGBA or palette images is not the
    same as resizing their RGB conversion."""
    if not isinstance(image, PIL.Image.Image):
        image = load_image(image, param=param)
    width, height = image.size
    if width * height > max_pixels:
        image = resize_exact(image, _capped(width, height, max_pixels))
    width, height = _floored(image.size, multiple, param)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height)).convert("RGB")


def prepare_init_image(
    image: ImageInput,
    size: tuple[int, int] | None = None,
    *,
    max_pixels: int = 1024**2,
    multiple: int = 16,
    param: str = "init_image",
) -> torch.Tensor:
    """The img2img / inpainting source as [1, 3, H, W] float32 pixels in [-1, 1], resized to `size`
    (width, height). Without a size it keeps its own, as Flux2KleinInpaintPipeline does: scaled down to
    `max_pixels` if larger, then floored to `multiple` by resizing (a slight squash, not a crop).

    Float arrays and tensors keep their exact values and are resized with nearest neighbour, as diffusers
    does for them; everything else (PIL, paths, bytes, uint8 arrays) is resized as a picture with LANCZOS."""
    exact = isinstance(image, (np.ndarray, torch.Tensor)) and _is_float(image)
    if exact:
        source: PIL.Image.Image | torch.Tensor = _exact_pixels(image, param)
    elif isinstance(image, PIL.Image.Image):
        source = image  # its own mode until the end, as in diffusers (see prepare_reference)
    else:
        source = load_image(image, param=param)
    if size is None:
        width, height = _size(source)
        if width * height > max_pixels:
            # Two resizes, not one: the reference pipeline caps first and then fits to the multiple.
            source = resize_exact(source, _capped(width, height, max_pixels))
        size = _floored(_size(source), multiple, param)
    source = resize_exact(source, size)
    if isinstance(source, PIL.Image.Image):
        return to_pixels(source)
    return (2.0 * source - 1.0).float()


def load_mask(
    mask: ImageInput, size: tuple[int, int], *, alpha_is_repaint: bool = False, param: str = "mask"
) -> torch.Tensor:
    """[1, 1, H, W] float32 of 1 (repaint) and 0 (keep) at `size` = (width, height).

    White (>= 0.5) marks the area to repaint. The mask is resized first and binarized after, as the
    diffusers inpaint mask processor does: PIL masks with LANCZOS in their own mode and then made
    grayscale, single-channel arrays and tensors (uint8, bool or float in [0, 1]) with nearest neighbour.
    With `alpha_is_repaint`, the mask must have an alpha channel, and alpha == 0 marks the area to
    repaint (the OpenAI edits convention)."""
    width, height = size
    if alpha_is_repaint:
        picture = _as_pil(mask, param)
        if "A" not in picture.getbands() and "transparency" not in picture.info:
            raise ValueError(
                f"{param}: alpha_is_repaint needs an image with an alpha channel, got mode {picture.mode}; "
                "pass an RGBA image whose transparent pixels mark the area to repaint, or a "
                "white-on-black mask without alpha_is_repaint"
            )
        alpha = np.array(picture.convert("RGBA").getchannel("A"))
        mask = PIL.Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8))
    if isinstance(mask, (np.ndarray, torch.Tensor)):
        values = _single_channel(mask, param)
        return (F.interpolate(values, size=(height, width)) >= 0.5).float()
    picture = _as_pil(mask, param)
    gray = resize_exact(picture, (width, height)).convert("L")
    values = torch.from_numpy(np.array(gray).astype(np.float32) / 255.0)
    return (values >= 0.5).float()[None, None]


def to_pil(pixels: torch.Tensor) -> list[PIL.Image.Image]:
    """Decoded pixels [B, 3, H, W] in about [-1, 1] as PIL images, as `VaeImageProcessor.postprocess`.
    The affine map and clamp run in the tensor's own dtype (bf16 output stays bf16 until then) as there."""
    if not isinstance(pixels, torch.Tensor):
        raise TypeError(f"pixels must be a torch tensor, got {type(pixels).__name__}; pass the VAE's output")
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(
            f"pixels must be a [B, 3, H, W] tensor, got {tuple(pixels.shape)}; pass the VAE's decoded output"
        )
    unit = (pixels.detach() * 0.5 + 0.5).clamp(0, 1)
    hwc = unit.cpu().permute(0, 2, 3, 1).float().numpy()
    return [PIL.Image.fromarray(image) for image in (hwc * 255).round().astype(np.uint8)]


def save_png(image: PIL.Image.Image, path: str | os.PathLike, metadata: Mapping[str, Any]) -> None:
    """Write a PNG with the settings in two text chunks: "fluxforge" (JSON, read back by
    `read_png_metadata`) and "parameters" (the A1111 text that most image tools display)."""
    try:
        # ASCII (non-ASCII as \u escapes), so that it always fits a Latin-1 tEXt chunk.
        text = json.dumps(dict(metadata))
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"metadata must hold only JSON values (str, int, float, bool, None, lists, dicts): {exc}"
        ) from None
    info = PIL.PngImagePlugin.PngInfo()
    info.add_text(_METADATA_KEY, text)
    # Pillow stores text that Latin-1 cannot hold (most non-European prompts) as UTF-8 iTXt instead.
    info.add_text("parameters", _a1111(metadata))
    image.save(path, format="PNG", pnginfo=info)


def read_png_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata `save_png` stored in a PNG."""
    text = _open_file(path, "path").info.get(_METADATA_KEY)
    if text is None:
        raise ValueError(
            f"path: {os.fspath(path)} has no {_METADATA_KEY!r} text chunk; pass a PNG written by fluxforge"
        )
    return json.loads(text)


# A1111 "parameters" labels for the settings that have one; other plain values follow under their own name.
_A1111_LABELS = {
    "steps": "Steps",
    "guidance": "CFG scale",
    "seed": "Seed",
    "size": "Size",
    "variant": "Model",
    "strength": "Denoising strength",
    "mode": "Mode",
}


def _a1111(metadata: Mapping[str, Any]) -> str:
    """`prompt`, an optional "Negative prompt: ..." line, then "Steps: 4, Seed: 42, ..."."""
    settings = {
        k: v for k, v in metadata.items() if k not in ("prompt", "negative_prompt", "width", "height")
    }
    if "size" not in settings and metadata.get("width") is not None and metadata.get("height") is not None:
        settings["size"] = f"{metadata['width']}x{metadata['height']}"
    if isinstance(settings.get("size"), (list, tuple)) and len(settings["size"]) == 2:
        width, height = settings["size"]
        settings["size"] = f"{width}x{height}"
    ordered = [k for k in _A1111_LABELS if k in settings] + [k for k in settings if k not in _A1111_LABELS]
    fields = []
    for key in ordered:
        value = settings[key]
        if isinstance(value, (str, int, float, bool)):
            text = str(value)
            # A1111 quotes values that would break its "Key: value, ..." parsing.
            if any(c in text for c in ",:\n"):
                text = json.dumps(text, ensure_ascii=False)
            fields.append(f"{_A1111_LABELS.get(key, key)}: {text}")
    lines = [str(metadata.get("prompt") or "")]
    if metadata.get("negative_prompt"):
        lines.append(f"Negative prompt: {metadata['negative_prompt']}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def _as_pil(image: ImageInput, param: str) -> PIL.Image.Image:
    """Any accepted input as a PIL image in its own mode (arrays: L, RGB or RGBA)."""
    if isinstance(image, PIL.Image.Image):
        return image
    if isinstance(image, (np.ndarray, torch.Tensor)):
        hwc = _hwc(image, param)
        if hwc.dtype != np.uint8:
            hwc = (hwc * 255).round().astype(np.uint8)
        return PIL.Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc)
    if isinstance(image, bytes):
        if not image:
            raise ValueError(f"{param}: the bytes are empty; pass the encoded image (PNG, JPEG, WebP, ...)")
        picture = _decode(io.BytesIO(image), param, "the bytes")
    elif isinstance(image, (str, os.PathLike)):
        picture = _open_file(image, param)
    else:
        what = f"one image ({_KINDS}), not a list" if isinstance(image, (list, tuple)) else _KINDS
        raise TypeError(f"{param} must be an image, got {type(image).__name__}; pass {what}")
    # Phone photos store their rotation in EXIF; diffusers' load_image applies it to files too.
    return PIL.ImageOps.exif_transpose(picture)


def _open_file(path: str | os.PathLike, param: str) -> PIL.Image.Image:
    name = os.fsdecode(path)
    if name.startswith(("http://", "https://")):
        raise ValueError(
            f"{param}: {name!r} is a URL; fluxforge does not download: pass a local file or bytes"
        )
    if not Path(name).is_file():
        raise ValueError(f"{param}: no file at {name!r}; pass the path of an existing image file")
    return _decode(name, param, repr(name))


def _decode(source: str | io.BytesIO, param: str, what: str) -> PIL.Image.Image:
    try:
        picture = PIL.Image.open(source)
        picture.load()  # decode now: a truncated file fails here, not later in the pipeline
        return picture
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as exc:
        raise ValueError(
            f"{param}: {what} could not be read as an image ({exc}); pass a PNG, JPEG, WebP or another "
            "format Pillow reads"
        ) from None


def _is_float(array: np.ndarray | torch.Tensor) -> bool:
    return array.is_floating_point() if isinstance(array, torch.Tensor) else array.dtype.kind == "f"


def _check_values(array: np.ndarray | torch.Tensor, param: str) -> None:
    """uint8 passes; floats must lie in [0, 1]; other dtypes are refused."""
    dtype = str(array.dtype).removeprefix("torch.")
    if dtype != "uint8" and not _is_float(array):
        raise TypeError(f"{param} has dtype {dtype}; pass uint8 values in 0..255 or floats in [0, 1]")
    if 0 in array.shape:
        raise ValueError(f"{param} is empty (shape {tuple(array.shape)}); pass an image with pixels")
    if dtype == "uint8":
        return
    low, high = float(array.min()), float(array.max())
    if not (0.0 <= low and high <= 1.0):  # also catches NaN
        raise ValueError(
            f"{param} holds values in [{low:g}, {high:g}]; float images must be in [0, 1] "
            "(from [-1, 1] use (x + 1) / 2; from 0..255 use x / 255 or pass uint8)"
        )


def _batchless(array: np.ndarray | torch.Tensor, param: str) -> np.ndarray | torch.Tensor:
    """Drop a leading batch of one; refuse larger batches and other dimension counts."""
    layout = "(H, W) or (H, W, C)" if isinstance(array, np.ndarray) else "(H, W), (C, H, W) or (1, C, H, W)"
    if array.ndim == 4:
        if array.shape[0] != 1:
            raise ValueError(
                f"{param} holds a batch of {array.shape[0]} images (shape {tuple(array.shape)}); pass one "
                "image here, and several images as a list of single images"
            )
        return array[0]
    if array.ndim not in (2, 3):
        raise ValueError(f"{param} has {array.ndim} dimensions (shape {tuple(array.shape)}); pass {layout}")
    return array


def _hwc(image: np.ndarray | torch.Tensor, param: str) -> np.ndarray:
    """A checked single image as numpy (H, W, C), C in 1, 3, 4; uint8, or floats in [0, 1]."""
    _check_values(image, param)
    image = _batchless(image, param)
    if isinstance(image, torch.Tensor):
        chw = image[None] if image.ndim == 2 else image
        if chw.shape[0] not in _CHANNELS and chw.shape[-1] in _CHANNELS:
            raise ValueError(
                f"{param} has shape {tuple(chw.shape)}, which looks channels-last; tensors are (C, H, W): "
                "pass tensor.permute(2, 0, 1)"
            )
        # float32 as diffusers' pt_to_numpy makes it, so that round(x * 255) matches.
        hwc = chw.detach().cpu().permute(1, 2, 0)
        hwc = hwc.float().numpy() if hwc.is_floating_point() else hwc.numpy()
    else:
        hwc = image[..., None] if image.ndim == 2 else image
        if hwc.shape[-1] not in _CHANNELS and hwc.shape[0] in _CHANNELS:
            raise ValueError(
                f"{param} has shape {hwc.shape}, which looks channels-first; numpy images are (H, W, C): "
                "pass array.transpose(1, 2, 0)"
            )
    if hwc.shape[-1] not in _CHANNELS:
        raise ValueError(f"{param} has {hwc.shape[-1]} channels; pass 1 (gray), 3 (RGB) or 4 (RGBA)")
    return hwc


def _exact_pixels(image: np.ndarray | torch.Tensor, param: str) -> torch.Tensor:
    """A float array or tensor as [1, 3, H, W] in [0, 1] without rounding, in its own dtype."""
    if isinstance(image, np.ndarray):
        # numpy (H, W, C) seen as (C, H, W), the view diffusers' numpy_to_pt makes. np.stack, not [None]:
        # a stride-0 batch axis hides the channels-last layout from F.interpolate, which then changes it.
        bchw = torch.from_numpy(np.stack([_hwc(image, param)])).permute(0, 3, 1, 2)
    else:
        _hwc(image, param)  # the checks only
        # cat / stack as diffusers' preprocess batches tensors: the result's memory layout is theirs too.
        image = image.detach()
        image = image[None] if image.ndim == 2 else image
        bchw = torch.cat([image]) if image.ndim == 4 else torch.stack([image])
    # Gray and RGBA as PIL's convert("RGB") treats them: channels repeated, alpha dropped.
    return bchw.expand(-1, 3, -1, -1) if bchw.shape[1] == 1 else bchw[:, :3]


def _single_channel(mask: np.ndarray | torch.Tensor, param: str) -> torch.Tensor:
    """A mask array or tensor as [1, 1, H, W] in [0, 1] (its own float dtype; uint8 / 255, bool as 0 / 1)."""
    if isinstance(mask, np.ndarray) and mask.dtype == np.bool_:
        mask = mask.astype(np.uint8) * 255
    elif isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
        mask = mask.to(torch.uint8) * 255
    hwc = _hwc(mask, param)
    if hwc.shape[-1] != 1:
        raise ValueError(
            f"{param} has {hwc.shape[-1]} channels (shape {tuple(mask.shape)}); a mask array or tensor has "
            "one: pass (H, W) with white (>= 0.5) where to repaint, or a PIL image"
        )
    if isinstance(mask, np.ndarray):
        values = torch.from_numpy(np.array(hwc[..., 0]))
    else:
        values = _batchless(mask.detach(), param).reshape(hwc.shape[:2])
    if values.dtype == torch.uint8:
        values = values / 255.0
    return values[None, None]


def _size(picture: PIL.Image.Image | torch.Tensor) -> tuple[int, int]:
    """(width, height)."""
    if isinstance(picture, PIL.Image.Image):
        return picture.size
    return picture.shape[-1], picture.shape[-2]


def _capped(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The size of area about `max_pixels` with the same aspect ratio, truncated as diffusers does."""
    scale = math.sqrt(max_pixels / (width * height))
    return int(width * scale), int(height * scale)


def _floored(size: tuple[int, int], multiple: int, param: str) -> tuple[int, int]:
    width, height = size
    floored = (width // multiple * multiple, height // multiple * multiple)
    if min(floored) == 0:
        raise ValueError(
            f"{param} is {width}x{height}; each side must be at least {multiple} px after any downscaling"
        )
    return floored
