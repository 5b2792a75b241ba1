"""The engine: requests in, tokens out, many at once over the paged hybrid KV cache.

`Engine` is the step-by-step core (`add_request`, `abort`, `step`) that a server drives;
`LLM` is the offline, vLLM-style API on top of it.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from herd.detokenizer import IncrementalDetokenizer
from herd.image_inputs import ExpandedPrompt, ImageInputError, expand_images
from herd.kv_cache import KVCacheManager
from herd.kv_sizing import plan_kv_cache
from herd.layers.attention import PagedKVStorage
from herd.layers.cpu_packing import pack_for_cpu, packing_available
from herd.model_runner import ModelRunner
from herd.models.llama4 import text_model
from herd.models.loader import load_model, resolve_dtype
from herd.prefix_cache import PrefixCache
from herd.sampling import Sampler, SamplingParams, SamplingState
from herd.scheduler import Scheduler, Sequence
from herd.server_args import ServerArgs
from herd.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine cannot take: the message says why and what the limits are."""


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[dict[int, float]] | None = None  # per token: sampled token and top alternatives

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)


@dataclass(eq=False)
class _Request:
    output: RequestOutput
    params: SamplingParams
    seqs: list[Sequence]
    states: list[SamplingState]
    detokenizers: list[IncrementalDetokenizer | None]
    started: bool = False  # has produced its first token


