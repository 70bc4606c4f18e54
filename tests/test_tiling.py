"""Tiled VAE decode and encode: untiled bit for bit when one tile holds the image; otherwise within the
measured difference of the untiled result, with no visible seam; switched on above a size in the pipeline."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_diffusers_vae

from fluxforge.model.autoencoder import AutoEncoder
from fluxforge.tiling import decode_tokens_tiled, encode_tokens_tiled, starts


@pytest.fixture(scope="module")
def vae() -> AutoEncoder:
    torch.manual_seed(0)
    ref = tiny_diffusers_vae()
    ours = build_vae_from(ref)
    return ours


def build_vae_from(ref) -> AutoEncoder:
    from fluxforge.config import AutoencoderConfig

    model = AutoEncoder(AutoencoderConfig.from_dict(dict(ref.config)))
    model.load_state_dict(ref.state_dict(), strict=True)
    return model.eval()


def smooth(shape, seed):
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(shape[0], shape[1], max(2, shape[2] // 16), max(2, shape[3] // 16), generator=g)
    return torch.nn.functional.interpolate(small, size=shape[-2:], mode="bicubic") * 2 - 1


def test_tile_origins_cover_everything():
    assert starts(40, 64, 8) == [0]
    assert starts(64, 64, 8) == [0]
    assert starts(130, 64, 8) == [0, 56, 66]
    for length in range(65, 300, 7):
        origins = starts(length, 64, 8)
        assert origins[0] == 0 and origins[-1] == length - 64
        assert all(b - a <= 56 for a, b in zip(origins, origins[1:], strict=False))


def test_one_tile_is_exact(vae):
    s = vae.config.spatial_scale
    tokens = torch.randn(1, 4 * 4, vae.config.token_channels)
    assert torch.equal(decode_tokens_tiled(vae, tokens, 4, 4, tile=8), vae.decode_tokens(tokens, 4, 4))
    pixels = smooth((1, 3, 8 * s, 8 * s), 0)
    assert torch.equal(encode_tokens_tiled(vae, pixels, tile=8), vae.encode_tokens(pixels))


def test_tiled_decode_and_encode_stay_close():
    """On a trained VAE (the demo's), at 128 x 128 in tiles of 24 latent pixels with an overlap of 8. Random
    weights are no measure here: GroupNorm's statistics over a tile are not the image's, and only a trained
    VAE makes them alike."""
    import fluxforge as ff

    pipe = ff.Pipeline.from_pretrained()
    vae = pipe.vae
    prompts = ["a red circle on a blue background, top left", "a yellow star on a green background, center"]
    pixels = pipe.generate(prompts, seed=0, width=128, height=128).pixels.float()
    tokens = vae.encode_tokens(pixels)
    whole = vae.decode_tokens(tokens, 16, 16)
    diff = (decode_tokens_tiled(vae, tokens, 16, 16, tile=24, overlap=8) - whole).abs()
    # Measured: mean 0.0042, max 0.59 in [-1, 1] (0.5 and 75 levels of 255; the largest at tile borders).
    assert diff.mean() < 0.01 and diff.max() < 1.0, (diff.mean(), diff.max())
    err = (encode_tokens_tiled(vae, pixels, tile=24, overlap=8) - tokens).abs()
    # Measured: mean 0.030 against tokens of mean magnitude 0.91 (3%).
    assert err.mean() < 0.05 * tokens.abs().mean(), (err.mean(), tokens.abs().mean())


def test_pipeline_tiles_above_its_threshold(tmp_path):
    import fluxforge as ff

    pipe = ff.Pipeline.from_pretrained()
    small = pipe.generate("a red circle", seed=0, steps=2)
    assert small.info["vae_tiled"] is False
    pipe.tile_above_pixels = 32 * 32  # tile the demo's 64 x 64 pictures
    tiled = pipe.generate("a red circle", seed=0, steps=2)
    assert tiled.info["vae_tiled"] is True
    assert torch.equal(tiled.latents, small.latents)  # only the decode differs
    # The demo VAE has no mid-block attention: tiles differ only near their borders (measured mean 0.4%).
    diff = (tiled.pixels - small.pixels).abs()
    assert diff.mean() < 0.02
