"""What a generation asks for, and every rule it must pass before any model runs.

`GenerationRequest` is the one request type: the Python API, the CLI, the compat facades and the server
all build it. `Validator` holds the rules. It needs only the facts of a model's shape (its variant, token
grid and latent channels, `ModelSpec`) and the `Limits` in force, not its weights, so a server can check a
request when it arrives, before it is queued, with the same messages the Python API gives; the pipeline
checks it again when it runs.

Errors: TypeError for a wrong type, ValueError for a wrong value, `errors.InputTooLarge` (a ValueError) for
an image or request over a size limit. `param_of(exc)` names the request field an error is about.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import logging
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch
from torch import Tensor

from fluxforge import images
from fluxforge.config import Variant
from fluxforge.errors import InputTooLarge
from fluxforge.lora import check_scale

log = logging.getLogger(__name__)

REFERENCE_PIXELS = 1024 * 1024  # references and init images above this are scaled down to it
MAX_ASPECT = 8.0
MAX_STEPS = 1000


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. The defaults suit the Python API; `fluxforge serve` sets its own from
    the command line, and these same checks enforce them."""

    max_references: int = 10  # as BFL documents for FLUX.2; each adds its tokens to every attention
    max_pixels: int = 4 * 1024 * 1024  # output: FLUX.2 is trained up to 4 megapixels
    max_images: int = 16  # per request: prompts x num_images
    max_prompt_chars: int = 20_000  # per prompt (and negative prompt); the encoder reads 512 tokens of it
    max_input_pixels: int = 64 * 1024 * 1024  # an input image's own size, read from its header
    max_steps: int = MAX_STEPS

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelSpec:
    """The facts of a model that the rules depend on; no weights."""

    variant: Variant
    pixels_per_token: int  # VAE scale x patch size: 16 for FLUX.2
    latent_channels: int  # the transformer's input channels
    default_size: int  # output side when a request gives none
    loras: tuple[str, ...] = ()  # the names of the LoRA adapters loaded, which a request may ask for


