"""Tiny random FLUX.2 checkpoints, built offline for the tests (no hub is reachable)."""

from __future__ import annotations

import torch
from diffusers import Flux2Transformer2DModel

# FLUX2_FACTS 7.1 sizes (D = 32), with joint_attention_dim 32 as in the diffusers model test.
TINY_DIT = dict(
    patch_size=1,
    in_channels=4,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    timestep_guidance_channels=256,
    axes_dims_rope=(4, 4, 4, 4),
)


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Overwrite every parameter with N(0, std), norm gains with 1 + N(0, std), so that no path is trivial
    and layers differ visibly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            is_gain = p.ndim == 1 and "norm" in name and name.endswith("weight")
            p.copy_(1 + noise if is_gain else noise)
    return module.eval()


def tiny_diffusers_transformer(
    guidance_embeds: bool = False, seed: int = 0, **overrides
) -> Flux2Transformer2DModel:
    """std 0.1: every path visible, yet not so chaotic that a 1-ulp difference (a product whose rounding
    depends on the rows beside it, as Intel MKL's AVX2 kernels do) grows past 1e-6 of the latents over a
    few steps, as it did at 0.2 (4e-6); the batched-against-alone checks measure what they claim."""
    model = Flux2Transformer2DModel(**{**TINY_DIT, "guidance_embeds": guidance_embeds, **overrides})
    return randomize_(model, seed, std=0.1).eval()


def grid_ids(h: int, w: int, t: int = 0) -> torch.Tensor:
    """(T, H, W, L) ids of an h x w token grid in row-major order: [h*w, 4]."""
    hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([torch.full_like(hh, t), hh, ww, torch.zeros_like(hh)], dim=-1).reshape(-1, 4)


def text_ids(n: int) -> torch.Tensor:
    ids = torch.zeros(n, 4, dtype=torch.long)
    ids[:, 3] = torch.arange(n)
    return ids


# Tiny FLUX.2 autoencoder: one latent channel, so transformer tokens have 4 channels (FLUX2_FACTS 7.1),
# with two resolutions so that down/up sampling and the reversed BFL up-block order are exercised.
TINY_VAE = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=1,
    norm_num_groups=4,
)


def tiny_diffusers_vae(seed: int = 0, **overrides):
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(**{**TINY_VAE, **overrides})
    randomize_(vae, seed, std=0.1)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=gen) * 0.3)
        vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=gen) * 1.5)
    return vae.eval()


def to_bfl(state_dict: dict[str, torch.Tensor], plan: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """Write a diffusers-named state dict in BFL's layout by inverting a fluxforge plan (fused qkv rows
    re-joined, modulation halves swapped back, attention weights as 1x1 convs)."""
    parts: dict[str, dict[int, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        src = plan[key]
        t = tensor.detach().clone()
        if src.swap_halves:
            a, b = t.chunk(2)
            t = torch.cat([b, a])
        if src.squeeze:
            t = t[:, :, None, None]
        if src.part is not None:
            parts.setdefault(src.key, {})[src.part[0]] = t
        else:
            out[prefix + src.key] = t
    for key, blocks in parts.items():
        out[prefix + key] = torch.cat([blocks[i] for i in sorted(blocks)])
    return {k: v.contiguous() for k, v in out.items()}
