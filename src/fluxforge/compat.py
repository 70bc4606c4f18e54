"""Drop-in facades with the diffusers 0.42.1 FLUX.2 call signatures, as thin adapters over `Pipeline`.

Porting is one changed import:

    from fluxforge.compat import Flux2KleinPipeline        # was: from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained("FLUX.2-klein-4B", torch_dtype=torch.bfloat16)
    image = pipe(prompt="a fox", generator=torch.Generator().manual_seed(0)).images[0]

Every call becomes one `GenerationRequest`, run by `Pipeline.run`; the result is shaped as diffusers shapes
it. The same inputs, `generator` (one, or one per image) and `latents` (4-D [B*n, C, h, w], normalized and
patchified) give the same outputs as diffusers (fp32 within 1e-5), and `output_type` means what it means
there: "pil", "np" ([B, H, W, 3] in [0, 1]), "pt" ([B, 3, H, W] in [0, 1]) and "latent" (dev: packed
normalized tokens [B, S, C]; the klein pipelines: raw VAE latents [B, C/4, H/8, W/8]).

Deliberate differences from diffusers:
  * The three ways to use an image are never confused: arguments of another mode (`strength=` on a
    reference pipeline, ...) raise a TypeError that says which pipeline or parameter was meant, and any other
    unknown argument is named with its closest valid spelling.
  * Reference images may be numpy arrays or tensors as well as PIL images (diffusers documents them but
    only takes PIL). References, the init image and the mask (one each) are shared by the whole batch.
  * fluxforge builds only the text-encoder layers it reads: a call with other `text_encoder_out_layers`
    rebuilds the text encoder for them from the files once (logged). `attention_kwargs` other than the
    LoRA `scale`, `padding_mask_crop`, caption upsampling and callbacks that replace tensors raise
    NotImplementedError instead of being half supported.
  * `pipe("a prompt", image=ref)` (diffusers' own KV example, which fails there with "multiple values for
    argument 'image'") says that the first positional argument is image= and to pass prompt= by name.
  * `from_pretrained` takes `Pipeline.from_pretrained`'s arguments, with `torch_dtype=` as the older name of
    `dtype=` and diffusers' default dtypes, and checks that the model is one the class runs.
    `pipe.to(device, dtype)`, `pipe.device` and `pipe.dtype` work as there.

The parts ported code reaches for are there with diffusers' meaning, backed by fluxforge's objects:
`pipe.transformer`, `.vae`, `.text_encoder`, `.tokenizer` (fluxforge's networks), `.scheduler` (timesteps and
sigmas of the last call), `.image_processor` and the inpainting pipeline's `.mask_processor` (preprocess,
postprocess, blur), `.vae_scale_factor`, `.components`, `.interrupt` (set `pipe._interrupt = True` in a
callback to stop and decode), `.num_timesteps`, `.guidance_scale`, `.do_classifier_free_guidance`,
`set_progress_bar_config`, `enable_model_cpu_offload` (fluxforge.offload) and the LoRA loader methods
(`load_lora_weights`, `set_adapters`, `fuse_lora`, ...; fluxforge.lora reads every trainer's layout).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import PIL.Image
import torch
from torch import Tensor

from fluxforge.compat_parts import FlowMatchScheduler, ImageProcessor, LoraMethods
from fluxforge.config import Variant
from fluxforge.images import ImageInput
from fluxforge.model.autoencoder import unpack, unpatchify
from fluxforge.pipeline import GenerationRequest, GenerationResult, Pipeline
from fluxforge.sampling import StepInfo, make_schedule
from fluxforge.weights import load_text_encoder

log = logging.getLogger(__name__)

Images = ImageInput | Sequence[ImageInput]
StepCallback = Callable[[Any, int, Tensor, dict[str, Tensor]], dict[str, Tensor] | None]
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
_CALLBACK_TENSORS = ("latents", "prompt_embeds")  # what diffusers lets a FLUX.2 callback ask for

_FAMILY_NAMES = {
    "flux.2-dev": "FLUX.2 [dev]",
    "flux.2-klein": "FLUX.2 [klein]",
    "flux.2-klein-base": "FLUX.2 [klein] base",
    "flux.2-klein-kv": "FLUX.2 [klein] KV",
}
_REFERENCE_CLASS = {
    "flux.2-dev": "Flux2Pipeline",
    "flux.2-klein": "Flux2KleinPipeline",
    "flux.2-klein-base": "Flux2KleinPipeline",
    "flux.2-klein-kv": "Flux2KleinKVPipeline",
}

_REFERENCE_MODE = (
    "image= here is reference conditioning: each image becomes extra attention tokens and nothing is noised, "
    "so there is no strength or mask."
)
_IMG2IMG_FIX = "fluxforge.Pipeline.generate(init_image=..., strength=...)"
_INPAINT_FIX = "fluxforge.Pipeline.generate(init_image=..., mask=..., strength=...)"


_KLEIN_IMG2IMG = f"Flux2KleinImg2ImgPipeline(image=..., strength=...) or {_IMG2IMG_FIX}"
_KLEIN_INPAINT = f"Flux2KleinInpaintPipeline(image=..., mask_image=..., strength=...) or {_INPAINT_FIX}"


def _mode_hints(img2img: str, inpaint: str) -> dict[str, str]:
    """Why a reference pipeline refuses the arguments of img2img and inpainting, and what to use instead."""
    start = f"{_REFERENCE_MODE} To start from an image and keep part of it, use {img2img}."
    repaint = f"{_REFERENCE_MODE} To repaint part of an image, use {inpaint}."
    return {
        "strength": start,
        "denoising_strength": start,
        "init_image": start,
        "mask_image": repaint,
        "mask": repaint,
        "image_reference": "reference images go in image= here (image_reference= is the inpainting "
        "pipeline's name for them)",
    }


_NO_NEGATIVE_TEXT = (
    'diffusers\' klein pipelines take no negative prompt text (they use ""): pass negative_prompt_embeds=, '
    "or use fluxforge.Pipeline.generate(negative_prompt=...)"
)
_SOURCE_HINTS = {  # the inpainting and img2img pipelines, whose image= is the picture to start from
    "init_image": "the image to start from is image= here",
    "denoising_strength": "use strength=",
    "reference_images": "reference images go in image_reference=",
    "references": "reference images go in image_reference=",
    "negative_prompt": _NO_NEGATIVE_TEXT,
}
_DEV_GUIDANCE = (
    "FLUX.2 [dev] is guidance-distilled: guidance_scale is embedded and there is no negative prompt"
)


@dataclass
class Flux2PipelineOutput:
    """What the facades return with return_dict=True, as diffusers' class of the same name."""

    images: list[PIL.Image.Image] | np.ndarray | Tensor  # as output_type asked


