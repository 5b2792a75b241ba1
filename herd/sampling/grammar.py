"""Constrained decoding on the engine side: a compiled grammar, one matcher per sequence, a token mask.

The frontend compiles a request's grammar (herd.frontend.structured) and sends it here as a
`GrammarBlob`: xgrammar's own serialization of the compiled grammar, a plain string, so the blob pickles
across the engine pipe. Compiling there, not here, keeps a slow compile (a large JSON schema over a 200k
vocabulary) off the engine's step loop, and a schema that does not compile is refused before anything
reaches the engine. The vocabulary a grammar was compiled against (`GrammarVocabulary`, ~7 MB of JSON for
Llama 4's 202k tokens) crosses once, before the first constrained request (`register_vocabulary`), not
with every request. Here a blob is only deserialized, once per grammar (`_compiled` is keyed by the blob's
key), and each sequence gets its own `GrammarState`.

Masking: xgrammar fills a packed int32 bitmask per constrained row on the CPU (the matcher is a CPU
automaton). To mask a whole row, the bitmask moves to the logits' device and xgrammar's kernel (on CUDA) or
a table lookup of its bytes (on the CPU) sets the disallowed logits to -inf. A row may instead need only its
allowed ids (`StepMask.allowed`, herd.sampling.allowed), or no bitmask at all: greedy and plain-temperature
rows draw first and ask the matcher (`GrammarState.try_accept`), see herd.sampling.sampler. All of it works
row by row, so a row's tokens still do not depend on the rest of the batch.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from threading import Lock
from typing import Literal

import numpy as np
import torch
import xgrammar as xgr

logger = logging.getLogger(__name__)

GrammarKind = Literal["json_object", "json_schema", "regex", "ebnf", "structural_tag"]
_CACHE_SIZE = 256  # deserialized grammars kept by the engine
# Bitmask rows whose allowed ids a masker keeps: only rows gathered sparsely (herd.sampling.allowed), so at
# most 64k int32 ids each, and a JSON number's digits ~1k.
_ALLOWED_CACHE_SIZE = 64
# For each byte value, its 8 bits as "forbidden" flags (1 where the bit is 0), packed into one int64.
_FORBIDDEN = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).eq(0).to(torch.uint8).view(torch.int64).view(256)


@dataclass(frozen=True)
class StructuredOutput:
    """What a request constrains its output to, as the client gave it (picklable, hashable).

    `spec` is the JSON schema text, the regex, the EBNF or the structural-tag JSON ("" for json_object);
    `field` is the request field it came from, named in the 400 when it does not compile. `strict`: the
    client asked for every keyword of its JSON schema to hold (a keyword the backend cannot enforce is a 400).
    """

    kind: GrammarKind
    spec: str = ""
    field: str = "response_format"
    strict: bool = False


@dataclass(frozen=True)
class GrammarVocabulary:
    """xgrammar's view of a tokenizer (TokenizerInfo.serialize_json()), sent to the engine once."""

    key: str
    info: str


@dataclass(frozen=True)
class GrammarBlob:
    """A compiled grammar as it crosses to the engine; `key` identifies grammar and vocabulary together."""

    key: str
    compiled: str  # xgrammar CompiledGrammar.serialize_json()
    vocabulary_key: str  # of the GrammarVocabulary it was compiled against, registered beforehand


_lock = Lock()
_compiled: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
_vocabularies: dict[str, xgr.TokenizerInfo] = {}


def register_vocabulary(vocabulary: GrammarVocabulary) -> None:
    """Make a vocabulary known to this process's grammars (idempotent; ~0.1 s the first time for 202k tokens)."""
    with _lock:
        if vocabulary.key not in _vocabularies:
            _vocabularies[vocabulary.key] = xgr.TokenizerInfo.deserialize_json(vocabulary.info)


def is_loaded(blob: GrammarBlob) -> bool:
    """Whether `load_compiled(blob)` would be a cache hit (no deserializing)."""
    with _lock:
        return blob.key in _compiled


