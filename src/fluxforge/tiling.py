"""Tiled VAE decode and encode for large images: bounded peak memory, seams blended away.

The latents (decode) or pixels (encode) are cut into overlapping tiles; each tile goes through the VAE alone,
and the overlaps are blended with linear ramps, so no edge shows. Peak memory is that of one tile instead of
the whole image. It is not exact: the decoder's mid-block attention and every convolution's border see only
their tile; `tests/test_tiling.py` states the measured difference. An image that fits in one tile is
processed untiled, bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fluxforge.model.autoencoder import AutoEncoder, pack, patchify, unpack, unpatchify

TILE = 64  # latent pixels per tile side (512 image pixels for FLUX.2's 8x VAE)
OVERLAP = 8  # latent pixels shared by neighbouring tiles (64 image pixels)


def starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile origins covering [0, length): steps of tile - overlap, the last one flush with the end."""
    if length <= tile:
        return [0]
    step = tile - overlap
    origins = list(range(0, length - tile, step))
    return [*origins, length - tile]


def _ramp(size: int, overlap: int, before: bool, after: bool) -> Tensor:
    """Weights along one side of a tile: rising over `overlap` where a tile comes before, falling where one
    comes after, 1 elsewhere."""
    i = torch.arange(size, dtype=torch.float32) + 0.5
    w = torch.ones(size)
    if before:
        w = torch.minimum(w, i / overlap)
    if after:
        w = torch.minimum(w, (size - i) / overlap)
    return w


def _blend(inputs: Tensor, run, scale: float, tile: int, overlap: int) -> Tensor:
    """Run `run` on overlapping tiles of `inputs` [B, C, H, W] (tile and overlap in its pixels) and blend the
    outputs, which are `scale` times larger per side, into one [B, C', H*scale, W*scale] float32 tensor."""
    height, width = inputs.shape[-2:]
    ys, xs = starts(height, tile, overlap), starts(width, tile, overlap)
    out = weight = None
    for iy, y in enumerate(ys):
        for ix, x in enumerate(xs):
            part = run(inputs[..., y : y + tile, x : x + tile]).float()
            if out is None:
                out = part.new_zeros(*part.shape[:2], int(height * scale), int(width * scale))
                weight = part.new_zeros(1, 1, *out.shape[-2:])
            th, tw = part.shape[-2:]
            o = max(1, int(overlap * scale))
            wy = _ramp(th, o, iy > 0, iy < len(ys) - 1).to(part.device)
            wx = _ramp(tw, o, ix > 0, ix < len(xs) - 1).to(part.device)
            w = wy[:, None] * wx[None, :]
            oy, ox = int(y * scale), int(x * scale)
            out[..., oy : oy + th, ox : ox + tw] += part * w
            weight[..., oy : oy + th, ox : ox + tw] += w
    return out / weight


def fits_one_tile(height: int, width: int, tile: int) -> bool:
    return height <= tile and width <= tile


@torch.no_grad()
def decode_tokens_tiled(
    vae: AutoEncoder, tokens: Tensor, h: int, w: int, tile: int = TILE, overlap: int = OVERLAP
) -> Tensor:
    """As `vae.decode_tokens`, tile by tile: normalized tokens [B, h*w, 4C] -> images [B, 3, 2s*h, 2s*w]."""
    z = unpatchify(vae.denormalize(unpack(tokens.to(vae.dtype), h, w)), vae.config.patch_size)
    if fits_one_tile(*z.shape[-2:], tile):
        return vae.decode(z)
    return _blend(z, vae.decode, vae.config.spatial_scale, tile, overlap).to(vae.dtype)


@torch.no_grad()
def encode_tokens_tiled(vae: AutoEncoder, pixels: Tensor, tile: int = TILE, overlap: int = OVERLAP) -> Tensor:
    """As `vae.encode_tokens`, tile by tile (tile and overlap in latent pixels): [B, 3, H, W] -> tokens."""
    s = vae.config.spatial_scale
    if fits_one_tile(*pixels.shape[-2:], tile * s):
        return vae.encode_tokens(pixels)
    z = _blend(pixels, vae.encode, 1 / s, tile * s, overlap * s).to(vae.dtype)
    return pack(vae.normalize(patchify(z, vae.config.patch_size)))
