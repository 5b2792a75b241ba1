"""Every engine and server option, in one dataclass, and how it becomes the frozen configs.

Field names are the CLI flags in snake_case (`--chunked-prefill-size` is `chunked_prefill_size`)
and follow SGLang's names and meanings where SGLang has the option; `LLM(model, **kwargs)`
takes the same names. The entry points turn a `ServerArgs` into a `HerdConfig` (`to_config`) and pass
only that down.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from herd.config.engine import (
    ATTENTION_BACKENDS,
    DEFAULT_MAX_RUNNING_REQUESTS,
    DTYPES,
    LOAD_FORMATS,
    QUANTIZATIONS,
    CacheConfig,
    DeviceConfig,
    EngineConfig,
    FrontendConfig,
    HerdConfig,
    LoadConfig,
    ParallelConfig,
    SchedulerConfig,
    ServerConfig,
    SpeculativeConfig,
    default_attention_backend,
)
from herd.config.fields import ArgumentError
from herd.config.model import ModelConfig
from herd.config.speculative import speculative_config
from herd.demo import DRAFT_PATH as DEMO_DRAFT_PATH
from herd.demo import MODEL_NAME as DEMO_MODEL_NAME
from herd.demo import MODEL_PATH as DEMO_MODEL_PATH

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# The frontend's tool-call parsers (herd.frontend.tool_parser.TOOL_PARSERS has one for each name).
TOOL_CALL_PARSERS = ("llama4", "pythonic", "llama4_pythonic", "json", "llama4_json", "llama3_json")
DEFAULT_TOOL_CALL_PARSER = "llama4"  # herd serves Llama 4 only: read both shapes it writes calls in

# SGLang flags for features herd does not have yet, with the value that means "off". Setting one fails at
# start: a command line copied from SGLang must not silently run something else than it asks for.
NOT_YET: dict[str, Any] = {
    "kv_cache_dtype": "auto",
    "dp_size": 1,
    "lora_paths": None,
}


@dataclass
class ServerArgs:
    model_path: str = field(
        default=str(DEMO_MODEL_PATH),
        metadata={"aliases": ("--model",), "help": "checkpoint folder (Hugging Face layout); default: the demo model"},
    )
    tokenizer_path: str | None = None
    skip_tokenizer_init: bool = False
    chat_template: str | None = None
    dtype: str = "auto"
    load_format: str = "auto"
    # w8a16: INT8 weights (per output channel) made from a full-precision checkpoint at load (SGLang's flag);
    # w8a8_int8: the same weights with activations quantized to INT8 per token (herd.layers.quantization.w8a8_int8).
    quantization: str | None = None
    device: str | None = None  # None: cuda when available, else cpu
    attention_backend: str | None = None  # None: chosen by hardware
    context_length: int | None = None
    # Memory: share of the device's memory for weights + KV cache (on CPU: of `cpu_memory_budget_gb`),
    # or an explicit number of full-attention KV tokens.
    mem_fraction_static: float | None = None
    cpu_memory_budget_gb: float = 8.0
    max_total_tokens: int | None = None
    swa_full_tokens_ratio: float = 0.8
    hybrid_kvcache_ratio: float | None = field(
        default=None,
        metadata={
            "nargs": "?",
            "const": 0.5,
            "help": "SGLang's older knob for --swa-full-tokens-ratio, in [0, 1] (bare flag: 0.5): 0 gives the local "
            "layers as many KV tokens as the global ones, 1 gives them attention_chunk_size / context_length "
            "of them; when given it sets --swa-full-tokens-ratio",
        },
    )
    page_size: int = 16
    max_running_requests: int | None = None
    max_queued_requests: int | None = field(
        default=None,
        metadata={"help": "most requests waiting beyond the running ones; more get 503 + Retry-After (SGLang's)"},
    )
    chunked_prefill_size: int = field(default=8192, metadata={"help": "prompt tokens per step; -1: no chunking"})
    disable_radix_cache: bool = False
    enable_torch_compile: bool = field(
        default=False, metadata={"help": "compile the decode step with torch.compile (slow start, faster steps)"}
    )
    cuda_graph_max_bs: int = field(
        default=256, metadata={"help": "capture decode CUDA graphs for batches up to this size (GPU, triton backend)"}
    )
    disable_cuda_graph: bool = field(default=False, metadata={"help": "run decode steps eagerly on the GPU"})
    seed: int = field(default=0, metadata={"aliases": ("--random-seed",)})
    # -- server -------------------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 30000
    tp_size: int = field(default=1, metadata={"aliases": ("--tp",), "help": "tensor parallel size: ranks (processes)"})
    ep_size: int = field(
        default=1, metadata={"aliases": ("--ep",), "help": "expert parallel size: whole experts on tp/ep ranks each"}
    )
    nnodes: int = field(default=1, metadata={"help": "nodes the --tp-size ranks are spread over"})
    node_rank: int = field(default=0, metadata={"help": "this node's rank; node 0 runs the server"})
    dist_init_addr: str | None = field(
        default=None, metadata={"help": "host:port of node 0 where the ranks meet (needed with --nnodes above 1)"}
    )
    served_model_name: str | None = field(
        default=None, metadata={"help": "model id in the API (default: the model folder's name; demo: herd-demo)"}
    )
    api_key: str | None = field(default=None, metadata={"help": "require `Authorization: Bearer KEY`"})
    tool_call_parser: str | None = field(
        default=None, metadata={"help": "tool-call format of the model's output (default: llama4, both shapes)"}
    )
    tool_call_constraint: str = field(
        default="on",
        metadata={"help": "on: with tool_choice auto, a call the model opens must name an offered tool (off: free)"},
    )
    enable_multimodal: bool = False
    allowed_local_media_path: str | None = field(
        default=None, metadata={"help": "let requests name image files under this folder (vLLM's flag; off by default)"}
    )
    # Neither SGLang nor vLLM has a flag for this (SGLang reads SGLANG_REQ_WAITING_TIMEOUT and
    # SGLANG_REQ_RUNNING_TIMEOUT from the environment): herd takes the plain name.
    request_timeout: float | None = field(
        default=None,
        metadata={"help": "seconds a request may take from arrival to its last token; beyond: 504, its KV freed"},
    )
    graceful_shutdown_timeout: float = field(
        default=30.0, metadata={"help": "seconds SIGTERM / SIGINT wait for requests in flight before stopping"}
    )
    max_request_body_bytes: int = field(
        default=64 * 1024 * 1024, metadata={"help": "largest request body (images as base64 included); more: 413"}
    )
    max_images_per_request: int = field(default=10, metadata={"help": "most images one request may carry"})
    allowed_media_domains: list[str] | None = field(
        default=None,
        metadata={
            "nargs": "+",
            "help": "the only hosts image URLs may name (vLLM's flag); default: any host with a public address "
            "(loopback, private, link-local and metadata addresses are refused)",
        },
    )
    media_fetch_timeout: float = field(default=10.0, metadata={"help": "seconds to download one image URL"})
    max_media_bytes: int = field(default=32 * 1024 * 1024, metadata={"help": "largest image file, in bytes"})
    max_image_pixels: int = field(default=8192 * 8192, metadata={"help": "largest image, width x height"})
    trust_remote_code: bool = field(default=False, metadata={"help": "accepted for SGLang compatibility; no effect"})
    enable_metrics: bool = field(default=False, metadata={"help": "accepted for SGLang compatibility: always on"})
    log_level: str | None = field(default=None, metadata={"help": "default: info for serve, warning for generate"})
    # -- speculative decoding (herd.config.speculative) ------------------------------------------------------
    speculative_algorithm: str | None = field(default=None, metadata={"help": "EAGLE3 (or EAGLE) or NGRAM"})
    speculative_draft_model_path: str | None = None
    speculative_num_steps: int | None = None
    speculative_eagle_topk: int | None = None
    speculative_num_draft_tokens: int | None = None
    speculative_ngram_min_match_window_size: int = 1
    speculative_ngram_max_match_window_size: int = 12
    speculative_demo_draft: bool = field(
        default=False, metadata={"help": "EAGLE3 with the draft trained for the demo model (herd/demo/draft)"}
    )
    # -- not supported yet (see NOT_YET) --------------------------------------------------------------------
    kv_cache_dtype: str = "auto"
    dp_size: int = field(default=1, metadata={"aliases": ("--dp",)})
    lora_paths: str | None = None

    def __post_init__(self) -> None:
        self._check_not_yet()
        self._check_speculative()
        self._check_parallel()
        self._check_server()
        self._check_choice("dtype", ("auto", *DTYPES))
        self._check_choice("load_format", LOAD_FORMATS)
        if self.attention_backend is not None:
            self._check_choice("attention_backend", ATTENTION_BACKENDS)
            on_cpu = self.device == "cpu" or (self.device is None and not torch.cuda.is_available())
            if self.attention_backend == "triton" and on_cpu and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
                raise ArgumentError(
                    "--attention-backend triton needs a CUDA GPU (on the CPU it runs only under TRITON_INTERPRET=1, "
                    "for tests); use torch_native on the CPU"
                )
        if self.device is not None:
            self._check_choice("device", ("cpu", "cuda"))
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ArgumentError(
                f"--quantization {self.quantization!r}: not supported yet; supported: {', '.join(QUANTIZATIONS)}"
            )
        if self.max_queued_requests is not None and (
            not isinstance(self.max_queued_requests, int) or self.max_queued_requests < 0
        ):
            raise ArgumentError(f"--max-queued-requests must be 0 or more, got {self.max_queued_requests!r}")
        for name in ("context_length", "max_total_tokens", "max_running_requests", "cuda_graph_max_bs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ArgumentError(f"{_flag(name)} must be a positive integer, got {value!r}")
        if not isinstance(self.page_size, int) or self.page_size < 1:
            raise ArgumentError(f"--page-size must be a positive integer, got {self.page_size!r}")
        if not isinstance(self.chunked_prefill_size, int) or not (
            self.chunked_prefill_size >= 1 or self.chunked_prefill_size == -1
        ):
            raise ArgumentError(
                "--chunked-prefill-size must be a positive integer or -1 (no chunking), "
                f"got {self.chunked_prefill_size!r}"
            )
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static <= 1:
            raise ArgumentError(f"--mem-fraction-static must be in (0, 1], got {self.mem_fraction_static}")
        if not (self.swa_full_tokens_ratio > 0 and math.isfinite(self.swa_full_tokens_ratio)):
            raise ArgumentError(f"--swa-full-tokens-ratio must be a positive number, got {self.swa_full_tokens_ratio}")
        if self.hybrid_kvcache_ratio is not None and not 0 <= self.hybrid_kvcache_ratio <= 1:
            raise ArgumentError(f"--hybrid-kvcache-ratio must be in [0, 1], got {self.hybrid_kvcache_ratio}")
        if self.cpu_memory_budget_gb <= 0:
            raise ArgumentError(f"--cpu-memory-budget-gb must be positive, got {self.cpu_memory_budget_gb}")

    def _check_not_yet(self) -> None:
        for name, off in NOT_YET.items():
            value = getattr(self, name)
            if value != off:
                raise ArgumentError(f"{_flag(name)} {value!r}: not supported yet")

    def _check_speculative(self) -> SpeculativeConfig:
        algorithm, path = self.speculative_algorithm, self.speculative_draft_model_path
        if self.speculative_demo_draft:
            if (algorithm or "EAGLE3").upper() not in ("EAGLE3", "EAGLE") or path not in (None, str(DEMO_DRAFT_PATH)):
                raise ArgumentError(
                    f"--speculative-demo-draft is EAGLE3 with {DEMO_DRAFT_PATH}; it conflicts with "
                    f"--speculative-algorithm {algorithm} --speculative-draft-model-path {path}"
                )
            algorithm, path = "EAGLE3", str(DEMO_DRAFT_PATH)
        return speculative_config(
            algorithm,
            path,
            self.speculative_num_steps,
            self.speculative_eagle_topk,
            self.speculative_num_draft_tokens,
            self.speculative_ngram_min_match_window_size,
            self.speculative_ngram_max_match_window_size,
        )

    def _check_parallel(self) -> None:
        for name in ("tp_size", "ep_size", "nnodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ArgumentError(f"{_flag(name)} must be a positive integer, got {value!r}")
        if self.tp_size % self.ep_size:
            raise ArgumentError(f"--ep-size {self.ep_size} must divide --tp-size {self.tp_size}")
        if self.tp_size % self.nnodes:
            raise ArgumentError(f"--nnodes {self.nnodes} must divide --tp-size {self.tp_size} (ranks per node)")
        if not isinstance(self.node_rank, int) or not 0 <= self.node_rank < self.nnodes:
            raise ArgumentError(f"--node-rank must be in [0, {self.nnodes}) for --nnodes {self.nnodes}")
        if self.nnodes > 1 and self.dist_init_addr is None:
            raise ArgumentError(f"--nnodes {self.nnodes} needs --dist-init-addr, the host:port of node 0")
        if self.dist_init_addr is not None:
            host, sep, port = self.dist_init_addr.rpartition(":")
            if not (sep and host and port.isdigit() and 0 < int(port) <= 65535):
                raise ArgumentError(f"--dist-init-addr {self.dist_init_addr!r} must be host:port")

    def check_parallel_fits(self, model: ModelConfig) -> None:
        """Every split the ranks make must be exact: name the numbers that do not divide."""
        tp, ep, moe_tp = self.tp_size, self.ep_size, self.tp_size // self.ep_size
        kv_ok = model.num_kv_heads % tp == 0 if model.num_kv_heads >= tp else tp % model.num_kv_heads == 0
        checks = [  # (splits exactly, what does not)
            (model.num_heads % tp == 0, f"num_attention_heads {model.num_heads} is not a multiple of --tp-size {tp}"),
            (kv_ok, f"num_key_value_heads {model.num_kv_heads} and --tp-size {tp}: neither divides the other"),
            (model.vocab_size % tp == 0, f"vocab_size {model.vocab_size} is not a multiple of --tp-size {tp}"),
            (
                model.intermediate_size_mlp % tp == 0,
                f"intermediate_size_mlp {model.intermediate_size_mlp} is not a multiple of --tp-size {tp}",
            ),
            (  # each expert is split over the tp / ep ranks that hold it
                model.intermediate_size % moe_tp == 0,
                f"intermediate_size {model.intermediate_size} is not a multiple of --tp-size / --ep-size ({moe_tp})",
            ),
            (model.num_experts % ep == 0, f"num_local_experts {model.num_experts} is not a multiple of --ep-size {ep}"),
        ]
        problems = [what for fits, what in checks if not fits]
        if problems:
            raise ArgumentError(f"the model does not split across {tp} ranks: " + "; ".join(problems))

    def _check_server(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ArgumentError(f"--port must be in [0, 65535], got {self.port!r}")
        if not self.host:
            raise ArgumentError("--host must not be empty")
        if self.tool_call_parser is not None:
            self._check_choice("tool_call_parser", sorted(TOOL_CALL_PARSERS))
        self._check_choice("tool_call_constraint", ("on", "off"))
        if self.log_level is not None:
            self._check_choice("log_level", LOG_LEVELS)
        if self.api_key == "":
            raise ArgumentError("--api-key must not be empty")
        if self.served_model_name == "":
            raise ArgumentError("--served-model-name must not be empty")
        if not isinstance(self.max_images_per_request, int) or self.max_images_per_request < 0:
            raise ArgumentError(f"--max-images-per-request must be 0 or more, got {self.max_images_per_request!r}")
        if self.allowed_media_domains is not None and not all(d.strip() for d in self.allowed_media_domains):
            raise ArgumentError("--allowed-media-domains needs host names, got an empty one")
        if self.request_timeout is not None and not (
            isinstance(self.request_timeout, int | float) and 0 < self.request_timeout < math.inf
        ):
            raise ArgumentError(f"--request-timeout must be a positive number of seconds, got {self.request_timeout!r}")
        if not (isinstance(self.graceful_shutdown_timeout, int | float) and self.graceful_shutdown_timeout >= 0):
            raise ArgumentError(
                f"--graceful-shutdown-timeout must be 0 or more, got {self.graceful_shutdown_timeout!r}"
            )
        if not (isinstance(self.media_fetch_timeout, int | float) and 0 < self.media_fetch_timeout < math.inf):
            raise ArgumentError(f"--media-fetch-timeout must be a positive number, got {self.media_fetch_timeout!r}")
        for name in ("max_media_bytes", "max_image_pixels", "max_request_body_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ArgumentError(f"{_flag(name)} must be a positive integer, got {value!r}")
        if self.allowed_local_media_path is not None and not Path(self.allowed_local_media_path).is_dir():
            raise ArgumentError(f"--allowed-local-media-path {self.allowed_local_media_path!r} is not a folder")

    def _check_choice(self, name: str, choices: tuple[str, ...] | list[str]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise ArgumentError(f"{_flag(name)} {value!r} is not supported; choose from {', '.join(choices)}")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def to_config(self) -> HerdConfig:
        """The frozen configs of a run; reads the checkpoint's config.json (a bad one raises ConfigError)."""
        model = ModelConfig.from_hf(self.model_path)
        self.check_parallel_fits(model)
        context_length = self.context_length or model.max_position_embeddings
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        engine = EngineConfig(
            model=model,
            load=LoadConfig(
                model_path=self.model_path,
                load_format=self.load_format,
                dtype=self.dtype,
                seed=self.seed,
                enable_multimodal=self.enable_multimodal,
                quantization=self.quantization,
            ),
            cache=CacheConfig(
                page_size=self.page_size,
                mem_fraction_static=self.mem_fraction_static,
                cpu_memory_budget_gb=self.cpu_memory_budget_gb,
                max_total_tokens=self.max_total_tokens,
                swa_full_tokens_ratio=self._swa_full_tokens_ratio(model, context_length),
                enable_prefix_caching=not self.disable_radix_cache,
            ),
            scheduler=SchedulerConfig(
                context_length=context_length,
                max_running_requests=self.max_running_requests or DEFAULT_MAX_RUNNING_REQUESTS,
                chunked_prefill_size=self.chunked_prefill_size,
            ),
            parallel=ParallelConfig(
                tp_size=self.tp_size,
                ep_size=self.ep_size,
                dp_size=self.dp_size,
                nnodes=self.nnodes,
                node_rank=self.node_rank,
                dist_init_addr=self.dist_init_addr,
            ),
            speculative=self._check_speculative(),
            device=DeviceConfig(
                device=device,
                attention_backend=self.attention_backend or default_attention_backend(device),
                enable_torch_compile=self.enable_torch_compile,
                cuda_graph_max_bs=self.cuda_graph_max_bs,
                disable_cuda_graph=self.disable_cuda_graph,
            ),
        )
        tokenizer_path = self.tokenizer_path or self.model_path
        frontend = FrontendConfig(
            tokenizer_path=None if self.skip_tokenizer_init else tokenizer_path,
            tokenizer_required=self.tokenizer_path is not None,
            chat_template=self.chat_template,
            enable_multimodal=self.enable_multimodal,
            seed=self.seed,
            max_queued_requests=self.max_queued_requests,
            request_timeout=None if self.request_timeout is None else float(self.request_timeout),
        )
        server = ServerConfig(
            host=self.host,
            port=self.port,
            model_path=self.model_path,
            tokenizer_path=tokenizer_path,
            served_model_name=self.served_model_name or default_served_model_name(self.model_path),
            api_key=self.api_key,
            tool_call_parser=self.tool_call_parser or DEFAULT_TOOL_CALL_PARSER,
            tool_call_constraint=self.tool_call_constraint,
            enable_multimodal=self.enable_multimodal,
            allowed_local_media_path=self.allowed_local_media_path,
            max_images_per_request=self.max_images_per_request,
            max_request_body_bytes=self.max_request_body_bytes,
            graceful_shutdown_timeout=float(self.graceful_shutdown_timeout),
            allowed_media_domains=None if self.allowed_media_domains is None else tuple(self.allowed_media_domains),
            media_fetch_timeout=float(self.media_fetch_timeout),
            max_media_bytes=self.max_media_bytes,
            max_image_pixels=self.max_image_pixels,
            log_level=self.log_level or "info",
        )
        return HerdConfig(engine=engine, frontend=frontend, server=server)

    def _swa_full_tokens_ratio(self, model: ModelConfig, context_length: int) -> float:
        """Local-layer KV tokens per global-layer KV token. SGLang's --hybrid-kvcache-ratio r mixes "as many"
        (1) with "a chunk's worth per context" (attention_chunk_size / context_length): (1 - r) + r * that."""
        if self.hybrid_kvcache_ratio is None:
            return self.swa_full_tokens_ratio
        chunk = model.attention_chunk_size
        if not chunk:
            return self.swa_full_tokens_ratio  # no local layers: there is nothing to split
        least = min(1.0, chunk / context_length)
        return (1 - self.hybrid_kvcache_ratio) + self.hybrid_kvcache_ratio * least