Mode = Literal["text-to-image", "references", "img2img", "inpaint"]


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one generation needs. None means "the variant's default" or "not used"."""

    prompt: str | Sequence[str] | None = None
    references: Sequence[images.ImageInput] = ()
    init_image: images.ImageInput | None = None
    strength: float | None = None
    mask: images.ImageInput | None = None
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    num_images: int = 1
    max_sequence_length: int | None = None
    mask_alpha_is_repaint: bool = False  # RGBA masks whose alpha = 0 marks the repaint area (OpenAI edits)
    # For ports of diffusers code (fluxforge.compat); most callers leave these alone.
    prompt_embeds: Tensor | None = None  # [B, L, joint_attention_dim] instead of `prompt`
    negative_prompt_embeds: Tensor | None = None
    noise: Tensor | None = None  # [B*n, C, h, w] start noise instead of drawing it from seeds
    # [B*n, C, h, w] img2img / inpainting: the latents to start from, already noised, instead of the init
    # image noised to the strength's sigma (diffusers' `latents=` in its inpainting pipeline)
    start_latents: Tensor | None = None
    generator: torch.Generator | Sequence[torch.Generator] | None = None  # diffusers-style noise draw
    sigmas: Sequence[float] | None = None  # a custom schedule before shifting
    decode: bool = True  # False: return latents only
    # LoRA adapters by name -> scale, each loaded with Pipeline.load_lora ({}: none); None: those active
    loras: Mapping[str, float] | None = None


class Validator:
    """The rules for a request on one model under some limits; `plan` runs them all and loads the images."""

    def __init__(self, spec: ModelSpec, limits: Limits | None = None) -> None:
        self.spec, self.limits = spec, limits or Limits()
        self.variant = spec.variant
        self.pixels_per_token, self.latent_channels = spec.pixels_per_token, spec.latent_channels
        self.default_size = spec.default_size

    def plan(self, r: GenerationRequest) -> Plan:
        d = self.variant.defaults
        prompts = _prompts(r)
        n_prompts = (
            len(prompts) if prompts else (r.prompt_embeds.shape[0] if r.prompt_embeds is not None else 1)
        )
        for i, text in enumerate([*prompts, r.negative_prompt]):
            if isinstance(text, str) and len(text) > self.limits.max_prompt_chars:
                name = "negative_prompt" if i == len(prompts) else "prompt"
                raise InputTooLarge(
                    f"{name} has {len(text)} characters; at most {self.limits.max_prompt_chars} (the text "
                    f"encoder reads the first {d.max_sequence_length} tokens)"
                )
        _check_int(r.num_images, "num_images", 1, self.limits.max_images)
        batch = n_prompts * r.num_images
        if batch > self.limits.max_images:
            raise ValueError(
                f"num_images: {n_prompts} prompts x num_images={r.num_images} is {batch} images; at most "
                f"{self.limits.max_images} per request"
            )
        steps = d.steps if r.steps is None else _check_int(r.steps, "steps", 1, self.limits.max_steps)
        if r.sigmas is not None:
            _check_sigmas(r.sigmas)
        max_len = (
            d.max_sequence_length
            if r.max_sequence_length is None
            else _check_int(r.max_sequence_length, "max_sequence_length", 1, 4096)
        )
        guidance = self._guidance(r)
        self._check_loras(r.loras)
        if r.negative_prompt is not None and d.guidance_mode != "cfg":
            raise ValueError(
                f"negative_prompt needs classifier-free guidance, which {self.variant.name} does not use "
                f"(it is {'guidance-distilled' if d.distilled else 'not a CFG model'}); leave it out, or use "
                "a klein base variant"
            )
        if r.negative_prompt is not None and not isinstance(r.negative_prompt, str):
            raise TypeError(f"negative_prompt must be a str, got {type(r.negative_prompt).__name__}")
        if r.negative_prompt is not None and guidance is not None and guidance <= 1:
            raise ValueError(
                f"negative_prompt is used only with classifier-free guidance, which runs when guidance > 1 "
                f"(guidance is {guidance:g}): raise guidance above 1, or leave the negative prompt out"
            )
        mode = self._mode(r)
        strength = r.strength
        if mode in ("img2img", "inpaint"):
            strength = 1.0 if strength is None and mode == "inpaint" else strength
            if strength is None:
                raise ValueError(
                    "strength: img2img needs strength= in (0, 1]: how much of the schedule to run "
                    "(1.0 ignores the init image's content, 0.3 keeps most of it)"
                )
            _check_strength(strength)
        refs = self._load_references(r.references)
        init_pixels = mask_pixels = None
        if r.init_image is not None:
            init_pixels = self._load_init(r.init_image, r.width, r.height)
            height, width = init_pixels.shape[-2:]
            if r.mask is not None:
                mask_pixels = self._load_mask(r.mask, (width, height), r.mask_alpha_is_repaint)
        elif refs:  # a side not given is the first reference's
            height, width = refs[0].shape[-2:]
            if r.width is not None or r.height is not None:
                width, height = self._output_size(
                    width if r.width is None else r.width, height if r.height is None else r.height
                )
        elif r.width is not None or r.height is not None:
            width, height = self._output_size(r.width, r.height)
        else:
            width = height = self.default_size
        seeds = None
        if r.noise is None and r.generator is None:
            base = random.randrange(2**31) if r.seed is None else _check_int(r.seed, "seed", 0, 2**63 - 1)
            seeds = [base + b for b in range(batch)]
        elif r.seed is not None:
            raise ValueError("seed= cannot be combined with noise= or generator=; pass one way to get noise")
        if r.start_latents is not None and init_pixels is None:
            raise ValueError(
                "start_latents= needs init_image=: it replaces the noised init image; for text-to-image "
                "pass the starting noise as noise="
            )
        if isinstance(r.generator, Sequence) and len(r.generator) != batch:
            raise ValueError(
                f"{len(r.generator)} generators given for {batch} images; pass one per image, or a "
                "single generator for the whole batch"
            )
        h, w = height // self.pixels_per_token, width // self.pixels_per_token
        expected = (batch, self.latent_channels, h, w)
        for name, given in (("noise", r.noise), ("start_latents", r.start_latents)):
            if given is not None and tuple(given.shape) != expected:
                raise ValueError(f"{name} must be {list(expected)} for this request, got {list(given.shape)}")
        return Plan(
            mode,
            prompts,
            r.negative_prompt,
            batch,
            steps,
            guidance,
            d.guidance_mode == "cfg" and guidance > 1,
            strength,
            width,
            height,
            tuple(refs),
            init_pixels,
            mask_pixels,
            seeds,
            max_len,
        )

    def _check_loras(self, loras: Mapping[str, float] | None) -> None:
        if loras is None:
            return
        if not isinstance(loras, Mapping):
            raise TypeError(f"loras: a mapping of LoRA name -> scale, got {type(loras).__name__}")
        for name, scale in loras.items():
            if name not in self.spec.loras:
                loaded = ", ".join(map(repr, self.spec.loras)) or "none"
                raise ValueError(f"loras: no LoRA named {name!r} is loaded (loaded: {loaded})")
            check_scale(scale, name)

    def _guidance(self, r: GenerationRequest) -> float | None:
        d = self.variant.defaults
        if r.guidance is None:
            return d.guidance
        if isinstance(r.guidance, bool) or not isinstance(r.guidance, (int, float)):
            raise TypeError(f"guidance must be a number, got {type(r.guidance).__name__}")
        if d.guidance_mode == "none":
            raise ValueError(
                f"{self.variant.name} is guidance-distilled and takes no guidance scale; leave guidance out "
                "(a klein base variant takes one, with negative_prompt)"
            )
        if not 0 <= r.guidance <= 30 or math.isnan(r.guidance):
            raise ValueError(f"guidance must be in [0, 30], got {r.guidance}")
        return float(r.guidance)

    def _mode(self, r: GenerationRequest) -> Mode:
        if r.init_image is None:
            if r.mask is not None:
                raise ValueError(
                    "mask= needs init_image=: inpainting repaints part of an init image. To condition on an "
                    "image without repainting it, pass it in references=."
                )
            if r.strength is not None:
                raise ValueError(
                    "strength= needs init_image=: strength says how far to noise an init image (img2img). "
                    "Reference images (references=) are never noised and take no strength."
                )
            return "references" if r.references else "text-to-image"
        return "inpaint" if r.mask is not None else "img2img"

    def _output_size(self, width: int | None, height: int | None) -> tuple[int, int]:
        default = self.default_size
        width = default if width is None else _check_int(width, "width", 1, 1 << 16)
        height = default if height is None else _check_int(height, "height", 1, 1 << 16)
        m = self.pixels_per_token
        floored = (width // m * m, height // m * m)
        if floored != (width, height):
            log.info("size %dx%d rounded down to %dx%d (multiples of %d)", width, height, *floored, m)
        self._check_size(
            *floored, "width/height", original=None if floored == (width, height) else (width, height)
        )
        return floored

    def _check_size(
        self, width: int, height: int, what: str, original: tuple[int, int] | None = None
    ) -> None:
        m = self.pixels_per_token
        low = 4 * m  # 64 px for FLUX.2
        given = f" (given {original[0]}x{original[1]}, rounded down to multiples of {m})" if original else ""
        if min(width, height) < low:
            raise ValueError(
                f"{what}: {width}x{height}{given} is too small; each side must be at least {low} px"
            )
        if width * height > self.limits.max_pixels:
            raise ValueError(
                f"{what}: {width}x{height}{given} is {width * height / 1e6:.1f} MP; at most "
                f"{self.limits.max_pixels / 2**20:.3g} MP ({self.limits.max_pixels} px)"
            )
        if max(width, height) / min(width, height) > MAX_ASPECT:
            raise ValueError(f"{what}: {width}x{height} has an aspect ratio above {MAX_ASPECT:g}:1")

    def _load_references(self, references: Sequence[images.ImageInput]) -> list[Tensor]:
        if isinstance(references, (str, bytes)) or not isinstance(references, Sequence):
            raise TypeError("references must be a list of images (PIL, numpy, tensor, path or bytes)")
        if len(references) > self.limits.max_references:
            raise ValueError(
                f"references: {len(references)} given; at most {self.limits.max_references} per request"
            )
        out = []
        for i, ref in enumerate(references):
            param = f"references[{i}]"
            images.check_input_size(ref, self.limits.max_input_pixels, param=param)
            image = ref if isinstance(ref, PIL.Image.Image) else images.load_image(ref, param=param)
            w, h = image.size
            low = 4 * self.pixels_per_token
            if min(w, h) < low:
                raise ValueError(f"{param} is {w}x{h}; each side must be at least {low} px")
            if max(w, h) / min(w, h) > MAX_ASPECT:
                raise ValueError(f"{param} is {w}x{h}, an aspect ratio above {MAX_ASPECT:g}:1")
            prepared = images.prepare_reference(
                image, max_pixels=REFERENCE_PIXELS, multiple=self.pixels_per_token, param=param
            )
            out.append(images.to_pixels(prepared))
        return out

    def _load_init(self, image: images.ImageInput, width: int | None, height: int | None) -> Tensor:
        """[1, 3, H, W] in [-1, 1]: the init image at the output size. Without width/height that is its own
        size, scaled down to 1 MP if larger and floored to the token grid (a slight squash, as the reference
        implementation does)."""
        images.check_input_size(image, self.limits.max_input_pixels, param="init_image")
        size = self._output_size(width, height) if width is not None or height is not None else None
        pixels = images.prepare_init_image(
            image, size, max_pixels=REFERENCE_PIXELS, multiple=self.pixels_per_token, param="init_image"
        )
        if size is None:
            self._check_size(pixels.shape[-1], pixels.shape[-2], "init_image")
        return pixels

    def _load_mask(self, mask: images.ImageInput, size: tuple[int, int], alpha: bool) -> Tensor:
        images.check_input_size(mask, self.limits.max_input_pixels, param="mask")
        m = images.load_mask(mask, size, alpha_is_repaint=alpha)
        if float(m.max()) == 0.0:
            raise ValueError(
                "mask= marks nothing to repaint (no pixel >= 0.5); white marks the area to repaint"
            )
        return m


@dataclass(frozen=True)
class Plan:
    """A validated request, with images loaded and sizes resolved."""

    mode: Mode
    prompts: list[str]
    negative_prompt: str | None
    batch: int
    steps: int
    guidance: float | None
    cfg: bool
    strength: float | None
    width: int
    height: int
    reference_pixels: tuple[Tensor, ...]
    init_pixels: Tensor | None
    mask: Tensor | None
    seeds: list[int] | None
    max_sequence_length: int


def _prompts(r: GenerationRequest) -> list[str]:
    if r.prompt_embeds is not None:
        if r.prompt is not None:
            raise ValueError("pass prompt or prompt_embeds, not both")
        return []
    if r.prompt is None:
        raise TypeError("generate() needs a prompt (a str, or a list of str for a batch)")
    if isinstance(r.prompt, str):
        return [r.prompt]
    if isinstance(r.prompt, Sequence) and r.prompt and all(isinstance(p, str) for p in r.prompt):
        return list(r.prompt)
    raise TypeError(f"prompt must be a str or a non-empty list of str, got {r.prompt!r:.80}")


def _check_sigmas(sigmas: Any) -> None:
    """A custom schedule: 1 to MAX_STEPS noise levels in (0, 1], strictly decreasing (the shift and the
    final 0 are added to it). As in diffusers, `steps` still sets the dynamic shift."""
    try:
        values = [float(v) for v in sigmas]
    except (TypeError, ValueError):
        raise TypeError(f"sigmas must be a sequence of numbers, got {sigmas!r}") from None
    if not 1 <= len(values) <= MAX_STEPS:
        raise ValueError(f"sigmas must hold 1 to {MAX_STEPS} noise levels, got {len(values)}")
    if not all(0 < v <= 1 for v in values):  # also False for nan
        raise ValueError(f"sigmas must lie in (0, 1] (1 is pure noise; the final 0 is added), got {values}")
    if any(b >= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"sigmas must decrease strictly, from noise towards the image, got {values}")


def _check_int(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r:.40}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return int(value)


def _check_strength(strength: Any) -> None:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        raise TypeError(f"strength must be a number in (0, 1], got {type(strength).__name__}")
    if not 0 < strength <= 1:
        raise ValueError(
            f"strength must be in (0, 1], got {strength}: 1.0 repaints from pure noise, small values keep "
            "more of the init image"
        )


# diffusers argument names a porting user is likely to try, and what fluxforge calls them.
_DIFFUSERS_NAMES = {
    "image": "an input image is either references=[...] (reference conditioning: extra attention tokens, "
    "nothing noised, no strength) or init_image= with strength= (img2img; add mask= to inpaint)",
    "image_reference": "use references=[...]",
    "mask_image": "use mask= (with init_image=)",
    "denoising_strength": "use strength= (with init_image=)",
    "num_inference_steps": "use steps=",
    "guidance_scale": "use guidance=",
    "num_images_per_prompt": "use num_images=",
    "latents": "use noise= ([B, C, h, w] normalized, patchified), or seed=",
    "output_type": "results carry .images (PIL), .pixels and .latents",
}


def reject_unknown(kwargs: dict[str, Any], cls: type, where: str) -> None:
    fields = {f.name for f in dataclasses.fields(cls)}
    for name in kwargs:
        if name in fields:
            continue
        if name in _DIFFUSERS_NAMES:
            raise TypeError(
                f"{where}() got an unexpected keyword argument {name!r}: {_DIFFUSERS_NAMES[name]}"
            )
        close = difflib.get_close_matches(name, fields | _GENERATE_PARAMETERS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TypeError(f"{where}() got an unexpected keyword argument {name!r}{hint}")


_GENERATE_PARAMETERS = {"on_step", "cancel"}


_LEADING_NAME = re.compile(
    r"(?:generate\(\) needs a )?([a-z_]+(?:\[\d+\])?)(?:[=:]| must| is| has| needs| given| cannot)"
)


def param_of(exc: BaseException) -> str | None:
    """The request field an error from these rules is about (`steps`, `references[1]`, `width/height`,
    ...), or None; every message names its field first, as the rules above write them."""
    given = getattr(exc, "param", None)
    if given:
        return given
    if str(exc).startswith("width/height"):
        return "width/height"
    match = _LEADING_NAME.match(str(exc))
    if match is None:
        return None
    name = match.group(1)
    return name if name.split("[")[0] in _FIELDS else None


_FIELDS = {f.name for f in dataclasses.fields(GenerationRequest)}


def batch_signature(plan: Plan, request: GenerationRequest) -> dict[str, Any]:
    """What must be equal for requests to run as one batch (`Pipeline.run_batch`, the server's batching):
    everything that shapes the computation. Prompts, negative prompts, seeds, the number of images and the
    images' contents may differ; the images' prepared sizes may not. JSON-friendly: the server stores it
    with each job when it arrives and batches jobs whose signatures are equal."""

    def sizes(pixels: Sequence[Tensor]) -> list[list[int]]:
        return [[int(p.shape[-1]), int(p.shape[-2])] for p in pixels]

    def shape(t: Tensor | None) -> list[int] | None:
        return None if t is None else [int(n) for n in t.shape[1:]]

    return {
        "mode": plan.mode,
        "width": plan.width,
        "height": plan.height,
        "steps": plan.steps,
        "strength": plan.strength,
        "guidance": plan.guidance,
        "cfg": plan.cfg,
        "max_sequence_length": plan.max_sequence_length,
        "reference_sizes": sizes(plan.reference_pixels),
        "init_size": sizes([plan.init_pixels])[0] if plan.init_pixels is not None else None,
        "sigmas": [float(s) for s in request.sigmas] if request.sigmas else None,
        "decode": bool(request.decode),
        "loras": None if request.loras is None else sorted([n, float(s)] for n, s in request.loras.items()),
        "prompt_embeds": shape(request.prompt_embeds),
        "negative_prompt_embeds": shape(request.negative_prompt_embeds),
        "start_latents": request.start_latents is not None,
    }


def check_batch(signatures: Sequence[Mapping[str, Any]]) -> None:
    """ValueError naming the first field in which a request differs from the first request of a batch."""
    first = signatures[0]
    for i, other in enumerate(signatures[1:], 1):
        differ = [name for name in first if first[name] != other.get(name)]
        if differ:
            name = differ[0]
            raise ValueError(
                f"requests 0 and {i} cannot run as one batch: they differ in {name} ({first[name]!r} "
                f"against {other.get(name)!r}); only prompts, seeds, the number of images and the images' "
                "contents may differ. Run them separately."
            )
