"""The FLUX.2 autoencoder (diffusers `AutoencoderKLFlux2`) and the latent <-> token helpers.

Architecture, with the real config's sizes (s = 2^(levels - 1) = 8, C = latent_channels = 32):

    encode  x [B, 3, H, W] in [-1, 1]
            conv_in 3->128
            down_blocks x4 (128, 256, 512, 512): 2 ResnetBlocks each; blocks 0-2 end in a stride-2 conv
            mid_block: ResnetBlock -> single-head self-attention over the (H/s * W/s) positions -> ResnetBlock
            GroupNorm -> SiLU -> conv_out 512->2C -> quant_conv 1x1 -> channels [0, C) = posterior mean
            -> z [B, C, H/s, W/s]
    decode  z -> post_quant_conv 1x1 -> conv_in C->512 -> mid_block
            up_blocks x4 (512, 512, 256, 128): 3 ResnetBlocks each; blocks 0-2 end in nearest x2 + conv
            GroupNorm -> SiLU -> conv_out 128->3 -> x [B, 3, H, W], about [-1, 1], not clamped
    tokens  z -> patchify 2x2 [B, 4C, h, w] (h = H/2s) -> normalize with the `bn` running stats
            -> pack [B, h*w, 4C] in row-major (h, w) order; decode_tokens runs the same steps backwards.

Every GroupNorm uses eps 1e-6. Parameter and buffer names are exactly diffusers', so a diffusers checkpoint
loads with a strict `load_state_dict`. The pipelines only ever use the posterior mean (`.mode()`), so the
log-variance half of the encoder output is dropped and no sampling is offered.

Layout: in bf16 / fp16 the activations run channels-last (NHWC), which oneDNN's convolutions take about
1.3x faster on CPU; fp32, the exact reference mode, keeps diffusers' layout because channels-last
convolutions round differently (~1e-5 in fp32, about one bf16 step in bf16, by CPU). `channels_last`
overrides the choice (False gives diffusers' own ops in any dtype). Results always come back contiguous.

Dtype: `encode` and `decode` cast their input to the weights' dtype and compute in it. diffusers does not
cast, so a bf16 transformer feeding an fp32 VAE (or the reverse) crashes there (FLUX2_FACTS 8.4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fluxforge.config import AutoencoderConfig

_NORM_EPS = 1e-6


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=_NORM_EPS)


def patchify(z: Tensor, patch_size: tuple[int, int]) -> Tensor:
    """[B, C, H, W] -> [B, C*ph*pw, H/ph, W/pw]; channel c*ph*pw + dy*pw + dx holds z[c, y*ph+dy, x*pw+dx]."""
    b, c, height, width = z.shape
    ph, pw = patch_size
    if height % ph or width % pw:
        raise ValueError(f"latent size {height}x{width} is not a multiple of the patch size {ph}x{pw}")
    z = z.reshape(b, c, height // ph, ph, width // pw, pw).permute(0, 1, 3, 5, 2, 4)  # [B, C, ph, pw, h, w]
    return z.reshape(b, c * ph * pw, height // ph, width // pw)


def unpatchify(z: Tensor, patch_size: tuple[int, int]) -> Tensor:
    """The inverse of `patchify`: [B, C*ph*pw, h, w] -> [B, C, h*ph, w*pw]."""
    b, channels, h, w = z.shape
    ph, pw = patch_size
    z = z.reshape(b, channels // (ph * pw), ph, pw, h, w).permute(0, 1, 4, 2, 5, 3)  # [B, C, h, ph, w, pw]
    return z.reshape(b, channels // (ph * pw), h * ph, w * pw)


def pack(z: Tensor) -> Tensor:
    """[B, C, h, w] -> tokens [B, h*w, C], row-major over (h, w)."""
    return z.flatten(2).transpose(1, 2)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """Tokens [B, h*w, C] -> [B, C, h, w]."""
    b, n, c = tokens.shape
    if n != h * w:
        raise ValueError(f"{n} tokens cannot be unpacked to a {h}x{w} grid ({h * w} tokens)")
    return tokens.transpose(1, 2).reshape(b, c, h, w)


class ResnetBlock(nn.Module):
    """GN -> SiLU -> conv3x3 -> GN -> SiLU -> conv3x3, added to the input (through a 1x1 conv when the width
    changes)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:  # [B, Cin, H, W] -> [B, Cout, H, W]
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions (head dim = channels), with a residual."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = _group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # a list: checkpoints name it to_out.0

    def forward(self, x: Tensor) -> Tensor:  # [B, C, H, W] -> [B, C, H, W]
        b, c, h, w = x.shape
        img = self.group_norm(x.flatten(2)).transpose(1, 2)  # [B, HW, C]
        q, k, v = (proj(img).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # [B, 1, HW, C]
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # [B, HW, C]
        return self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w) + x


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, H, W] -> [B, C, H/2, W/2]
        # Padding only right and bottom is what the weights were trained with; padding=1 would shift the grid.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, H, W] -> [B, C, 2H, 2W]
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(
        self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers)
        )
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])

    def forward(self, x: Tensor) -> Tensor:
        for layer in (*self.resnets, *self.downsamplers):
            x = layer(x)
        return x


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers)
        )
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x: Tensor) -> Tensor:
        for layer in (*self.resnets, *self.upsamplers):
            x = layer(x)
        return x