Facade = TypeVar("Facade", bound="_Facade")
# What diffusers 0.42.1 loads without torch_dtype: its own models in float32, transformers' as stored.
_DIFFUSERS_DTYPES = {"transformer": torch.float32, "vae": torch.float32, "text_encoder": "stored"}
_NO_SEQUENTIAL = (
    "enable_sequential_cpu_offload: fluxforge offloads whole networks, not layer by layer; use "
    "pipe.enable_model_cpu_offload() (each network on the accelerator only while it runs)"
)
_PROMPT_FIRST = (
    "{name}({prompt!r:.50}, image=...) passes the prompt as the first positional argument, which is "
    "image= in diffusers' FLUX.2 pipelines, so image is given twice (diffusers fails here too, with "
    "'multiple values for argument image'); pass the prompt by name: pipe(prompt={prompt!r:.50}, image=...)"
)


class _Facade(LoraMethods):
    """Loading, the checks every diffusers FLUX.2 pipeline makes, running one request, shaping the result."""

    families: ClassVar[tuple[str, ...]]  # Variant.family values this class runs
    packed_latents: ClassVar[bool] = False  # output_type="latent": packed tokens (dev) or raw VAE latents
    hints: ClassVar[dict[str, str]] = {}  # names of other pipelines' arguments -> what to do instead
    other_use: ClassVar[str] = ""  # ends the wrong-model error: another way to use such a model
    image_first: ClassVar[bool] = True  # image= is the first positional argument of __call__
    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _callback_tensor_inputs = list(_CALLBACK_TENSORS)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Each facade's `__call__` (the diffusers signature) behind one check Python would answer with a
        bare TypeError: a prompt passed positionally beside image=."""
        super().__init_subclass__(**kwargs)
        call = cls.__dict__.get("__call__")
        if call is None or not cls.image_first:
            return

        @functools.wraps(call)
        def checked_call(self: _Facade, *args: Any, **kwargs: Any) -> Any:
            if args and "image" in kwargs and isinstance(args[0], str):
                raise TypeError(_PROMPT_FIRST.format(name=type(self).__name__, prompt=args[0]))
            return call(self, *args, **kwargs)

        cls.__call__ = checked_call  # type: ignore[method-assign]

    def __init__(self, pipeline: Pipeline) -> None:
        if not isinstance(pipeline, Pipeline):
            raise TypeError(
                f"{type(self).__name__}() wraps a fluxforge.Pipeline, got {type(pipeline).__name__}; "
                f"load a model with {type(self).__name__}.from_pretrained(path)"
            )
        family = pipeline.variant.family
        if family not in self.families:
            runs = " or ".join(_FAMILY_NAMES[f] for f in self.families)
            raise ValueError(
                f"{type(self).__name__} runs {runs} models, and {pipeline.variant.name} is "
                f"{_FAMILY_NAMES.get(family, family)}: load it with "
                f"{_REFERENCE_CLASS.get(family, 'Pipeline')}{self.other_use}"
            )
        self.pipeline = pipeline
        vae = pipeline.vae
        self.vae_scale_factor = vae.config.spatial_scale
        self.image_processor = ImageProcessor(self.vae_scale_factor * 2)
        self.scheduler = FlowMatchScheduler(pipeline.variant.scheduler)
        self._progress: dict[str, Any] = {}
        self._interrupt = False
        self._num_timesteps: int | None = None
        self._guidance_scale: float | None = None
        self._current_timestep: Tensor | None = None
        self._attention_kwargs: dict[str, Any] | None = None

    # -- diffusers' attributes ---------------------------------------------------------------------------

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipeline.transformer

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipeline.vae

    @property
    def text_encoder(self) -> torch.nn.Module | None:
        return self.pipeline.components.text_encoder

    @property
    def tokenizer(self) -> Any:
        return self.pipeline.components.tokenizer

    @property
    def components(self) -> dict[str, Any]:
        return {
            "scheduler": self.scheduler,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
            "transformer": self.transformer,
        }

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` (in a step callback) to skip the remaining steps, as in diffusers."""
        return self._interrupt

    @property
    def num_timesteps(self) -> int | None:
        return self._num_timesteps

    @property
    def guidance_scale(self) -> float | None:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """klein's rule: guidance_scale > 1 on a model that is not guidance-distilled."""
        cfg = self.pipeline.variant.defaults.guidance_mode == "cfg"
        return cfg and self._guidance_scale is not None and self._guidance_scale > 1

    @property
    def current_timestep(self) -> Tensor | None:
        return self._current_timestep

    @property
    def attention_kwargs(self) -> dict[str, Any] | None:
        return self._attention_kwargs

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """tqdm's options for the step bar of later calls (disable=True: none), as in diffusers."""
        self._progress = dict(kwargs)

    def progress_bar(self, iterable: Any = None, total: int | None = None) -> Any:
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, **self._progress)

    def enable_model_cpu_offload(
        self, gpu_id: int | None = None, device: torch.device | str | None = None
    ) -> None:
        """Each network on the accelerator only while it runs (fluxforge.offload); on a machine without
        one this changes nothing and says so once."""
        if device is None and gpu_id is not None:
            device = torch.device("cuda", gpu_id)
        self.pipeline.enable_offload(device)

    def enable_sequential_cpu_offload(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(_NO_SEQUENTIAL)

    def maybe_free_model_hooks(self) -> None:
        """Nothing to free: fluxforge's offload moves each network back after its stage."""

    # -----------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls: type[Facade],
        path: str | Path,
        *,
        vae: str | Path | None = None,
        text_encoder: str | Path | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str | None = None,
        variant: str | Variant | None = None,
        torch_dtype: torch.dtype | str | None = None,
        **unknown: Any,
    ) -> Facade:
        """Load a model as `fluxforge.Pipeline.from_pretrained` does (a folder, a BFL file or a hub id), with
        diffusers' dtypes: `dtype=` (or the deprecated `torch_dtype=`) for every network, and without either
        the transformer and the VAE in float32 and the text encoder as stored, as diffusers 0.42.1 loads them,
        so that ported code gives diffusers' numbers."""
        _reject(
            unknown, inspect.signature(cls.from_pretrained).parameters, {}, f"{cls.__name__}.from_pretrained"
        )
        if dtype is not None and torch_dtype is not None:
            raise TypeError("pass dtype= or its older name torch_dtype=, not both")
        given = dtype if torch_dtype is None else torch_dtype
        pipeline = Pipeline.from_pretrained(
            path,
            vae=vae,
            text_encoder=text_encoder,
            device=device,
            dtype=_DIFFUSERS_DTYPES if given is None else given,
            variant=variant,
        )
        return cls(pipeline)

    @property
    def device(self) -> torch.device:
        return self.pipeline.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipeline.transformer.dtype

    def to(
        self: Facade,
        *args: torch.device | str | torch.dtype,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Facade:
        """`pipe.to("cuda")`, `pipe.to(torch.bfloat16)` or both, as in diffusers: moves every network."""
        for arg in args:
            if isinstance(arg, torch.dtype) and dtype is None:
                dtype = arg
            elif isinstance(arg, (str, torch.device)) and device is None:
                device = arg
            else:
                raise TypeError(f"{type(self).__name__}.to() takes one device and one dtype, got {args!r}")
        self.pipeline.to(device, dtype)
        return self

    # -----------------------------------------------------------------------------------------------------

    def _checked(self, call: dict[str, Any]) -> dict[str, Any]:
        """A call's arguments (`locals()` of `__call__`), the ones every facade shares checked before any
        work is done."""
        call = {k: v for k, v in call.items() if k != "self"}
        name = type(self).__name__
        _reject(
            call["kwargs"], inspect.signature(type(self).__call__).parameters, self.hints, f"{name}.__call__"
        )
        attention_kwargs, output_type = call["attention_kwargs"], call["output_type"]
        callback = call["callback_on_step_end"]
        callback_inputs = call["callback_on_step_end_tensor_inputs"]
        if attention_kwargs and set(attention_kwargs) - {"scale"}:
            raise NotImplementedError(
                f"attention_kwargs={attention_kwargs!r}: fluxforge has no attention processors to pass them "
                "to; only the LoRA scale ({'scale': s}) is taken"
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(
                f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))}, got {output_type!r}"
            )
        if callback is not None and not callable(callback):
            raise TypeError(f"callback_on_step_end must be callable, got {type(callback).__name__}")
        unsupported = [k for k in callback_inputs if k not in _CALLBACK_TENSORS]
        if unsupported:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs has to be in {list(_CALLBACK_TENSORS)}, but found "
                f"{unsupported}"
            )
        if "prompt_embeds" in callback_inputs:
            raise NotImplementedError(
                "callback_on_step_end_tensor_inputs: fluxforge.compat hands callbacks only 'latents'; "
                "leave 'prompt_embeds' out"
            )
        self._use_text_layers(tuple(call["text_encoder_out_layers"]))
        return call

    def _request(self, call: dict[str, Any], **mode: Any) -> GenerationRequest:
        """The one request of a call: the arguments every facade shares, and those of its mode."""
        return GenerationRequest(
            prompt=call["prompt"],
            steps=call["num_inference_steps"],
            num_images=call["num_images_per_prompt"],
            max_sequence_length=call["max_sequence_length"],
            prompt_embeds=call["prompt_embeds"],
            noise=call["latents"],
            generator=call["generator"],
            sigmas=call["sigmas"],
            decode=call["output_type"] != "latent",
            loras=self._call_loras(call["attention_kwargs"]),
            **mode,
        )

    def _call_loras(self, attention_kwargs: dict[str, Any] | None) -> dict[str, float] | None:
        """attention_kwargs={"scale": s}: the active adapters at s times their scales, for this call."""
        self._attention_kwargs = attention_kwargs
        if not attention_kwargs or "scale" not in attention_kwargs:
            return None
        s = attention_kwargs["scale"]
        return {name: scale * s for name, scale in self.pipeline.loras.active.items()}

    def _use_text_layers(self, layers: tuple[int, ...]) -> None:
        """diffusers reads any hidden states at call time; fluxforge builds only the layers it reads, so other
        layers mean a text encoder rebuilt for them from the files (once: it then stays)."""
        components = self.pipeline.components
        encoder = components.text_encoder
        if encoder is None or layers == encoder.out_layers:
            return
        if components.text_encoder_path is None:
            raise ValueError(
                f"text_encoder_out_layers={layers}, but the text encoder was loaded for layers "
                f"{encoder.out_layers} and not from files it can be rebuilt from; pass "
                f"text_encoder_out_layers={encoder.out_layers} or leave it out"
            )
        log.info(
            "text_encoder_out_layers=%s: rebuilding the text encoder from %s for those layers (it was loaded "
            "for %s)",
            layers,
            components.text_encoder_path,
            encoder.out_layers,
        )
        weight = encoder.embed_tokens.weight
        rebuilt, text_cfg = load_text_encoder(
            components.text_encoder_path,
            self.pipeline.variant,
            out_layers=layers,
            dtype=weight.dtype,
            device=weight.device,
        )
        width = self.pipeline.transformer.config.joint_attention_dim
        if rebuilt.feature_dim != width:
            raise ValueError(
                f"text_encoder_out_layers={layers} gives {rebuilt.feature_dim} text features, but the "
                f"transformer takes {width} ({width // rebuilt.hidden_size} layers of {rebuilt.hidden_size})"
            )
        components.text_encoder = rebuilt
        variant = dataclasses.replace(self.pipeline.variant, text_encoder=text_cfg)
        components.variant = self.pipeline.variant = variant

    def _guidance(self, guidance_scale: float | None) -> float | None:
        """klein's rule: classifier-free guidance on base models; distilled ones ignore the scale, with
        diffusers' warning."""
        if self.pipeline.variant.defaults.guidance_mode == "cfg":
            return guidance_scale
        if guidance_scale is not None and guidance_scale > 1:
            log.warning("Guidance scale %s is ignored for step-wise distilled models.", guidance_scale)
        return None

    def _run(self, request: GenerationRequest, call: dict[str, Any]) -> GenerationResult:
        callback, callback_inputs = call["callback_on_step_end"], call["callback_on_step_end_tensor_inputs"]
        self._interrupt, self._num_timesteps = False, None
        self._guidance_scale = call.get("guidance_scale")
        timesteps: list[Tensor] = []  # this call's, found on the first step from the token count
        user = None if callback is None else self._step_callback(timesteps, callback, callback_inputs)
        bar: Any = None

        def on_step(info: StepInfo) -> None:
            nonlocal bar
            if not timesteps:
                sigmas = list(request.sigmas) if request.sigmas else None
                schedule = make_schedule(
                    request.steps, info.latents.shape[1], self.pipeline.variant.scheduler, sigmas
                )
                self.scheduler.use(schedule, info.latents.device)
                timesteps.extend(schedule.timesteps[schedule.num_steps - info.total :])
                self._num_timesteps = info.total
                bar = None if self._progress.get("disable") else self._bar(info.total)
            self._current_timestep = timesteps[info.step - 1]
            if user is not None:
                user(info)
            if bar is not None:
                bar.update()

        try:
            return self.pipeline.run(request, on_step=on_step, stop=lambda: self._interrupt)
        finally:
            self._current_timestep = None
            if bar is not None:
                bar.close()

    def _bar(self, total: int) -> Any:
        try:
            return self.progress_bar(total=total)
        except ImportError:  # tqdm is not a dependency of fluxforge: no bar without it
            return None

    def _step_callback(
        self, timesteps: list[Tensor], callback: StepCallback, names: Sequence[str]
    ) -> Callable[[StepInfo], None]:
        """`callback_on_step_end(pipe, i, t, {"latents": ...})` as diffusers calls it: i counts the steps
        this call runs from 0, t is the scheduler timestep (sigma x 1000) and latents are packed [B, S, C]."""

        def on_step(info: StepInfo) -> None:
            returned = callback(
                self, info.step - 1, timesteps[info.step - 1], {k: info.latents for k in names}
            )
            if returned is not None and not isinstance(returned, dict):
                raise TypeError(
                    f"callback_on_step_end must return its callback_kwargs dict (or None), got "
                    f"{type(returned).__name__}"
                )
            for key, value in (returned or {}).items():
                same = isinstance(value, Tensor) and (
                    value is info.latents or torch.equal(value, info.latents)
                )
                if key != "latents" or not same:
                    raise NotImplementedError(
                        f"callback_on_step_end returned a changed {key!r}; fluxforge.compat cannot feed "
                        "tensors back into the sampling loop: return the callback_kwargs unchanged (or None)"
                    )

        return on_step

    def _output(
        self, result: GenerationResult, output_type: str, return_dict: bool
    ) -> Flux2PipelineOutput | tuple[Any]:
        if output_type == "latent":
            images: Any = result.latents
            if not self.packed_latents:  # unpack, de-normalize and unpatchify, as the klein pipelines do
                vae, grid = self.pipeline.vae, self.pipeline.pixels_per_token
                h, w = result.info["height"] // grid, result.info["width"] // grid
                images = unpatchify(vae.denormalize(unpack(result.latents, h, w)), vae.config.patch_size)
        elif output_type == "pil":
            images = result.images
        else:
            unit = (result.pixels * 0.5 + 0.5).clamp(0, 1)  # VaeImageProcessor.postprocess
            images = unit if output_type == "pt" else unit.cpu().permute(0, 2, 3, 1).float().numpy()
        return Flux2PipelineOutput(images) if return_dict else (images,)


