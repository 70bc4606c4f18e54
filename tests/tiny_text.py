"""Tiny text encoders and offline tokenizers for tests (no hub access).

The model configs are those of diffusers' FLUX.2 pipeline tests with more decoder layers, so that truncation
is exercised. The tokenizers are byte-level with no merges: every byte is one token.
"""

from __future__ import annotations

from tiny import randomize_  # noqa: F401  (re-exported for the text tests)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import Mistral3Config, PreTrainedTokenizerFast, Qwen2TokenizerFast, Qwen3Config
from transformers.convert_slow_tokenizer import bytes_to_unicode

# Qwen3's template, reduced to what klein uses: user turns and the no-thinking generation prompt.
QWEN3_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)

# Mistral Small 3.1's template, reduced to a system prompt and user turns with typed content blocks.
MISTRAL3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ m['content'][0]['text'] }}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]{% for b in m['content'] %}"
    "{% if b['type'] == 'text' %}{{ b['text'] }}{% else %}[IMG]{% endif %}{% endfor %}[/INST]"
    "{% endif %}{% endfor %}"
)

# Ids 0..4 match the tiny Mistral 3 config: unk, image token 1, bos 2, eos 3, pad 4.
_MISTRAL3_SPECIALS = (
    "<unk>",
    "[IMG]",
    "<s>",
    "</s>",
    "<pad>",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
)


def tiny_qwen3_config(num_hidden_layers: int = 4) -> Qwen3Config:
    return Qwen3Config(
        intermediate_size=16,
        hidden_size=16,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=512,
    )


def tiny_mistral3_config(num_text_layers: int = 4) -> Mistral3Config:
    return Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": 32000,
            "hidden_size": 16,
            "intermediate_size": 37,
            "max_position_embeddings": 512,
            "num_attention_heads": 4,
            "num_hidden_layers": num_text_layers,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-05,
            "rope_theta": 1000000000.0,
            "sliding_window": None,
            "bos_token_id": 2,
            "eos_token_id": 3,
            "pad_token_id": 4,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "intermediate_size": 37,
            "image_size": 30,
            "patch_size": 6,
            "num_channels": 3,
        },
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=4,
        image_seq_length=4,
        vision_feature_layer=-1,
        image_token_index=1,
    )


def qwen3_tokenizer() -> Qwen2TokenizerFast:
    tokenizer = Qwen2TokenizerFast(
        vocab={c: i for i, c in enumerate(bytes_to_unicode().values())},
        merges=[],
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    specials = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def mistral3_tokenizer() -> PreTrainedTokenizerFast:
    """A stand-in for dev's Pixtral processor: the prompt path only calls `apply_chat_template`, which the
    tokenizer offers with the same arguments. (PixtralProcessor itself needs torchvision.)"""
    vocab = {token: i for i, token in enumerate(_MISTRAL3_SPECIALS)}
    vocab |= {c: len(_MISTRAL3_SPECIALS) + i for i, c in enumerate(bytes_to_unicode().values())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=list(_MISTRAL3_SPECIALS[5:]) + ["[IMG]"],
        chat_template=MISTRAL3_CHAT_TEMPLATE,
    )


def real_qwen3_config(size: str) -> Qwen3Config:
    """The published Qwen3-4B / Qwen3-8B architectures (for meta-device size checks; no weights)."""
    hidden, ffn, tied = {"4B": (2560, 9728, True), "8B": (4096, 12288, False)}[size]
    return Qwen3Config(
        vocab_size=151936,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=tied,
    )


def real_mistral_small_config() -> Mistral3Config:
    """Mistral Small 3.x: the language model and its 24-layer Pixtral vision tower."""
    return Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": 131072,
            "hidden_size": 5120,
            "intermediate_size": 32768,
            "num_hidden_layers": 40,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "sliding_window": None,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "head_dim": 64,
            "image_size": 1540,
            "patch_size": 14,
        },
        spatial_merge_size=2,
        multimodal_projector_bias=False,
    )
