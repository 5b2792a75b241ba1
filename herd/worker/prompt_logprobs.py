"""Prompt logprobs (vLLM's `prompt_logprobs`, OpenAI's `echo` + `logprobs`): how likely each prompt token
was given the tokens before it, from the hidden states a prefill step computes anyway.

Only the sequences that ask pay for it: their prompt rows go through the LM head in slices (a row is a
whole vocabulary of fp32 logits), and the engine core keeps them off the prefix cache so that every
position is computed here.
"""

from __future__ import annotations

import torch

from herd.worker.plan import ScheduledChunk, StepPlan

ROWS_PER_SLICE = 256  # rows of full-vocabulary logits held at once (Llama 4: 256 x 202k x 4 bytes = 207 MB)

# seq_id -> [(position, {token at position: logprob, top alternatives...})]
PromptLogprobsOut = dict[str, list[tuple[int, dict[int, float]]]]


class PromptLogprobs:
    def __init__(self) -> None:
        self._prompts: dict[str, tuple[list[int], int]] = {}  # seq_id -> (prompt ids, top-N)

    @property
    def wanted(self) -> bool:
        return bool(self._prompts)

    def update(self, plan: StepPlan) -> None:
        for seq_id in plan.finished_seq_ids:
            self._prompts.pop(seq_id, None)
        for new in plan.new_sequences:
            if new.params.prompt_logprobs is not None:
                self._prompts[new.seq_id] = (new.prompt_token_ids, new.params.prompt_logprobs)

    def compute(
        self, model: torch.nn.Module, hidden: torch.Tensor, chunks: list[ScheduledChunk], query_starts: list[int]
    ) -> PromptLogprobsOut:
        """Logprobs of the prompt tokens this step's rows predict: row of position p scores token p + 1."""
        out: PromptLogprobsOut = {}
        for i, chunk in enumerate(chunks):
            entry = self._prompts.get(chunk.seq_id)
            if entry is None:
                continue
            prompt, top_n = entry
            end = min(chunk.end, len(prompt) - 1)  # the last prompt row predicts an output token, not a prompt one
            if end <= chunk.start:
                continue
            rows = hidden[query_starts[i] : query_starts[i] + end - chunk.start]
            targets = torch.tensor(prompt[chunk.start + 1 : end + 1], dtype=torch.long, device=hidden.device)
            scored: list[dict[int, float]] = []
            for s in range(0, len(rows), ROWS_PER_SLICE):
                scored += _score(model, rows[s : s + ROWS_PER_SLICE], targets[s : s + ROWS_PER_SLICE], top_n)
            out[chunk.seq_id] = [(chunk.start + 1 + k, e) for k, e in enumerate(scored)]
        return out


def _score(model: torch.nn.Module, rows: torch.Tensor, targets: torch.Tensor, top_n: int) -> list[dict[int, float]]:
    logprobs = torch.log_softmax(model.compute_logits(rows).float(), dim=-1)  # the raw distribution
    chosen = logprobs.gather(1, targets[:, None]).squeeze(1).tolist()
    if top_n:
        top_values, top_ids = (t.tolist() for t in logprobs.topk(min(top_n, logprobs.shape[1])))
    else:
        top_values, top_ids = [[]] * len(chosen), [[]] * len(chosen)
    return [
        {target: lp, **dict(zip(ids, values, strict=True))}
        for target, lp, ids, values in zip(targets.tolist(), chosen, top_ids, top_values, strict=True)
    ]
