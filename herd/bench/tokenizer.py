"""The few tokenizer operations the benchmark needs, over herd's tokenizer or a `transformers` one.

The client uses a tokenizer for two things only: making prompts of a given number of tokens, and counting the
tokens of generated text when the server does not report them. herd's `load_tokenizer` reads a local folder
(tokenizer.json or Meta's tokenizer.model); a hub name or a folder herd cannot read falls back to
`transformers.AutoTokenizer`, as SGLang's client does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import cache, cached_property
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class TokenizerError(RuntimeError):
    """No tokenizer could be loaded from the given path or name."""


class BenchTokenizer:
    """Text <-> ids without special tokens, vocabulary facts and chat formatting for one tokenizer."""

    def __init__(self, tokenizer: Any, source: str) -> None:
        self._tok = tokenizer
        self.source = source

    def encode(self, text: str) -> list[int]:
        # No BOS: prompt and output lengths count the text itself, as SGLang's retokenization does.
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))

    def count(self, text: str) -> int:
        return len(self.encode(text)) if text else 0

    @property
    def vocab_size(self) -> int:
        # transformers' vocab_size leaves out added tokens; len() counts them, like herd's vocab_size.
        size = getattr(self._tok, "vocab_size", 0)
        return max(size, len(self._tok)) if hasattr(self._tok, "__len__") else size

    @cached_property
    def ordinary_ids(self) -> list[int]:
        """Ids of every non-special token: random prompts draw from these, so that they never contain a
        control token (end of turn, image patch, ...) that would change what the server does."""
        special = set(getattr(self._tok, "all_special_ids", ()))
        # transformers lists only the named specials there; reserved control tokens are added tokens.
        added = getattr(self._tok, "added_tokens_decoder", None) or {}
        special |= {i for i, token in added.items() if getattr(token, "special", False)}
        return [i for i in range(self.vocab_size) if i not in special]

    @property
    def bos_text(self) -> str | None:
        bos = getattr(self._tok, "bos_token", None)
        if bos is None:
            bos = (getattr(self._tok, "special_tokens_map", None) or {}).get("bos_token")
        return bos if isinstance(bos, str) else None

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        """The chat-formatted prompt text without its BOS, which a completions server adds itself."""
        text = self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        bos = self.bos_text
        return text.replace(bos, "") if bos else text

    def chat_prompt_len(self, messages: list[dict[str, Any]]) -> int:
        """Tokens of the chat-formatted prompt as a chat server sees it (BOS and control tokens included)."""
        ids = self._tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if isinstance(ids, Mapping):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return len(ids)


@cache
def load_bench_tokenizer(name_or_path: str) -> BenchTokenizer:
    """Load (once per process) the tokenizer of a local model folder or file, else of a hub name."""
    reasons = []
    if Path(name_or_path).exists():
        try:
            from herd.frontend.tokenizer import load_tokenizer

            return BenchTokenizer(load_tokenizer(name_or_path), name_or_path)
        except (ImportError, OSError, ValueError) as e:
            reasons.append(f"herd: {e}")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        reasons.append("transformers is not installed")
    else:
        try:
            return BenchTokenizer(AutoTokenizer.from_pretrained(name_or_path), name_or_path)
        except Exception as e:  # transformers raises many kinds (OSError, ValueError, HTTP errors)
            reasons.append(f"transformers: {e}")
    raise TokenizerError(
        f"cannot load a tokenizer from {name_or_path!r} ({'; '.join(reasons)}); pass a local model folder or "
        "tokenizer file with --tokenizer"
    )
