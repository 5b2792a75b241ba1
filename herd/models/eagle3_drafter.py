"""Per-sequence EAGLE-3 drafting over the draft's own KV cache: extend, draft a chain or a tree, roll back.

The draft keeps, for each sequence, keys/values and its pre-norm output for every position the target has
processed (index = position). Drafting writes scratch entries past that length and never moves it, so the
next `extend` or `truncate` sees exactly what was extended. Batch 1 per call: this is the CPU reference path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from herd.models.eagle3_model import Eagle3DraftModel
from herd.models.eagle3_step import DraftStep


@dataclass
class _SeqState:
    k: torch.Tensor  # [n_kv, capacity, D], head-major: the keys of positions 0 .. n - 1 are a view
    v: torch.Tensor
    out: torch.Tensor  # [capacity, H] the draft's pre-norm output at each position
    length: int = 0  # positions 0 .. length - 1 hold verified entries

    def reserve(self, size: int) -> None:
        """Grow the buffers (doubling) so that `size` positions fit."""
        cap = self.out.shape[0]
        if size <= cap:
            return
        new = max(size, 2 * cap)
        k = self.k.new_empty((self.k.shape[0], new, self.k.shape[2]))  # positions on dim 1
        v, out = self.v.new_empty(k.shape), self.out.new_empty((new, self.out.shape[1]))
        k[:, : self.length], v[:, : self.length] = self.k[:, : self.length], self.v[:, : self.length]
        out[: self.length] = self.out[: self.length]
        self.k, self.v, self.out = k, v, out

    def keys(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions < end, position-major [end, n_kv, D] (views)."""
        return self.k[:, :end].transpose(0, 1), self.v[:, :end].transpose(0, 1)


