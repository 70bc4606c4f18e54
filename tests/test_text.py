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

from fluxforge.config import MISTRAL_SMALL, QWEN3_4B, LanguageConfig
from fluxforge.model.text import (
    SYSTEM_MESSAGE,
    TextEncoder,
    encode_prompts,
    tokenize_mistral3,
    tokenize_qwen3,
)
from fluxforge.tokenizer import ChatTokenizer

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


def saved(tokenizer, folder) -> ChatTokenizer:
    """fluxforge's tokenizer for the files transformers writes for `tokenizer`."""
    tokenizer.save_pretrained(folder)
    return ChatTokenizer.from_folder(folder)


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
    assert torch.equal(got, want)  # fluxforge's own Qwen3 runs transformers' operations in its order
    assert len(encoder.layers) == max(out_layers)


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
    assert torch.equal(got, want)


def test_klein_prompts_match_diffusers(tmp_path):
    text_encoder = randomize_(Qwen3ForCausalLM(tiny_qwen3_config(num_hidden_layers=3)))
    tokenizer = qwen3_tokenizer()
    pipe = Flux2KleinPipeline(FlowMatchEulerDiscreteScheduler(), None, text_encoder, tokenizer, None)
    want_embeds, want_ids = pipe.encode_prompt(
        PROMPTS, device="cpu", num_images_per_prompt=2, max_sequence_length=64, text_encoder_out_layers=(1, 2)
    )
    encoder = load_encoder(text_encoder.config, (1, 2), text_encoder.state_dict())

    got = encode_prompts(encoder, saved(tokenizer, tmp_path), PROMPTS, 64, num_images_per_prompt=2)

    assert got.embeds.shape == want_embeds.shape == (4, 64, 32)
    assert torch.equal(got.embeds, want_embeds)
    assert torch.equal(got.ids, want_ids[0]) and got.ids.dtype == torch.int64
    # At 64 tokens the first prompt is padded and the second truncated.
    assert not torch.equal(got.embeds[0], got.embeds[2])


def test_dev_prompts_match_diffusers(tmp_path):
    text_encoder = randomize_(Mistral3ForConditionalGeneration(tiny_mistral3_config(num_text_layers=4)))
    processor = mistral3_tokenizer()
    pipe = Flux2Pipeline(FlowMatchEulerDiscreteScheduler(), None, text_encoder, processor, None)
    # The system message alone is ~170 byte tokens; 256 leaves room for the prompts and some padding.
    want_embeds, want_ids = pipe.encode_prompt(
        PROMPTS, device="cpu", max_sequence_length=256, text_encoder_out_layers=(1, 3)
    )
    encoder = load_encoder(text_encoder.config, (1, 3), text_encoder.state_dict())

    got = encode_prompts(encoder, saved(processor, tmp_path), PROMPTS, 256, dtype=torch.bfloat16)

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
        assert len(encoder.layers) == spec.layers_to_load
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


# Mistral Small 3.1's chat template in its shape: whitespace control, a loop over typed content blocks, the
# system prompt pulled out of the messages, errors raised from the template.
MISTRAL_LIKE_TEMPLATE = """{%- set today = strftime_now("%Y-%m-%d") %}
{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'][0]['text'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if system_message is defined %}
    {{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}
{%- endif %}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {{- '[INST]' }}
        {%- for block in message['content'] %}
            {%- if block['type'] == 'text' %}
                {{- block['text'] }}
            {%- else %}
                {{- raise_exception('Only text content is used here') }}
            {%- endif %}
        {%- endfor %}
        {{- '[/INST]' }}
    {%- else %}
        {{- raise_exception('Only user and system roles are supported') }}
    {%- endif %}
{%- endfor %}
"""

DEV_PROMPTS = [
    "a dog is dancing",
    "a red cube on a glass table, studio light [IMG]",
    "neon sign that reads 'open 24/7' in the rain, reflections, 35mm",
    "ünïcödé prompt: café, 東京, emoji 🦊",
    "a very long prompt " * 60,  # truncated at 512 tokens with the system message
]


@pytest.mark.parametrize("batch", [DEV_PROMPTS[:1], DEV_PROMPTS[2:4], DEV_PROMPTS])
def test_dev_tokens_equal_transformers_chat_template(batch, tmp_path):
    """dev prompts need no processor (and so no torchvision): the oracle is transformers' own
    apply_chat_template on the tokenizer with diffusers' dev messages, tokenized as the dev pipeline does."""
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    tokenizer = mistral3_tokenizer()
    tokenizer.chat_template = MISTRAL_LIKE_TEMPLATE
    want = tokenizer.apply_chat_template(
        format_input(batch, DIFFUSERS_SYSTEM_MESSAGE),
        add_generation_prompt=False,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        padding="max_length",
        truncation=True,
        max_length=512,
    )
    got = tokenize_mistral3(saved(tokenizer, tmp_path), batch, 512)
    assert got.input_ids.shape == (len(batch), 512)
    assert torch.equal(got.input_ids, want["input_ids"])
    assert torch.equal(got.attention_mask, want["attention_mask"])
    assert got.attention_mask[0].sum() < 512  # padded; the long prompt, last, fills all 512
    assert batch[-1] is not DEV_PROMPTS[-1] or got.attention_mask[-1].sum() == 512


def test_klein_tokens_equal_transformers(tmp_path):
    tokenizer = qwen3_tokenizer()
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,
        )
        for p in DEV_PROMPTS
    ]
    want = tokenizer(texts, return_tensors="pt", padding="max_length", truncation=True, max_length=512)
    got = tokenize_qwen3(saved(tokenizer, tmp_path), DEV_PROMPTS, 512)
    assert torch.equal(got.input_ids, want["input_ids"])
    assert torch.equal(got.attention_mask, want["attention_mask"])


@pytest.mark.parametrize(
    "config",
    [
        tiny_qwen3_config(3),
        tiny_mistral3_config(3),
        real_qwen3_config("8B"),
        real_mistral_small_config(),
    ],
    ids=["tiny-qwen3", "tiny-mistral3", "qwen3-8b", "mistral-small"],
)
def test_config_reads_as_transformers_does(config, tmp_path):
    """config.json as save_pretrained writes it (only what differs from the defaults) reads to the values
    transformers' config classes hold."""
    import json

    config.save_pretrained(tmp_path)
    ours = LanguageConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    text = config.get_text_config()
    assert (ours.hidden_size, ours.intermediate_size, ours.num_hidden_layers) == (
        text.hidden_size,
        text.intermediate_size,
        text.num_hidden_layers,
    )
    assert (ours.num_attention_heads, ours.num_key_value_heads, ours.head_dim) == (
        text.num_attention_heads,
        text.num_key_value_heads,
        getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
    )
    assert ours.rms_norm_eps == text.rms_norm_eps and ours.vocab_size == text.vocab_size
    assert ours.rope_theta == text.rope_parameters["rope_theta"]
    assert ours.sliding_window == getattr(text, "sliding_window", None)