def _reject(unknown: dict[str, Any], parameters: Any, hints: dict[str, str], where: str) -> None:
    """A TypeError for the first unknown keyword: the hint for a known mix-up, else the closest valid name."""
    for name in unknown:
        if name in hints:
            raise TypeError(f"{where}() got an unexpected keyword argument {name!r}: {hints[name]}")
        valid = [p for p, v in parameters.items() if p != "self" and v.kind != inspect.Parameter.VAR_KEYWORD]
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TypeError(f"{where}() got an unexpected keyword argument {name!r}{hint}")


def _images(images: Images | None) -> tuple[ImageInput, ...]:
    """One image or a list of them, as a tuple (each its own reference)."""
    if images is None:
        return ()
    return tuple(images) if isinstance(images, (list, tuple)) else (images,)


def _not_a_prompt(image: Images | None, prompt: Any, prompt_embeds: Tensor | None) -> None:
    """diffusers' FLUX.2 pipelines other than inpainting take image= first, so pipe("a fox") passes the
    prompt as an image; say so instead of looking for a file called "a fox"."""
    if isinstance(image, str) and prompt is None and prompt_embeds is None:
        raise TypeError(
            f"image={image!r:.60} looks like a prompt: the first positional argument here is image=, as in "
            "diffusers; pass the prompt by name: pipe(prompt=...)"
        )


