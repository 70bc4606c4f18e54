"""Prompt tokenization with the checkpoint's own tokenizer.json and chat template, without transformers.

FLUX.2 tokenizes a prompt as a chat turn, padded to a fixed length (FLUX2_FACTS 3.2, 3.3):

  klein  the Qwen3 template, one user turn, the no-thinking generation prompt; encoded with the
         tokenizer's special tokens (Qwen adds none);
  dev    the Mistral Small 3.1 processor's template with BFL's system message; encoded without special
         tokens when the rendered text already starts with the BOS token (as transformers' processors do).

The template is rendered as transformers renders it (a sandboxed Jinja environment with trim_blocks and
lstrip_blocks, loop controls, a non-escaping `tojson`, `raise_exception`, `strftime_now`; the named special
tokens as variables), and the text is encoded by the `tokenizers` library from tokenizer.json, truncated and
padded on the tokenizer config's sides. The tests check ids and masks against transformers'
`apply_chat_template` and tokenizer calls. Only prompt text is handled: no images, so dev needs no
torchvision.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fluxforge.errors import CheckpointError

_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Where a chat template may be stored in a tokenizer or processor folder, most specific first: the processor's
# own (dev's Pixtral processor keeps it beside the tokenizer) before the tokenizer config's.
_TEMPLATE_FILES = (
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "tokenizer_config.json",
)


@dataclass(frozen=True)
class Tokens:
    input_ids: Tensor  # [B, L] int64, L = max_length
    attention_mask: Tensor  # [B, L] int64, 1 for prompt tokens, 0 for padding


class ChatTokenizer:
    """A `tokenizers.Tokenizer` with the chat template and special tokens of its folder."""

    def __init__(
        self,
        backend: Any,  # tokenizers.Tokenizer
        chat_template: str | None,
        special_tokens: Mapping[str, str],
        padding_side: str = "right",
        truncation_side: str = "right",
        where: str = "",
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens)
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.where = where

    @classmethod
    def from_folder(cls, folder: str | Path) -> ChatTokenizer:
        from tokenizers import Tokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(
                "no tokenizer.json: fluxforge reads the fast-tokenizer file that every FLUX.2 text encoder "
                "ships with (save the tokenizer with transformers' save_pretrained to write one)",
                path=str(folder),
            )
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
            raise CheckpointError(f"cannot read the tokenizer ({exc})", path=str(path)) from None
        # A tokenizer.json may carry the padding and truncation of its last use; each call sets its own.
        backend.no_truncation()
        backend.no_padding()
        config = _json(folder / "tokenizer_config.json")
        specials = {k: _content(config[k]) for k in _NAMED_TOKENS if config.get(k) is not None}
        return cls(
            backend,
            _find_template(folder),
            specials,
            config.get("padding_side", "right"),
            config.get("truncation_side", "right"),
            str(folder),
        )

    @classmethod
    def from_transformers(cls, tokenizer: Any) -> ChatTokenizer:
        """The same tokenizer as a transformers fast tokenizer (or processor) in memory (tests, tools)."""
        inner = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holds its tokenizer
        template = getattr(tokenizer, "chat_template", None) or inner.chat_template
        return cls(
            inner.backend_tokenizer,
            template,
            dict(inner.special_tokens_map),
            inner.padding_side,
            inner.truncation_side,
        )

    @cached_property
    def _template(self) -> Any:
        if not self.chat_template:
            raise CheckpointError(
                "the tokenizer has no chat template (chat_template.jinja, or chat_template in "
                "tokenizer_config.json), and FLUX.2 prompts are chat turns",
                path=self.where or None,
            )
        return _compile(self.chat_template)

    def render(self, conversations: Sequence[Sequence[dict]], **kwargs: Any) -> list[str]:
        """Each conversation through the chat template, with the named special tokens as variables."""
        variables = {**self.special_tokens, **kwargs}
        return [
            self._template.render(messages=list(chat), tools=None, documents=None, **variables)
            for chat in conversations
        ]

    def encode(self, texts: Sequence[str], max_length: int, add_special_tokens: bool = True) -> Tokens:
        """Token ids and mask, truncated and padded to exactly `max_length` as transformers does."""
        pad = self.special_tokens.get("pad_token")
        pad_id = self.backend.token_to_id(pad) if pad is not None else None
        if pad_id is None:
            raise CheckpointError(
                f"the tokenizer has no pad token{f' ({pad!r} is not in its vocabulary)' if pad else ''}; "
                "FLUX.2 pads every prompt to max_sequence_length",
                path=self.where or None,
            )
        backend = self.backend
        backend.enable_truncation(max_length, direction=self.truncation_side)
        backend.enable_padding(direction=self.padding_side, pad_id=pad_id, pad_token=pad, length=max_length)
        try:
            encoded = backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        finally:
            backend.no_truncation()
            backend.no_padding()
        ids = torch.tensor([e.ids for e in encoded], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in encoded], dtype=torch.int64)
        return Tokens(ids, mask)


def _content(token: Any) -> str:
    return token["content"] if isinstance(token, dict) else str(token)


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CheckpointError(f"invalid JSON ({exc})", path=str(path)) from None
    return data if isinstance(data, dict) else {}


def _find_template(folder: Path) -> str | None:
    for name in _TEMPLATE_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".jinja"):
            return path.read_text(encoding="utf-8")
        template = _json(path).get("chat_template")
        if isinstance(template, str):
            return template
        if isinstance(template, list):  # several named templates: the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            if isinstance(named.get("default"), str):
                return named["default"]
    return None


def _compile(source: str) -> Any:
    """The template in a sandbox set up as transformers sets it up, so the same text comes out."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = dict
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise CheckpointError(f"the tokenizer's chat template does not parse ({exc})") from None
