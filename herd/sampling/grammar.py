"""Constrained decoding on the engine side: a compiled grammar, one matcher per sequence, a token mask.

The frontend compiles a request's grammar (herd.frontend.structured) and sends it here as a
`GrammarBlob`: xgrammar's own serialization of the compiled grammar plus that of the tokenizer info,
both plain strings, so the blob pickles across the engine pipe. Compiling there, not here, keeps a slow
compile (a large JSON schema over a 200k vocabulary) off the engine's step loop, and a schema that does
not compile is refused before anything reaches the engine. Here a blob is only deserialized, once per
grammar (`_compiled` is keyed by the blob's key), and each sequence gets its own `GrammarState`.

Masking: xgrammar fills a packed int32 bitmask per row on the CPU (the matcher is a CPU automaton), the
bitmask moves to the logits' device, and xgrammar's kernel (C++ on the CPU, a GPU kernel on CUDA) sets
the disallowed logits to -inf, before logit_bias, penalties and temperature. It works row by row, so a
row's tokens still do not depend on the rest of the batch.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from threading import Lock
from typing import Literal

import torch
import xgrammar as xgr

logger = logging.getLogger(__name__)

GrammarKind = Literal["json_object", "json_schema", "regex", "ebnf", "structural_tag"]
_CACHE_SIZE = 256  # deserialized grammars kept by the engine


@dataclass(frozen=True)
class StructuredOutput:
    """What a request constrains its output to, as the client gave it (picklable, hashable).

    `spec` is the JSON schema text, the regex, the EBNF or the structural-tag JSON ("" for json_object);
    `field` is the request field it came from, named in the 400 when it does not compile.
    """

    kind: GrammarKind
    spec: str = ""
    field: str = "response_format"


@dataclass(frozen=True)
class GrammarBlob:
    """A compiled grammar as it crosses to the engine; `key` identifies grammar and tokenizer together."""

    key: str
    compiled: str  # xgrammar CompiledGrammar.serialize_json()
    tokenizer_key: str
    tokenizer_info: str  # xgrammar TokenizerInfo.serialize_json(); the same string object for every request


_lock = Lock()
_compiled: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
_tokenizers: dict[str, xgr.TokenizerInfo] = {}


def load_compiled(blob: GrammarBlob) -> xgr.CompiledGrammar:
    """The blob's compiled grammar, deserialized once and kept (LRU) for the next request that uses it."""
    with _lock:
        hit = _compiled.get(blob.key)
        if hit is not None:
            _compiled.move_to_end(blob.key)
            return hit
        info = _tokenizers.get(blob.tokenizer_key)
        if info is None:
            info = _tokenizers[blob.tokenizer_key] = xgr.TokenizerInfo.deserialize_json(blob.tokenizer_info)
        compiled = xgr.CompiledGrammar.deserialize_json(blob.compiled, info)
        _compiled[blob.key] = compiled
        if len(_compiled) > _CACHE_SIZE:
            _compiled.popitem(last=False)
        return compiled


class GrammarState:
    """One sequence's place in its grammar: advanced with each token the engine accepts."""

    def __init__(self, blob: GrammarBlob) -> None:
        compiled = load_compiled(blob)
        self.matcher = xgr.GrammarMatcher(compiled)
        self.failed = False

    def accept(self, token_id: int) -> None:
        # The sampler only draws allowed tokens, so a refusal means a bug (or an all -inf row); the
        # sequence then goes on unconstrained rather than failing the whole batch.
        if not self.failed and not self.matcher.is_terminated() and not self.matcher.accept_token(token_id):
            logger.warning("grammar refused token %d; the rest of this sequence is unconstrained", token_id)
            self.failed = True

    def fill(self, bitmask: torch.Tensor, row: int) -> bool:
        """Write this step's allowed tokens into `bitmask[row]`; False when nothing is constrained."""
        if self.failed or self.matcher.is_terminated():
            return False
        self.matcher.fill_next_token_bitmask(bitmask, row)
        return True


def mask_in_place(x: torch.Tensor, grammars: Sequence[GrammarState | None]) -> None:
    """Set to -inf, in place, every logit of x ([len(grammars), V]) its row's grammar forbids.

    Columns past the grammar's vocabulary (padding rows of the embedding) are forbidden too: the bitmask
    covers x's whole width and xgrammar leaves ids it has no token for unset.
    """
    bitmask = torch.full((len(grammars), (x.shape[1] + 31) // 32), -1, dtype=torch.int32)
    masked = [i for i, g in enumerate(grammars) if g is not None and g.fill(bitmask, i)]
    if masked:
        # xgrammar's kernel: C++ on the CPU, a GPU kernel on CUDA. On the CPU it was 8x faster than
        # unpacking the bits with torch ops (16 rows of 202k logits: ~20 ms against ~160 ms, dev-cpu).
        xgr.apply_token_bitmask_inplace(x, bitmask.to(x.device, non_blocking=True), indices=masked)