def _single(image: Images | None, param: str, what: str) -> ImageInput | None:
    """One image, or a list holding one: fluxforge shares one init image / mask across the batch."""
    if not isinstance(image, (list, tuple)):
        return image
    if len(image) != 1:
        raise ValueError(
            f"{param}: got a list of {len(image)} images; pass one {what}, which every image of the batch "
            "shares (diffusers' per-image lists are not supported: make one call per image)"
        )
    return image[0]


class Flux2Pipeline(_Facade):
    """FLUX.2 [dev] with diffusers' `Flux2Pipeline` call: text-to-image and reference conditioning (image=),
    guidance embedded in the model (guidance_scale, no negative prompt)."""

    families = ("flux.2-dev",)
    packed_latents = True  # dev's output_type="latent" is the packed normalized tokens
    hints = {
        **_mode_hints(_IMG2IMG_FIX, _INPAINT_FIX),  # diffusers has neither for dev
        "negative_prompt": _DEV_GUIDANCE,
        "negative_prompt_embeds": _DEV_GUIDANCE,
    }

    def __call__(
        self,
        image: Images | None = None,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = 4.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        prompt_embeds: Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int = 512,
        text_encoder_out_layers: tuple[int, ...] = (10, 20, 30),
        caption_upsample_temperature: float | None = None,
        **kwargs: Any,
    ) -> Flux2PipelineOutput | tuple[Any]:
        call = self._checked(locals())
        _not_a_prompt(image, prompt, prompt_embeds)
        if caption_upsample_temperature:
            raise NotImplementedError(
                "caption_upsample_temperature: fluxforge does not rewrite prompts with the text encoder; "
                "rewrite the prompt before the call and leave caption_upsample_temperature out"
            )
        request = self._request(
            call,
            references=_images(image),
            width=width,
            height=height,
            guidance=guidance_scale,
        )
        result = self._run(request, call)
        return self._output(result, call["output_type"], call["return_dict"])


