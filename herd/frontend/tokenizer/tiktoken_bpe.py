"""Meta's `tokenizer.model` (base64 BPE ranks) read into tiktoken, with Llama 4's pattern and specials.

Written here rather than imported from llama-models, which is a test-only dependency; tests check that
ids, special tokens and decoding equal Meta's reference tokenizer.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import tiktoken

from herd.frontend.chat import ChatTemplate
from herd.frontend.tokenizer.base import Tokenizer


class TiktokenTokenizer(Tokenizer):
    """Meta's `tokenizer.model`: base64 BPE ranks read into tiktoken, with Llama 4's split pattern."""

    # The o200k-style pre-tokenizer regex of Llama 4 (llama_models/llama4/tokenizer.py).
    PATTERN = (
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
        r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
        r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    NUM_SPECIAL = 2048
    # tiktoken panics on very long inputs and very long runs of (non-)whitespace; Meta splits the same way.
    MAX_ENCODE_CHARS = 400_000
    MAX_RUN_CHARS = 25_000
    _LONG_RUN = re.compile(rf"\s{{{MAX_RUN_CHARS + 1},}}|\S{{{MAX_RUN_CHARS + 1},}}")

    def __init__(self, path: Path, config: dict[str, Any], generation_eos: Sequence[int], template: ChatTemplate):
        ranks = _load_bpe_ranks(path)
        n_base = len(ranks)
        self._specials = {tok: n_base + i for i, tok in enumerate(llama4_special_tokens(self.NUM_SPECIAL))}
        self._special_by_id = {i: tok for tok, i in self._specials.items()}
        self._enc = tiktoken.Encoding(
            name=path.name, pat_str=self.PATTERN, mergeable_ranks=ranks, special_tokens=self._specials
        )
        self._byte_to_char, self._char_to_byte = _byte_level_tables()
        super().__init__(config, generation_eos, template)

    def encode(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> list[int]:
        allowed: Any = set() if split_special_tokens else "all"
        ids: list[int] = [self._specials["<|begin_of_text|>"]] if add_special_tokens else []
        for chunk in self._chunks(text):
            ids += self._enc.encode(chunk, allowed_special=allowed, disallowed_special=())
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_by_id]
        return self._enc.decode(list(ids), errors="replace")

    def token_to_id(self, token: str) -> int | None:
        if token in self._specials:
            return self._specials[token]
        try:
            raw = bytes(self._char_to_byte[c] for c in token)
            return self._enc.encode_single_token(raw)
        except KeyError:
            return None

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self._special_by_id:
            return self._special_by_id[token_id]
        try:
            raw = self._enc.decode_single_token_bytes(token_id)
        except KeyError:
            return None
        return "".join(self._byte_to_char[b] for b in raw)

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def all_special_ids(self) -> frozenset[int]:
        return frozenset(self._special_by_id)

    def _chunks(self, text: str) -> Iterator[str]:
        for start in range(0, max(len(text), 1), self.MAX_ENCODE_CHARS):
            chunk = text[start : start + self.MAX_ENCODE_CHARS]
            if self._LONG_RUN.search(chunk):
                yield from _split_long_runs(chunk, self.MAX_RUN_CHARS)
            else:
                yield chunk


def llama4_special_tokens(total: int = 2048) -> list[str]:
    """Llama 4's special tokens in id order (the first is id 200000), padded with reserved tokens."""
    reserved = "<|{}_reserved_special_token_{}|>".format
    tokens = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    tokens += ["<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>"]
    tokens += [reserved("text_post_train", i) for i in range(6)]
    tokens += ["<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>"]
    tokens += [reserved("text_post_train", i) for i in range(8, 69)]
    tokens += ["<|image_start|>", "<|image_end|>", reserved("vision", 0), reserved("vision", 1)]
    tokens += ["<|tile_x_separator|>", "<|tile_y_separator|>"]
    tokens += [reserved("vision", i) for i in range(2, 6)]
    tokens += ["<|image|>", reserved("vision", 6), "<|patch|>"]
    tokens += [reserved("vision", i) for i in range(7, 1048)]
    tokens += [reserved("reasoning", i) for i in range(8)]
    tokens += ["<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
    tokens += [f"<|reserved_special_token_{i}|>" for i in range(total - len(tokens))]
    return tokens


def _load_bpe_ranks(path: Path) -> dict[bytes, int]:
    # One "<base64 token bytes> <rank>" per line; ranks are the token ids.
    ranks: dict[bytes, int] = {}
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    except (UnicodeDecodeError, ValueError) as e:  # e.g. a SentencePiece model, which is binary
        raise ValueError(f"{path} is not a tiktoken BPE file: {e}") from e
    return ranks


def _byte_level_tables() -> tuple[dict[int, str], dict[str, int]]:
    # GPT-2's printable stand-in for every byte: the vocabulary form tokenizer.json uses, so both
    # implementations agree on id_to_token / token_to_id.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_to_char = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in byte_to_char:
            byte_to_char[b] = chr(256 + extra)
            extra += 1
    return byte_to_char, {c: b for b, c in byte_to_char.items()}


def _split_long_runs(text: str, max_run: int) -> Iterator[str]:
    # Same cut points as Meta's tokenizer, so ids stay identical even for pathological inputs.
    run_len, run_is_space, start = 0, text[:1].isspace(), 0
    for i, ch in enumerate(text):
        is_space = ch.isspace()
        if is_space != run_is_space:
            run_len, run_is_space = 1, is_space
        else:
            run_len += 1
            if run_len > max_run:
                yield text[start:i]
                start, run_len = i, 1
    yield text[start:]
