"""`LLM`: offline batch generation, with vLLM's interface."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from tqdm import tqdm

from herd.config.server_args import ArgumentError, ServerArgs
from herd.frontend.llm_engine import LLMEngine
from herd.frontend.outputs import RequestOutput
from herd.frontend.processor import RequestError
from herd.frontend.tokenizer import Tokenizer
from herd.sampling import SamplingParams

Prompt = str | dict | list[int]


class LLM:
    """Load a model once, then generate for many prompts at a time.

    `LLM("path/to/checkpoint", chunked_prefill_size=512, dtype="bfloat16")`: keyword arguments are
    the server's flags in snake_case (see `ServerArgs`).
    """

    def __init__(self, model: str, **kwargs: object) -> None:
        unknown = set(kwargs) - ServerArgs.field_names()
        if unknown:
            raise ArgumentError(f"unknown engine argument(s): {', '.join(sorted(unknown))}")
        args = ServerArgs(model_path=model, **kwargs)  # type: ignore[arg-type]
        self.engine = LLMEngine(args.to_config())
        self._ids = itertools.count()

    def get_tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text, `{"prompt_token_ids": [...]}`); outputs in prompt order.

        A dict prompt may carry images: `{"prompt": "... <|image|> ...", "multi_modal_data": {"image": [img]}}`,
        PIL images, one `<|image|>` placeholder per image (needs `enable_multimodal=True`).
        """
        if isinstance(prompts, str | dict) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise RequestError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
        order = []
        try:
            for prompt, params in zip(prompts, params_list, strict=True):
                request_id = str(next(self._ids))
                self.engine.add_request(request_id, prompt, params)
                order.append(request_id)
            return self._run(order, use_tqdm)
        except BaseException:
            for request_id in order:
                self.engine.abort(request_id)
            raise

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, formatted by the chat template.

        Content parts `{"type": "image", "image": <PIL image>}` are images, in the order they appear.
        """
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise RequestError("chat needs a tokenizer, and this model folder has none")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conv in conversations:
            ids = tokenizer.apply_chat_template(
                conv, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=True
            )
            images = _images(conv)
            prompts.append({"prompt_token_ids": ids, **({"multi_modal_data": {"image": images}} if images else {})})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, order: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(order), desc="Generating", unit="req", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished and out.request_id not in done:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[request_id] for request_id in order]


def _images(conversation: list[dict]) -> list[object]:
    """The images of a conversation's `{"type": "image", "image": ...}` content parts, in order."""
    return [
        part["image"]
        for message in conversation
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, dict) and part.get("type") == "image" and "image" in part
    ]
