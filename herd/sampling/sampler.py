"""The sampler: one token per sequence from a batch of logits.

Per row: logit_bias and the min_tokens ban on EOS / stop tokens; the repetition penalty (prompt + output
tokens); presence and frequency penalties (output tokens); the grammar's mask (constrained decoding,
herd.sampling.grammar); then either argmax (greedy) or temperature, top-k, top-p, min-p and a draw. vLLM
masks first; the result is the same, since the mask only writes -inf, which every later adjustment keeps.
Masking after the temperature lets a drawn row be masked in the copy the division makes, not in a copy of
its own (a 16 x 202k batch: 13 MB less to copy each step). Greedy and plain-temperature rows are not masked
first at all: they draw, and only a refused draw is sampled again (see `Sampler`, herd.sampling.allowed).

Row independence: a sequence's token depends only on its own logits row and its own generator, never
on the other rows of the batch or on its position, bit for bit. So everything here is elementwise
with IEEE-exact ops (+ - * /, comparisons), exact (argmax, top-k values, max), a per-row kernel
(softmax, log_softmax), or a prefix sum, whose leading entries do not depend on how wide the tensor
is. Nothing reduces across rows, or across a whole row in a way the batch size could change (a plain
`sum` over a [1, V] tensor may be split between threads, over a [B, V] one it is not). The draw is an
inverse-CDF draw with one uniform number from the row's own generator, so a row's random stream
advances by exactly one number per step whatever the batch. (The other common way, an exponential
race with noise over the whole vocabulary, costs ~5 ms per row for 202k tokens on a CPU.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from herd.kernels import cpu as cpu_kernels
from herd.sampling.allowed import sample_allowed
from herd.sampling.grammar import GrammarMasker, StepMask
from herd.sampling.params import SamplingParams
from herd.sampling.penalties import adjusted_logits, adjusts, as_floats, as_index, take_rows
from herd.sampling.state import SamplingState

# Top-p first looks for the nucleus among this many most likely tokens, then among the second width,
# and sorts the whole row only when the nucleus is wider still (a nearly flat distribution).
TOP_P_WIDTHS = (128, 4096)
# The draw finds its token in two steps, a block of the vocabulary and then a token in it, so no
# float64 prefix sum over the whole [B, V] batch is needed.
DRAW_BLOCK = 1024


@dataclass(frozen=True, slots=True)
class SampleResult:
    token_id: int
    # Log-probability of token_id under the model's raw distribution: log_softmax of the incoming
    # logits, before logit_bias, penalties, temperature and filtering (vLLM's default). Computed only
    # when the request sets `logprobs` (it costs a pass over the vocabulary); None otherwise.
    logprob: float | None = None
    # The `logprobs` most likely (token id, logprob) pairs of the same distribution, most likely first;
    # [] for logprobs=0 and None when not requested.
    top_logprobs: list[tuple[int, float]] | None = None


class Sampler:
    """Samples one token for each row of `logits` ([B, V], float32 or the model's dtype) given the B rows' states.

    Returns one `SampleResult` per row, in row order. Does not modify `logits`. Of the states it advances
    the generators of rows that draw, and may move a row's grammar on to the token it returns (the engine's
    `SamplingState.append_token` then confirms it; see `GrammarState.try_accept`). The engine appends the
    tokens it accepts with `SamplingState.append_token`.

    Draw first, mask if refused: a constrained row without top-k, top-p or min-p (greedy or plain
    temperature) takes its token from the unmasked distribution, and only if the grammar refuses that token
    is the row masked and sampled again. That is exactly the masked distribution: greedy, the argmax is
    the masked argmax whenever it is allowed; drawn, token x in the allowed set A comes with probability
    p(x) + (1 - p(A)) p(x) / p(A) = p(x) / p(A). The refused row's second draw takes the next number of its
    generator. (With top-k / top-p / min-p the kept set depends on the mask, so those rows mask first.)
    Most tokens of a model that follows its format are allowed, and then no bitmask is filled at all.
    """

    def __init__(self) -> None:
        self.masker = GrammarMasker()

    def __call__(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> list[SampleResult]:
        _check_shape(logits, states)
        if all(map(_plain_greedy, states)):
            # The argmax of the logits as the model gave them (bf16 on a bf16 model): widening is exact, so the
            # fp32 copy (8 MB for 64 rows of 32k) would change nothing.
            return [SampleResult(t) for t in _argmax(logits).tolist()]
        logits = logits.float()
        vocab = logits.shape[1]
        tokens = torch.empty(len(states), dtype=torch.long, device=logits.device)
        grammars = [s.grammar if s.grammar is not None and s.grammar.active else None for s in states]
        first = {i: g for i, g in enumerate(grammars) if g is not None and _draws_first(states[i].params, vocab)}
        masked_now = [None if i in first else g for i, g in enumerate(grammars)]
        drawn, probs = _sample(logits, tokens, list(range(len(states))), states, self.masker.fill(masked_now, vocab))
        if first:
            chosen = tokens[as_index(list(first), logits.device)].tolist()
            refused = [i for (i, g), t in zip(first.items(), chosen, strict=True) if not g.try_accept(t)]
            if refused:
                mask = self.masker.fill([first[i] if i in refused else None for i in range(len(states))], vocab)
                at = {i: r for r, i in enumerate(drawn)}
                whole = sample_allowed(logits, tokens, refused, states, mask, probs, at)
                if whole:
                    _sample(logits, tokens, whole, states, mask)
        return _results(logits, tokens, states)

    def probs(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        """[B, V]: the distribution each row's token is drawn from, normalised; one-hot for greedy rows.

        That is after logit_bias, min_tokens, penalties, temperature, top-k, top-p and min-p. Draws no
        random numbers. For speculative decoding's acceptance test, and for tests.
        """
        _check_shape(logits, states)
        logits = logits.float()
        out = torch.zeros_like(logits)
        greedy, drawn = _split(states)
        mask = self.masker.fill([s.grammar for s in states], logits.shape[1])
        if greedy:
            rows = as_index(greedy, logits.device)
            out[rows, adjusted_logits(logits, greedy, states, mask).argmax(-1)] = 1.0
        if drawn:
            probs = _filtered_probs(adjusted_logits(logits, drawn, states), drawn, states, mask)
            total = _block_mass(probs).double().sum(-1, keepdim=True)  # row-local, unlike probs.sum(-1)
            out[as_index(drawn, logits.device)] = (probs / total).float()
        return out


def _check_shape(logits: torch.Tensor, states: Sequence[SamplingState]) -> None:
    if logits.dim() != 2 or logits.shape[0] != len(states):
        raise ValueError(f"logits must be [len(states)={len(states)}, vocab], got {list(logits.shape)}")


def _sample(
    logits: torch.Tensor, tokens: torch.Tensor, rows: list[int], states: Sequence[SamplingState], mask: StepMask | None
) -> tuple[list[int], torch.Tensor | None]:
    """Sample the batch rows `rows` into `tokens`, masked by `mask` where it has a row.

    Returns the rows that drew and the distributions they drew from ([len(drawn), V], or None).
    """
    greedy = [i for i in rows if states[i].params.greedy]
    drawn = [i for i in rows if not states[i].params.greedy]
    if greedy:
        tokens[as_index(greedy, logits.device)] = _argmax(adjusted_logits(logits, greedy, states, mask))
    if drawn:
        probs = _filtered_probs(adjusted_logits(logits, drawn, states), drawn, states, mask)
        # The only per-row loop: each row's uniform number comes from its own generator.
        u = torch.tensor([states[i].uniform() for i in drawn], dtype=torch.float64).to(logits.device)
        tokens[as_index(drawn, logits.device)] = _inverse_cdf(probs, u)
        return drawn, probs
    return drawn, None


def _plain_greedy(state: SamplingState) -> bool:
    """A row whose token is the argmax of its raw logits: greedy, unconstrained, unadjusted, no logprobs."""
    grammar = state.grammar
    return (
        state.params.greedy
        and state.params.logprobs is None
        and (grammar is None or not grammar.active)
        and not adjusts(state)
    )


_ARGMAX_DTYPES = (torch.float32, torch.bfloat16)  # herd's CPU kernel reads these


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """Each row's first maximal index (the first NaN's, if any), as torch.max(-1) gives it."""
    if x.device.type == "cpu" and x.dtype in _ARGMAX_DTYPES and x.shape[-1] > 0 and cpu_kernels.enabled():
        return torch.ops.herd_cpu.argmax_rows(x)  # ~10x faster than PyTorch's reduction with indices
    # max(dim) returns the first maximal index like argmax, and is ~2x faster on the CPU.
    return x.max(-1).indices


def _draws_first(params: SamplingParams, vocab: int) -> bool:
    """Whether a constrained row may draw from the unmasked distribution first (see `Sampler`)."""
    if params.greedy:
        return True
    return (params.top_k == 0 or params.top_k >= vocab) and params.top_p >= 1.0 and params.min_p == 0.0


def _split(states: Sequence[SamplingState]) -> tuple[list[int], list[int]]:
    """Rows that take the argmax and rows that draw."""
    greedy = [i for i, s in enumerate(states) if s.params.greedy]
    return greedy, [i for i, s in enumerate(states) if not s.params.greedy]


# -- temperature-scaled logits -> filtered probabilities -> a token ------------------------------------


def _filtered_probs(
    x: torch.Tensor, batch_rows: list[int], all_states: Sequence[SamplingState], mask: StepMask | None
) -> torch.Tensor:
    """Softmax of x / temperature, masked by the grammar, after top-k, then top-p and min-p: [R, V], zero
    outside the kept set. x's row j is batch row `batch_rows[j]`.

    top-k keeps the k largest logits (and ties with the k-th, as HF and vLLM do). top-p keeps the
    smallest set of most likely tokens whose mass reaches top_p in the top-k-renormalised distribution.
    min-p keeps tokens with probability >= min_p * the largest; being a ratio, renormalisation by the
    filters before it does not change it. Every filter keeps the most likely token.
    """
    states = [all_states[i] for i in batch_rows]
    temperature = as_floats([s.params.temperature for s in states], x.device)
    x = x / temperature[:, None]  # a new tensor, which the filters may change: x may be the caller's logits
    if mask is not None:
        mask.apply(x, batch_rows)
    vocab = x.shape[1]
    top_k = [min(s.params.top_k or vocab, vocab) for s in states]
    k_rows = [r for r, k in enumerate(top_k) if k < vocab]
    if k_rows:
        sub = take_rows(x, k_rows, copy=False)
        ks = as_index([top_k[r] - 1 for r in k_rows], x.device)[:, None]
        kth = sub.topk(max(top_k[r] for r in k_rows)).values.gather(1, ks)
        sub.masked_fill_(sub < kth, float("-inf"))
        if sub is not x:
            x[as_index(k_rows, x.device)] = sub
    probs = torch.softmax(x, dim=-1)  # row by row on every backend; no cross-row reduction
    p_rows = [r for r, s in enumerate(states) if s.params.top_p < 1.0]
    if p_rows:
        _top_p(probs, p_rows, [states[r].params.top_p for r in p_rows])
    m_rows = [r for r, s in enumerate(states) if s.params.min_p > 0.0]
    if m_rows:
        sub = take_rows(probs, m_rows, copy=False)
        floor = as_floats([states[r].params.min_p for r in m_rows], x.device)[:, None] * sub.amax(-1, keepdim=True)
        sub.masked_fill_(sub < floor, 0.0)
        if sub is not probs:
            probs[as_index(m_rows, x.device)] = sub
    return probs


def _top_p(probs: torch.Tensor, rows: list[int], top_p: list[float]) -> None:
    """Zero, in place, the probabilities outside each row's nucleus."""
    sub = take_rows(probs, rows, copy=False)
    vocab, device = sub.shape[1], sub.device
    p = torch.tensor(top_p, dtype=torch.float64, device=device)
    floor = torch.empty(len(rows), device=device)  # per row: the smallest probability kept
    todo = torch.arange(len(rows), device=device)
    for width in (*(w for w in TOP_P_WIDTHS if w < vocab), vocab):
        # The largest `width` probabilities, most likely first. Their prefix sums are the same whatever
        # the width, so a row reaches the same decision at whichever width it is decided.
        rows_left = sub if len(todo) == len(rows) else sub[todo]
        top = rows_left.topk(width).values if width < vocab else rows_left.sort(dim=-1, descending=True).values
        mass = top.double().cumsum(-1)
        before = F.pad(mass[:, :-1], (1, 0))  # mass strictly before each token
        n_keep = (before < p[todo, None]).sum(-1, keepdim=True)  # >= 1: nothing precedes the first
        decided = (mass[:, -1] >= p[todo]) | (width == vocab)
        floor[todo[decided]] = top.gather(1, n_keep - 1).squeeze(1)[decided]
        todo = todo[~decided]
        if len(todo) == 0:
            break
    # Ties with the smallest kept probability are kept too: which of equal tokens to drop is arbitrary.
    sub.masked_fill_(sub < floor[:, None], 0.0)
    if sub is not probs:
        probs[as_index(rows, device)] = sub


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """For each row, the token where the cumulative (unnormalised) probability first exceeds u * total.

    Done in float64, two-level: block masses pick a block of the vocabulary, a prefix sum inside the
    block picks the token. Tokens of zero probability are never picked, even where rounding would
    put the target on or past a boundary.
    """
    vocab = probs.shape[1]
    block = min(DRAW_BLOCK, vocab)
    mass = _block_mass(probs)
    cum = mass.double().cumsum(-1)
    target = (u * cum[:, -1])[:, None]
    b = torch.minimum(torch.searchsorted(cum, target, right=True), _last_nonzero(mass))
    before = torch.where(b > 0, cum.gather(1, (b - 1).clamp_min(0)), 0.0)
    cols = b * block + torch.arange(block, device=probs.device)
    inside = cols < vocab
    chunk = torch.where(inside, probs.gather(1, cols.clamp_max(vocab - 1)), 0.0).double()
    j = torch.searchsorted(chunk.cumsum(-1), (target - before).clamp_min(0.0), right=True)
    j = torch.minimum(j, _last_nonzero(chunk))
    return (b * block + j).squeeze(1)


