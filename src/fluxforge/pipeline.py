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
(`seeds[b] = seed + b`), so every image can be reproduced alone. `run_batch` runs several requests with
their own images (and prompts, seeds, ...) as one batch, each giving the images it gives alone.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from torch import Tensor

from fluxforge import dtypes, images, tiling
from fluxforge.cache import Caches, content_hash
from fluxforge.conditioning import ReferenceTokens, draw_noise, encode_references, grid_ids, mask_tokens
from fluxforge.config import Variant
from fluxforge.demo import DEMO_NOTICE, DEMO_PATH
from fluxforge.dtypes import DtypeRule, resolve_dtype
from fluxforge.lora import LoraAdapter, LoraSet, read_lora
from fluxforge.model.autoencoder import AutoEncoder, pack
from fluxforge.model.text import TextEmbeddings, encode_prompts, text_ids
from fluxforge.model.transformer import Flux2Transformer, ReferenceKV
from fluxforge.offload import Offload, accelerator, say_no_accelerator
from fluxforge.request import (
    GenerationRequest,
    Limits,
    ModelSpec,
    Plan,
    Validator,
    batch_signature,
    check_batch,
    reject_unknown,
)
from fluxforge.sampling import StepInfo, add_noise, denoise, make_schedule, start_step
from fluxforge.weights import Components, load

__all__ = ["GenerationRequest", "GenerationResult", "Limits", "Pipeline"]