class Flux2KleinPipeline(_Facade):
    """FLUX.2 [klein] and [klein] base with diffusers' `Flux2KleinPipeline` call: text-to-image and reference
    conditioning (image=). Base models run classifier-free guidance when guidance_scale > 1 against an empty
    prompt (or negative_prompt_embeds); distilled models ignore guidance_scale with a warning. As in
    diffusers, num_inference_steps defaults to 50 even for distilled models, which are made for 4."""

    families = ("flux.2-klein", "flux.2-klein-base")
    hints = {**_mode_hints(_KLEIN_IMG2IMG, _KLEIN_INPAINT), "negative_prompt": _NO_NEGATIVE_TEXT}

    def __call__(
        self,
        image: Images | None = None,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        sigmas: list[float] | None = None,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int = 512,
        text_encoder_out_layers: tuple[int, ...] = (9, 18, 27),
        **kwargs: Any,
    ) -> Flux2PipelineOutput | tuple[Any]:
        call = self._checked(locals())
        _not_a_prompt(image, prompt, prompt_embeds)
        request = self._request(
            call,
            references=_images(image),
            width=width,
            height=height,
            guidance=self._guidance(guidance_scale),
            negative_prompt_embeds=negative_prompt_embeds,
        )
        result = self._run(request, call)
        return self._output(result, call["output_type"], call["return_dict"])


