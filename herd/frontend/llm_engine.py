"""`LLMEngine`: the frontend and the engine core in one thread, stepped by the caller (what `LLM` runs on).

`add_request` checks and tokenizes a request and hands it to the core; each `step()` runs one batch and
returns the requests that made progress, with everything they produced so far.
"""

from __future__ import annotations

from herd.config import ModelConfig
from herd.config.engine import HerdConfig
from herd.engine import EngineCore
from herd.frontend.output_processor import OutputProcessor
from herd.frontend.outputs import CompletionOutput, RequestOutput
from herd.frontend.processor import InputProcessor, Prompt, RequestError, load_frontend_tokenizer
from herd.frontend.tokenizer import Tokenizer
from herd.sampling import SamplingParams


class LLMEngine:
    def __init__(self, config: HerdConfig) -> None:
        self.tokenizer: Tokenizer | None = load_frontend_tokenizer(config.frontend)
        self.core = EngineCore(config.engine)
        self.config: ModelConfig = config.engine.model
        self.context_length = config.engine.scheduler.context_length
        self.processor = InputProcessor(
            config.frontend, self.config, self.tokenizer, self.context_length, self.core.info
        )
        self.outputs = OutputProcessor(self.tokenizer)
        self._results: dict[str, RequestOutput] = {}

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None) -> None:
        """Queue a request (see `InputProcessor.process` for the prompt's forms); RequestError if it cannot run."""
        if request_id in self._results:
            raise RequestError(f"request id {request_id!r} is already in use")
        request = self.processor.process(request_id, prompt, params)
        self.core.add_requests(request.core_requests)
        self.outputs.add(request)
        completions = [CompletionOutput(index=i) for i in range(request.params.n)]
        self._results[request_id] = RequestOutput(request_id, request.prompt, request.prompt_token_ids, completions)

    def abort(self, request_id: str) -> None:
        result = self._results.pop(request_id, None)
        if result is None:
            return
        self.core.abort_requests(self.outputs.abort(request_id))
        for completion in result.outputs:
            if not completion.finished:
                completion.finish_reason = "abort"

    def step(self) -> list[RequestOutput]:
        """Run one batch; return the requests that made progress (everything each produced so far)."""
        deltas, stopped = self.outputs.process(self.core.step())
        self.core.abort_requests(stopped)
        progressed = []
        for delta in deltas:
            result = self._results[delta.request_id]
            result.add(delta)
            if delta.finished:
                del self._results[delta.request_id]
            progressed.append(result)
        return progressed

    def has_unfinished_requests(self) -> bool:
        return bool(self._results)

    def num_running(self) -> int:
        return len(self.core.scheduler.running)

    def num_waiting(self) -> int:
        return len(self.core.scheduler.waiting)
