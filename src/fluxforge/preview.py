"""Cheap previews of a generation in progress, for progress events.

A full VAE decode per step costs about as much as a transformer step at real sizes, so previews use a linear
map from the VAE's latent channels to RGB instead (one small matrix product per step, at the latent
resolution: 128 x 128 for a 1024 x 1024 image). The map is fitted to the loaded VAE itself, once, by least
squares: synthetic pictures (smooth random colour fields) are encoded, and each latent pixel is regressed on
the mean colour of the pixels it covers. No table of factors is shipped, so it fits any FLUX.2 VAE, the
demo's included.
"""

from __future__ import annotations

import io

import PIL.Image
import torch
import torch.nn.functional as F
from torch import Tensor

from fluxforge.model.autoencoder import AutoEncoder

FIT_SIZE = 128  # px: side of the synthetic pictures the map is fitted on


class Previewer:
    """Latent tokens -> small RGB pictures, through a linear map fitted to one VAE."""

    def __init__(self, vae: AutoEncoder, weight: Tensor, bias: Tensor) -> None:
        self.vae = vae
        self.weight, self.bias = weight, bias  # [C, 3], [3]: raw latent channels -> RGB in [-1, 1]
        # Folded into one map from normalized tokens: token channel c*ph*pw + p holds latent channel c at
        # sub-pixel p, scaled by std and shifted by mean; so RGB at sub-pixel p = tokens @ M[:, p] + b[p].
        (ph, pw), channels = vae.config.patch_size, weight.shape[0]
        mean = vae.bn.running_mean.detach().float().to(weight.device).view(channels, ph * pw)
        std = torch.sqrt(vae.bn.running_var.detach().float().to(weight.device) + vae.config.batch_norm_eps)
        std = std.view(channels, ph * pw)
        eye = torch.eye(ph * pw, device=weight.device)
        # M[c, p, q, k] = std[c, p] * [p == q] * W[c, k]  ->  [C*ph*pw, ph*pw*3]
        self._map = torch.einsum("cp,pq,ck->cpqk", std, eye, weight).reshape(channels * ph * pw, ph * pw * 3)
        self._shift = (torch.einsum("cp,ck->pk", mean, weight) + bias).reshape(ph * pw * 3)

    @classmethod
    @torch.no_grad()
    def fit(cls, vae: AutoEncoder, seed: int = 0) -> Previewer:
        """Fit the map on 12 synthetic pictures (one batch of VAE encodes at 128 x 128)."""
        generator = torch.Generator().manual_seed(seed)
        pictures = []
        for grid in (2, 3, 4, 6, 8, 16):  # smooth colour fields, then blocks of saturated colours
            pictures.append(_upscaled(torch.rand(1, 3, grid, grid, generator=generator) * 2 - 1, "bilinear"))
        for grid in (1, 2, 2, 4, 4, 8):
            pictures.append(_upscaled(torch.rand(1, 3, grid, grid, generator=generator).round() * 2 - 1))
        pixels = torch.cat(pictures)
        device = next(vae.parameters()).device
        z = vae.encode(pixels.to(device)).float().cpu()  # [N, C, h, w]
        s = vae.config.spatial_scale
        target = F.avg_pool2d(pixels, s)  # [N, 3, h, w]: the colour each latent pixel covers
        x = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()
        y = target.permute(0, 2, 3, 1).reshape(-1, 3).double()
        x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        ridge = 1e-4 * torch.eye(x1.shape[1], dtype=x.dtype)
        solution = torch.linalg.solve(x1.T @ x1 + ridge, x1.T @ y)  # [C + 1, 3]
        return cls(vae, solution[:-1].float().to(device), solution[-1].float().to(device))

    @torch.no_grad()
    def pixels(self, tokens: Tensor, h: int, w: int) -> Tensor:
        """Normalized DiT tokens [B, h*w, 4C] -> preview pixels [B, 3, 2h, 2w] in [-1, 1], float32, CPU:
        one [h*w, 4C] x [4C, 12] product on the tokens' device, then the 2x2 sub-pixels unfolded."""
        (ph, pw) = self.vae.config.patch_size
        rgb = tokens.to(self._map.device, torch.float32) @ self._map + self._shift  # [B, h*w, ph*pw*3]
        rgb = rgb.clamp(-1, 1).cpu().view(-1, h, w, ph, pw, 3).permute(0, 5, 1, 3, 2, 4)
        return rgb.reshape(-1, 3, h * ph, w * pw)

    def jpeg(self, tokens: Tensor, h: int, w: int, index: int = 0, quality: int = 70) -> bytes:
        """Image `index` of the batch as JPEG bytes at the latent resolution."""
        rgb = self.pixels(tokens[index : index + 1], h, w)[0]
        array = ((rgb + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        PIL.Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        return buffer.getvalue()


def _upscaled(grid: Tensor, mode: str = "nearest") -> Tensor:
    return F.interpolate(grid, size=(FIT_SIZE, FIT_SIZE), mode=mode)
