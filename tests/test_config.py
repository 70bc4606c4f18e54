"""The variant registry and configs against the official numbers (FLUX2_FACTS 1.2, 2.1, 3)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny import tiny_diffusers_transformer

from fluxforge.config import DEMO, VARIANTS, AutoencoderConfig, TransformerConfig, get_variant
from fluxforge.model.transformer import Flux2Transformer

PARAMS = {"flux.2-dev": 32_223_281_152, "flux.2-klein-4b": 3_875_544_576, "flux.2-klein-9b": 9_078_581_248}


@pytest.mark.parametrize("name,count", PARAMS.items())
def test_real_transformer_sizes(name, count):
    with torch.device("meta"):
        model = Flux2Transformer(get_variant(name).transformer)
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=list(VARIANTS))
def test_registered_networks_fit_together(variant):
    assert variant.transformer.joint_attention_dim == variant.text_encoder.feature_dim
    assert variant.transformer.in_channels == variant.vae.token_channels
    assert variant is DEMO or variant.vae.token_channels == 128  # the demo is the one small model
    assert variant.text_encoder.layers_to_load == max(variant.text_encoder.out_layers)


def test_defaults_per_family():
    assert get_variant("flux.2-dev").defaults.guidance_mode == "embedded"
    assert get_variant("flux.2-dev").text_encoder.out_layers == (10, 20, 30)
    assert get_variant("flux.2-klein-4b").defaults.steps == 4
    assert get_variant("flux.2-klein-base-9b").defaults.guidance_mode == "cfg"
    assert get_variant("flux.2-klein-9b-kv").defaults.reference_kv
    assert {v.family for v in VARIANTS.values()} == {
        "flux.2-dev",
        "flux.2-klein",
        "flux.2-klein-base",
        "flux.2-klein-kv",
    }


def test_transformer_config_round_trips_the_diffusers_config():
    ref = tiny_diffusers_transformer(guidance_embeds=True)
    cfg = TransformerConfig.from_dict(dict(ref.config))
    assert cfg.to_dict() == {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in ref.config.items() if not k.startswith("_")
    }


def test_invalid_configs_say_what_is_wrong():
    with pytest.raises(ValueError, match="axes_dims_rope .* must sum to attention_head_dim 128"):
        TransformerConfig(axes_dims_rope=(32, 32, 32))
    with pytest.raises(ValueError, match="not divisible by norm_num_groups"):
        AutoencoderConfig(norm_num_groups=48)
    with pytest.raises(ValueError, match="invalid transformer config"):
        TransformerConfig.from_dict({"num_attention_heads": 0})


def test_variants_are_frozen_and_changed_with_replace():
    v = get_variant("flux.2-klein-4b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.name = "x"  # type: ignore[misc]
    assert dataclasses.replace(v.defaults, steps=8).steps == 8 and v.defaults.steps == 4


def test_unknown_variant_suggests_close_names():
    with pytest.raises(ValueError, match="Did you mean 'flux.2-klein-9b-kv'"):
        get_variant("flux.2-klein-9b-KV")
