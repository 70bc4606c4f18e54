"""The truncated text encoders give the full models' hidden states, and prompts encode as in diffusers."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE as DIFFUSERS_SYSTEM_MESSAGE
from safetensors.torch import load_file
from tiny_text import (
    mistral3_tokenizer,
    qwen3_tokenizer,
    randomize_,
    real_mistral_small_config,
    real_qwen3_config,
    tiny_mistral3_config,
    tiny_qwen3_config,
)
from transformers import Mistral3ForConditionalGeneration, Qwen3ForCausalLM

from fluxforge.config import MISTRAL_SMALL, QWEN3_4B
from fluxforge.model.text import SYSTEM_MESSAGE, TextEncoder, encode_prompts

PROMPTS = ["a dog is dancing", "a red cube on a glass table, studio light [IMG]"]


def load_encoder(config, out_layers: tuple[int, ...], checkpoint: dict[str, torch.Tensor]) -> TextEncoder:
    """Build on meta and load strictly, reading each tensor under its first name the checkpoint has."""
    with torch.device("meta"):
        encoder = TextEncoder(config, out_layers)
    state = {}
    for key, names in encoder.checkpoint_keys().items():
        name = next((n for n in names if n in checkpoint), None)
        assert name is not None, f"{key}: none of {names} in the checkpoint"
        state[key] = checkpoint[name]
    encoder.load_state_dict(state, assign=True, strict=True)
    return encoder.eval()


def padded_batch(vocab: int, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, vocab, (3, length), generator=gen)
    attention_mask = torch.ones(3, length, dtype=torch.int64)
    attention_mask[1, 7:] = 0  # right padding
    attention_mask[2, :4] = 0  # left padding
    return input_ids, attention_mask


def reference_features(model, input_ids, attention_mask, out_layers) -> torch.Tensor:
    with torch.no_grad():
        out = model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False
        )
    return torch.cat([out.hidden_states[k] for k in out_layers], dim=-1)


@pytest.mark.parametrize("out_layers", [(1, 2, 3), (2, 4), (4,)])  # 4 = the last layer, which is normed
def test_qwen3_truncated_equals_full(out_layers):
    full = randomize_(Qwen3ForCausalLM(tiny_qwen3_config(num_hidden_layers=4)))
    encoder = load_encoder(full.config, out_layers, full.state_dict())
    input_ids, attention_mask = padded_batch(1000)

    with torch.no_grad():
        got = encoder(input_ids, attention_mask)
    want = reference_features(full, input_ids, attention_mask, out_layers)

    assert got.shape == (3, 12, len(out_layers) * 16)
    assert (got - want).abs().max().item() <= 1e-6
    assert len(encoder.lm.layers) == max(out_layers)


@pytest.mark.parametrize("layout", ["saved", "in_memory"])
@pytest.mark.parametrize("out_layers", [(1, 3), (2, 4)])
def test_mistral3_truncated_equals_full(out_layers, layout, tmp_path):
    full = randomize_(Mistral3ForConditionalGeneration(tiny_mistral3_config(num_text_layers=4)))
    if layout == "saved":  # transformers 5 saves the hub layout, `language_model.model.*`
        full.save_pretrained(tmp_path)
        checkpoint = load_file(tmp_path / "model.safetensors")
        assert "language_model.model.embed_tokens.weight" in checkpoint
    else:  # `model.language_model.*`
        checkpoint = full.state_dict()
    encoder = load_encoder(full.config, out_layers, checkpoint)
    input_ids, attention_mask = padded_batch(1000)

    with torch.no_grad():
        got = encoder(input_ids, attention_mask)
    want = reference_features(full, input_ids, attention_mask, out_layers)

    assert got.shape == (3, 12, len(out_layers) * 16)
    assert (got - want).abs().max().item() <= 1e-6


def test_klein_prompts_match_diffusers():
    text_encoder = randomize_(Qwen3ForCausalLM(tiny_qwen3_config(num_hidden_layers=3)))
    tokenizer = qwen3_tokenizer()
    pipe = Flux2KleinPipeline(FlowMatchEulerDiscreteScheduler(), None, text_encoder, tokenizer, None)
    want_embeds, want_ids = pipe.encode_prompt(
        PROMPTS, device="cpu", num_images_per_prompt=2, max_sequence_length=64, text_encoder_out_layers=(1, 2)
    )
    encoder = load_encoder(text_encoder.config, (1, 2), text_encoder.state_dict())

    got = encode_prompts(encoder, tokenizer, PROMPTS, max_sequence_length=64, num_images_per_prompt=2)

    assert got.embeds.shape == want_embeds.shape == (4, 64, 32)
    assert (got.embeds - want_embeds).abs().max().item() <= 1e-6
    assert torch.equal(got.ids, want_ids[0]) and got.ids.dtype == torch.int64
    # At 64 tokens the first prompt is padded and the second truncated.
    assert not torch.equal(got.embeds[0], got.embeds[2])


def test_dev_prompts_match_diffusers():
    text_encoder = randomize_(Mistral3ForConditionalGeneration(tiny_mistral3_config(num_text_layers=4)))
    processor = mistral3_tokenizer()
    pipe = Flux2Pipeline(FlowMatchEulerDiscreteScheduler(), None, text_encoder, processor, None)
    # The system message alone is ~170 byte tokens; 256 leaves room for the prompts and some padding.
    want_embeds, want_ids = pipe.encode_prompt(
        PROMPTS, device="cpu", max_sequence_length=256, text_encoder_out_layers=(1, 3)
    )
    encoder = load_encoder(text_encoder.config, (1, 3), text_encoder.state_dict())

    got = encode_prompts(encoder, processor, PROMPTS, max_sequence_length=256, dtype=torch.bfloat16)

    assert SYSTEM_MESSAGE == DIFFUSERS_SYSTEM_MESSAGE
    assert got.embeds.dtype == torch.bfloat16 and got.embeds.shape == (2, 256, 32)
    assert torch.equal(got.embeds, want_embeds.to(torch.bfloat16))
    assert torch.equal(got.ids, want_ids[0])


def test_real_sizes_load_only_the_used_layers():
    qwen3_4b, mistral_small = real_qwen3_config("4B"), real_mistral_small_config()
    for config, spec in ((qwen3_4b, QWEN3_4B), (mistral_small, MISTRAL_SMALL)):
        with torch.device("meta"):
            encoder = TextEncoder(config, spec.out_layers)
        keys = encoder.checkpoint_keys()
        text = config.get_text_config()
        dm, dff, dq, dkv = text.hidden_size, text.intermediate_size, 32 * 128, 8 * 128
        per_layer = (
            2 * dm * dq + 2 * dm * dkv + 3 * dm * dff + 2 * dm + (2 * 128 if spec.kind == "qwen3" else 0)
        )

        assert encoder.feature_dim == spec.feature_dim
        assert len(encoder.lm.layers) == spec.layers_to_load
        assert (
            sum(p.numel() for p in encoder.parameters())
            == text.vocab_size * dm + spec.layers_to_load * per_layer
        )
        wanted = {name for names in keys.values() for name in names}
        assert not any("norm.weight" in n and ".layers." not in n for n in wanted)  # no final norm
        assert not any(s in n for n in wanted for s in ("lm_head", "vision", "projector"))
        layers = {int(n.split(".layers.")[1].split(".")[0]) for n in wanted if ".layers." in n}
        assert layers == set(range(spec.layers_to_load))


def test_out_layer_beyond_the_checkpoint_is_rejected():
    with pytest.raises(ValueError, match=r"must lie in 1\.\.4: the qwen3 checkpoint has 4 decoder layers"):
        TextEncoder(tiny_qwen3_config(num_hidden_layers=4), (2, 5))
    with pytest.raises(ValueError, match=r"must lie in 1\.\.4"):
        TextEncoder(tiny_mistral3_config(num_text_layers=4), (0, 2))
