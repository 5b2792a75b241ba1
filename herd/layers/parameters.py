"""Parameters that load themselves: each carries `weight_loader(param, loaded, shard_id=None, ...)`.

The loader copies a checkpoint tensor into the part of the parameter it belongs to: one of the fused
q/k/v or gate/up blocks (`shard_id`), this rank's slice of a tensor-parallel weight, or a quantized
layout. So checkpoints load name for name, whatever the parameter's own shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

WeightLoader = Callable[..., None]


class WeightShapeError(ValueError):
    """A checkpoint tensor of the wrong shape; `expected` is the shape the checkpoint should have."""

    def __init__(self, expected: Sequence[int]) -> None:
        super().__init__(f"expected shape {list(expected)}")
        self.expected = list(expected)


def new_parameter(shape: Sequence[int], weight_loader: WeightLoader, dtype: torch.dtype | None = None) -> nn.Parameter:
    """An uninitialised parameter (the loader fills it) that loads through `weight_loader`."""
    param = nn.Parameter(torch.empty(tuple(shape), dtype=dtype), requires_grad=False)
    param.weight_loader = weight_loader  # type: ignore[attr-defined]
    return param


def weight_loader_of(param: nn.Parameter) -> WeightLoader:
    return getattr(param, "weight_loader", default_weight_loader)


def check_shape(loaded: torch.Tensor, expected: Sequence[int]) -> None:
    if tuple(loaded.shape) != tuple(expected):
        raise WeightShapeError(expected)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
    """The whole tensor, as stored."""
    check_shape(loaded, param.shape)
    param.data.copy_(loaded)


def materialize(module: nn.Module, device: torch.device | str, recurse: bool = True) -> None:
    """Give every parameter and buffer of a module built on the meta device real (uninitialised) storage;
    those that have storage already keep it.

    Unlike `Module.to_empty`, keeps each parameter's attributes: its `weight_loader` above all.
    """
    for sub in module.modules() if recurse else [module]:
        for name, param in list(sub._parameters.items()):
            if param is None or not param.is_meta:
                continue
            real = nn.Parameter(torch.empty_like(param, device=device), requires_grad=False)
            real.__dict__.update(param.__dict__)
            sub._parameters[name] = real
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None and buffer.is_meta:
                sub._buffers[name] = torch.empty_like(buffer, device=device)