class Flux2KleinKVPipeline(_Facade):
    """FLUX.2 [klein] 9B KV with diffusers' `Flux2KleinKVPipeline` call: the reference images' keys and values
    are computed on the first step and reused after. Guidance-distilled: no guidance_scale, 4 steps."""

    families = ("flux.2-klein-kv",)
    hints = {
        **_mode_hints(_KLEIN_IMG2IMG, _INPAINT_FIX),  # the inpainting facade takes no KV model
        "guidance_scale": "the klein KV model is guidance-distilled and takes no guidance_scale",
        "negative_prompt_embeds": "the klein KV model is guidance-distilled: it runs no classifier-free "
        "guidance, so there is no negative prompt",
    }

    def __call__(
        self,
        image: Images | None = None,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 4,
        sigmas: list[float] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        prompt_embeds: Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int = 512,
        text_encoder_out_layers: tuple[int, ...] = (9, 18, 27),
        **kwargs: Any,
    ) -> Flux2PipelineOutput | tuple[Any]:
        call = self._checked(locals())
        _not_a_prompt(image, prompt, prompt_embeds)
        request = self._request(
            call,
            references=_images(image),
            width=width,
            height=height,
        )
        result = self._run(request, call)
        return self._output(result, call["output_type"], call["return_dict"])


