"""A Hugging Face `tokenizer.json`, read with the `tokenizers` library."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as RustTokenizer

from herd.frontend.chat import ChatTemplate
from herd.frontend.tokenizer.base import Tokenizer


class HFTokenizer(Tokenizer):
    """A `tokenizer.json` read with the `tokenizers` library."""

    def __init__(
        self,
        path: Path | RustTokenizer,  # a tokenizer.json, or one already built (from a GGUF file's metadata)
        config: dict[str, Any],
        generation_eos: Sequence[int],
        template: ChatTemplate,
    ):
        self._tok = path if isinstance(path, RustTokenizer) else RustTokenizer.from_file(str(path))
        # encode_special_tokens is a mutable flag on the Rust object, so plain-text encoding gets its own
        # copy (built on first use) instead of toggling a flag that concurrent callers share.
        self._plain: RustTokenizer | None = None
        self._plain_lock = threading.Lock()
        added = self._tok.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, tok in added.items() if tok.special)
        super().__init__(config, generation_eos, template)

    def _plain_tokenizer(self) -> RustTokenizer:
        with self._plain_lock:
            if self._plain is None:
                self._plain = RustTokenizer.from_str(self._tok.to_str())
                self._plain.encode_special_tokens = True
        return self._plain

    def encode(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> list[int]:
        tok = self._plain_tokenizer() if split_special_tokens else self._tok
        return tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> frozenset[int]:
        return self._special_ids
