"""What a request produces, as deltas (streaming) and accumulated (vLLM's `RequestOutput`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionDelta:
    """What one of a request's n completions produced since the previous delta."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None  # per new token: {sampled id: logprob, alternatives...}
    finish_reason: str | None  # "stop", "length", "abort"; set on the completion's last delta
    stop_reason: int | str | None  # the stop token id or stop string that ended it


@dataclass
class RequestDelta:
    request_id: str
    num_prompt_tokens: int
    num_cached_tokens: int
    outputs: list[CompletionDelta]
    finished: bool  # every completion of the request is finished
    # With params.prompt_logprobs, on the delta that first carries it: per prompt token, None for the first.
    prompt_logprobs: list[dict[int, float] | None] | None = None


@dataclass
class CompletionOutput:
    """One completion so far: its tokens, text, logprobs and, once finished, why it ended."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[dict[int, float]] | None = None  # per token: sampled token and top alternatives
    _text: list[str] = field(default_factory=list, repr=False)  # parts: appending a delta must not copy it all

    @property
    def text(self) -> str:
        if len(self._text) > 1:
            self._text[:] = ["".join(self._text)]
        return self._text[0] if self._text else ""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, delta: CompletionDelta) -> None:
        if delta.text:
            self._text.append(delta.text)
        self.token_ids += delta.token_ids
        if delta.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs += delta.logprobs
        self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    prompt_logprobs: list[dict[int, float] | None] | None = None  # vLLM's: per prompt token, None for the first

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)

    def add(self, delta: RequestDelta) -> None:
        self.num_cached_tokens = delta.num_cached_tokens
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        for d in delta.outputs:
            self.outputs[d.index].add(d)