def load_compiled(blob: GrammarBlob) -> xgr.CompiledGrammar:
    """The blob's compiled grammar, deserialized once and kept (LRU) for the next request that uses it.

    Deserializing (tens of ms for a JSON schema over 202k tokens) happens outside the lock: the engine core
    loads new grammars in a thread of its own while the step loop reads cached ones.
    """
    with _lock:
        hit = _compiled.get(blob.key)
        if hit is not None:
            _compiled.move_to_end(blob.key)
            return hit
        info = _vocabularies.get(blob.vocabulary_key)
    if info is None:
        raise RuntimeError(f"grammar vocabulary {blob.vocabulary_key} was not registered before its grammar")
    compiled = xgr.CompiledGrammar.deserialize_json(blob.compiled, info)
    with _lock:
        _compiled[blob.key] = compiled
        if len(_compiled) > _CACHE_SIZE:
            _compiled.popitem(last=False)
    return compiled


_never: dict[str, frozenset[int]] = {}  # per vocabulary: the special tokens, which no grammar allows


def _never_allowed(vocabulary_key: str, compiled: xgr.CompiledGrammar) -> frozenset[int]:
    with _lock:
        never = _never.get(vocabulary_key)
    if never is None:
        never = frozenset(compiled.tokenizer_info.special_token_ids)
        with _lock:
            _never[vocabulary_key] = never
    return never


class GrammarState:
    """One sequence's place in its grammar: advanced with each token the engine accepts.

    The sampler may move a matcher on to the token it drew before the engine appends it (`try_accept`, the
    draw-first path); `accept` then only confirms it. A token moved ahead but never appended (a sampler
    called twice for one step, as tests do) is rolled back before the matcher is read again.
    """

    def __init__(self, blob: GrammarBlob) -> None:
        compiled = load_compiled(blob)
        self.matcher = xgr.GrammarMatcher(compiled)
        self.failed = False
        self._ahead: int | None = None  # a token the matcher took in `try_accept`, not yet appended
        self._never = _never_allowed(blob.vocabulary_key, compiled)
        self._vocab_size = compiled.tokenizer_info.vocab_size

    def accept(self, token_id: int) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead == token_id:
            return
        if ahead is not None:
            self.matcher.rollback(1)
        # The sampler only draws allowed tokens, so a refusal means a bug (or an all -inf row); the
        # sequence then goes on unconstrained rather than failing the whole batch.
        if not self.failed and not self.matcher.is_terminated() and not self.matcher.accept_token(token_id):
            logger.warning("grammar refused token %d; the rest of this sequence is unconstrained", token_id)
            self.failed = True

    def try_accept(self, token_id: int) -> bool:
        """Whether the grammar allows `token_id` now; if it does, the matcher has moved on to it.

        The same answer as this step's bitmask bit (xgrammar's matcher and mask agree, special and
        out-of-range ids included; tests/test_structured_sampling.py checks it), without filling the bitmask.
        """
        self._settle()
        # xgrammar refuses these too, but with a warning on stderr each time: a draw may well be one of them.
        if token_id in self._never or token_id >= self._vocab_size:
            return False
        if self.matcher.accept_token(token_id):
            self._ahead = token_id
            return True
        return False

    @property
    def active(self) -> bool:
        """Whether this step's token is constrained."""
        self._settle()
        return not self.failed and not self.matcher.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write this step's allowed tokens into `bitmask[row]`."""
        self._settle()
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def _settle(self) -> None:
        if self._ahead is not None:
            self._ahead = None
            self.matcher.rollback(1)


class GrammarMasker:
    """Fills the constrained rows' bitmasks for a step and applies them to logits.

    Holds one int32 buffer, grown as batches grow, so a step allocates no bitmask. Only the rows whose
    grammar is active are filled and masked; an unconstrained batch costs nothing.
    """

    def __init__(self) -> None:
        self._buffer = torch.empty(0, dtype=torch.int32)
        self._allowed: dict[bytes, np.ndarray] = {}  # see StepMask.allowed

    def fill(self, grammars: Sequence[GrammarState | None], vocab: int) -> StepMask | None:
        """This step's masks for `grammars` (one per batch row), or None when no row is constrained."""
        rows = [i for i, g in enumerate(grammars) if g is not None and g.active]
        if not rows:
            return None
        width = (vocab + 31) // 32  # the logits' whole width: ids past the grammar's vocabulary stay unset
        if self._buffer.shape[0] < len(grammars) or self._buffer.shape[1] != width:
            self._buffer = torch.empty(max(len(grammars), self._buffer.shape[0]), width, dtype=torch.int32)
        bitmask = self._buffer[: len(grammars)]
        for i in rows:
            grammar = grammars[i]
            assert grammar is not None
            grammar.fill(bitmask, i)
        return StepMask(bitmask, rows, self._allowed)


