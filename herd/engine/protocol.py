"""What crosses between the frontend and the engine core: token ids in, new token ids out.

The frontend turns a request into one `EngineCoreRequest` per completion (n of them for `n > 1`), with
its prompt already tokenized and its images preprocessed. Every step the core answers with one
`EngineCoreOutput` per sequence that produced tokens: only the new ones, so a message's size does not grow
with the length of the output. Text, stop strings and response formats are the frontend's business.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from herd.multimodal import RequestImages
from herd.sampling import SamplingParams
from herd.sampling.grammar import GrammarVocabulary


@dataclass
class EngineCoreRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # of this sequence's sampling generator
    max_tokens: int  # resolved: the request's max_tokens, or what the context length leaves
    eos_token_ids: frozenset[int]  # end the sequence (unless params.ignore_eos), after params.min_tokens
    images: RequestImages | None = None
    cache_key: list[int] | None = None  # the prompt as the prefix cache keys it, when images stand in it
    # The vocabulary params.grammar was compiled against. A process client sends each one once and strips
    # it from later requests (it is ~7 MB for Llama 4); the core registers it before the request's grammar.
    grammar_vocabulary: GrammarVocabulary | None = None


@dataclass
class EngineCoreOutput:
    request_id: str
    new_token_ids: list[int]
    # Per new token: {sampled id: logprob, then the top alternatives}; None unless params.logprobs is set.
    new_logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop" (a stop token) or "length"; the core never matches text
    stop_reason: int | None = None  # the stop token that ended it
    num_cached_tokens: int = 0  # prompt tokens the prefix cache served
    # With params.prompt_logprobs, on the sequence's first output: per prompt position, {token: logprob, top
    # alternatives...} of that token given the ones before it; None at position 0 (nothing comes before it).
    prompt_logprobs: list[dict[int, float] | None] | None = None


@dataclass(frozen=True)
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0  # share of the full-attention pool held by requests (running or being prefilled)
    # Share of the full pool that only the prefix cache holds: free for the taking (evicted on demand).
    kv_cached_usage: float = 0.0
    prefix_hit_rate: float = 0.0
    num_preemptions: int = 0  # since start: sequences whose blocks were taken back to make room
    # Speculative decoding, since start: decode steps of a sequence (verify steps) and the tokens they added.
    spec_verify_ct: int = 0
    spec_accepted_tokens: int = 0

    @property
    def spec_accept_length(self) -> float:
        """Mean tokens per verify step (SGLang's avg_spec_accept_length); 0.0 without speculation."""
        return self.spec_accepted_tokens / self.spec_verify_ct if self.spec_verify_ct else 0.0


@dataclass(frozen=True)
class CoreInfo:
    """What the frontend needs to know of a started core to check requests before sending them."""

    max_request_tokens: int  # prompt + output of one sequence that the full KV pool can hold


@dataclass
class CoreMessage:
    """Everything the core has to say after handling a batch of commands and (maybe) running a step."""

    outputs: list[EngineCoreOutput] = field(default_factory=list)
    stats: EngineStats = field(default_factory=EngineStats)
    replies: list[tuple[int, Any, BaseException | None]] = field(default_factory=list)  # (call id, result, error)
    failed: list[tuple[list[str], BaseException]] = field(default_factory=list)  # requests the core refused
    dead: BaseException | None = None  # the core stopped: nothing more will come
    nbytes: int = 0  # its size on the pipe, set by the receiving client (0 in process)