class Flux2KleinInpaintPipeline(_Facade):
    """Inpainting with diffusers' `Flux2KleinInpaintPipeline` call: image= is repainted where mask_image= is
    white (>= 0.5) and kept where it is black, strength= says how much of the schedule runs (ceil(N x
    strength) steps), and the source image also conditions as the first reference, followed by
    image_reference= (one image or a list, each at its own size).

    As in diffusers, the output has the image's size (height= and width= are ignored, with a warning when
    they differ) and latents= are the start point itself, not noise mixed into the image. Pre-encoded latent
    images, per-image lists and padding_mask_crop are not supported."""

    families = ("flux.2-klein", "flux.2-klein-base")
    hints = {**_SOURCE_HINTS, "mask": "the mask is mask_image= (white = repaint, black = keep)"}
    other_use = f" for references, or inpaint with {_INPAINT_FIX}"
    image_first = False  # prompt= comes first here

    def __init__(self, pipeline: Pipeline) -> None:
        super().__init__(pipeline)
        self.mask_processor = ImageProcessor(
            self.vae_scale_factor * 2, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Images | None = None,
        image_reference: Images | None = None,
        mask_image: Images | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
        sigmas: list[float] | None = None,
        guidance_scale: float = 8.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int = 512,
        text_encoder_out_layers: tuple[int, ...] = (9, 18, 27),
        **kwargs: Any,
    ) -> Flux2PipelineOutput | tuple[Any]:
        call = self._checked(locals())
        if padding_mask_crop is not None:
            raise NotImplementedError(
                "padding_mask_crop: fluxforge inpaints the whole image; crop the image and mask around the "
                "area before the call, and leave padding_mask_crop out"
            )
        if image is None or mask_image is None:
            raise ValueError(
                "Flux2KleinInpaintPipeline needs image= (the picture to repaint) and mask_image= (white = "
                "repaint); to restyle a whole image use Flux2KleinImg2ImgPipeline(image=..., strength=...)"
            )
        references = _images(image_reference)
        prompts = len(prompt) if isinstance(prompt, list) else 1
        if prompt is None and prompt_embeds is not None:
            prompts = prompt_embeds.shape[0]
        batch = prompts * num_images_per_prompt
        if len(references) > 1 and len(references) == batch:
            raise ValueError(
                f"image_reference: {len(references)} images for a batch of {batch}; diffusers would give "
                "image k to image k of the batch, while fluxforge shares every reference by the batch: make "
                "one call per image, or pass a number of references other than the batch size"
            )
        request = self._request(
            call,
            references=references,
            init_image=_single(image, "image", "image to repaint"),
            strength=strength,
            mask=_single(mask_image, "mask_image", "mask"),
            guidance=self._guidance(guidance_scale),
            negative_prompt_embeds=negative_prompt_embeds,
            # diffusers starts from the given latents as they are and re-noises the kept area with them
            start_latents=latents,
        )
        result = self._run(request, call)
        size = (result.info["width"], result.info["height"])
        if (width is not None and width != size[0]) or (height is not None and height != size[1]):
            log.warning(
                "height/width are ignored by Flux2KleinInpaintPipeline, as in diffusers: the output has the "
                "image's size, %dx%d; to inpaint at another size use %s with width= and height=",
                *size,
                _INPAINT_FIX,
            )
        return self._output(result, call["output_type"], call["return_dict"])