class MidBlock(nn.Module):
    """ResnetBlock -> optional attention -> ResnetBlock, at constant width."""

    def __init__(self, channels: int, groups: int, attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([AttnBlock(channels, groups)] if attention else [])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        ch, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], config.layers_per_block, groups, downsample=i < len(ch) - 1)
            for i in range(len(ch))
        )
        self.mid_block = MidBlock(ch[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = _group_norm(ch[-1], groups)
        self.conv_out = nn.Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: Tensor) -> Tensor:  # [B, 3, H, W] -> [B, 2C, H/s, W/s]
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        ch, groups = config.decoder_channels[::-1], config.norm_num_groups  # widest first
        self.conv_in = nn.Conv2d(config.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], groups, config.mid_block_add_attention)
        # One resnet more per block than the encoder, as in every LDM-style VAE.
        self.up_blocks = nn.ModuleList(
            UpBlock(ch[max(i - 1, 0)], ch[i], config.layers_per_block + 1, groups, upsample=i < len(ch) - 1)
            for i in range(len(ch))
        )
        self.conv_norm_out = _group_norm(ch[-1], groups)
        self.conv_out = nn.Conv2d(ch[-1], config.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:  # [B, C, h, w] -> [B, 3, h*s, w*s]
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class LatentStats(nn.Module):
    """Per-channel statistics of patchified latents. diffusers keeps them in an affine-free BatchNorm2d named
    `bn` that is never run; only the running mean and variance are used. `num_batches_tracked` is kept so that
    checkpoints load strictly."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))


class AutoEncoder(nn.Module):
    """The FLUX.2 VAE; see the module docstring for the layout and the dtype rule."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        c = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if config.use_post_quant_conv else None
        self.bn = LatentStats(config.token_channels)
        self.channels_last: bool | None = None  # None: channels-last in bf16 / fp16 only

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def _layout(self) -> torch.memory_format:
        channels_last = self.dtype != torch.float32 if self.channels_last is None else self.channels_last
        return torch.channels_last if channels_last else torch.contiguous_format

    def encode(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] [B, 3, H, W] -> posterior mean [B, C, H/s, W/s], in the weights' dtype."""
        moments = self.encoder(x.to(self.dtype, memory_format=self._layout))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments[:, : self.config.latent_channels].contiguous()

    def decode(self, z: Tensor) -> Tensor:
        """Raw latents [B, C, h, w] -> images [B, 3, h*s, w*s] in about [-1, 1], in the weights' dtype."""
        z = z.to(self.dtype, memory_format=self._layout)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).contiguous()

    def normalize(self, z: Tensor) -> Tensor:
        """Patchified latents [B, 4C, h, w] -> (z - mean) / sqrt(var + eps) per channel, in z's dtype."""
        mean, std = self._stats(z.dtype)
        return (z - mean) / std

    def denormalize(self, z: Tensor) -> Tensor:
        """The inverse of `normalize`: z * sqrt(var + eps) + mean."""
        mean, std = self._stats(z.dtype)
        return z * std + mean

    def _stats(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # Computed in the buffers' dtype, then cast, as the diffusers pipelines do, so low precision matches.
        mean = self.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(self.bn.running_var.view(1, -1, 1, 1) + self.config.batch_norm_eps)
        return mean.to(dtype), std.to(dtype)

    def encode_tokens(self, x: Tensor) -> Tensor:
        """Images [B, 3, H, W] -> normalized DiT tokens [B, h*w, 4C] with h = H / (2s), w = W / (2s)."""
        (ph, pw), s = self.config.patch_size, self.config.spatial_scale
        height, width = x.shape[-2:]
        if height % (s * ph) or width % (s * pw):
            raise ValueError(f"image size {height}x{width} is not a multiple of {s * ph}x{s * pw} pixels")
        return pack(self.normalize(patchify(self.encode(x), self.config.patch_size)))

    def decode_tokens(self, tokens: Tensor, h: int, w: int) -> Tensor:
        """Normalized tokens [B, h*w, 4C] -> images [B, 3, 2s*h, 2s*w]; computed in the weights' dtype."""
        z = self.denormalize(unpack(tokens.to(self.dtype), h, w))
        return self.decode(unpatchify(z, self.config.patch_size))
