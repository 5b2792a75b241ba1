"""The tokenizer interface herd uses, whatever file the checkpoint shipped."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from herd.frontend.chat import ChatTemplate, Piece, resolve_chat_template

# Tokens after which Llama 4 stops generating, whatever generation_config.json says.
LLAMA4_STOP_TOKENS = ("<|eot|>", "<|eom|>", "<|end_of_text|>")

# Named special tokens a chat template sees as globals (HF's `special_tokens_map`).
NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_LLAMA4_DEFAULT_SPECIALS = {
    "bos_token": "<|begin_of_text|>",
    "eos_token": "<|eot|>",
    "pad_token": "<|finetune_right_pad|>",
}


class Tokenizer(ABC):
    """Text <-> token ids, special-token lookups and chat formatting for one checkpoint.

    Subclasses provide the primitive encode/decode/lookups; this base adds what is common: named special
    tokens from tokenizer_config.json, stop tokens and the chat template.
    """

    def __init__(self, config: dict[str, Any], generation_eos: Sequence[int], chat_template: ChatTemplate) -> None:
        self.special_tokens_map: dict[str, str] = {}
        for name in NAMED_SPECIALS:
            token = _token_content(config.get(name)) or _LLAMA4_DEFAULT_SPECIALS.get(name)
            if token is not None and self.token_to_id(token) is not None:
                self.special_tokens_map[name] = token
        stops = {self.token_to_id(t) for t in LLAMA4_STOP_TOKENS} | set(generation_eos)
        if self.eos_token_id is not None:
            stops.add(self.eos_token_id)
        self.eos_token_ids: tuple[int, ...] = tuple(sorted(i for i in stops if i is not None))
        self.chat_template = chat_template

    # -- primitives -------------------------------------------------------------------------------------

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. add_special_tokens adds BOS; split_special_tokens=True encodes text such as
        "<|eot|>" as ordinary text instead of the control token (used for untrusted message content)."""

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD."""

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Id of a token given in vocabulary form (byte-level string, or a special token's text)."""

    @abstractmethod
    def id_to_token(self, token_id: int) -> str | None:
        """Vocabulary form of a token id (inverse of token_to_id)."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""

    @property
    @abstractmethod
    def all_special_ids(self) -> frozenset[int]:
        """Ids of every special (control) token."""

    # -- common -----------------------------------------------------------------------------------------

    def _named_id(self, name: str) -> int | None:
        token = self.special_tokens_map.get(name)
        return None if token is None else self.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._named_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._named_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._named_id("pad_token")

    def encode_pieces(self, pieces: Sequence[Piece]) -> list[int]:
        """Encode rendered chat pieces: template text with its control tokens, message content as text."""
        ids: list[int] = []
        for piece in pieces:
            ids += self.encode(piece.text, add_special_tokens=False, split_special_tokens=not piece.trusted)
        return ids

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> list[int] | str:
        """Hugging Face's `apply_chat_template`: the prompt for `messages` as ids, or as text if not tokenize.

        chat_template overrides the tokenizer's template for this call: a built-in name ("llama-4"), a path
        to a .jinja file or jinja source. Extra kwargs reach jinja templates as variables; the built-in
        template accepts `continue_final_message`.
        """
        template = self.chat_template if chat_template is None else resolve_chat_template(chat_template)
        # Like transformers, the named special tokens are template variables; explicit kwargs win.
        variables = {**self.special_tokens_map, **kwargs}
        pieces = template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt, **variables)
        if not tokenize:
            return "".join(p.text for p in pieces)
        return self.encode_pieces(pieces)


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json stores a special token as its text or as an AddedToken dict.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
