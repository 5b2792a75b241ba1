"""What every chat template produces: the prompt as pieces of text, each marked trusted or not."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, NamedTuple


class Piece(NamedTuple):
    """A run of prompt text.

    trusted pieces come from the template itself: special-token text in them ("<|eot|>") is the control
    token. Untrusted pieces are message content and are encoded as plain text, so a user cannot forge a
    header or an end of turn. Pieces are encoded one by one, so BPE merges never cross a piece boundary
    (Meta's reference formatter encodes the same way).
    """

    text: str
    trusted: bool


class ChatTemplate(ABC):
    """Turns OpenAI-style messages into a prompt (Hugging Face `apply_chat_template` semantics)."""

    name: str = "template"

    @abstractmethod
    def render(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> list[Piece]:
        """The prompt for `messages` as pieces; "".join(p.text for p in pieces) is the prompt string."""

    def render_text(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        pieces = self.render(messages, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs)
        return "".join(p.text for p in pieces)


def continue_final_message(kwargs: dict[str, Any], add_generation_prompt: bool) -> bool:
    """HF's `continue_final_message` flag, which cannot go with a generation prompt."""
    continue_final = bool(kwargs.get("continue_final_message", False))
    if continue_final and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be set")
    return continue_final
