"""The pipeline parts diffusers code reaches for through a FLUX.2 pipeline, backed by fluxforge's own code
(no diffusers import): `pipe.image_processor` / `pipe.mask_processor` (preprocess, postprocess, blur, ...),
`pipe.scheduler` (config, set_timesteps, timesteps, sigmas), and the LoRA methods of diffusers' loader
mixin (load_lora_weights, set_adapters, fuse_lora, ...) over `Pipeline.loras`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageFilter
import torch
import torch.nn.functional as F
from torch import Tensor

from fluxforge.config import SchedulerConfig
from fluxforge.images import resize_exact
from fluxforge.pipeline import Pipeline
from fluxforge.sampling import Schedule, make_schedule

log = logging.getLogger(__name__)


class FrozenConfig(dict):
    """A read-only dict whose keys are also attributes, as diffusers' `FrozenDict` configs."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setitem__(self, key: str, value: Any) -> None:
        raise TypeError("a pipeline part's config cannot be changed; build a new part instead")


# ---------------------------------------------------------------------------------------------------------
# Image and mask processors


class ImageProcessor:
    """diffusers' `VaeImageProcessor` as the FLUX.2 pipelines configure it: `pipe.image_processor` (pixels in
    [-1, 1]) and, on the inpainting pipeline, `pipe.mask_processor` (grayscale, binarized, in [0, 1])."""

    def __init__(
        self,
        vae_scale_factor: int = 16,
        do_resize: bool = True,
        do_normalize: bool = True,
        do_binarize: bool = False,
        do_convert_grayscale: bool = False,
    ) -> None:
        self.config = FrozenConfig(
            vae_scale_factor=vae_scale_factor,
            do_resize=do_resize,
            do_normalize=do_normalize,
            do_binarize=do_binarize,
            do_convert_grayscale=do_convert_grayscale,
            resample="lanczos",
        )

    # -- the methods diffusers' docs use ----------------------------------------------------------------

    @staticmethod
    def blur(image: PIL.Image.Image, blur_factor: int = 4) -> PIL.Image.Image:
        """A Gaussian blur of radius `blur_factor`, to soften a mask's edge (as in diffusers' examples)."""
        if not isinstance(image, PIL.Image.Image):
            raise TypeError(f"blur() takes a PIL image, got {type(image).__name__}")
        return image.filter(PIL.ImageFilter.GaussianBlur(blur_factor))

    def preprocess(
        self,
        image: Any,
        height: int | None = None,
        width: int | None = None,
        resize_mode: str = "default",
        crops_coords: tuple[int, int, int, int] | None = None,
    ) -> Tensor:
        """PIL images, arrays [H, W, C] / [B, H, W, C] in [0, 1] or tensors [B, C, H, W] in [0, 1] (or a
        list of them) -> [B, C, H, W] float32: resized to height x width (by default the image's size
        floored to the scale factor), then normalized to [-1, 1] or binarized."""
        if resize_mode != "default":
            raise NotImplementedError(
                f"resize_mode={resize_mode!r}: fluxforge's processor resizes to the size asked for "
                "(resize_mode='default'); crop or pad the image before the call"
            )
        items = image if isinstance(image, list) else [image]
        if not items:
            raise ValueError("preprocess() got an empty list of images")
        if all(isinstance(i, PIL.Image.Image) for i in items):
            if crops_coords is not None:
                items = [i.crop(crops_coords) for i in items]
            height, width = self._size(items[0].height, items[0].width, height, width)
            if self.config.do_resize:  # in the image's own mode, converted after (as diffusers)
                items = [resize_exact(i, (width, height)) for i in items]
            items = [i.convert("L" if self.config.do_convert_grayscale else "RGB") for i in items]
            pixels = self.numpy_to_pt(self.pil_to_numpy(items))
        else:
            pixels = torch.cat([self._tensor(i) for i in items])
            if self.config.do_convert_grayscale and pixels.shape[1] == 3:
                raise ValueError("the mask processor takes single-channel arrays; pass a grayscale mask")
            height, width = self._size(pixels.shape[2], pixels.shape[3], height, width)
            if self.config.do_resize:
                pixels = F.interpolate(pixels, size=(height, width))
        if self.config.do_normalize and pixels.min() >= 0:
            pixels = self.normalize(pixels)
        if self.config.do_binarize:
            pixels = (pixels >= 0.5).to(pixels.dtype)
        return pixels

    def postprocess(
        self, image: Tensor, output_type: str = "pil", do_denormalize: list[bool] | None = None
    ) -> Any:
        """[B, C, H, W] in [-1, 1] (or [0, 1] without normalization) -> "pil" images, "np" [B, H, W, C] or
        "pt" [B, C, H, W] in [0, 1]; "latent" returns the tensor as it is."""
        if not isinstance(image, Tensor):
            raise TypeError(f"postprocess() takes a tensor [B, C, H, W], got {type(image).__name__}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if output_type == "latent":
            return image
        flags = do_denormalize or [self.config.do_normalize] * image.shape[0]
        image = torch.stack([self.denormalize(i) if f else i for i, f in zip(image, flags, strict=True)])
        if output_type == "pt":
            return image
        array = self.pt_to_numpy(image)
        return array if output_type == "np" else self.numpy_to_pil(array)

    def resize(self, image: Any, height: int, width: int, resize_mode: str = "default") -> Any:
        if resize_mode != "default":
            raise NotImplementedError(f"resize_mode={resize_mode!r}: only 'default' is supported")
        return resize_exact(image, (width, height))

    # -- conversions (diffusers' static helpers) --------------------------------------------------------

    @staticmethod
    def normalize(images: Tensor) -> Tensor:
        return 2.0 * images - 1.0

    @staticmethod
    def denormalize(images: Tensor) -> Tensor:
        return (images * 0.5 + 0.5).clamp(0, 1)

    @staticmethod
    def pil_to_numpy(images: PIL.Image.Image | Sequence[PIL.Image.Image]) -> np.ndarray:
        images = [images] if isinstance(images, PIL.Image.Image) else images
        arrays = [np.array(i).astype(np.float32) / 255.0 for i in images]
        return np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])

    @staticmethod
    def numpy_to_pt(images: np.ndarray) -> Tensor:
        if images.ndim == 3:
            images = images[..., None]
        return torch.from_numpy(images.transpose(0, 3, 1, 2))

    @staticmethod
    def pt_to_numpy(images: Tensor) -> np.ndarray:
        return images.cpu().permute(0, 2, 3, 1).float().numpy()

    @staticmethod
    def numpy_to_pil(images: np.ndarray) -> list[PIL.Image.Image]:
        images = images[None] if images.ndim == 3 else images
        uint8 = (images * 255).round().astype("uint8")
        if uint8.shape[-1] == 1:
            return [PIL.Image.fromarray(i.squeeze(), mode="L") for i in uint8]
        return [PIL.Image.fromarray(i) for i in uint8]

    # -- inside -------------------------------------------------------------------------------------------

    def _size(self, h: int, w: int, height: int | None, width: int | None) -> tuple[int, int]:
        f = self.config.vae_scale_factor
        height = h if height is None else height
        width = w if width is None else width
        return height - height % f, width - width % f

    @staticmethod
    def _tensor(image: Any) -> Tensor:
        if isinstance(image, np.ndarray):
            array = image.astype(np.float32) if image.dtype != np.uint8 else image.astype(np.float32) / 255
            array = array[None] if array.ndim == 3 else array
            array = array[..., None] if array.ndim == 3 else array
            return torch.from_numpy(array.transpose(0, 3, 1, 2).copy())
        if isinstance(image, Tensor):
            t = image.float()
            if t.ndim == 2:
                t = t[None, None]
            elif t.ndim == 3:
                t = t[None] if t.shape[0] in (1, 3) else t[:, None]
            return t
        raise TypeError(
            f"preprocess() takes PIL images, numpy arrays or tensors (or a list of one kind), got "
            f"{type(image).__name__}"
        )