@dataclass(frozen=True)
class StepMask:
    """One step's bitmasks: `bitmask[i]` holds row i's allowed tokens for every i in `rows` (others unset)."""

    bitmask: torch.Tensor  # [B, ceil(V / 32)] int32 on the CPU
    rows: list[int]
    cache: dict[bytes, np.ndarray] | None = None  # GrammarMasker's: a bitmask row -> its allowed ids

    def allowed(self, batch_rows: Sequence[int], vocab: int) -> list[np.ndarray]:
        """Per row of `batch_rows` (each in `self.rows`), its allowed token ids below `vocab`, ascending (int32).

        A row's ids are kept in `cache` under the row's bitmask itself, the whole of it: a grammar returns to
        the same few masks (the next digit of a number, the next key), so most steps only look them up.
        """
        words = self.bitmask.numpy()
        out = []
        for i in batch_rows:
            key = words[i].tobytes()
            ids = None if self.cache is None else self.cache.get(key)
            if ids is None:
                ids = _allowed_ids(words[i])
                if self.cache is not None:
                    if len(self.cache) >= _ALLOWED_CACHE_SIZE:
                        del self.cache[next(iter(self.cache))]  # the oldest
                    self.cache[key] = ids
            out.append(ids[: np.searchsorted(ids, vocab)])
        return out

    def busy_words(self, batch_rows: Sequence[int]) -> list[int]:
        """Per row of `batch_rows`, how many words of its bitmask allow something (a bound on its tokens / 32)."""
        return np.count_nonzero(self.bitmask.numpy()[list(batch_rows)], axis=1).tolist()

    def apply(self, x: torch.Tensor, batch_rows: Sequence[int]) -> None:
        """Set to -inf, in place, what the grammar forbids in x, whose row j is batch row `batch_rows[j]`.

        Only the -inf entries change, so the mask may come after logit_bias, penalties and temperature:
        -inf stays -inf through all of them, and every other entry is left as it is.
        """
        constrained = set(self.rows)
        local = [j for j, row in enumerate(batch_rows) if row in constrained]
        if not local:
            return
        rows = list(batch_rows)
        # x's rows are the batch's first ones (often all of them): a view, else a gather of just those rows.
        bitmask = self.bitmask[: len(rows)] if rows == list(range(len(rows))) else self.bitmask[rows]
        if x.is_cuda:  # xgrammar's GPU kernel
            xgr.apply_token_bitmask_inplace(x, bitmask.to(x.device, non_blocking=True), indices=local)
            return
        # On the CPU, torch's vectorised unpacking beats xgrammar's one-threaded C++ loop (16 rows of 202k logits:
        # 13.5 ms on an idle dev-cpu, benchmarks/grammar_mask_cpu.py). Each byte of the bitmask is looked up in
        # a table of 8 "forbidden" flags packed in one int64, so the unpacking is one gather of 8-byte words
        # into a bool tensor as wide as the logits (shifting every bit out of the int32 words took four
        # passes over a 4-byte-per-token tensor). Bit j of byte k of word w is token 32 * w + 8 * k + j, as in
        # xgrammar (little-endian); ids past the logits' width are left alone.
        words = bitmask[local] if len(local) < len(rows) else bitmask
        forbidden = _FORBIDDEN.index_select(0, words.view(torch.uint8).view(-1).int())
        forbidden = forbidden.view(torch.bool).view(len(local), -1)[:, : x.shape[1]]
        if len(local) == x.shape[0]:
            x.masked_fill_(forbidden, float("-inf"))
        else:
            index = torch.tensor(local)
            x[index] = x[index].masked_fill(forbidden, float("-inf"))


def _allowed_ids(words: np.ndarray) -> np.ndarray:
    """The ids whose bits are set in one bitmask row (int32 words), ascending: the work follows the words, then
    the bytes, that allow something, not the vocabulary."""
    w = np.flatnonzero(words)
    data = words[w].view(np.uint8).reshape(-1, 4)  # little-endian: byte b of a word holds its bits 8b .. 8b + 7
    m, b = np.nonzero(data)
    n, bit = np.nonzero(np.unpackbits(data[m, b][:, None], axis=1, bitorder="little"))
    return (w[m[n]] * 32 + b[n] * 8 + bit).astype(np.int32)
