"""oneDNN weight prepacking for CPU inference.

oneDNN runs a matmul against a weight already in its blocked layout without reordering it on
every call; for the small-batch GEMVs of decoding on a CPU that is up to ~1.7x faster per call
(benchmarks/RESULTS.md). Applied after loading, by swapping modules, so the model code and the
loader keep working with plain `nn.Linear` weights in Hugging Face layout.
"""

from __future__ import annotations

import torch
from torch import nn

from herd.models.llama4_text import Llama4Experts


def packing_available(device: torch.device) -> bool:
    return (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """A [out, in] linear weight in oneDNN's layout (tuned for small batches: decoding)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed_weight", _pack(linear.weight), persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _packed_linear(x, self.packed_weight, self.bias)


class PackedExperts(nn.Module):
    """Llama4Experts with each expert's two projections packed as linear weights."""

    def __init__(self, experts: Llama4Experts) -> None:
        super().__init__()
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        self.gate_up = [_pack(gate_up[e].t()) for e in range(gate_up.shape[0])]  # each [2I, H]
        self.down = [_pack(down[e].t()) for e in range(down.shape[0])]  # each [H, I]
        for e, (a, b) in enumerate(zip(self.gate_up, self.down, strict=True)):
            self.register_buffer(f"gate_up_{e}", a, persistent=False)
            self.register_buffer(f"down_{e}", b, persistent=False)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        from herd.layers.moe import grouped_experts

        return grouped_experts(x, expert_ids, self._expert)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = _packed_linear(x, self.gate_up[e]).chunk(2, dim=-1)
        return _packed_linear(torch.nn.functional.silu(gate) * up, self.down[e])


def pack_for_cpu(model: nn.Module) -> int:
    """Swap every nn.Linear and expert block of `model` for its packed form; returns how many were swapped."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            replacement: nn.Module = PackedLinear(module)
        elif isinstance(module, Llama4Experts):
            replacement = PackedExperts(module)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
        swapped += 1
    return swapped