# ---------------------------------------------------------------------------------------------------------
# Scheduler


class FlowMatchScheduler:
    """`pipe.scheduler`: the flow-matching schedule with the attributes of diffusers'
    `FlowMatchEulerDiscreteScheduler` that code reads. After a pipeline call it holds that call's
    schedule; `set_timesteps` computes one as the FLUX.2 pipelines do (mu from the token count)."""

    order = 1
    init_noise_sigma = 1.0

    def __init__(self, config: SchedulerConfig) -> None:
        self._config = config
        self.config = FrozenConfig(dataclasses.asdict(config))
        self.timesteps: Tensor | None = None
        self.sigmas: Tensor | None = None

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: torch.device | str | None = None,
        sigmas: Sequence[float] | None = None,
        image_seq_len: int = 4096,
    ) -> None:
        """The schedule of `num_inference_steps` steps (or of custom `sigmas`) for `image_seq_len` noisy
        tokens (4096: a 1024 x 1024 image)."""
        steps = len(sigmas) if sigmas is not None else num_inference_steps
        if not isinstance(steps, int) or steps < 1:
            raise ValueError("set_timesteps needs num_inference_steps >= 1 or a list of sigmas")
        schedule = make_schedule(steps, image_seq_len, self._config, list(sigmas) if sigmas else None)
        self.use(schedule, device)

    def use(self, schedule: Schedule, device: torch.device | str | None = None) -> None:
        self.timesteps, self.sigmas = schedule.timesteps.to(device), schedule.sigmas.to(device)

    def __repr__(self) -> str:
        return f"FlowMatchScheduler({dict(self.config)})"


