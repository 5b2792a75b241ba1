"""Chat templates: the checkpoint's jinja template, or a built-in one chosen by name.

`resolve_chat_template(spec, checkpoint_template)` implements `--chat-template`: no spec means the
checkpoint's own template (else built-in llama-4); a built-in name ("llama-4"); a path to a .jinja file;
or jinja source.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from herd.frontend.chat.base import ChatTemplate, Piece
from herd.frontend.chat.jinja import JinjaChatTemplate
from herd.frontend.chat.llama4 import Llama4ChatTemplate

__all__ = [
    "BUILTIN_CHAT_TEMPLATES",
    "ChatTemplate",
    "JinjaChatTemplate",
    "Llama4ChatTemplate",
    "Piece",
    "load_checkpoint_template",
    "resolve_chat_template",
]

logger = logging.getLogger(__name__)

BUILTIN_CHAT_TEMPLATES: dict[str, Callable[[], ChatTemplate]] = {
    "llama-4": Llama4ChatTemplate,
    "llama4": Llama4ChatTemplate,
}
DEFAULT_CHAT_TEMPLATE = "llama-4"


def resolve_chat_template(spec: str | None, checkpoint_template: str | Mapping[str, str] | None = None) -> ChatTemplate:
    """The template for `--chat-template spec` given the checkpoint's own (see module docstring)."""
    if spec is None:
        if checkpoint_template is not None:
            return JinjaChatTemplate(checkpoint_template, name="checkpoint")
        return BUILTIN_CHAT_TEMPLATES[DEFAULT_CHAT_TEMPLATE]()
    if spec in BUILTIN_CHAT_TEMPLATES:
        return BUILTIN_CHAT_TEMPLATES[spec]()
    if isinstance(checkpoint_template, Mapping) and spec in checkpoint_template:
        return JinjaChatTemplate(checkpoint_template[spec], name=spec)
    if "{{" in spec or "{%" in spec:
        return JinjaChatTemplate(spec, name="inline")
    if Path(spec).is_file():
        return JinjaChatTemplate(Path(spec).read_text(encoding="utf-8"), name=spec)
    names = ", ".join(sorted(BUILTIN_CHAT_TEMPLATES))
    raise ValueError(f"chat template {spec!r} is not a built-in ({names}), a file or jinja source")


def load_checkpoint_template(folder: Path, tokenizer_config: Mapping[str, Any]) -> str | dict[str, str] | None:
    """The jinja template a checkpoint folder carries, as transformers finds it, or None.

    chat_template.jinja wins over tokenizer_config.json's `chat_template` (a string, or a list of named
    templates), which wins over a processor's chat_template.json.
    """
    main: str | None = None
    named: dict[str, str] = {}
    if (folder / "chat_template.jinja").is_file():
        main = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif isinstance(tokenizer_config.get("chat_template"), str):
        main = tokenizer_config["chat_template"]
    elif isinstance(tokenizer_config.get("chat_template"), list):
        named = {t["name"]: t["template"] for t in tokenizer_config["chat_template"]}
    elif (folder / "chat_template.json").is_file():
        with (folder / "chat_template.json").open(encoding="utf-8") as f:
            main = json.load(f).get("chat_template")
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        named |= {p.stem: p.read_text(encoding="utf-8") for p in sorted(extra.glob("*.jinja"))}
    if main is not None and not named:
        return main
    if main is not None:
        named["default"] = main
    return named or None
