"""herd: a Llama 4 inference and serving engine on PyTorch.

`from herd import LLM, SamplingParams` as with vLLM; the heavy modules load on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from herd.llm import LLM

        return LLM
    if name == "SamplingParams":
        from herd.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'herd' has no attribute {name!r}")