# ---------------------------------------------------------------------------------------------------------
# LoRA, with diffusers' loader methods

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' file name in a LoRA folder


class LoraMethods:
    """diffusers' `Flux2LoraLoaderMixin` methods over `self.pipeline.loras`. As in diffusers, a newly loaded
    adapter becomes the only active one at scale 1; `set_adapters` combines them."""

    pipeline: Pipeline

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | Path | dict[str, Tensor],
        adapter_name: str | None = None,
        weight_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        """A LoRA / LoKr file of any trainer's layout, a folder holding one (`weight_name`, default
        pytorch_lora_weights.safetensors) or a state dict. Hub downloads are not made: pass a local path."""
        unknown = set(kwargs) - {"low_cpu_mem_usage", "hotswap", "local_files_only"}
        if unknown:
            raise TypeError(f"load_lora_weights() got an unexpected keyword argument {sorted(unknown)[0]!r}")
        if kwargs.get("hotswap"):
            raise NotImplementedError("hotswap=True: unload the adapter and load the new one instead")
        source: Any = pretrained_model_name_or_path_or_dict
        if isinstance(source, (str, Path)) and Path(source).is_dir():
            source = Path(source) / (weight_name or LORA_WEIGHT_NAME)
        elif isinstance(source, str) and not Path(source).exists() and source.count("/") == 1:
            raise FileNotFoundError(
                f"{source!r} looks like a hub id: fluxforge does not download LoRAs; download the file and "
                "pass its path (and weight_name= for a folder)"
            )
        loras = self.pipeline.loras
        name = adapter_name or _default_name(loras.loaded)
        self.pipeline.load_lora(source, name=name)
        self.pipeline.set_loras({name: 1.0})

    def set_adapters(
        self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None
    ) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None:
            weights = [1.0] * len(names)
        elif isinstance(adapter_weights, (int, float)):
            weights = [float(adapter_weights)] * len(names)
        else:
            weights = list(adapter_weights)
        if len(weights) != len(names):
            raise ValueError(
                f"set_adapters: {len(names)} adapter names and {len(weights)} weights; pass one weight per "
                "adapter (or one for all)"
            )
        self.pipeline.set_loras(dict(zip(names, weights, strict=True)))

    def get_active_adapters(self) -> list[str]:
        return list(self.pipeline.loras.active)

    def get_list_adapters(self) -> dict[str, list[str]]:
        loaded = list(self.pipeline.loras.loaded)
        return {"transformer": loaded} if loaded else {}

    def disable_lora(self) -> None:
        self._disabled = dict(self.pipeline.loras.active)
        self.pipeline.set_loras({})

    def enable_lora(self) -> None:
        before = getattr(self, "_disabled", None) or dict.fromkeys(self.pipeline.loras.loaded, 1.0)
        self.pipeline.set_loras({n: s for n, s in before.items() if n in self.pipeline.loras.loaded})

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            self.pipeline.unload_lora(name)

    def fuse_lora(
        self,
        components: Sequence[str] = ("transformer",),
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Fuse the active adapters (or `adapter_names`) into the weights at their scales x lora_scale."""
        if set(components) - {"transformer"}:
            raise ValueError(f"fuse_lora: FLUX.2 LoRAs change the transformer only, got {list(components)}")
        loras = self.pipeline.loras
        names = adapter_names if adapter_names is not None else list(loras.active)
        self._before_fusing = dict(loras.active)  # unfuse_lora brings these back, as in diffusers
        self.pipeline.set_loras({n: loras.active.get(n, 1.0) * lora_scale for n in names})
        if safe_fusing:
            self._check_finite_after_fusing()
        self.pipeline.fuse_loras()

    def unfuse_lora(self, components: Sequence[str] = ("transformer",), **kwargs: Any) -> None:
        self.pipeline.unfuse_loras()
        before = getattr(self, "_before_fusing", None)
        if before is not None:
            self.pipeline.set_loras({n: s for n, s in before.items() if n in self.pipeline.loras.loaded})
            self._before_fusing = None

    def unload_lora_weights(self, reset_to_overwritten_params: bool = False) -> None:
        self.pipeline.unload_lora()

    def _check_finite_after_fusing(self) -> None:
        loras = self.pipeline.loras
        for name, scale in loras.active.items():
            for module, changes in loras.loaded[name].changes.items():
                if not all(torch.isfinite(c.delta() * scale).all() for c in changes):
                    raise ValueError(
                        f"fuse_lora(safe_fusing=True): LoRA {name!r} gives non-finite weights in {module}"
                    )


def _default_name(loaded: dict) -> str:
    n = 0
    while f"default_{n}" in loaded:
        n += 1
    return f"default_{n}"
