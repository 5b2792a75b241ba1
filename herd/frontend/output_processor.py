"""The engine core's new tokens, turned into each request's deltas: text, stop strings, logprobs, n.

Per completion an `IncrementalDetokenizer` decodes only a window of recent tokens, so a step costs the
same at output token 16,000 as at token 16. A stop string ends a completion here (the core only knows
stop tokens); the caller then aborts its core sequence (`process` returns those ids).
"""

from __future__ import annotations

from dataclasses import dataclass

from herd.engine.protocol import EngineCoreOutput
from herd.frontend.detokenizer import IncrementalDetokenizer
from herd.frontend.outputs import CompletionDelta, RequestDelta
from herd.frontend.processor import ProcessedRequest, core_request_id
from herd.frontend.tokenizer import Tokenizer


@dataclass(eq=False)
class _Completion:
    core_id: str
    detokenizer: IncrementalDetokenizer | None
    finished: bool = False


@dataclass(eq=False)
class _Request:
    request_id: str
    num_prompt_tokens: int
    completions: list[_Completion]
    num_cached_tokens: int = 0


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self._requests: dict[str, _Request] = {}
        self._by_core_id: dict[str, tuple[_Request, int]] = {}

    def add(self, request: ProcessedRequest) -> None:
        params = request.params
        completions = []
        for i in range(params.n):
            detokenizer = None
            if self.tokenizer is not None:
                detokenizer = IncrementalDetokenizer(
                    self.tokenizer,
                    skip_special_tokens=params.skip_special_tokens,
                    stop=params.stop,
                    include_stop_str_in_output=params.include_stop_str_in_output,
                )
            completions.append(_Completion(core_request_id(request.request_id, i), detokenizer))
        state = _Request(request.request_id, len(request.prompt_token_ids), completions)
        self._requests[request.request_id] = state
        for i, completion in enumerate(completions):
            self._by_core_id[completion.core_id] = (state, i)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_sequences(self) -> int:
        """Completions of requests not yet finished (what the engine runs or queues)."""
        return len(self._by_core_id)

    def abort(self, request_id: str) -> list[str]:
        """Forget a request; returns the core ids of its unfinished completions (for the core to abort)."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return []
        for completion in state.completions:
            self._by_core_id.pop(completion.core_id, None)
        return [c.core_id for c in state.completions if not c.finished]

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestDelta], list[str]]:
        """Deltas of the requests that made progress, and the core ids to abort (ended by a stop string)."""
        deltas: dict[str, RequestDelta] = {}
        to_abort: list[str] = []
        for out in outputs:
            owner = self._by_core_id.get(out.request_id)
            if owner is None:  # aborted here while the core was still running it
                continue
            state, index = owner
            completion = state.completions[index]
            if completion.finished:  # by a stop string, while the core ran one more step of it
                continue
            delta = self._completion_delta(completion, index, out)
            if completion.finished and out.finish_reason is None:
                to_abort.append(completion.core_id)
            if index == 0:
                state.num_cached_tokens = out.num_cached_tokens
            if state.request_id not in deltas:
                deltas[state.request_id] = RequestDelta(
                    state.request_id, state.num_prompt_tokens, state.num_cached_tokens, [], finished=False
                )
            deltas[state.request_id].outputs.append(delta)
            if out.prompt_logprobs is not None:  # each of the n completions scores the same prompt: any will do
                deltas[state.request_id].prompt_logprobs = out.prompt_logprobs
        for request_id, request_delta in deltas.items():
            state = self._requests[request_id]
            request_delta.num_cached_tokens = state.num_cached_tokens
            if all(c.finished for c in state.completions):
                request_delta.finished = True
                self.abort(request_id)
        return list(deltas.values()), to_abort

    def _completion_delta(self, completion: _Completion, index: int, out: EngineCoreOutput) -> CompletionDelta:
        detokenizer = completion.detokenizer
        reason, stop = out.finish_reason, out.stop_reason
        text = ""
        token_ids, logprobs = list(out.new_token_ids), out.new_logprobs
        if detokenizer is not None:
            # A stop token ends the text without adding to it.
            ids = out.new_token_ids[:-1] if reason == "stop" else out.new_token_ids
            if len(ids) > 1 and detokenizer.has_stop_strings:
                # Several tokens in one step (speculative decoding): those after a stop string's end are not
                # output, as they would not be had the tokens come one step at a time.
                text, n = "", 0
                while n < len(ids) and not detokenizer.stopped:
                    text += detokenizer.add_tokens(ids[n : n + 1])
                    n += 1
                if detokenizer.stopped:
                    token_ids = token_ids[:n]
                    logprobs = logprobs[:n] if logprobs is not None else None
            else:
                text = detokenizer.add_tokens(ids) if ids else ""
            if detokenizer.stopped:
                reason, stop = "stop", detokenizer.stop_string
            elif reason is not None:
                text += detokenizer.finish()  # text held back in case a stop string was starting
        completion.finished = reason is not None
        return CompletionDelta(index, text, token_ids, logprobs, reason, stop)
