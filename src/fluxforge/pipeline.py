"""One pipeline for every FLUX.2 mode: one request type in, one result out, one sampling loop.

The three ways to use an input image are separate parameters and never guessed from each other:

  references=[...]          reference conditioning: each image is VAE-encoded into extra attention tokens
                            (T = 10, 20, ...); nothing is noised; no strength.
  init_image=, strength=    img2img: the init image is encoded, noised to the schedule point that strength
                            selects (ceil(steps x strength) steps remain) and denoised from there.
  init_image=, mask=        inpainting: img2img plus, after every step, the kept region (mask < 0.5) reset
                            to the noised original; the source image is also a reference (T = 10) and any
                            `references` follow it (T = 20, ...). strength defaults to 1.0.

Batches: `prompt` may be a list; each prompt gives `num_images` images, in the order p0, p0, ..., p1, ...;
references, init image and mask are shared by the whole batch. Image b is drawn from its own seed
(`seeds[b] = seed + b`), so every image can be reproduced alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch
from torch import Tensor

from fluxforge import dtypes, images
from fluxforge.conditioning import ReferenceTokens, draw_noise, encode_references, grid_ids, mask_tokens
from fluxforge.config import Variant
from fluxforge.demo import DEMO_NOTICE, DEMO_PATH
from fluxforge.dtypes import DtypeRule, resolve_dtype
from fluxforge.model.autoencoder import AutoEncoder, pack
from fluxforge.model.text import TextEmbeddings, encode_prompts, text_ids
from fluxforge.model.transformer import Flux2Transformer, ReferenceKV
from fluxforge.sampling import StepInfo, add_noise, denoise, make_schedule, start_step
from fluxforge.weights import Components, load

log = logging.getLogger(__name__)

MAX_REFERENCES = 10  # as BFL documents for FLUX.2; every reference adds its tokens to every attention
MAX_PIXELS = 4 * 1024 * 1024  # output: FLUX.2 is trained up to 4 megapixels
REFERENCE_PIXELS = 1024 * 1024  # references and init images above this are scaled down to it
MAX_ASPECT = 8.0
MAX_STEPS = 1000
MAX_IMAGES = 16  # per request: prompts x num_images

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


@dataclass
class GenerationResult:
    images: list[PIL.Image.Image]  # empty when the request asked not to decode
    seeds: list[int | None]  # one per image; None where the noise came from the caller
    info: dict[str, Any]  # the settings actually used: mode, variant, size, steps, guidance, timings, ...
    latents: Tensor  # [B, h*w, C] final normalized packed latents
    pixels: Tensor | None = None  # [B, 3, H, W] decoded, in about [-1, 1]

    def metadata(self, index: int) -> dict[str, Any]:
        """The settings of image `index`, for its PNG: its own prompt and seed, and the shared settings."""
        keep = ("negative_prompt", "mode", "variant", "width", "height", "steps", "guidance", "strength")
        prompt = self.info.get("prompt")
        if isinstance(prompt, list):  # prompts p0, p0, ..., p1, ...: num_images each
            prompt = prompt[index // self.info["num_images"]]
        shared = {k: self.info[k] for k in keep if self.info.get(k) is not None}
        return {"prompt": prompt, **shared, "seed": self.seeds[index]}

    def save(self, path: str | Path) -> list[Path]:
        """Save every image as PNG with its settings in the metadata; several images get -0, -1, ..."""
        path = Path(path)
        paths = (
            [path]
            if len(self.images) == 1
            else [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(len(self.images))]
        )
        for i, (image, target) in enumerate(zip(self.images, paths, strict=True)):
            images.save_png(image, target, self.metadata(i))
        return paths


class Pipeline:
    """A loaded FLUX.2 model and the one way to generate with it."""

    def __init__(self, components: Components) -> None:
        if components.vae is None:
            raise ValueError("a Pipeline needs the autoencoder: load the model with vae=")
        self.components = components
        self.variant: Variant = components.variant
        self.transformer: Flux2Transformer = components.transformer
        self.vae: AutoEncoder = components.vae

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        vae: str | Path | None = None,
        text_encoder: str | Path | None = None,
        device: torch.device | str = "cpu",
        dtype: DtypeRule = "auto",
        variant: str | Variant | None = None,
        text_encoder_out_layers: Sequence[int] | None = None,
    ) -> Pipeline:
        """Load a model as `fluxforge.load` does (a folder, a BFL file, or a hub id; `dtype="auto"` keeps the
        stored dtype where the device computes it natively, else float32). `path` None loads the built-in
        demo model (variant fluxforge-demo, see fluxforge.demo)."""
        if path is None:
            # A warning, so that it shows without any logging set up: the images will not be FLUX.2's.
            log.warning(DEMO_NOTICE)
            path = DEMO_PATH
        return cls(
            load(
                path,
                vae=vae,
                text_encoder=text_encoder,
                device=device,
                dtype=dtype,
                variant=variant,
                text_encoder_out_layers=text_encoder_out_layers,
            )
        )

    @property
    def device(self) -> torch.device:
        """Where the transformer runs; inputs are moved there, outputs stay there (PIL images aside)."""
        return next(self.transformer.parameters()).device

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None
    ) -> Pipeline:
        """Move (and cast) every network, in place; returns the pipeline, as `torch.nn.Module.to` does."""
        if dtype is not None:
            dtype = resolve_dtype(dtype)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"Pipeline.to(dtype=) takes a dtype, got {dtype!r}")
        for module in (self.transformer, self.vae, self.components.text_encoder):
            if module is not None:
                module.to(device=device, dtype=dtype)
        return self

    @property
    def default_size(self) -> int:
        """Output side when a request gives none: the variant's, else 128 latent pixels (1024 for FLUX.2)."""
        return self.variant.defaults.size or 128 * self.vae.config.spatial_scale

    @property
    def pixels_per_token(self) -> int:
        return self.vae.config.spatial_scale * self.vae.config.patch_size[0]

    def generate(
        self,
        prompt: str | Sequence[str] | None = None,
        *,
        references: Sequence[images.ImageInput] | images.ImageInput | None = None,
        init_image: images.ImageInput | None = None,
        strength: float | None = None,
        mask: images.ImageInput | None = None,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        num_images: int = 1,
        on_step: Callable[[StepInfo], None] | None = None,
        cancel: threading.Event | None = None,
        **advanced: Any,
    ) -> GenerationResult:
        """Generate images; see the module docstring for the modes. `advanced` takes the other
        `GenerationRequest` fields (max_sequence_length, mask_alpha_is_repaint, noise, ...)."""
        _reject_unknown(advanced, GenerationRequest, "Pipeline.generate")
        if references is not None and not isinstance(references, (list, tuple)):
            references = [references]
        request = GenerationRequest(
            prompt=prompt,
            references=tuple(references or ()),
            init_image=init_image,
            strength=strength,
            mask=mask,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            steps=steps,
            guidance=guidance,
            seed=seed,
            num_images=num_images,
            **advanced,
        )
        return self.run(request, on_step=on_step, cancel=cancel)

    # -----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def run(
        self,
        request: GenerationRequest,
        on_step: Callable[[StepInfo], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
        r, variant = request, self.variant
        timings: dict[str, float] = {}
        clock = time.perf_counter()
        plan = self._plan(r)
        dtype, device = self.transformer.dtype, self.device

        text, negative = self._encode_text(r, plan)
        timings["text"], clock = time.perf_counter() - clock, time.perf_counter()

        refs = self._reference_tokens(plan)
        init_tokens = None
        if plan.init_pixels is not None:
            init_tokens = self.vae.encode_tokens(self._on_vae(plan.init_pixels)).to(device, dtype)
            init_tokens = init_tokens.expand(plan.batch, -1, -1)
        timings["encode_images"], clock = time.perf_counter() - clock, time.perf_counter()

        h, w = plan.height // self.pixels_per_token, plan.width // self.pixels_per_token
        channels = self.transformer.config.in_channels
        if r.noise is not None:
            noise = r.noise
        else:  # drawn where the generator lives (the CPU for seeds), so a seed means the same on any device
            noise = draw_noise((plan.batch, channels, h, w), dtype, seeds=plan.seeds, generator=r.generator)
        noise = pack(noise.to(device, dtype))  # [B, h*w, C]
        schedule = make_schedule(plan.steps, h * w, variant.scheduler, list(r.sigmas) if r.sigmas else None)
        start = start_step(plan.steps, plan.strength) if plan.strength is not None else 0
        if r.start_latents is not None:
            x = pack(r.start_latents.to(device, dtype))
        else:
            x = noise if init_tokens is None else add_noise(init_tokens, noise, schedule.sigmas[start])

        blend = None
        if plan.mask is not None:
            keep = 1 - mask_tokens(plan.mask, h, w).to(device, dtype)

            def blend(latents: Tensor, i: int) -> Tensor:
                last = i + 1 == schedule.num_steps
                original = init_tokens if last else add_noise(init_tokens, noise, schedule.sigmas[i + 1])
                return keep * original + (1 - keep) * latents

        velocity = self._velocity(text, negative, refs, grid_ids(h, w).to(device), plan)
        x = denoise(velocity, x, schedule, start=start, blend=blend, on_step=on_step, cancel=cancel)
        timings["denoise"], clock = time.perf_counter() - clock, time.perf_counter()

        pixels, pil = None, []
        if r.decode:
            pixels = self.vae.decode_tokens(self._on_vae(x), h, w)
            pil = images.to_pil(pixels)
            timings["decode"] = time.perf_counter() - clock
        info = {
            "mode": plan.mode,
            "variant": variant.name,
            "prompt": plan.prompts if len(plan.prompts) > 1 else (plan.prompts[0] if plan.prompts else None),
            "negative_prompt": plan.negative_prompt,
            "width": plan.width,
            "height": plan.height,
            "steps": schedule.num_steps - start,
            "schedule_steps": schedule.num_steps,
            "guidance": plan.guidance,
            "strength": plan.strength,
            "num_images": r.num_images,
            "num_references": len(plan.reference_pixels),
            "reference_sizes": [tuple(p.shape[-1:-3:-1]) for p in plan.reference_pixels],
            "max_sequence_length": plan.max_sequence_length,
            "dtype": dtypes.name(dtype),
            "dtype_reason": self.components.dtype.reason if self.components.dtype else None,
            "timings": timings,
        }
        return GenerationResult(pil, list(plan.seeds) if plan.seeds else [None] * plan.batch, info, x, pixels)

    # -----------------------------------------------------------------------------------------------------

    def _encode_text(self, r: GenerationRequest, plan: _Plan) -> tuple[TextEmbeddings, TextEmbeddings | None]:
        dtype, n = self.transformer.dtype, r.num_images

        def encode(prompts: list[str], given: Tensor | None) -> TextEmbeddings:
            if given is not None:
                embeds = given.to(dtype).repeat_interleave(n, dim=0)
                return TextEmbeddings(embeds, text_ids(embeds.shape[1]))
            encoder, tokenizer = self.components.text_encoder, self.components.tokenizer
            if encoder is None or tokenizer is None:
                raise ValueError(
                    "this model was loaded without a text encoder: load it with text_encoder=, "
                    "or pass prompt_embeds"
                )
            return encode_prompts(encoder, tokenizer, prompts, plan.max_sequence_length, dtype, n)

        text = encode(plan.prompts, r.prompt_embeds)
        negative = None
        if plan.cfg:
            negatives = [plan.negative_prompt or ""] * (plan.batch // r.num_images)  # one per prompt or embed
            negative = encode(negatives, r.negative_prompt_embeds)
        return text, negative

    def _reference_tokens(self, plan: _Plan) -> ReferenceTokens | None:
        pixels = list(plan.reference_pixels)
        if plan.mode == "inpaint":
            pixels.insert(0, plan.init_pixels)  # the source image is the first reference (T = 10)
        return encode_references(self.vae, [self._on_vae(p) for p in pixels]) if pixels else None

    def _on_vae(self, x: Tensor) -> Tensor:
        return x.to(next(self.vae.parameters()).device)

    def _velocity(
        self,
        text: TextEmbeddings,
        negative: TextEmbeddings | None,
        refs: ReferenceTokens | None,
        img_ids: Tensor,
        plan: _Plan,
    ) -> Callable[[Tensor, Tensor, int], Tensor]:
        """The model as the sampling loop calls it: references, reference KV, guidance and CFG folded in."""
        model, dtype, device = self.transformer, self.transformer.dtype, self.device
        guidance = None
        if self.variant.defaults.guidance_mode == "embedded":
            guidance = torch.full((plan.batch,), plan.guidance, dtype=torch.float32, device=device)
        text = TextEmbeddings(text.embeds.to(device), text.ids.to(device))
        if negative is not None:
            negative = TextEmbeddings(negative.embeds.to(device), negative.ids.to(device))
        if refs is not None:
            refs = dataclasses.replace(refs, tokens=refs.tokens.to(device), ids=refs.ids.to(device))
        n_img = img_ids.shape[0]
        ref_tokens = refs.tokens.to(dtype).expand(plan.batch, -1, -1) if refs is not None else None
        kv: list[ReferenceKV] = []  # filled on the first step of reference-KV sampling

        def one(x: Tensor, t: Tensor, txt: TextEmbeddings) -> Tensor:
            if ref_tokens is None:
                return model(x, txt.embeds, t, img_ids, txt.ids, guidance)
            if self.variant.defaults.reference_kv:
                if not kv:  # references first, block-causal; their K/V are reused from here on
                    out = model.forward_extract(
                        torch.cat([ref_tokens, x], 1),
                        txt.embeds,
                        t,
                        torch.cat([refs.ids, img_ids]),
                        txt.ids,
                        refs.num_tokens,
                        guidance,
                    )
                    kv.append(out.reference_kv)
                    return out.sample
                return model(x, txt.embeds, t, img_ids, txt.ids, guidance, reference_kv=kv[0])
            out = model(
                torch.cat([x, ref_tokens], 1),
                txt.embeds,
                t,
                torch.cat([img_ids, refs.ids]),
                txt.ids,
                guidance,
            )
            return out[:, :n_img]

        def velocity(x: Tensor, t: Tensor, step: int) -> Tensor:
            v = one(x, t, text)
            if negative is not None:
                v_neg = one(x, t, negative)
                v = v_neg + plan.guidance * (v - v_neg)
            return v

        return velocity

    # -----------------------------------------------------------------------------------------------------
    # Validation: every check runs before any model does.

    def _plan(self, r: GenerationRequest) -> _Plan:
        d = self.variant.defaults
        prompts = _prompts(r)
        n_prompts = (
            len(prompts) if prompts else (r.prompt_embeds.shape[0] if r.prompt_embeds is not None else 1)
        )
        _check_int(r.num_images, "num_images", 1, MAX_IMAGES)
        batch = n_prompts * r.num_images
        if batch > MAX_IMAGES:
            raise ValueError(
                f"{n_prompts} prompts x num_images={r.num_images} is {batch} images; at most "
                f"{MAX_IMAGES} per request"
            )
        steps = d.steps if r.steps is None else _check_int(r.steps, "steps", 1, MAX_STEPS)
        if r.sigmas is not None:
            _check_sigmas(r.sigmas)
        max_len = (
            d.max_sequence_length
            if r.max_sequence_length is None
            else _check_int(r.max_sequence_length, "max_sequence_length", 1, 4096)
        )
        guidance = self._guidance(r)
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
                    "img2img needs strength= in (0, 1]: how much of the schedule to run "
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
        expected = (batch, self.transformer.config.in_channels, h, w)
        for name, given in (("noise", r.noise), ("start_latents", r.start_latents)):
            if given is not None and tuple(given.shape) != expected:
                raise ValueError(f"{name} must be {list(expected)} for this request, got {list(given.shape)}")
        return _Plan(
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
        if width * height > MAX_PIXELS:
            raise ValueError(
                f"{what}: {width}x{height}{given} is {width * height / 1e6:.1f} MP; at most "
                f"{MAX_PIXELS / 2**20:.0f} MP ({MAX_PIXELS} px)"
            )
        if max(width, height) / min(width, height) > MAX_ASPECT:
            raise ValueError(f"{what}: {width}x{height} has an aspect ratio above {MAX_ASPECT:g}:1")

    def _load_references(self, references: Sequence[images.ImageInput]) -> list[Tensor]:
        if isinstance(references, (str, bytes)) or not isinstance(references, Sequence):
            raise TypeError("references must be a list of images (PIL, numpy, tensor, path or bytes)")
        if len(references) > MAX_REFERENCES:
            raise ValueError(f"{len(references)} references given; at most {MAX_REFERENCES}")
        out = []
        for i, ref in enumerate(references):
            param = f"references[{i}]"
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
        size = self._output_size(width, height) if width is not None or height is not None else None
        pixels = images.prepare_init_image(
            image, size, max_pixels=REFERENCE_PIXELS, multiple=self.pixels_per_token, param="init_image"
        )
        if size is None:
            self._check_size(pixels.shape[-1], pixels.shape[-2], "init_image")
        return pixels

    def _load_mask(self, mask: images.ImageInput, size: tuple[int, int], alpha: bool) -> Tensor:
        m = images.load_mask(mask, size, alpha_is_repaint=alpha)
        if float(m.max()) == 0.0:
            raise ValueError(
                "mask= marks nothing to repaint (no pixel >= 0.5); white marks the area to repaint"
            )
        return m


@dataclass(frozen=True)
class _Plan:
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


def _reject_unknown(kwargs: dict[str, Any], cls: type, where: str) -> None:
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
