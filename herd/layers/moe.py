"""Routed experts, computed only for the rows that chose them.

`FusedMoE` holds the experts of one layer in Hugging Face's fused layout (`gate_up_proj [E, H, 2I]`,
`down_proj [E, I, H]`); checkpoints that store each expert apart (`experts.<e>.gate_proj.weight ...`) load
into the same parameters. Under tensor parallelism each rank keeps 1/tp of every expert's intermediate
dimension; with expert parallelism (`ep_size` ranks) each group of tp/ep ranks keeps whole experts, 1/ep of
them, and gives zeros for the rows routed elsewhere. Either way the caller sums the ranks' outputs.
The computation is the layer's method: `routed_swiglu` here for unquantized weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from herd.layers import opaque
from herd.layers.linear import input_pack
from herd.layers.parameters import check_shape
from herd.layers.quantization.base import FusedMoEMethodBase

GATE, UP = 0, 1  # shard ids of the two halves of gate_up_proj


class FusedMoE(nn.Module):
    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        method: FusedMoEMethodBase,
        tp_rank: int = 0,
        tp_size: int = 1,
        ep_rank: int = 0,
        ep_size: int = 1,
    ) -> None:
        super().__init__()
        if intermediate_size % tp_size:
            raise ValueError(f"intermediate_size {intermediate_size} does not split across {tp_size} ranks")
        if num_experts % ep_size:
            raise ValueError(f"{num_experts} experts do not split across --ep-size {ep_size} ranks")
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.tp_rank, self.tp_size = tp_rank, tp_size  # the split of each expert's intermediate dimension
        self.ep_rank, self.ep_size = ep_rank, ep_size
        self.num_local_experts = num_experts // ep_size
        self.first_expert = ep_rank * self.num_local_experts
        self.intermediate_size_per_rank = intermediate_size // tp_size
        self.method = method
        method.create_weights(self)
        self.opaque_handle = opaque.register(self, _eager_forward, _fake_forward)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """x [N, H] (scaled by the router), expert_ids [N] -> [N, H] (zero rows for other ranks' experts)."""
        if x.device.type == "cpu" and torch.compiler.is_compiling():
            # The CPU methods group rows by expert on the host and may hold oneDNN-packed weights: in a compiled
            # step they run eagerly as one opaque op (herd.layers.opaque), each chosen expert's weight read once.
            return opaque.call(self.opaque_handle, [x, expert_ids])
        return self.eager_forward(x, expert_ids)

    def eager_forward(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        if self.ep_size == 1:
            return self.method.apply(self, x, expert_ids)
        local_ids = expert_ids - self.first_expert
        here = (local_ids >= 0) & (local_ids < self.num_local_experts)
        out = x.new_zeros(x.shape[0], self.hidden_size)
        if bool(here.any()):
            out[here] = self.method.apply(self, x[here], local_ids[here])
        return out

    def _local(self, expert_id: int) -> int | None:
        """Index of global expert `expert_id` among this rank's experts; None if another rank holds it."""
        local = expert_id - self.first_expert
        return local if 0 <= local < self.num_local_experts else None

    def _experts(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.narrow(0, self.first_expert, self.num_local_experts)

    def _slice(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        per_rank = self.intermediate_size_per_rank
        return tensor.narrow(dim, self.tp_rank * per_rank, per_rank)

    def load_gate_up(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None, expert_id: int | None = None
    ) -> None:
        """Fused `gate_up_proj [E, H, 2I]`, or one expert's `gate_proj`/`up_proj.weight [I, H]` (shard_id GATE/UP)."""
        inter, per_rank = self.intermediate_size, self.intermediate_size_per_rank
        if expert_id is None:
            check_shape(loaded, [self.num_experts, self.hidden_size, 2 * inter])
            gate, up = self._experts(loaded).split(inter, dim=2)
            # Half by half into place: a concatenated copy would be a second whole layer of experts in memory.
            param.data[..., :per_rank].copy_(self._slice(gate, 2))
            param.data[..., per_rank:].copy_(self._slice(up, 2))
            return
        check_shape(loaded, [inter, self.hidden_size])
        assert shard_id in (GATE, UP)
        local = self._local(expert_id)
        if local is None:
            return
        param.data[local, :, shard_id * per_rank : (shard_id + 1) * per_rank] = self._slice(loaded, 0).t()

    def load_down(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None, expert_id: int | None = None
    ) -> None:
        """Fused `down_proj [E, I, H]`, or one expert's `down_proj.weight [H, I]`."""
        if expert_id is None:
            check_shape(loaded, [self.num_experts, self.intermediate_size, self.hidden_size])
            param.data.copy_(self._slice(self._experts(loaded), 1))
            return
        check_shape(loaded, [self.hidden_size, self.intermediate_size])
        local = self._local(expert_id)
        if local is not None:
            param.data[local] = self._slice(loaded, 1).t()

    def load_expert_linear(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None, expert_id: int | None = None
    ) -> None:
        """One expert's tensor in nn.Linear's [out, in] orientation (a quantized weight or its scales) into
        param [local experts, out rows, in columns]: `*gate_up*` params hold the gate rows then the up rows
        (shard_id GATE/UP), `*down*` params the H rows. Columns count `input_pack(param)` inputs each."""
        if expert_id is None:
            raise KeyError("quantized experts load one expert at a time (experts.<e>.<proj>.<tensor>)")
        pack = input_pack(param)
        per_rank = self.intermediate_size_per_rank

        def cols(n: int) -> list[int]:
            return [1] if pack is None else [n // pack]

        if shard_id is not None:  # gate or up: this rank's rows of the intermediate dimension
            check_shape(loaded, [self.intermediate_size, *cols(self.hidden_size)])
            rows = self._slice(loaded, 0)
        else:  # down: this rank's columns of the intermediate dimension
            check_shape(loaded, [self.hidden_size, *cols(self.intermediate_size)])
            rows = loaded if pack is None else loaded.narrow(1, self.tp_rank * per_rank // pack, per_rank // pack)
        local = self._local(expert_id)
        if local is None:
            return
        if shard_id is None:
            param.data[local] = rows
        else:
            param.data[local, shard_id * per_rank : (shard_id + 1) * per_rank] = rows


def _eager_forward(layer: FusedMoE, args: list[torch.Tensor]) -> torch.Tensor:
    return layer.eager_forward(args[0], args[1])


def _fake_forward(layer: FusedMoE, args: list[torch.Tensor]) -> torch.Tensor:
    return args[0].new_empty((args[0].shape[0], layer.hidden_size))


def routed_swiglu(x: torch.Tensor, expert_ids: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Each row of x through its expert, SwiGLU in HF's layout: gate_up [E, H, 2I] (gate first), down [E, I, H].

    On a GPU: one grouped GEMM per projection over the rows sorted by expert, with group offsets computed on
    the device, so nothing waits for the host. On the CPU the rows' expert ids are already in host memory:
    one matmul per expert that has rows. Under torch.compile the whole call is one opaque op.
    """
    if torch.compiler.is_compiling():
        return torch.ops.herd.routed_swiglu(x, expert_ids, gate_up, down)
    return _routed_swiglu(x, expert_ids, gate_up, down)


def _routed_swiglu(
    x: torch.Tensor, expert_ids: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    if x.is_cuda and _grouped_mm_supported(x, gate_up):
        return _grouped_gemm_swiglu(x, expert_ids, gate_up, down)
    return grouped_experts(x, expert_ids, lambda e, rows: swiglu_expert(rows, gate_up[e], down[e]))


@torch.library.custom_op("herd::routed_swiglu", mutates_args=())
def _routed_swiglu_op(
    x: torch.Tensor, expert_ids: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    return _routed_swiglu(x, expert_ids, gate_up, down)


@_routed_swiglu_op.register_fake
def _(x: torch.Tensor, expert_ids: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], down.shape[-1]))


def _grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # torch's grouped GEMM runs bf16 on Hopper and newer.
    return x.dtype == weight.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)


def _grouped_gemm_swiglu(
    x: torch.Tensor, expert_ids: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    order = torch.argsort(expert_ids, stable=True)
    ends = torch.cumsum(torch.bincount(expert_ids, minlength=gate_up.shape[0]), 0).to(torch.int32)
    gate, up = F.grouped_mm(x[order], gate_up, offs=ends).chunk(2, dim=-1)
    out_sorted = F.grouped_mm(F.silu(gate) * up, down, offs=ends)
    out = torch.empty_like(out_sorted)
    out[order] = out_sorted
    return out


def grouped_experts(
    x: torch.Tensor,  # [N, H], one row per (token, choice)
    expert_ids: torch.Tensor,  # [N] int64: the expert each row goes to, in host memory
    expert: Callable[[int, torch.Tensor], torch.Tensor],  # (e, rows [n, H]) -> expert e's output [n, H]
) -> torch.Tensor:  # [N, H]
    """Run each expert once on the rows that chose it: never all experts on all rows.

    Reads expert_ids on the host: free for CPU tensors; on a GPU that torch's grouped GEMM does not serve
    (not bf16, or older than Hopper) it waits for the device, until a fused-MoE kernel replaces this path.
    """
    if x.shape[0] == 1:  # one decoding sequence: skip the grouping
        return expert(int(expert_ids), x)
    counts = torch.bincount(expert_ids).tolist()
    if max(counts) == x.shape[0]:  # every row chose the same expert (a short verify step often does)
        return expert(counts.index(x.shape[0]), x)
    order = torch.argsort(expert_ids, stable=True)
    x_sorted = x[order]
    out_sorted = torch.empty_like(x_sorted)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        rows = slice(start, start + count)
        out_sorted[rows] = expert(e, x_sorted[rows])
        start += count
    out = torch.empty_like(out_sorted)
    out[order] = out_sorted
    return out


def swiglu_expert(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert in HF's fused layout: gate_up [H, 2I] (gate first), down [I, H]."""
    gate, up = (x @ gate_up).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down
