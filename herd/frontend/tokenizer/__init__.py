"""Tokenizers: one interface over Hugging Face `tokenizer.json` and Meta's tiktoken `tokenizer.model`.

`load_tokenizer(path)` accepts a model folder or a tokenizer file. Both kinds give the same ids for the
same text (tests/test_tokenizer.py checks this on the real Llama 4 vocabulary), so the rest of herd never
needs to know which file a checkpoint shipped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from herd.frontend.chat import load_checkpoint_template, resolve_chat_template
from herd.frontend.tokenizer.base import LLAMA4_STOP_TOKENS, Tokenizer
from herd.frontend.tokenizer.gguf import load_gguf_tokenizer
from herd.frontend.tokenizer.hf import HFTokenizer
from herd.frontend.tokenizer.tiktoken_bpe import TiktokenTokenizer, llama4_special_tokens

__all__ = [
    "LLAMA4_STOP_TOKENS",
    "HFTokenizer",
    "TiktokenTokenizer",
    "Tokenizer",
    "llama4_special_tokens",
    "load_tokenizer",
]

logger = logging.getLogger(__name__)


def load_tokenizer(path: str | Path, chat_template: str | None = None) -> Tokenizer:
    """Load the tokenizer of a model folder, or a `tokenizer.json` / `tokenizer.model` / GGUF file.

    The folder (a file's parent) also supplies tokenizer_config.json (named special tokens, chat template),
    chat_template.jinja / chat_template.json, and generation_config.json (extra stop ids). chat_template
    overrides the checkpoint's template: a built-in name ("llama-4"), a .jinja path or jinja source.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if path.suffix == ".gguf":
        # A tokenizer file beside the GGUF file wins, as llama.cpp's users expect of a downloaded folder.
        beside = [p for p in (folder / "tokenizer.json", folder / "tokenizer.model") if p.is_file()]
        if not beside:
            return load_gguf_tokenizer(path, chat_template)
        path = beside[0]
    if path.is_dir():
        candidates = [path / "tokenizer.json", path / "tokenizer.model"]
        path = next((p for p in candidates if p.is_file()), candidates[0])
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {folder}")
    elif not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")

    config = _read_json(folder / "tokenizer_config.json")
    generation_eos = _as_int_list(_read_json(folder / "generation_config.json").get("eos_token_id"))
    template = resolve_chat_template(chat_template, load_checkpoint_template(folder, config))
    cls = HFTokenizer if path.suffix == ".json" else TiktokenTokenizer
    logger.info("loading %s from %s (chat template: %s)", cls.__name__, path, template.name)
    return cls(path, config, generation_eos, template)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _as_int_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []
