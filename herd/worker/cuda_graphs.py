"""CUDA graphs for decode steps: one graph per batch size up to `--cuda-graph-max-bs`, replayed for any
decode batch padded to the next captured size.

A captured graph replays the kernels it recorded on the same memory, so everything a decode step reads is
copied into persistent buffers first: token ids, positions and the attention metadata. Only the `triton`
backend's metadata has fixed shapes (its block tables are padded to the longest context, its split count
is a launch constant) and is capturable. Padding rows decode token 0 at position 0 with a one-token context
whose K/V go to a scratch block that no sequence owns, so they disturb nothing.

On a CPU the same runner replays eagerly (no capture): that is how the CPU tests check the padding and the
buffer copies against the unpadded step.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable

import torch

from herd.layers.attention.triton_backend import TritonBackend, TritonMetadata, TritonPoolMetadata

logger = logging.getLogger(__name__)

DEFAULT_MAX_BS = 256


def capture_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 (SGLang's spacing): padding wastes at most 7 rows."""
    sizes = [bs for bs in (1, 2, 4, 8) if bs <= max_bs] + list(range(16, max_bs + 1, 8))
    if sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


class DecodeGraphRunner:
    def __init__(
        self,
        forward: Callable[[torch.Tensor, torch.Tensor, TritonMetadata], torch.Tensor],
        backend: TritonBackend,
        *,
        max_bs: int,
        max_blocks_per_seq: int,
        scratch_full_block: int,
        scratch_local_block: int,
        block_size: int,
        chunk: int,
        has_local: bool,
        device: torch.device,
    ) -> None:
        self.forward, self.device = forward, device
        self.sizes = capture_sizes(max_bs)
        self.max_bs = self.sizes[-1]
        self.block_size = block_size
        self.scratch = {"full": scratch_full_block, "local": scratch_local_block}
        self.max_splits = backend.max_splits
        self.chunk = chunk
        self.input_ids = torch.zeros(self.max_bs, dtype=torch.long, device=device)
        self.positions = torch.zeros(self.max_bs, dtype=torch.long, device=device)
        self.query_start_loc = torch.arange(self.max_bs + 1, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(self.max_bs, dtype=torch.int32, device=device)
        self.pools = {
            name: TritonPoolMetadata(
                slot_mapping=torch.full((self.max_bs,), block * block_size, dtype=torch.long, device=device),
                block_table=torch.full((self.max_bs, max_blocks_per_seq), block, dtype=torch.int32, device=device),
            )
            for name, block in self.scratch.items()
            if name == "full" or has_local
        }
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def metadata(self, bs: int) -> TritonMetadata:
        """The persistent metadata of a `bs`-row step: views of the buffers, the same tensors on every replay."""

        def pool(name: str) -> TritonPoolMetadata | None:
            p = self.pools.get(name)
            return None if p is None else TritonPoolMetadata(p.slot_mapping[:bs], p.block_table[:bs])

        full = pool("full")
        assert full is not None
        return TritonMetadata(
            full=full,
            local=pool("local"),
            query_start_loc=self.query_start_loc[: bs + 1],
            context_lens=self.context_lens[:bs],
            max_query_len=1,
            is_decode=True,
            num_splits=self.splits(bs),
            chunk=self.chunk,
        )

    def splits(self, bs: int) -> int:
        """Split-K factor of a `bs`-row graph, fixed at capture (each split sizes its share at run time): many
        splits for a few sequences, which alone would leave most of the GPU idle, none for large batches."""
        return max(1, min(self.max_splits, 64 // bs))

    def capture(self) -> None:
        """Record one graph per size, largest first (the later ones reuse its memory pool)."""
        assert self.device.type == "cuda"
        start, free_before = time.perf_counter(), torch.cuda.mem_get_info(self.device)[0]
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.sizes):
            args = (self.input_ids[:bs], self.positions[:bs], self.metadata(bs))
            for _ in range(2):  # compile the kernels and settle the allocator outside the capture
                self.forward(*args)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = self.forward(*args)
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        logger.info("captured %d decode CUDA graphs (batch 1..%d) in %.1f s, %.2f GiB",
                    len(self.sizes), self.max_bs, time.perf_counter() - start, used / 2**30)  # fmt: skip

    def can_run(self, num_seqs: int, is_decode: bool) -> bool:
        return is_decode and num_seqs <= self.max_bs

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, step: TritonMetadata) -> torch.Tensor:
        """One decode step of n sequences (metadata as the backend built it) through the graph of size >= n."""
        n = input_ids.shape[0]
        bs = self.sizes[bisect.bisect_left(self.sizes, n)]
        self.input_ids[:n].copy_(input_ids)
        self.input_ids[n:bs].zero_()
        self.positions[:n].copy_(positions)
        self.positions[n:bs].zero_()
        self.context_lens[:n].copy_(step.context_lens)
        self.context_lens[n:bs].fill_(1)
        for name, static in self.pools.items():
            new = step.full if name == "full" else step.local
            assert new is not None
            width = new.block_table.shape[1]
            static.block_table[:n, :width].copy_(new.block_table)
            static.block_table[n:bs, 0].fill_(self.scratch[name])
            static.slot_mapping[:n].copy_(new.slot_mapping)
            static.slot_mapping[n:bs].fill_(self.scratch[name] * self.block_size)
        if bs in self.graphs:
            self.graphs[bs].replay()
            return self.outputs[bs][:n]
        return self.forward(self.input_ids[:bs], self.positions[:bs], self.metadata(bs))[:n]  # eager (CPU)


def graphs_enabled(device: torch.device, backend: object, disable: bool) -> bool:
    """Decode graphs run on CUDA with the `triton` backend, unless --disable-cuda-graph."""
    return device.type == "cuda" and isinstance(backend, TritonBackend) and not disable


def build_decode_graphs(
    forward: Callable[[torch.Tensor, torch.Tensor, TritonMetadata], torch.Tensor],
    backend: TritonBackend,
    *,
    max_bs: int,
    context_length: int,
    num_full_blocks: int,
    num_local_blocks: int,
    block_size: int,
    chunk: int | None,
    device: torch.device,
    capture: bool = True,
) -> DecodeGraphRunner:
    """A runner whose scratch blocks are the last block of each pool (the worker allocates one extra)."""
    runner = DecodeGraphRunner(
        forward,
        backend,
        max_bs=max_bs,
        max_blocks_per_seq=min(-(-context_length // block_size), num_full_blocks) + 1,
        scratch_full_block=num_full_blocks,
        scratch_local_block=num_local_blocks,
        block_size=block_size,
        chunk=chunk or backend.kernels.NO_CHUNK,
        has_local=chunk is not None,
        device=device,
    )
    if capture:
        runner.capture()
    return runner
