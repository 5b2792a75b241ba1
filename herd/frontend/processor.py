"""A request as the engine core takes it: tokenized, images preprocessed and expanded, checked, fanned out.

`InputProcessor.process` turns a prompt (text, token ids, or a dict with images) and its `SamplingParams`
into one `EngineCoreRequest` per completion (`n` of them), each with its own sampling seed. Everything a
request can get wrong is found here, before anything reaches the core: an empty prompt, token ids outside
the vocabulary, images without a vision tower, more tokens than the context length or the KV cache holds.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from herd.config import ModelConfig
from herd.config.engine import FrontendConfig
from herd.engine.protocol import CoreInfo, EngineCoreRequest
from herd.frontend.images import ExpandedPrompt, ImageInputError, expand_images
from herd.frontend.structured import GrammarCompiler
from herd.frontend.tokenizer import Tokenizer, load_tokenizer
from herd.sampling import SamplingParams

logger = logging.getLogger(__name__)

Prompt = str | list[int] | dict


class RequestError(ValueError):
    """A request the engine cannot take: the message says why and what the limits are."""


@dataclass
class ProcessedRequest:
    request_id: str
    prompt: str | None  # the text, when the prompt was given as text
    prompt_token_ids: list[int]  # as the model sees them (images expanded)
    params: SamplingParams
    core_requests: list[EngineCoreRequest]  # one per completion, ids `<request_id>#<index>`


def load_frontend_tokenizer(config: FrontendConfig) -> Tokenizer | None:
    """The tokenizer, or None (with a warning) when the model folder has none and none was asked for."""
    if config.tokenizer_path is None:
        return None
    try:
        return load_tokenizer(Path(config.tokenizer_path), chat_template=config.chat_template)
    except FileNotFoundError:
        if config.tokenizer_required:
            raise
        logger.warning("no tokenizer in %s: prompts must be token ids and outputs carry no text", config.tokenizer_path)
        return None


def core_request_id(request_id: str, index: int) -> str:
    return f"{request_id}#{index}"


class InputProcessor:
    def __init__(
        self,
        config: FrontendConfig,
        model: ModelConfig,
        tokenizer: Tokenizer | None,
        context_length: int,
        core: CoreInfo,
    ) -> None:
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.context_length = context_length
        self.max_request_tokens = core.max_request_tokens
        self.eos_token_ids = frozenset(tokenizer.eos_token_ids if tokenizer else model.eos_token_ids)
        self._rng = random.Random(config.seed)
        self._grammars: GrammarCompiler | None = None  # built on the first constrained request

    def needs_compile(self, params: SamplingParams | None) -> bool:
        """Whether `process` would compile a grammar it has not cached (slow: run it off the event loop)."""
        if params is None or params.structured is None or params.grammar is not None:
            return False
        return self._grammars is None or self._grammars.cached(params.structured) is None

    def _with_grammar(self, params: SamplingParams) -> SamplingParams:
        """`params` with its `structured` constraint compiled into `grammar` (GrammarError if it cannot be)."""
        if params.structured is None or params.grammar is not None:
            return params
        if self.tokenizer is None:
            raise RequestError("constrained decoding needs a tokenizer, and this engine has none")
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.model.vocab_size, self.eos_token_ids)
        return dataclasses.replace(params, grammar=self._grammars.compile(params.structured))

    def process(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None) -> ProcessedRequest:
        """Check and convert one request; `prompt` is text, token ids or `{"prompt_token_ids": [...]}` /
        `{"prompt": ...}`, optionally with vLLM's `"multi_modal_data": {"image": [PIL images]}` (one
        `<|image|>` placeholder in the prompt per image, in order)."""
        params = params or SamplingParams()
        try:
            params.check_vocab(self.model.vocab_size)
        except ValueError as e:
            raise RequestError(str(e)) from None
        params = self._with_grammar(params)
        vocabulary = self._grammars.vocabulary if params.grammar is not None and self._grammars else None
        text, ids = self._prompt_ids(prompt)
        expanded = self._expand_images(prompt, ids) if isinstance(prompt, dict) else None
        if expanded is not None:
            ids = expanded.token_ids
        self._check_fits(len(ids), params)
        max_tokens = params.max_tokens or self.context_length - len(ids)
        requests = []
        for i in range(params.n):
            seed = params.seed + i if params.seed is not None else self._rng.getrandbits(63)
            core_id = core_request_id(request_id, i)
            images = expanded.images if expanded is not None else None
            if images is not None:
                images.hold(core_id)  # the n sequences share the images, so each is encoded once
            requests.append(
                EngineCoreRequest(
                    request_id=core_id,
                    prompt_token_ids=ids,
                    params=params,
                    seed=seed,
                    max_tokens=max_tokens,
                    eos_token_ids=self.eos_token_ids,
                    images=images,
                    cache_key=expanded.cache_key if expanded is not None else None,
                    grammar_vocabulary=vocabulary,
                )
            )
        return ProcessedRequest(request_id, text, ids, params, requests)

    def _prompt_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise RequestError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this engine has no tokenizer: give prompts as token ids")
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        ids = list(prompt)
        if not ids:
            raise RequestError("the prompt is empty")
        vocab = self.model.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})")
        return None, ids

    def _expand_images(self, prompt: dict, ids: list[int]) -> ExpandedPrompt | None:
        """The prompt with each `<|image|>` placeholder replaced by its image's tokens; None without images."""
        data = prompt.get("multi_modal_data")
        if not data:
            return None
        try:
            return expand_images(data, ids, self.model, self.tokenizer, enabled=self.config.enable_multimodal)
        except ImageInputError as e:
            raise RequestError(str(e)) from None

    def _check_fits(self, prompt_len: int, params: SamplingParams) -> None:
        total = prompt_len + (params.max_tokens or 1)
        if total > self.context_length:
            raise RequestError(
                f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) = {total} "
                f"exceeds the context length ({self.context_length} tokens)"
            )
        if total > self.max_request_tokens:
            raise RequestError(
                f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) = {total} tokens "
                f"cannot fit the KV cache ({self.max_request_tokens} tokens); "
                "raise --max-total-tokens or --mem-fraction-static"
            )
