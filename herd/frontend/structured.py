"""Compiling a request's grammar (JSON schema, regex, EBNF, structural tag) before it goes to the engine.

Why here and not in the engine: the frontend has the tokenizer, a bad schema must be a 400 before the
engine sees the request, and a compile (hundreds of ms for a big schema over a 200k vocabulary) must
not stall the engine's step loop. `InputProcessor` calls `compile` (off the event loop for a grammar it
has not seen); compiled grammars are cached by (kind, spec), so a schema is compiled once. What crosses
to the engine is a `GrammarBlob`, xgrammar's own serialization (herd.sampling.grammar), and, once, the
`GrammarVocabulary` every blob of this compiler refers to.

Why xgrammar and not llguidance: both mask a 202k vocabulary in about a millisecond a row. xgrammar has
what this design leans on: compiled grammars that serialize (so compiling stays out of the engine
process), structural tags (free text until a trigger such as `[` or `<|python_start|>`, then a grammar:
tool_choice "auto"), and mask kernels for CPU and CUDA logits. Its gap, keywords of a JSON schema it drops
without a word, is closed by herd.frontend.schema_support, which makes `strict` refuse them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Iterable
from threading import Lock

import xgrammar as xgr

from herd.frontend.schema_support import unenforced
from herd.frontend.tokenizer import Tokenizer
from herd.sampling.grammar import GrammarBlob, GrammarVocabulary, StructuredOutput

logger = logging.getLogger(__name__)

CACHE_SIZE = 256
_BYTE_LEVEL_NUL = "\u0100"  # byte 0 in the GPT-2 byte-to-character mapping of byte-level vocabularies


class GrammarError(ValueError):
    """A grammar that does not compile; `field` is the request field it came from."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def tokenizer_info(tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Iterable[int]) -> xgr.TokenizerInfo:
    """xgrammar's view of the vocabulary: byte-level token strings, special tokens as "" (never text).

    `vocab_size` is the model's (the logits' width), which may exceed the tokenizer's. Tokens holding a
    NUL byte are treated as special too: xgrammar lets them through where a grammar forbids control
    characters (a JSON string), and no structured output wants one.
    """
    special = tokenizer.all_special_ids
    vocab = []
    for i in range(min(tokenizer.vocab_size, vocab_size)):
        token = tokenizer.id_to_token(i) or ""
        vocab.append("" if i in special or _BYTE_LEVEL_NUL in token else token)
    return xgr.TokenizerInfo(
        vocab, xgr.VocabType.BYTE_LEVEL, vocab_size=vocab_size, stop_token_ids=sorted(set(stop_token_ids))
    )


class GrammarCompiler:
    """Compiles `StructuredOutput`s against one tokenizer, with an LRU cache of the results."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Iterable[int]) -> None:
        self.info = tokenizer_info(tokenizer, vocab_size, stop_token_ids)
        self._compiler = xgr.GrammarCompiler(self.info, cache_enabled=False)  # herd's own cache holds blobs
        info_json = self.info.serialize_json()
        self.vocabulary = GrammarVocabulary(hashlib.sha256(info_json.encode()).hexdigest()[:16], info_json)
        self._cache: OrderedDict[StructuredOutput, GrammarBlob] = OrderedDict()
        self._lock = Lock()

    def cached(self, structured: StructuredOutput) -> GrammarBlob | None:
        with self._lock:
            blob = self._cache.get(_cache_key(structured))
            if blob is not None:
                self._cache.move_to_end(_cache_key(structured))
            return blob

    def compile(self, structured: StructuredOutput) -> GrammarBlob:
        """The compiled grammar; `GrammarError` naming `structured.field` when it does not compile."""
        blob = self.cached(structured)
        if blob is not None:
            return blob
        compiled = self._compile(structured)
        text = compiled.serialize_json()
        key = hashlib.sha256(f"{self.vocabulary.key}\0{text}".encode()).hexdigest()[:24]
        blob = GrammarBlob(key, text, self.vocabulary.key)
        with self._lock:
            self._cache[_cache_key(structured)] = blob
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return blob

    def _compile(self, s: StructuredOutput) -> xgr.CompiledGrammar:
        try:
            if s.kind == "json_object":
                return self._compiler.compile_builtin_json_grammar()
            if s.kind == "json_schema":
                return self._compile_json_schema(s)
            if s.kind == "regex":
                return self._compiler.compile_regex(s.spec)
            if s.kind == "ebnf":
                return self._compiler.compile_grammar(s.spec)
            if s.kind == "structural_tag":
                return self._compiler.compile_structural_tag(s.spec)
        except GrammarError:
            raise
        except json.JSONDecodeError as e:
            raise GrammarError(f"{s.field} is not valid JSON: {e}", s.field) from None
        except (RuntimeError, ValueError, TypeError) as e:
            message = f"{s.field} cannot be used for constrained decoding: {_first_line(e)}"
            raise GrammarError(message, s.field) from None
        raise GrammarError(f"unknown constraint kind {s.kind!r}", s.field)

    def _compile_json_schema(self, s: StructuredOutput) -> xgr.CompiledGrammar:
        schema = json.loads(s.spec)
        if not isinstance(schema, dict | bool):
            raise GrammarError(f"{s.field} must be a JSON schema (an object), got {s.spec[:80]!r}", s.field)
        problems = unenforced(schema)
        if problems and s.strict:
            raise GrammarError(f"{s.field} uses what strict mode cannot enforce: {'; '.join(problems)}", s.field)
        if problems:
            logger.info("%s: best effort, not enforced: %s", s.field, "; ".join(problems))
        try:
            # xgrammar's strict mode: no properties or items beyond those the schema lists, which keeps the
            # model from rambling on with made-up ones; outputs still validate against the schema.
            return self._compiler.compile_json_schema(s.spec, any_whitespace=False, strict_mode=True)
        except RuntimeError:
            # ... unless the schema needs more than it lists ({"type": "array", "minItems": 2}).
            return self._compiler.compile_json_schema(s.spec, any_whitespace=False, strict_mode=False)


def _cache_key(s: StructuredOutput) -> StructuredOutput:
    return StructuredOutput(s.kind, s.spec, "", s.strict)  # the same grammar whichever field it came from


def _first_line(e: BaseException) -> str:
    # xgrammar's messages start with a timestamp and a C++ source location: keep what a user can act on.
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.split(": ", 1)[1] if text.startswith("[") and ": " in text else text