class Eagle3Drafter:
    """The interface the speculative worker drives, one sequence (`seq_id`) at a time.

    Position p's entry is built from the target's captured hidden states at p and the token at p + 1; so
    after the target has processed positions 0..p and chosen token p + 1, `draft` proposes tokens p + 2 ...
    """

    def __init__(self, model: Eagle3DraftModel, target_layer_ids: tuple[int, int, int]) -> None:
        self.model = model.eval()
        self.target_layer_ids = target_layer_ids
        self._seqs: dict[int, _SeqState] = {}
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self._fast: DraftStep | None = None  # built on first use: the weights are loaded after construction
        self.packed_matmuls = False  # the draft step's matmuls in packed bf16 (see DraftStep); set before drafting

    @property
    def step(self) -> DraftStep:
        if self._fast is None:
            self._fast = DraftStep(self.model, self.packed_matmuls)
        return self._fast

    # ----- state -----

    def _state(self, seq_id: int) -> _SeqState:
        if seq_id not in self._seqs:
            cfg = self.model.config
            k = torch.empty((cfg.num_kv_heads, 64, cfg.head_dim), dtype=self.dtype, device=self.device)
            out = torch.empty((64, cfg.hidden_size), dtype=self.dtype, device=self.device)
            self._seqs[seq_id] = _SeqState(k, torch.empty_like(k), out)
        return self._seqs[seq_id]

    def length(self, seq_id: int) -> int:
        """Positions of `seq_id` the draft holds (0 for an unknown sequence)."""
        return self._seqs[seq_id].length if seq_id in self._seqs else 0

    def truncate(self, seq_id: int, length: int) -> None:
        """Keep draft KV for positions < length only."""
        if seq_id in self._seqs:
            state = self._seqs[seq_id]
            state.length = min(state.length, max(length, 0))

    def release(self, seq_id: int) -> None:
        self._seqs.pop(seq_id, None)

    # ----- extend -----

    @torch.inference_mode()
    def extend(self, seq_id: int, next_token_ids: torch.Tensor, aux_hidden: torch.Tensor, start_pos: int) -> None:
        """Add positions start_pos .. start_pos + T - 1, which the target has processed.

        next_token_ids: [T], the token at each position + 1; aux_hidden: [T, 3 * target hidden], the captured
        layers concatenated in `target_layer_ids` order. A start_pos below the held length drops the entries
        from start_pos on first (a re-extension after rollback); above it is a gap and an error.
        """
        state = self._state(seq_id)
        if start_pos > state.length:
            raise ValueError(f"extend at position {start_pos} leaves a gap: sequence {seq_id} has {state.length}")
        n = int(next_token_ids.shape[0])
        if aux_hidden.shape[0] != n:
            raise ValueError(f"extend got {n} tokens but {aux_hidden.shape[0]} rows of hidden states")
        if n == 0:
            state.length = start_pos
            return
        state.reserve(start_pos + n)
        ids = next_token_ids.to(self.device)
        hidden = self.step.fc(aux_hidden.to(device=self.device))
        state.out[start_pos : start_pos + n] = self.step(ids, hidden, start_pos, state.k, state.v)
        state.length = start_pos + n

    # ----- drafting -----

    def _last(self, seq_id: int) -> tuple[_SeqState, torch.Tensor]:
        state = self._seqs.get(seq_id)
        if state is None or state.length == 0:
            raise ValueError(f"sequence {seq_id} has no extended positions to draft from")
        return state, state.out[state.length - 1]

    def _step(
        self, token: int, hidden: torch.Tensor, pos: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One draft token (a target id) at `pos` over the given keys [pos, n_kv, D]: (out [H], k, v [n_kv, D])."""
        m = self.model
        ids = torch.tensor([[token]], device=self.device)
        out, k, v = m.layer(
            m.embed_tokens(ids),
            hidden.view(1, 1, -1),
            torch.tensor([pos], device=self.device),
            keys[None],
            values[None],
            torch.ones((1, keys.shape[0] + 1), dtype=torch.bool, device=self.device),
        )
        return out[0, 0], k[0, 0], v[0, 0]

    @torch.inference_mode()
    def draft(self, seq_id: int, num_steps: int) -> list[int]:
        """A greedy chain of num_steps tokens (target vocabulary ids) following the last extended position."""
        state, hidden = self._last(seq_id)
        base = state.length
        state.reserve(base + num_steps)
        step = self.step
        token_ids = torch.empty(1, dtype=torch.long, device=self.device)
        tokens: list[int] = []
        for i in range(num_steps):
            token = step.head(hidden)
            tokens.append(token)
            if i == num_steps - 1:
                break
            token_ids[0] = token
            # Scratch slots past the verified length: the next extend or truncate discards them.
            hidden = step(token_ids, hidden[None], base + i, state.k, state.v)[0]
        return tokens

    @torch.inference_mode()
    def draft_tree(self, seq_id: int, num_steps: int, topk: int, num_draft_tokens: int) -> tuple[list[int], list[int]]:
        """An EAGLE-2/3 dynamic tree: (tokens, parent index per token, -1 for children of the root).

        As SGLang's `--speculative-num-steps / -eagle-topk / -num-draft-tokens`: each step expands the topk best
        frontier nodes by their topk children, scored by cumulative log-probability; the tree returned is the
        num_draft_tokens - 1 best nodes drawn (num_draft_tokens counts the root, the token the target chose),
        in an order where every parent comes before its children.

        Each depth's frontier runs as one batch through the lean draft step: its nodes take scratch slots past
        the verified length (depth by depth), all at the position of their depth, each seeing the context, its
        ancestors' slots and its own (`draft_tree_reference` computes the same node by node).
        """
        state, root_out = self._last(seq_id)
        want = num_draft_tokens - 1
        if num_steps < 1 or topk < 1 or want < 1:
            raise ValueError("draft_tree needs num_steps >= 1, topk >= 1 and num_draft_tokens >= 2")
        step, base = self.step, state.length
        topk = min(topk, len(step.to_target))
        state.reserve(base + topk * max(1, num_steps - 1))
        top = step.logprobs(root_out[None]).topk(topk)
        # The pool of every node drawn, in order: draft-vocabulary token, parent (pool index, -1 the root), score.
        tokens, scores = [top.indices[0]], [top.values[0]]
        parents: list[int] = [-1] * topk
        frontier = list(range(topk))  # pool indices
        frontier_scores = top.values[0]
        frontier_hidden = root_out[None].expand(topk, -1)
        ancestry: dict[int, list[int]] = {node: [] for node in frontier}  # node -> its ancestors' scratch slots
        to_target = self.model.draft_to_target
        for depth in range(1, num_steps):
            n, slot = len(frontier), base + (depth - 1) * topk
            flat = torch.cat(tokens)
            visible = torch.zeros((n, slot + n), dtype=torch.bool, device=self.device)
            visible[:, :base] = True
            for row, node in enumerate(frontier):
                visible[row, ancestry[node]] = True
                visible[row, slot + row] = True
            ids = to_target[flat[frontier]]
            out = step.tree(ids, frontier_hidden, base + depth - 1, slot, state.k, state.v, visible)
            top = step.logprobs(out).topk(topk)  # [n, topk]
            cand = (frontier_scores[:, None] + top.values).flatten()
            first = len(parents)
            tokens.append(top.indices.flatten())
            scores.append(cand)
            parents += [node for node in frontier for _ in range(topk)]
            if depth == num_steps - 1:
                break
            best = torch.sort(-cand, stable=True).indices[:topk].tolist()
            frontier_hidden = out[[b // topk for b in best]]
            frontier_scores = cand[best]
            new = [first + b for b in best]
            for b, node in zip(best, new, strict=True):
                parent = frontier[b // topk]
                ancestry[node] = [*ancestry[parent], slot + b // topk]
            frontier = new
        # Children score no higher than their parent, and ties go to the earlier (parent) index: the pick is a tree.
        order = torch.sort(-torch.cat(scores), stable=True).indices[:want]
        chosen = sorted(order.tolist())
        index = {node: j for j, node in enumerate(chosen)}
        picked = to_target[torch.cat(tokens)[chosen]].tolist()
        return picked, [index[parents[i]] if parents[i] >= 0 else -1 for i in chosen]

    @torch.inference_mode()
    def draft_tree_reference(
        self, seq_id: int, num_steps: int, topk: int, num_draft_tokens: int
    ) -> tuple[list[int], list[int]]:
        """`draft_tree` computed node by node through the draft model's modules: the reference it is tested against."""
        state, root_hidden = self._last(seq_id)
        want = num_draft_tokens - 1
        if num_steps < 1 or topk < 1 or want < 1:
            raise ValueError("draft_tree needs num_steps >= 1, topk >= 1 and num_draft_tokens >= 2")
        m, base = self.model, state.length
        keys, values = state.keys(base)
        to_target = m.draft_to_target
        # The pool of every node drawn: token, parent (pool index), score, depth.
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []
        kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # node -> its key/value, once expanded

        def children(logits: torch.Tensor, parent: int, parent_score: float) -> None:
            logp = torch.log_softmax(logits.float(), dim=-1)
            top = torch.topk(logp, min(topk, logp.shape[-1]))
            for lp, d in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                tokens.append(int(to_target[d]))
                parents.append(parent)
                scores.append(parent_score + lp)

        children(m.logits(root_hidden), -1, 0.0)
        frontier = list(range(len(tokens)))
        node_hidden = {-1: root_hidden}
        for depth in range(1, num_steps):
            fresh_from = len(tokens)
            for node in frontier:
                path = self._ancestors(node, parents)  # root child .. node's parent
                k_path = torch.stack([kv[a][0] for a in path]) if path else keys[:0]
                v_path = torch.stack([kv[a][1] for a in path]) if path else values[:0]
                out, k, v = self._step(
                    tokens[node],
                    node_hidden[parents[node]],
                    base + depth - 1,
                    torch.cat([keys, k_path]),
                    torch.cat([values, v_path]),
                )
                kv[node], node_hidden[node] = (k, v), out
                children(m.logits(out), node, scores[node])
            fresh = range(fresh_from, len(tokens))
            frontier = sorted(fresh, key=lambda i: (-scores[i], i))[:topk]
        # Children score no higher than their parent, and ties go to the earlier (parent) index: the pick is a tree.
        chosen = sorted(sorted(range(len(tokens)), key=lambda i: (-scores[i], i))[:want])
        index = {node: j for j, node in enumerate(chosen)}
        return [tokens[i] for i in chosen], [index[parents[i]] if parents[i] >= 0 else -1 for i in chosen]

    @staticmethod
    def _ancestors(node: int, parents: list[int]) -> list[int]:
        path = []
        p = parents[node]
        while p >= 0:
            path.append(p)
            p = parents[p]
        return path[::-1]
