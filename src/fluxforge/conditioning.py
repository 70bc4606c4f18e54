"""Turn references, an init image and a mask into what the sampler consumes: tokens, position ids, start
noise and a per-step blend mask.

Position ids are (T, H, W, L) per token. The noisy image is T = 0 on its (h, w) token grid; reference
image i (0-based) is T = 10 (i + 1) on its own grid, so references of any size and aspect ratio coexist;
text tokens are (0, 0, 0, l).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fluxforge.model.autoencoder import AutoEncoder, pack

REFERENCE_T_STEP = 10  # T offset between consecutive reference images


def grid_ids(h: int, w: int, t: int = 0) -> Tensor:
    """[h*w, 4] int64 ids (t, y, x, 0) of an h x w token grid, row-major."""
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([torch.full_like(y, t), y, x, torch.zeros_like(y)], dim=-1).reshape(-1, 4)


@dataclass(frozen=True)
class ReferenceTokens:
    """Reference images as extra attention tokens, shared by every image of the batch."""

    tokens: Tensor  # [1, N, C] normalized packed latents of all references, in order
    ids: Tensor  # [N, 4] with T = 10, 20, ... per image
    sizes: tuple[tuple[int, int], ...]  # (width, height) in pixels of each processed reference

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]


@torch.no_grad()
def encode_references(
    vae: AutoEncoder,
    pixels: Sequence[Tensor],
    first_index: int = 0,
    encode: Callable[[Tensor], Tensor] | None = None,
) -> ReferenceTokens:
    """Encode [1, 3, H, W] images in [-1, 1]; image k gets T = 10 (first_index + k + 1). `encode` replaces
    `vae.encode_tokens` (the pipeline passes its cached stage)."""
    tokens, ids, sizes = [], [], []
    grid = vae.config.spatial_scale * vae.config.patch_size[0]  # pixels per token side
    for k, image in enumerate(pixels):
        height, width = image.shape[-2:]
        tokens.append(encode(image) if encode is not None else vae.encode_tokens(image))
        ids.append(grid_ids(height // grid, width // grid, REFERENCE_T_STEP * (first_index + k + 1)))
        sizes.append((width, height))
    return ReferenceTokens(torch.cat(tokens, dim=1), torch.cat(ids), tuple(sizes))


def draw_noise(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    *,
    seeds: Sequence[int] | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> Tensor:
    """Gaussian noise [B, C, h, w] in the normalized, patchified latent space.

    With `seeds`, sample b is drawn alone from a generator seeded with seeds[b], so any image of a batch
    can be reproduced by itself. With one `generator`, the whole batch is one draw and with a list, one
    draw per sample: both exactly as diffusers' `randn_tensor` does on the CPU."""
    if seeds is not None:
        generator = [torch.Generator().manual_seed(s) for s in seeds]
    # On the generator's device, as randn_tensor draws it (a CUDA generator gives CUDA noise).
    if isinstance(generator, Sequence):
        return torch.cat(
            [torch.randn((1, *shape[1:]), generator=g, dtype=dtype, device=g.device) for g in generator]
        )
    device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, dtype=dtype, device=device)


def mask_tokens(mask: Tensor, h: int, w: int) -> Tensor:
    """[1, 1, H, W] pixel mask (1 = repaint) -> [1, h*w, 1] per-token weights, bilinear, so tokens on the
    mask's edge are partly repainted (as the reference implementation does)."""
    return pack(F.interpolate(mask, size=(h, w), mode="bilinear"))
