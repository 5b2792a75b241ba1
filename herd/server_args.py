"""Every engine and server option, in one dataclass.

Field names are the CLI flags in snake_case (`--chunked-prefill-size` is `chunked_prefill_size`)
and follow SGLang's names and meanings where SGLang has the option; `LLM(model, **kwargs)`
takes the same names.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass

from herd.layers.attention import available_backends
from herd.models.loader import DTYPES, LOAD_FORMATS


class ArgumentError(ValueError):
    """A bad option value: the message names the option and what is accepted."""


@dataclass
class ServerArgs:
    model_path: str
    tokenizer_path: str | None = None
    skip_tokenizer_init: bool = False
    chat_template: str | None = None
    dtype: str = "auto"
    load_format: str = "auto"
    device: str | None = None  # None: cuda when available, else cpu
    attention_backend: str | None = None  # None: chosen by hardware
    context_length: int | None = None
    # Memory: share of the device's memory for weights + KV cache (on CPU: of `cpu_memory_budget_gb`),
    # or an explicit number of full-attention KV tokens.
    mem_fraction_static: float | None = None
    cpu_memory_budget_gb: float = 8.0
    max_total_tokens: int | None = None
    swa_full_tokens_ratio: float = 0.8
    page_size: int = 16
    max_running_requests: int | None = None
    chunked_prefill_size: int = 8192
    disable_radix_cache: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_choice("dtype", ("auto", *DTYPES))
        self._check_choice("load_format", LOAD_FORMATS)
        if self.attention_backend is not None:
            self._check_choice("attention_backend", available_backends())
        if self.device is not None:
            self._check_choice("device", ("cpu", "cuda"))
        for name in ("context_length", "max_total_tokens", "max_running_requests"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ArgumentError(f"{_flag(name)} must be a positive integer, got {value!r}")
        for name in ("page_size", "chunked_prefill_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ArgumentError(f"{_flag(name)} must be a positive integer, got {value!r}")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static <= 1:
            raise ArgumentError(f"--mem-fraction-static must be in (0, 1], got {self.mem_fraction_static}")
        if not (self.swa_full_tokens_ratio > 0 and math.isfinite(self.swa_full_tokens_ratio)):
            raise ArgumentError(f"--swa-full-tokens-ratio must be a positive number, got {self.swa_full_tokens_ratio}")
        if self.cpu_memory_budget_gb <= 0:
            raise ArgumentError(f"--cpu-memory-budget-gb must be positive, got {self.cpu_memory_budget_gb}")

    def _check_choice(self, name: str, choices: tuple[str, ...] | list[str]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise ArgumentError(f"{_flag(name)} {value!r} is not supported; choose from {', '.join(choices)}")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """One flag per ServerArgs field, `--field-name`, typed as the field."""
    hints = typing.get_type_hints(ServerArgs)
    for f in dataclasses.fields(ServerArgs):
        flag, hint = _flag(f.name), hints[f.name]
        required = f.default is dataclasses.MISSING
        if hint is bool:
            parser.add_argument(flag, action="store_true", help=f.metadata.get("help"))
            continue
        kind = next((t for t in (int, float, str) if t is hint or t in typing.get_args(hint)), str)
        default = None if required else f.default
        parser.add_argument(flag, type=kind, default=default, required=required, help=f.metadata.get("help"))


def server_args_from(namespace: argparse.Namespace) -> ServerArgs:
    return ServerArgs(**{name: getattr(namespace, name) for name in ServerArgs.field_names()})
