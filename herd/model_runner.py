"""Turns a scheduled step into tensors, runs the model, and returns the logits to sample from."""

from __future__ import annotations

import torch

from herd.kv_cache import KVCacheManager
from herd.layers.attention import AttentionMetadata, PagedKVStorage, PoolView
from herd.models.llama4_text import Llama4ForCausalLM
from herd.scheduler import SchedulerOutput


class ModelRunner:
    def __init__(
        self, model: Llama4ForCausalLM, kv_storage: PagedKVStorage, kv: KVCacheManager, device: torch.device
    ) -> None:
        self.model = model
        self.kv = kv
        self.kv_storage = kv_storage
        self.block_size = kv_storage.block_size
        self.device = device

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> torch.Tensor:
        """Run one step; float32 logits [number of sequences that sample, vocab], in schedule order."""
        ids: list[int] = []
        starts = [0]
        context_lens, full_tables, local_tables, sample_rows = [], [], [], []
        for item in out.scheduled:
            seq, end = item.seq, item.start + item.num_tokens
            ids += seq.token_ids()[item.start : end]
            starts.append(starts[-1] + item.num_tokens)
            context_lens.append(end)
            full_tables.append(seq.blocks.full)
            local_tables.append(seq.blocks.local)
            if item.samples:
                sample_rows.append(starts[-1] - 1)
        positions = torch.cat([torch.arange(i.start, i.start + i.num_tokens) for i in out.scheduled])
        meta = AttentionMetadata(
            query_start_loc=starts,
            context_lens=context_lens,
            block_size=self.block_size,
            full=PoolView(full_tables, self._slots(full_tables, out)),
            local=PoolView(local_tables, self._slots(local_tables, out)),
        )
        self.kv_storage.zero_blocks(self.kv.full.take_fresh(), self.kv.local.take_fresh())
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, positions.to(self.device), meta, self.kv_storage)
        if not sample_rows:
            return hidden.new_empty((0, self.model.config.vocab_size), dtype=torch.float32)
        rows = torch.tensor(sample_rows, device=self.device)
        return self.model.compute_logits(hidden[rows]).float()

    def _slots(self, tables: list[list[int]], out: SchedulerOutput) -> torch.Tensor:
        """Physical slot of every new token: table[pos // block_size] * block_size + pos % block_size."""
        bs = self.block_size
        slots: list[int] = []
        for table, item in zip(tables, out.scheduled, strict=True):
            if not table:  # a model without layers of this kind
                slots += [0] * item.num_tokens
                continue
            slots += [table[p // bs] * bs + p % bs for p in range(item.start, item.start + item.num_tokens)]
        return torch.tensor(slots, dtype=torch.long, device=self.device)
