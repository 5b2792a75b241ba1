"""Turns a scheduled step into tensors, runs the model, and returns the logits to sample from."""

from __future__ import annotations

import torch

from herd.image_inputs import PromptImage
from herd.kv_cache import KVCacheManager
from herd.layers.attention import AttentionMetadata, PagedKVStorage, PoolView
from herd.models.llama4 import Llama4ForConditionalGeneration
from herd.models.llama4_text import Llama4ForCausalLM
from herd.scheduler import SchedulerOutput


class ModelRunner:
    def __init__(
        self,
        model: Llama4ForCausalLM | Llama4ForConditionalGeneration,
        kv_storage: PagedKVStorage,
        kv: KVCacheManager,
        device: torch.device,
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
        images = self._image_inputs(out, starts) if isinstance(self.model, Llama4ForConditionalGeneration) else None
        if images is None:
            hidden = self.model(input_ids, positions.to(self.device), meta, self.kv_storage)
        else:
            hidden = self.model(input_ids, positions.to(self.device), meta, self.kv_storage, *images)
        if not sample_rows:
            return hidden.new_empty((0, self.model.config.vocab_size), dtype=torch.float32)
        rows = torch.tensor(sample_rows, device=self.device)
        return self.model.compute_logits(hidden[rows]).float()

    def _image_inputs(self, out: SchedulerOutput, starts: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows of the token axis, their features) for the image patch tokens computed this step, or None.

        Encodes, in one batch, the images whose patch tokens this step reaches for the first time.
        """
        spans: list[tuple[PromptImage, int, int, int]] = []  # image, lo, hi, token-axis row of position 0
        for item, row in zip(out.scheduled, starts[:-1], strict=True):
            if item.seq.images is None:
                continue
            for img, lo, hi in item.seq.images.overlapping(item.start, item.start + item.num_tokens):
                spans.append((img, lo, hi, row - item.start))
        if not spans:
            return None
        todo = list({id(img): img for img, *_ in spans if img.features is None}.values())
        if todo:
            self._encode(todo)
        rows, features = [], []
        for img, lo, hi, offset in spans:
            assert img.features is not None
            rows.append(torch.tensor(img.patch_positions[lo:hi]) + offset)
            features.append(img.features[lo:hi])
        return torch.cat(rows).to(self.device), torch.cat(features)

    def _encode(self, images: list[PromptImage]) -> None:
        assert isinstance(self.model, Llama4ForConditionalGeneration)
        tiles = torch.cat([img.pixel_values for img in images]).to(self.device)
        features = self.model.encode_images(tiles)  # [tiles, tokens_per_tile, hidden]
        counts = [img.pixel_values.shape[0] for img in images]
        for img, feats in zip(images, features.split(counts), strict=True):
            img.features = feats.flatten(0, 1)

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