class Engine:
    def __init__(self, args: ServerArgs) -> None:
        self.args = args
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        backend = args.attention_backend or "torch_native"
        self.model = load_model(
            args.model_path,
            dtype=args.dtype,
            device=self.device,
            load_format=args.load_format,
            attention_backend=backend,
            seed=args.seed,
            enable_multimodal=args.enable_multimodal,
        )
        self.config = self.model.config
        weight_bytes = _param_bytes(self.model)
        dtype = resolve_dtype(args.dtype, self.config)
        if packing_available(self.device) and dtype in (torch.bfloat16, torch.float32):
            pack_for_cpu(text_model(self.model))  # the vision tower runs large batches: oneDNN's default suits it
        self.tokenizer = self._load_tokenizer()
        self.context_length = args.context_length or self.config.max_position_embeddings

        plan = plan_kv_cache(args, self.config, dtype, self.device, weight_bytes)
        self.kv = KVCacheManager(plan.num_full_blocks, plan.num_local_blocks, plan.block_size, plan.chunk_size)
        storage = PagedKVStorage(
            self.config,
            num_full_blocks=plan.num_full_blocks,
            num_local_blocks=plan.num_local_blocks,
            block_size=plan.block_size,
            dtype=dtype,
            device=self.device,
        )
        self.prefix_cache = None if args.disable_radix_cache else PrefixCache(self.kv)
        max_running = args.max_running_requests or 128
        # SGLang's -1: no chunking, a whole prompt per step (the context length bounds it).
        prefill_budget = args.chunked_prefill_size if args.chunked_prefill_size > 0 else self.context_length
        self.scheduler = Scheduler(self.kv, self.prefix_cache, max_running, prefill_budget)
        self.runner = ModelRunner(self.model, storage, self.kv, self.device)
        self.sampler = Sampler()
        self.eos_token_ids = set(self.tokenizer.eos_token_ids if self.tokenizer else self.config.eos_token_ids)
        self._requests: dict[str, _Request] = {}
        self._seq_owner: dict[Sequence, tuple[_Request, int]] = {}
        self._rng = random.Random(args.seed)
        logger.info(
            "KV cache: %d full tokens, %d local tokens, page size %d",
            plan.num_full_blocks * plan.block_size,
            plan.num_local_blocks * plan.block_size,
            plan.block_size,
        )

    def _load_tokenizer(self) -> Tokenizer | None:
        if self.args.skip_tokenizer_init:
            return None
        path = Path(self.args.tokenizer_path or self.args.model_path)
        try:
            return load_tokenizer(path, chat_template=self.args.chat_template)
        except FileNotFoundError:
            if self.args.tokenizer_path:
                raise
            logger.warning("no tokenizer in %s: prompts must be token ids and outputs carry no text", path)
            return None

    # -- requests ---------------------------------------------------------------------------------------

    def add_request(
        self, request_id: str, prompt: str | list[int] | dict, params: SamplingParams | None = None
    ) -> None:
        """Queue a request. `prompt` is text, a list of token ids or `{"prompt_token_ids": [...]}`.

        A prompt dict may carry images, vLLM-style: `{"prompt": ..., "multi_modal_data": {"image": [img, ...]}}`
        (PIL images; one `<|image|>` placeholder in the prompt for each, in order).
        """
        params = params or SamplingParams()
        if request_id in self._requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        params.check_vocab(self.config.vocab_size)
        text, ids = self._prompt_ids(prompt)
        expanded = self._expand_images(prompt, ids) if isinstance(prompt, dict) else None
        if expanded is not None:
            ids = expanded.token_ids
        self._check_fits(len(ids), params)
        max_tokens = params.max_tokens or self.context_length - len(ids)
        request = _Request(
            output=RequestOutput(request_id, text, ids, []), params=params, seqs=[], states=[], detokenizers=[]
        )
        for i in range(params.n):
            seq = Sequence(seq_id=f"{request_id}#{i}", prompt_token_ids=list(ids), max_tokens=max_tokens)
            if expanded is not None:  # the n sequences share the images, so each is encoded once
                seq.prompt_key_ids, seq.images = expanded.cache_key, expanded.images
            seed = params.seed + i if params.seed is not None else self._rng.getrandbits(63)
            request.seqs.append(seq)
            request.states.append(SamplingState(params, ids, seed=seed, eos_token_ids=self.eos_token_ids))
            request.detokenizers.append(self._detokenizer(params))
            request.output.outputs.append(CompletionOutput(index=i, text="", token_ids=[]))
            self._seq_owner[seq] = (request, i)
            self.scheduler.add(seq)
        self._requests[request_id] = request

    def _prompt_ids(self, prompt: str | list[int] | dict) -> tuple[str | None, list[int]]:
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
        vocab = self.config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})")
        return None, ids

    def _expand_images(self, prompt: dict, ids: list[int]) -> ExpandedPrompt | None:
        """The prompt with each `<|image|>` placeholder replaced by its image's tokens; None without images."""
        data = prompt.get("multi_modal_data")
        if not data:
            return None
        try:
            return expand_images(data, ids, self.config, self.tokenizer, enabled=self.args.enable_multimodal)
        except ImageInputError as e:
            raise RequestError(str(e)) from None

    def _check_fits(self, prompt_len: int, params: SamplingParams) -> None:
        total = prompt_len + (params.max_tokens or 1)
        if total > self.context_length:
            raise RequestError(
                f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) = {total} "
                f"exceeds the context length ({self.context_length} tokens)"
            )
        capacity = self.kv.full.num_blocks * self.kv.block_size
        if total > capacity:
            raise RequestError(
                f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) = {total} tokens "
                f"cannot fit the KV cache ({capacity} tokens); raise --max-total-tokens or --mem-fraction-static"
            )

    def _detokenizer(self, params: SamplingParams) -> IncrementalDetokenizer | None:
        if self.tokenizer is None:
            return None
        return IncrementalDetokenizer(
            self.tokenizer,
            skip_special_tokens=params.skip_special_tokens,
            stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
        )

    def abort(self, request_id: str) -> None:
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        for seq, out in zip(request.seqs, request.output.outputs, strict=True):
            if not out.finished:
                out.finish_reason = "abort"
                self.scheduler.finish(seq)
            self._seq_owner.pop(seq, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    # -- the loop ---------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one batch; return the requests that made progress (their outputs so far)."""
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            # Nothing runs and nothing can be admitted: add_request's size checks make this a bug.
            if self.scheduler.waiting and not self.scheduler.running:
                raise RuntimeError("scheduler stalled: a waiting request cannot be admitted into an idle engine")
            return []
        logits = self.runner.execute(plan)
        self.scheduler.update(plan)
        sampling = [item.seq for item in plan.scheduled if item.samples]
        states = [self._owner(seq)[0].states[self._owner(seq)[1]] for seq in sampling]
        results = self.sampler(logits, states)
        touched: dict[str, _Request] = {}
        for seq, result in zip(sampling, results, strict=True):
            request, index = self._owner(seq)
            if not request.started:
                request.started = True
                request.output.num_cached_tokens = request.seqs[0].num_cached_tokens
            self._append(request, index, seq, result)
            touched[request.output.request_id] = request
        for request in touched.values():
            images = request.seqs[0].images
            if images is not None and all(s.output_token_ids for s in request.seqs):
                images.drop_features()  # every sequence is past its prompt (recomputed after preemption: re-encoded)
            if request.output.finished:
                self._requests.pop(request.output.request_id, None)
                for seq in request.seqs:
                    self._seq_owner.pop(seq, None)
        return [r.output for r in touched.values()]

    def _owner(self, seq: Sequence) -> tuple[_Request, int]:
        return self._seq_owner[seq]

    def _append(self, request: _Request, index: int, seq: Sequence, result) -> None:
        token = result.token_id
        out, state, detok = request.output.outputs[index], request.states[index], request.detokenizers[index]
        params = request.params
        seq.output_token_ids.append(token)
        state.append_token(token)
        out.token_ids.append(token)
        if params.logprobs is not None:
            out.logprobs = out.logprobs or []
            out.logprobs.append({token: result.logprob, **dict(result.top_logprobs or [])})
        n_out = len(seq.output_token_ids)
        reason, stop = None, None
        if n_out >= params.min_tokens and (
            token in (params.stop_token_ids or ()) or (not params.ignore_eos and token in self.eos_token_ids)
        ):
            reason, stop = "stop", token  # a stop token ends the text without adding to it
        elif detok is not None:
            out.text += detok.add_token(token)
            if detok.stopped:
                reason, stop = "stop", detok.stop_string
        if reason is None and (n_out >= seq.max_tokens or seq.num_tokens >= self.context_length):
            reason = "length"
        if reason is None:
            return
        if detok is not None and not detok.stopped:
            out.text += detok.finish()  # text held back in case a stop string was starting
        out.finish_reason, out.stop_reason = reason, stop
        self.scheduler.finish(seq)

    # -- introspection (metrics, tests) -----------------------------------------------------------------

    def num_running(self) -> int:
        return len(self.scheduler.running)

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
