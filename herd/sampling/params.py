"""`SamplingParams`: what a request asks of the sampler and of the stop logic, with vLLM's names and defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from herd.sampling.grammar import GrammarBlob, StructuredOutput

# Below this temperature a request is greedy, as in vLLM: dividing logits by ~0 would only overflow.
GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs
MAX_STOP_STRINGS = 64  # every output token is matched against each: a bound on what a request costs


@dataclass(frozen=True)
class SamplingParams:
    """Sampling and stopping parameters of one request (vLLM's names, defaults and accepted ranges).

    Invalid values raise `ValueError` naming the parameter, the value and the accepted range.
    Normalised on construction: `top_k=-1` becomes 0 (both mean off), `stop` and `stop_token_ids`
    become lists, `logit_bias` keys become ints (JSON gives them as strings).
    """

    n: int = 1
    temperature: float = 1.0  # 0 (below 1e-5) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # over prompt + output tokens
    presence_penalty: float = 0.0  # over output tokens
    frequency_penalty: float = 0.0  # over output tokens
    max_tokens: int | None = 16
    min_tokens: int = 0  # EOS and stop_token_ids cannot be sampled before this many tokens
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # top-N alternatives per token; 0 = only the sampled token's logprob
    # Logprobs of the prompt's tokens (each given the tokens before it), with top-N alternatives; None = off.
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Constrained decoding: what the client asked for, and (set by the frontend, which compiles it)
    # the compiled grammar the engine masks with.
    structured: StructuredOutput | None = None
    grammar: GrammarBlob | None = None

    def __post_init__(self) -> None:
        _check_int("n", self.n, lo=1)
        _check_range("temperature", self.temperature, ">= 0", lambda v: v >= 0)
        _check_range("top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1)
        if not _is_int(self.top_k) or not (self.top_k in (-1, 0) or self.top_k >= 1):
            raise ValueError(f"top_k must be -1 or 0 (off) or >= 1, got {self.top_k!r}")
        _check_range("min_p", self.min_p, "in [0, 1]", lambda v: 0 <= v <= 1)
        _check_range("repetition_penalty", self.repetition_penalty, "> 0", lambda v: v > 0)
        _check_range("presence_penalty", self.presence_penalty, "in [-2, 2]", lambda v: -2 <= v <= 2)
        _check_range("frequency_penalty", self.frequency_penalty, "in [-2, 2]", lambda v: -2 <= v <= 2)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, lo=1, none_ok=True)
        _check_int("min_tokens", self.min_tokens, lo=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, lo=0, hi=MAX_LOGPROBS, none_ok=True)
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, lo=0, hi=MAX_LOGPROBS, none_ok=True)
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        # A frozen dataclass can still normalise its own fields once, here.
        set_ = object.__setattr__
        if self.top_k == -1:
            set_(self, "top_k", 0)
        set_(self, "temperature", float(self.temperature))
        set_(self, "stop", _stop_strings(self.stop))
        set_(self, "stop_token_ids", _token_ids("stop_token_ids", self.stop_token_ids))
        set_(self, "logit_bias", _logit_bias(self.logit_bias))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    def check_vocab(self, vocab_size: int) -> None:
        """Raise `ValueError` if a token id in `stop_token_ids` or `logit_bias` is outside [0, vocab_size).

        The engine calls this when a request arrives: the sampler, which runs a whole batch, would
        rather not fail on one request's bad id (it ignores out-of-range ids).
        """
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", self.logit_bias)):
            bad = [i for i in ids or () if i >= vocab_size]
            if bad:
                raise ValueError(f"{name} token ids must be in [0, {vocab_size}), got {bad[0]}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_int(name: str, v: Any, *, lo: int, hi: int | None = None, none_ok: bool = False) -> None:
    accepted = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
    if none_ok:
        accepted += " or None"
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        raise ValueError(f"{name} must be {accepted}, got {v!r}")


def _check_range(name: str, v: Any, accepted: str, ok: Any) -> None:
    # `not ok(v)` rather than a negated comparison so that NaN (every comparison false) is rejected.
    if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v) or not ok(v):
        raise ValueError(f"{name} must be {accepted}, got {v!r}")


def _stop_strings(stop: Any) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) for s in stops):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"stop must hold at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
    return [s for s in stops if s]  # an empty stop string would match everywhere; it means nothing


def _token_ids(name: str, ids: Any) -> list[int]:
    ids = list(ids or [])
    if not all(_is_int(i) and i >= 0 for i in ids):
        raise ValueError(f"{name} must be a list of token ids (integers >= 0), got {ids!r}")
    return ids


def _logit_bias(bias: Any) -> dict[int, float]:
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must be a dict of token id -> bias, got {bias!r}")
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token = int(key)  # JSON object keys are strings: "50256" -> 50256
        except (TypeError, ValueError):
            token = -1
        if isinstance(key, bool | float) or token < 0:
            raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {key!r}")
        _check_range(f"logit_bias[{key!r}]", value, "in [-100, 100]", lambda v: -100 <= v <= 100)
        out[token] = float(value)
    return out
