"""The frozen configs the engine is built from, one per concern, made once from the flags at the entry.

`EngineConfig` travels to the engine core (in its own process) and to every worker; `FrontendConfig` to
the request-side code (tokenizer, chat template, images); `ServerConfig` to the HTTP app. None of them
changes after start-up, and nothing below the entry points reads `ServerArgs`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from herd.config.model import ModelConfig

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
LOAD_FORMATS = ("auto", "safetensors", "dummy")
ATTENTION_BACKENDS = ("torch_native", "triton")
# --quantization: formats a full-precision checkpoint is quantized to at load
QUANTIZATIONS = ("fp8", "w8a16", "w8a8_int8", "w4a16")
DEFAULT_MAX_RUNNING_REQUESTS = 128
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # the server's and the engine process's


def default_attention_backend(device: str) -> str:
    """Triton kernels on a GPU when triton is installed (it ships with CUDA builds of torch), else the reference."""
    if device == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "torch_native"


@dataclass(frozen=True)
class LoadConfig:
    model_path: str
    load_format: str = "auto"  # auto | safetensors | dummy (random weights from config.json alone)
    dtype: str = "auto"  # auto (the checkpoint's) | bfloat16 | float16 | float32
    seed: int = 0  # of the dummy weights
    enable_multimodal: bool = False  # build and load the vision tower (when the checkpoint has one)
    quantization: str | None = None  # one of QUANTIZATIONS: quantize the checkpoint's weights as they load


@dataclass(frozen=True)
class CacheConfig:
    page_size: int = 16  # tokens per KV block (lowered to divide the attention chunk)
    mem_fraction_static: float | None = None  # of device memory for weights + KV (None: a default per device)
    cpu_memory_budget_gb: float = 8.0  # what "device memory" means on the CPU
    max_total_tokens: int | None = None  # full-pool tokens, overriding the memory fraction
    swa_full_tokens_ratio: float = 0.8  # local-pool tokens per full-pool token
    enable_prefix_caching: bool = True


@dataclass(frozen=True)
class SchedulerConfig:
    context_length: int  # longest prompt + output a request may have
    max_running_requests: int = DEFAULT_MAX_RUNNING_REQUESTS
    chunked_prefill_size: int = 8192  # prompt tokens per step; -1: a whole prompt per step

    @property
    def prefill_budget(self) -> int:
        """Prompt tokens per step (SGLang's -1, no chunking, is bounded by the context length)."""
        return self.chunked_prefill_size if self.chunked_prefill_size > 0 else self.context_length


@dataclass(frozen=True)
class ParallelConfig:
    tp_size: int = 1
    ep_size: int = 1  # expert parallelism inside the tensor-parallel ranks (divides tp_size)
    dp_size: int = 1
    nnodes: int = 1  # machines the tensor-parallel ranks are spread over, tp_size // nnodes ranks each
    node_rank: int = 0  # this machine's place; node 0 runs the scheduler and the server
    dist_init_addr: str | None = None  # host:port where the ranks meet (None: a free port on 127.0.0.1)

    @property
    def ranks_per_node(self) -> int:
        return self.tp_size // self.nnodes

    @property
    def world_size(self) -> int:
        return self.tp_size * self.dp_size


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (herd.config.speculative checks the flags): off when `algorithm` is None."""

    algorithm: str | None = None  # "EAGLE3" | "NGRAM"
    draft_model_path: str | None = None  # EAGLE3's draft checkpoint
    num_steps: int = 0  # draft steps per sequence per step (a chain: its length; a tree: its depth)
    eagle_topk: int = 1  # > 1: a tree, each draft step expanding the topk best nodes by their topk children
    num_draft_tokens: int = 1  # tokens verified per sequence per step: num_steps + 1 for a chain
    ngram_min_match: int = 1  # NGRAM: shortest and longest suffix looked up in the earlier context
    ngram_max_match: int = 12

    @property
    def enabled(self) -> bool:
        return self.algorithm is not None


@dataclass(frozen=True)
class DeviceConfig:
    device: str  # "cpu" or "cuda"
    attention_backend: str = "torch_native"
    enable_torch_compile: bool = False  # compile the decode step (CPU linear weights then stay unpacked)
    cuda_graph_max_bs: int = 256  # decode CUDA graphs for batches up to this (capped by max_running_requests)
    disable_cuda_graph: bool = False

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    load: LoadConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    speculative: SpeculativeConfig
    device: DeviceConfig


@dataclass(frozen=True)
class FrontendConfig:
    tokenizer_path: str | None  # None: no tokenizer (prompts are token ids, outputs carry no text)
    tokenizer_required: bool  # the tokenizer was named explicitly: its absence is an error, not a warning
    chat_template: str | None
    enable_multimodal: bool
    seed: int  # draws the sampling seed of requests that give none
    # Sequences that may wait beyond those that can run (max_running_requests); None: no limit.
    max_queued_requests: int | None = None
    # Seconds a request may take from its arrival to its last token; None: no limit.
    request_timeout: float | None = None


@dataclass(frozen=True)
class ServerConfig:
    host: str
    port: int
    model_path: str
    tokenizer_path: str
    served_model_name: str
    api_key: str | None
    tool_call_parser: str
    tool_call_constraint: str  # "on": tool_choice auto constrains a call once the model opens one
    enable_multimodal: bool
    allowed_local_media_path: str | None
    max_images_per_request: int
    max_request_body_bytes: int
    graceful_shutdown_timeout: float  # seconds a SIGTERM / SIGINT waits for requests in flight
    allowed_media_domains: tuple[str, ...] | None  # None: any host with a public address
    media_fetch_timeout: float  # seconds
    max_media_bytes: int
    max_image_pixels: int
    log_level: str


@dataclass(frozen=True)
class HerdConfig:
    """Everything a run of herd was configured with."""

    engine: EngineConfig
    frontend: FrontendConfig
    server: ServerConfig