def _block_mass(probs: torch.Tensor) -> torch.Tensor:
    """[n, ceil(V / DRAW_BLOCK)] float32 sums of DRAW_BLOCK-wide blocks of each row (the last one may be short).

    Short sums are never split between threads, so a row's block sums do not depend on the batch (a
    whole-row sum of a one-row tensor may be). float32: a float64 sum would first copy the whole batch
    to float64; the small disagreement with float64 sums inside a block is absorbed by the draw's clamps.
    """
    n, vocab = probs.shape
    block = min(DRAW_BLOCK, vocab)
    full = vocab // block * block
    mass = probs[:, :full].reshape(n, -1, block).sum(-1)
    if full < vocab:
        mass = torch.cat([mass, probs[:, full:].sum(-1, keepdim=True)], dim=1)
    return mass


def _last_nonzero(x: torch.Tensor) -> torch.Tensor:
    """[n, 1]: index of the last non-zero entry of each row (0 if none)."""
    width = x.shape[1]
    return (width - 1 - (x.flip(-1) > 0).to(torch.uint8).argmax(-1, keepdim=True)).clamp_min(0)


# -- results -------------------------------------------------------------------------------------------


def _results(logits: torch.Tensor, tokens: torch.Tensor, states: Sequence[SamplingState]) -> list[SampleResult]:
    token_ids = tokens.tolist()
    wanted = [i for i, s in enumerate(states) if s.params.logprobs is not None]
    if not wanted:
        return [SampleResult(t) for t in token_ids]
    index = as_index(wanted, logits.device)
    logprobs = torch.log_softmax(logits[index], dim=-1)  # the raw distribution, before any processing
    chosen = logprobs.gather(1, tokens[index][:, None]).squeeze(1).tolist()
    top_values, top_ids = logprobs.topk(min(max(states[i].params.logprobs or 0 for i in wanted), logits.shape[1]))
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    results = [SampleResult(t) for t in token_ids]
    for k, i in enumerate(wanted):
        n = states[i].params.logprobs or 0
        top = list(zip(top_ids[k][:n], top_values[k][:n], strict=True))
        results[i] = SampleResult(token_ids[i], chosen[k], top)
    return results