def default_served_model_name(model_path: str) -> str:
    """The model id the API lists when --served-model-name is not given: the checkpoint folder's name, never
    the machine's absolute path (a Hub-style id such as meta-llama/Llama-4-Scout-... stays as given)."""
    path = Path(model_path)
    if path.resolve() == DEMO_MODEL_PATH.resolve():
        return DEMO_MODEL_NAME
    if path.is_absolute() or path.exists():
        return path.resolve().name or model_path
    return model_path


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """One flag per ServerArgs field, `--field-name`, typed as the field."""
    hints = typing.get_type_hints(ServerArgs)
    for f in dataclasses.fields(ServerArgs):
        flags, hint = (_flag(f.name), *f.metadata.get("aliases", ())), hints[f.name]
        required = f.default is dataclasses.MISSING
        help_ = "not supported yet" if f.name in NOT_YET else f.metadata.get("help")
        if hint is bool:
            parser.add_argument(*flags, dest=f.name, action="store_true", help=help_)
            continue
        kind = next((t for t in (int, float, str) if t is hint or t in typing.get_args(hint)), str)
        default = None if required else f.default
        extra = {k: f.metadata[k] for k in ("nargs", "const") if k in f.metadata}
        parser.add_argument(*flags, dest=f.name, type=kind, default=default, required=required, help=help_, **extra)


def server_args_from(namespace: argparse.Namespace) -> ServerArgs:
    return ServerArgs(**{name: getattr(namespace, name) for name in ServerArgs.field_names()})
