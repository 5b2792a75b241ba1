"""The vocabulary split across tensor-parallel ranks: the token embedding and the LM head.

Each rank keeps a contiguous 1/tp of the vocabulary's rows. The embedding looks up the ids that fall in
its rows, writes zeros for the others, and the ranks' lookups are summed (all-reduce); the LM head
computes its rows' logits and the ranks' slices are put side by side (all-gather). With one rank both
are the plain operations.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from herd.layers.parameters import check_shape, new_parameter


class VocabParallelEmbedding(nn.Module):
    def __init__(
        self, num_embeddings: int, embedding_dim: int, *, tp_rank: int = 0, tp_size: int = 1, tp_group: Any = None
    ) -> None:
        super().__init__()
        if num_embeddings % tp_size:
            raise ValueError(f"a vocabulary of {num_embeddings} tokens does not split across {tp_size} ranks")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.tp_rank, self.tp_size, self.tp_group = tp_rank, tp_size, tp_group
        self.rows_per_rank = num_embeddings // tp_size
        self.first_row = tp_rank * self.rows_per_rank
        self.weight = new_parameter((self.rows_per_rank, embedding_dim), self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        check_shape(loaded, [self.num_embeddings, self.embedding_dim])
        param.data.copy_(loaded.narrow(0, self.first_row, self.rows_per_rank))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.first_row
        outside = (local < 0) | (local >= self.rows_per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        dist.all_reduce(out, group=self.tp_group)
        return out


def gather_vocab(logits: torch.Tensor, tp_size: int, tp_group: Any = None) -> torch.Tensor:
    """[N, V / tp] per rank -> [N, V] on every rank (rank order is vocabulary order)."""
    if tp_size == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(tp_size)]
    dist.all_gather(parts, logits.contiguous(), group=tp_group)
    return torch.cat(parts, dim=-1)
