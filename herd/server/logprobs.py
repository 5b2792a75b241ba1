"""Token logprobs in OpenAI's two layouts: chat (`logprobs.content[]`) and completions (parallel lists)."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

from herd.frontend.tokenizer import Tokenizer

MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM writes this for tokens that cannot be sampled


class TokenText:
    """The text and UTF-8 bytes of single tokens. A token may hold part of a character: its text then shows
    U+FFFD and its bytes are the truth."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self.text = lru_cache(maxsize=65536)(self._text)
        self.bytes = lru_cache(maxsize=65536)(self._bytes)

    def _text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])

    def _bytes(self, token_id: int) -> list[int]:
        if self.tokenizer is None or token_id in self.tokenizer.all_special_ids:
            return list(self._text(token_id).encode())
        # Byte-level BPE: the vocabulary form maps each byte to one printable character (GPT-2's table).
        form = self.tokenizer.id_to_token(token_id) or ""
        try:
            return [_CHAR_TO_BYTE[c] for c in form]
        except KeyError:
            return list(self._text(token_id).encode())


def _byte_level_table() -> dict[str, int]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    extra = (b for b in range(256) if b not in printable)
    table |= {chr(256 + i): b for i, b in enumerate(extra)}
    return table


_CHAR_TO_BYTE = _byte_level_table()


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


def _top(entry: dict[int, float], n: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: -kv[1])[:n]


def chat_logprobs(
    text: TokenText, token_ids: list[int], logprobs: list[dict[int, float]], top_n: int
) -> list[dict[str, Any]]:
    """`choices[].logprobs.content` entries for these tokens."""

    def item(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": text.text(token_id), "logprob": _finite(logprob), "bytes": text.bytes(token_id)}

    return [
        {**item(tid, entry[tid]), "top_logprobs": [item(t, lp) for t, lp in _top(entry, top_n)]}
        for tid, entry in zip(token_ids, logprobs, strict=True)
    ]


class CompletionLogprobs:
    """`choices[].logprobs` of /v1/completions for one choice, built up delta by delta."""

    def __init__(self, text: TokenText, top_n: int) -> None:
        self.text, self.top_n, self.offset = text, top_n, 0

    def add(self, token_ids: list[int], logprobs: list[dict[int, float]]) -> dict[str, Any]:
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, entry in zip(token_ids, logprobs, strict=True):
            token = self.text.text(tid)
            out["tokens"].append(token)
            out["token_logprobs"].append(_finite(entry[tid]))
            out["top_logprobs"].append({self.text.text(t): _finite(lp) for t, lp in _top(entry, self.top_n)})
            out["text_offset"].append(self.offset)
            self.offset += len(token)
        return out


def merge_completion_logprobs(parts: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for part in parts:
        for key in merged:
            merged[key] += part[key]
    return merged
