"""`SamplingState`: what the sampler remembers about one sequence between steps."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from herd.sampling.grammar import GrammarState
from herd.sampling.params import SamplingParams


class SamplingState:
    """One sequence's sampling state, made by the engine when the sequence is added.

    The engine calls `append_token` with every token it accepts for the sequence (after the sampler
    returns it); the sampler reads the rest. The state outlives preemption: a recomputed sequence
    keeps its generator where it was, so preemption never changes what it samples.

    `seed` picks the generator's seed: the engine passes `params.seed + i` for the i-th of n samples
    (or a seed of its own when the request has none). Without it, `params.seed` is used, and without
    that a non-deterministic seed.
    """

    def __init__(
        self,
        params: SamplingParams,
        prompt_token_ids: Sequence[int],
        *,
        seed: int | None = None,
        eos_token_ids: Iterable[int] = (),
    ) -> None:
        self.params = params
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        # A CPU generator even when the logits live on a GPU: each step draws one number per sequence,
        # so the stream is the same on every device and costs no kernel launch.
        self.generator = torch.Generator()
        seed = params.seed if seed is None else seed
        if seed is None:
            self.seed = self.generator.seed()
        else:
            self.seed = seed
            self.generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)  # any Python int, into torch's 64 bits
        # While fewer than min_tokens tokens exist these cannot be sampled: they would end the sequence.
        # EOS stops nothing under ignore_eos, so it is left alone then (as vLLM does).
        banned = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            banned.update(eos_token_ids)
        self._min_tokens_banned = tuple(sorted(banned)) if params.min_tokens > 0 else ()
        self._prompt_ids: torch.Tensor | None = None
        self.grammar = GrammarState(params.grammar) if params.grammar is not None else None

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        if self.grammar is not None:
            self.grammar.accept(token_id)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def banned_token_ids(self) -> tuple[int, ...]:
        """Token ids that cannot be sampled at this step (EOS and stop tokens before min_tokens)."""
        if len(self.output_token_ids) < self.params.min_tokens:
            return self._min_tokens_banned
        return ()

    def uniform(self) -> float:
        """The next number in [0, 1) from this sequence's own generator."""
        return float(torch.rand((), generator=self.generator, dtype=torch.float64))

    def prompt_ids(self, device: torch.device) -> torch.Tensor:
        """The distinct prompt token ids as a tensor, made once: the repetition penalty needs them every step."""
        if self._prompt_ids is None or self._prompt_ids.device != device:
            self._prompt_ids = torch.tensor(sorted(set(self.prompt_token_ids)), dtype=torch.long, device=device)
        return self._prompt_ids