class Flux2KleinImg2ImgPipeline(_Facade):
    """img2img with the call of `Flux2KleinImg2ImgPipeline` from diffusers' development branch (commit
    4369be3, not in 0.42.1): image= is the init image, noised to the schedule point strength= selects, and
    the remaining steps run. Guidance follows Flux2KleinPipeline. Beyond that signature, image_reference=
    (keyword only) adds reference images, as in the inpainting pipeline.

    fluxforge's img2img rules apply where that branch differs: ceil(N x strength) steps run, as in
    diffusers' inpainting pipeline (the branch truncates, so small strengths can leave no step); the init
    image is resized to the token grid (the branch center-crops it), or to height= and width= when given;
    latents= are the noise mixed into the image (the branch ignores them), so strength=1.0 gives
    Flux2KleinPipeline's text-to-image for the same latents or generator."""

    families = ("flux.2-klein", "flux.2-klein-base", "flux.2-klein-kv")
    hints = {
        **_SOURCE_HINTS,
        "mask_image": f"to repaint only part of the image use Flux2KleinInpaintPipeline or {_INPAINT_FIX}",
    }

    def __call__(
        self,
        image: Images | None = None,
        prompt: str | list[str] | None = None,
        strength: float = 0.8,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        sigmas: list[float] | None = None,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int = 512,
        text_encoder_out_layers: tuple[int, ...] = (9, 18, 27),
        *,
        image_reference: Images | None = None,
        **kwargs: Any,
    ) -> Flux2PipelineOutput | tuple[Any]:
        call = self._checked(locals())
        _not_a_prompt(image, prompt, prompt_embeds)
        if image is None:
            raise ValueError(
                "Flux2KleinImg2ImgPipeline needs image= (the init image); for text-to-image use "
                "Flux2KleinPipeline"
            )
        request = self._request(
            call,
            references=_images(image_reference),
            init_image=_single(image, "image", "init image"),
            strength=strength,
            width=width,
            height=height,
            guidance=self._guidance(guidance_scale),
            negative_prompt_embeds=negative_prompt_embeds,
        )
        result = self._run(request, call)
        return self._output(result, call["output_type"], call["return_dict"])
