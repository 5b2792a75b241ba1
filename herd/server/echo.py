"""`echo` on /v1/completions: each choice starts with its prompt, and with `logprobs` the prompt's tokens
carry their logprobs as vLLM returns them (the first token's is null: nothing comes before it).

`max_tokens: 0` with echo scores the prompt without generating: the engine samples one token that the
reply leaves out (lm_eval's loglikelihood requests and other scorers rely on this).
"""

from __future__ import annotations

import math
from typing import Any

from herd.server.logprobs import MIN_LOGPROB, TokenText


class Echo:
    """The prompt part of every choice of one /v1/completions request."""

    def __init__(self, text: TokenText, prompts: list[str | None], prompt_ids: list[list[int]], top_n: int) -> None:
        self.token_text, self.top_n = text, top_n
        self.prompt_ids = prompt_ids
        # A prompt given as token ids is echoed as their text.
        self.prompts = [p if p is not None else _decode(text, ids) for p, ids in zip(prompts, prompt_ids, strict=True)]

    def text(self, prompt_index: int) -> str:
        return self.prompts[prompt_index]

    def logprobs(self, prompt_index: int, scored: list[dict[int, float] | None]) -> tuple[dict[str, Any], int]:
        """The prompt tokens in the completions logprobs layout, and the text offset after them."""
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = 0
        for token_id, entry in zip(self.prompt_ids[prompt_index], scored, strict=True):
            token = self.token_text.text(token_id)
            out["tokens"].append(token)
            out["text_offset"].append(offset)
            offset += len(token)
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(_finite(entry[token_id]))
            top = sorted(entry.items(), key=lambda kv: -kv[1])[: self.top_n]
            out["top_logprobs"].append({self.token_text.text(t): _finite(lp) for t, lp in top})
        return out, offset


def _decode(text: TokenText, ids: list[int]) -> str:
    if text.tokenizer is None:
        return "".join(text.text(t) for t in ids)
    return text.tokenizer.decode(ids)


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else MIN_LOGPROB
