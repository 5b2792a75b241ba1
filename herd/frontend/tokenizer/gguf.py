"""The tokenizer stored in a GGUF file's metadata, rebuilt as a `tokenizers` BPE.

llama.cpp's converter stores a Llama 4 tokenizer as `tokenizer.ggml.model = gpt2` (byte-level BPE: the tokens
in GPT-2's printable byte form, the merges as "a b") with `tokenizer.ggml.pre = llama4` (Llama 4's pre-tokenizer
regex), the token types (3 = control: the special tokens), the BOS/EOS/EOT/EOM/padding ids, whether to add BOS,
and the chat template. Those are exactly the parts of a `tokenizer.json`, so herd builds one with the
`tokenizers` library and serves it through HFTokenizer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as RustTokenizer

from herd.config.gguf import GGUFError, open_gguf
from herd.frontend.chat import resolve_chat_template
from herd.frontend.tokenizer.hf import HFTokenizer
from herd.frontend.tokenizer.tiktoken_bpe import TiktokenTokenizer

logger = logging.getLogger(__name__)

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types of special and added tokens
# The pre-tokenizer regex of each `tokenizer.ggml.pre` herd knows.
_PRE_TOKENIZERS = {"llama4": TiktokenTokenizer.PATTERN}


def load_gguf_tokenizer(path: Path, chat_template: str | None = None) -> HFTokenizer:
    """The tokenizer of the GGUF model at `path` (the first file of a split set holds it)."""
    model = open_gguf(path)
    kind, pre = model.value("tokenizer.ggml.model"), model.value("tokenizer.ggml.pre")
    if kind != "gpt2" or pre not in _PRE_TOKENIZERS:
        raise GGUFError(
            f"{path}: tokenizer.ggml.model {kind!r} with pre-tokenizer {pre!r} is not supported; herd reads "
            f"'gpt2' with {', '.join(map(repr, _PRE_TOKENIZERS))} (Llama 4's), or a tokenizer.json beside the file"
        )
    tokens: list[str] = model.value("tokenizer.ggml.tokens")
    types: list[int] = model.value("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in model.value("tokenizer.ggml.merges", [])]
    added = {i for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)}
    vocab = {tok: i for i, tok in enumerate(tokens) if i not in added}
    tok = RustTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRE_TOKENIZERS[pre]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # Added in id order, each lands on its own id: the BPE vocabulary fills the ids below them.
    tok.add_tokens([AddedToken(tokens[i], special=types[i] == _CONTROL, normalized=False) for i in sorted(added)])
    bad = [i for i in sorted(added) if tok.token_to_id(tokens[i]) != i]
    if bad:
        raise GGUFError(f"{path}: special tokens out of place in the vocabulary, e.g. {tokens[bad[0]]!r}")

    ids = {k: model.value(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "eot", "eom", "padding")}
    if model.value("tokenizer.ggml.add_bos_token", True) and ids["bos"] is not None:
        bos = tokens[ids["bos"]]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, ids["bos"])])
    config: dict[str, Any] = {
        name: tokens[ids[key]]
        for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding"))
        if ids[key] is not None
    }
    template = resolve_chat_template(chat_template, model.value("tokenizer.chat_template"))
    generation_eos = [i for i in (ids["eos"], ids["eot"], ids["eom"]) if i is not None]
    logger.info("tokenizer from the metadata of %s (chat template: %s)", path, template.name)
    return HFTokenizer(tok, config, generation_eos, template)