log = logging.getLogger(__name__)


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
        self.limits = Limits()  # what one request may ask for; a server sets its own
        # Prompt embeddings, reference latents and reference K/V seen before (fluxforge.cache); exact.
        self.caches = Caches()
        # Opt-in speed mode: classifier-free guidance as one forward of batch 2B instead of two of batch B,
        # about 10% faster per step on an AVX-512 EPYC (benchmarks/serving.py). Off by default: it differs
        # from diffusers' two forwards by the rounding of larger matrix products, which guidance amplifies
        # (up to 1.2e-5 in the parity tests, against their 1e-5; tests/test_cache.py states the bound).
        self.batch_cfg = False
        # Images above this many pixels are decoded and encoded in blended tiles (fluxforge.tiling): the
        # peak memory of one 512 x 512 tile instead of the whole image, within a stated tolerance of the
        # untiled result. None: never.
        self.tile_above_pixels: int | None = 2 * 1024 * 1024
        # LoRA / LoKr adapters of the transformer (fluxforge.lora): load_lora, set_loras, fuse_loras, ...
        self.loras = LoraSet(self.transformer)
        self.offload: Offload | None = None  # enable_offload: networks on the CPU between their stages

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
        if self.offload is not None:
            return self.offload.device
        return next(self.transformer.parameters()).device

    def enable_offload(self, device: torch.device | str | None = None) -> bool:
        """Keep every network on the CPU and move each to `device` (default: the accelerator there is)
        only for the stage that runs it (fluxforge.offload). Where there is no accelerator this changes
        nothing, says so once, and returns False."""
        target = accelerator() if device is None else torch.device(device)
        if target is None:
            say_no_accelerator()
            return False
        self.offload = Offload(target)
        self.to("cpu")
        return True

    def disable_offload(self) -> None:
        """Every network back on the offload device, to stay there."""
        if self.offload is not None:
            target, self.offload = self.offload.device, None
            self.to(target)

    def _stage(self, module: torch.nn.Module | None) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self.offload is None else self.offload.using(module)

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

    @property
    def spec(self) -> ModelSpec:
        """The facts of this model that request validation needs (no weights)."""
        return ModelSpec(
            self.variant,
            self.pixels_per_token,
            self.transformer.config.in_channels,
            self.default_size,
            tuple(self.loras.loaded),
        )

    def validate(self, request: GenerationRequest) -> Plan:
        """Check a request against this model and `self.limits` without running any network: what `run`
        does first. Raises TypeError / ValueError (`InputTooLarge` for sizes) with the message `run` gives;
        returns the plan (images loaded and sized, seeds drawn)."""
        return Validator(self.spec, self.limits).plan(request)

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
        reject_unknown(advanced, GenerationRequest, "Pipeline.generate")
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

    # -- LoRA ---------------------------------------------------------------------------------------------

    def load_lora(
        self, source: str | Path | Mapping[str, Tensor], scale: float = 1.0, name: str | None = None
    ) -> LoraAdapter:
        """Load a LoRA or LoKr file of any trainer's layout (fluxforge.lora) and make it active at `scale`,
        beside those active already. The name (default: the file's stem) is what `set_loras` and a request's
        `loras=` use. The base weights stay untouched until `fuse_loras`."""
        adapter = read_lora(source, self.transformer, name)
        self.loras.add(adapter, scale)
        return adapter

    def set_loras(self, scales: Mapping[str, float]) -> None:
        """Make exactly these loaded adapters active, at these scales ({}: none)."""
        self.loras.activate(scales)

    def unload_lora(self, name: str | None = None) -> None:
        """Unload one adapter, or all (None); the weights are as before any was loaded, bit for bit."""
        self.loras.remove(name)

    def fuse_loras(self) -> None:
        """Add the active adapters into the weights: the base model's speed; `unfuse_loras` undoes it
        exactly. While fused, requests can only ask for the fused adapters."""
        self.loras.fuse()

    def unfuse_loras(self) -> None:
        self.loras.unfuse()

    # -----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def run(
        self,
        request: GenerationRequest,
        on_step: Callable[[StepInfo], None] | None = None,
        cancel: threading.Event | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """Run one request. `cancel` set: GenerationCancelled at the next step; `stop()` true: the
        remaining steps are skipped and the latents decoded as they are (diffusers' `pipe._interrupt`)."""
        return self.run_batch([request], on_step, cancel, stop)[0]

    @torch.no_grad()
    def run_batch(
        self,
        requests: Sequence[GenerationRequest],
        on_step: Callable[[StepInfo], None] | None = None,
        cancel: threading.Event | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> list[GenerationResult]:
        """Run several requests as one batch, one result each. They must agree on everything that shapes the
        computation (`request.batch_signature`: mode, size, steps, strength, guidance, the references' and
        init image's sizes, LoRAs, ...); their prompts, negative prompts, seeds, numbers of images and
        images may differ. Each request gets the images it gets alone (each one's timestep embedding is
        computed on its own rows; bit for bit where the matrix products treat rows alike, as on the CPUs
        measured: tests/test_batching.py). Each is checked against `self.limits` alone:
        the caller decides how many run together."""
        clock = time.perf_counter()
        if not requests:
            raise ValueError("run_batch needs at least one request")
        plans = [self.validate(r) for r in requests]
        check_batch([batch_signature(p, r) for p, r in zip(plans, requests, strict=True)])
        with self.caches.track() as tally, self.loras.applied(requests[0].loras):
            return self._run(list(requests), plans, on_step, cancel, stop, tally, clock)

    def _run(
        self,
        requests: list[GenerationRequest],
        plans: list[Plan],
        on_step: Callable[[StepInfo], None] | None,
        cancel: threading.Event | None,
        stop: Callable[[], bool] | None,
        tally: dict[str, dict[str, int]],
        clock: float,
    ) -> list[GenerationResult]:
        r, plan, variant = requests[0], plans[0], self.variant  # the settings all requests share
        timings: dict[str, float] = {}
        dtype, device = self.transformer.dtype, self.device

        with self._stage(self.components.text_encoder):
            encoded = [self._encode_text(q, p) for q, p in zip(requests, plans, strict=True)]
        text = _cat_text([t for t, _ in encoded])
        negative = _cat_text([n for _, n in encoded]) if plan.cfg else None
        timings["text"], clock = time.perf_counter() - clock, time.perf_counter()

        with self._stage(self.vae):
            refs = self._batch_references(plans, dtype)
            init_tokens = None
            if plan.init_pixels is not None:
                init_tokens = _by_rows(
                    [self._image_tokens(p.init_pixels).to(device, dtype) for p in plans], plans, expand=True
                )
        timings["encode_images"], clock = time.perf_counter() - clock, time.perf_counter()

        h, w = plan.height // self.pixels_per_token, plan.width // self.pixels_per_token
        channels = self.transformer.config.in_channels

        def noise_of(q: GenerationRequest, p: Plan) -> Tensor:
            if q.noise is not None:
                return q.noise.to(device, dtype)
            # drawn where the generator lives (the CPU for seeds), so a seed means the same on any device
            drawn = draw_noise((p.batch, channels, h, w), dtype, seeds=p.seeds, generator=q.generator)
            return drawn.to(device, dtype)

        noise = pack(torch.cat([noise_of(q, p) for q, p in zip(requests, plans, strict=True)]))  # [B, h*w, C]
        schedule = make_schedule(plan.steps, h * w, variant.scheduler, list(r.sigmas) if r.sigmas else None)
        start = start_step(plan.steps, plan.strength) if plan.strength is not None else 0
        if r.start_latents is not None:
            x = pack(torch.cat([q.start_latents.to(device, dtype) for q in requests]))
        else:
            x = noise if init_tokens is None else add_noise(init_tokens, noise, schedule.sigmas[start])

        blend = None
        if plan.mask is not None:
            keep = 1 - _by_rows([mask_tokens(p.mask, h, w).to(device, dtype) for p in plans], plans)

            def blend(latents: Tensor, i: int) -> Tensor:
                last = i + 1 == schedule.num_steps
                original = init_tokens if last else add_noise(init_tokens, noise, schedule.sigmas[i + 1])
                return keep * original + (1 - keep) * latents

        with self._stage(self.transformer):
            batches = [p.batch for p in plans]
            velocity = self._velocity(text, negative, refs, grid_ids(h, w).to(device), plan, batches)
            x = denoise(
                velocity, x, schedule, start=start, blend=blend, on_step=on_step, cancel=cancel, stop=stop
            )
        timings["denoise"], clock = time.perf_counter() - clock, time.perf_counter()

        pixels, pil = None, []
        if r.decode:
            with self._stage(self.vae):
                if self._tiled(plan.width * plan.height):
                    pixels = tiling.decode_tokens_tiled(self.vae, self._on_vae(x), h, w)
                else:
                    pixels = self.vae.decode_tokens(self._on_vae(x), h, w)
            pil = images.to_pil(pixels)
            timings["decode"] = time.perf_counter() - clock
        shared = {
            "variant": variant.name,
            "mode": plan.mode,
            "width": plan.width,
            "height": plan.height,
            "steps": schedule.num_steps - start,
            "schedule_steps": schedule.num_steps,
            "guidance": plan.guidance,
            "strength": plan.strength,
            "reference_sizes": [tuple(p.shape[-1:-3:-1]) for p in plan.reference_pixels],
            "num_references": len(plan.reference_pixels),
            "max_sequence_length": plan.max_sequence_length,
            "dtype": dtypes.name(dtype),
            "dtype_reason": self.components.dtype.reason if self.components.dtype else None,
            "timings": timings,  # of the whole batch
            "vae_tiled": self._tiled(plan.width * plan.height),
            "loras": dict(self.loras.scales),  # the adapters this ran with, and their scales
            "cache": tally,  # this run's hits and misses per cache
        }
        if len(requests) > 1:
            shared["batch_size"] = len(requests)
        results, row = [], 0
        for q, p in zip(requests, plans, strict=True):
            part = slice(row, row + p.batch)
            row += p.batch
            prompt = p.prompts if len(p.prompts) > 1 else (p.prompts[0] if p.prompts else None)
            info = {
                **shared,
                "prompt": prompt,
                "negative_prompt": p.negative_prompt,
                "num_images": q.num_images,
            }
            seeds = list(p.seeds) if p.seeds else [None] * p.batch
            own = None if pixels is None else pixels[part]
            results.append(GenerationResult(pil[part], seeds, info, x[part], own))
        return results

    # -----------------------------------------------------------------------------------------------------

    def _encode_text(self, r: GenerationRequest, plan: Plan) -> tuple[TextEmbeddings, TextEmbeddings | None]:
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
            if not self.caches.prompts.enabled:
                return encode_prompts(encoder, tokenizer, prompts, plan.max_sequence_length, dtype, n)
            embeds = torch.cat(self._prompt_rows(prompts, plan.max_sequence_length, dtype))
            embeds = embeds.repeat_interleave(n, dim=0)
            return TextEmbeddings(embeds, text_ids(embeds.shape[1]).to(embeds.device))

        text = encode(plan.prompts, r.prompt_embeds)
        negative = None
        if plan.cfg:
            negatives = [plan.negative_prompt or ""] * (plan.batch // r.num_images)  # one per prompt or embed
            negative = encode(negatives, r.negative_prompt_embeds)
        return text, negative

    def _prompt_rows(self, prompts: list[str], max_length: int, dtype: torch.dtype) -> list[Tensor]:
        """[1, L, D] embeddings per prompt from the prompt cache; the missing ones encoded in one batch.
        Keyed by the encoder's identity, its layers, the length, the dtype and the exact text."""
        cache, encoder = self.caches.prompts, self.components.text_encoder
        keys = [(id(encoder), encoder.out_layers, max_length, dtype, prompt) for prompt in prompts]
        rows = {key: cache.get(key) for key in dict.fromkeys(keys)}
        missing = [key for key, row in rows.items() if row is None]
        if missing:
            tokenizer = self.components.tokenizer
            fresh = encode_prompts(encoder, tokenizer, [key[-1] for key in missing], max_length, dtype)
            for i, key in enumerate(missing):
                rows[key] = fresh.embeds[i : i + 1].clone()  # its own storage: the cache counts its bytes
                cache.put(key, rows[key])
        return [rows[key] for key in keys]

    def _image_tokens(self, pixels: Tensor) -> Tensor:
        """VAE tokens [1, n, C] of prepared pixels, from the latent cache: keyed by the VAE's identity and
        dtype and a hash of the pixels after resizing (so a changed file with the same name misses)."""
        tiled = self._tiled(pixels.shape[-1] * pixels.shape[-2])

        def encode() -> Tensor:
            if tiled:
                return tiling.encode_tokens_tiled(self.vae, self._on_vae(pixels))
            return self.vae.encode_tokens(self._on_vae(pixels))

        if not self.caches.latents.enabled or pixels.is_meta:  # meta tensors have no values to hash
            return encode()
        key = (id(self.vae), self.vae.dtype, tiled, content_hash(pixels))
        return self.caches.latents.lookup(key, encode)

    def _tiled(self, pixels: int) -> bool:
        return self.tile_above_pixels is not None and pixels > self.tile_above_pixels

    def _batch_references(self, plans: list[Plan], dtype: torch.dtype) -> BatchReferences | None:
        """Each request's reference tokens (the inpainting source first), as the batch's."""
        per_request = []
        for plan in plans:
            pixels = list(plan.reference_pixels)
            if plan.mode == "inpaint":
                pixels.insert(0, plan.init_pixels)  # the source image is the first reference (T = 10)
            if not pixels:
                return None
            per_request.append(encode_references(self.vae, pixels, encode=self._image_tokens))
        # Hashed where used: the K/V cache's key (klein KV), or one shared copy for several requests.
        keyed = bool(self.variant.defaults.reference_kv) or len(plans) > 1
        return BatchReferences.of(per_request, [p.batch for p in plans], self.device, dtype, keyed)

    def _reference_kv_key(self, refs: BatchReferences, digest: str) -> tuple:
        # the adapters change the K/V: a cached entry never crosses a LoRA change
        return (id(self.transformer), self.transformer.dtype, self.loras.key(), digest, refs.ids_digest)

    def _reference_kv(self, refs: BatchReferences, guidance: Tensor | None) -> ReferenceKV:
        """The references' K/V for every layer (klein KV), one copy per distinct set of references, each
        computed from its reference tokens alone and cached: they depend only on the reference latents and
        their positions, so they are keyed by those and the transformer, and references seen before cost no
        transformer work at all, not even on the first step. Computed alone, they are the same numbers
        whatever request or batch they serve: a cached result equals the uncached one bit for bit."""
        model, cache = self.transformer, self.caches.reference_kv
        g = guidance[:1] if guidance is not None else None
        found = {}
        for digest, (tokens, _) in refs.groups.items():

            def extract(tokens: Tensor = tokens) -> ReferenceKV:
                return model.reference_kv(tokens, refs.ids, g)

            if not cache.enabled or tokens.is_meta:
                found[digest] = extract()
            else:
                found[digest] = cache.lookup(self._reference_kv_key(refs, digest), extract)
        return refs.per_row(found)

    def _on_vae(self, x: Tensor) -> Tensor:
        return x.to(next(self.vae.parameters()).device)

    def _velocity(
        self,
        text: TextEmbeddings,
        negative: TextEmbeddings | None,
        refs: BatchReferences | None,
        img_ids: Tensor,
        plan: Plan,
        batches: list[int],
    ) -> Callable[[Tensor, Tensor, int], Tensor]:
        """The model as the sampling loop calls it: references, reference KV, guidance and CFG folded in.
        `batches`: the rows of each request of the batch."""
        model, device, rows = self.transformer, self.device, sum(batches)
        guidance = None
        if self.variant.defaults.guidance_mode == "embedded":
            guidance = torch.full((rows,), plan.guidance, dtype=torch.float32, device=device)
        text = TextEmbeddings(text.embeds.to(device), text.ids.to(device))
        if negative is not None:
            negative = TextEmbeddings(negative.embeds.to(device), negative.ids.to(device))
        n_img = img_ids.shape[0]
        reference_kv = None
        if refs is not None and self.variant.defaults.reference_kv:
            reference_kv = self._reference_kv(refs, guidance)
        # The ids every step passes: the noisy tokens', then the references' where they join the sequence.
        in_sequence = refs is not None and reference_kv is None
        ids = torch.cat([img_ids, refs.ids]) if in_sequence else img_ids
        texts = {"prompt": text, "negative": negative}
        if negative is not None and self.batch_cfg and negative.embeds.shape == text.embeds.shape:
            # conditional and unconditional as one forward of batch 2B
            texts = {"both": TextEmbeddings(torch.cat([text.embeds, negative.embeds]), text.ids)}
        # What no step changes (the text stream's projection, the RoPE tables): once, not at every step.
        prepared = {name: model.prepare(t.embeds, ids, t.ids) for name, t in texts.items() if t is not None}

        def one(x: Tensor, t: Tensor, name: str) -> Tensor:
            txt, prep = texts[name], prepared[name]
            g = guidance if guidance is None or x.shape[0] == rows else guidance.repeat(x.shape[0] // rows)
            # several requests: each one's timestep embedding on its own rows, as alone (bit for bit)
            groups = None if len(batches) == 1 else batches * (x.shape[0] // rows)
            common = dict(reference_kv=reference_kv, row_groups=groups, prepared=prep)
            if not in_sequence:
                return model(x, txt.embeds, t, ids, txt.ids, g, **common)
            joint = torch.cat([x, refs.rows(x.shape[0])], 1)
            return model(joint, txt.embeds, t, ids, txt.ids, g, out_tokens=n_img, **common)  # refs follow

        def velocity(x: Tensor, t: Tensor, step: int) -> Tensor:
            if "both" in texts:
                v, v_neg = one(torch.cat([x, x]), torch.cat([t, t]), "both").chunk(2)
            else:
                v = one(x, t, "prompt")
                if negative is None:
                    return v
                v_neg = one(x, t, "negative")
            return v_neg + plan.guidance * (v - v_neg)

        return velocity


def _cat_text(parts: list[TextEmbeddings]) -> TextEmbeddings:
    if len(parts) == 1:
        return parts[0]
    return TextEmbeddings(torch.cat([p.embeds for p in parts]), parts[0].ids)


def _by_rows(tensors: list[Tensor], plans: list[Plan], expand: bool = False) -> Tensor:
    """One [1, ...] tensor per request as the batch's rows (a lone request's may stay one broadcast row)."""
    if len(tensors) == 1:
        return tensors[0].expand(plans[0].batch, *tensors[0].shape[1:]) if expand else tensors[0]
    return torch.cat([t.expand(p.batch, *t.shape[1:]) for t, p in zip(tensors, plans, strict=True)])


@dataclass
class BatchReferences:
    """A batch's reference tokens: one copy shared by every row ([1, N, C]) when its requests have the same
    references, else one row per image ([B, N, C]); either way the same sizes, so the same ids."""

    tokens: Tensor  # [1 or B, N, C]
    ids: Tensor  # [N, 4]
    groups: dict[str, tuple[Tensor, list[int]]]  # per distinct set of references: its tokens, its rows
    ids_digest: str

    @classmethod
    def of(
        cls,
        per_request: list[ReferenceTokens],
        batches: list[int],
        device: torch.device,
        dtype: torch.dtype,
        keyed: bool = True,
    ) -> BatchReferences:
        """`keyed` False: no digests of the contents (each request its own group, "request k")."""
        groups: dict[str, tuple[Tensor, list[int]]] = {}
        own: list[tuple[Tensor, int]] = []  # each request's tokens, and its rows
        row = 0
        for k, (refs, batch) in enumerate(zip(per_request, batches, strict=True)):
            digest = content_hash(refs.tokens) if keyed and not refs.tokens.is_meta else f"request {k}"
            if digest not in groups:  # each distinct set moved and cast once
                groups[digest] = (refs.tokens.to(device, dtype), [])
            groups[digest][1].extend(range(row, row + batch))
            own.append((groups[digest][0], batch))
            row += batch
        if len(groups) == 1:
            tokens = own[0][0]
        else:
            tokens = torch.cat([t.expand(batch, -1, -1) for t, batch in own])
        ids = per_request[0].ids
        ids_digest = content_hash(ids) if keyed and not ids.is_meta else "unkeyed"
        return cls(tokens, ids.to(device), groups, ids_digest)

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]

    def rows(self, n: int) -> Tensor:
        """The tokens for a forward of n rows (the batch, or the batch twice for batched CFG)."""
        if self.tokens.shape[0] == 1:
            return self.tokens.expand(n, -1, -1)
        return self.tokens.repeat(n // self.tokens.shape[0], 1, 1)

    def per_row(self, kv_of: dict[str, ReferenceKV]) -> ReferenceKV:
        """One set's K/V as the whole batch's (one copy), or each row's set stacked ([B, ...])."""
        if len(kv_of) == 1:
            return next(iter(kv_of.values()))
        order = [None] * sum(len(rows) for _, rows in self.groups.values())
        for digest, (_, rows) in self.groups.items():
            for row in rows:
                order[row] = kv_of[digest]

        def stack(pick: Callable[[ReferenceKV], list[tuple[Tensor, Tensor]]]) -> list[tuple[Tensor, Tensor]]:
            layers = zip(*(pick(kv) for kv in order), strict=True)
            return [(torch.cat([k for k, _ in layer]), torch.cat([v for _, v in layer])) for layer in layers]

        first = order[0]
        return ReferenceKV(stack(lambda kv: kv.double), stack(lambda kv: kv.single), first.num_tokens)
