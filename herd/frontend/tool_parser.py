"""Tool-call parsers: model output text -> content + OpenAI `tool_calls`, whole or streamed.

A parser is a small state machine fed text deltas. It passes text through as content until something may
start a call (`[name(` for pythonic, `{"` or `[{` for JSON), holds that back until the bracket closes,
then either emits the calls or, if the text was no call after all, releases it as content. Malformed
calls never raise. `<|python_start|>` / `<|python_end|>` wrappers are dropped wherever they appear, and
text before a call stays content. `parse(text)` is the same machine fed all at once, so streaming, split
anywhere, ends with exactly the non-streaming result.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from herd.frontend.tool_calls import arguments_json, json_calls, pythonic_calls

WRAPPERS = ("<|python_start|>", "<|python_end|>")
_PY_START = re.compile(r"\[\s*[^\W\d]\w*\s*\(")
_PY_PARTIAL = re.compile(r"\[\s*(?:[^\W\d]\w*\s*)?")
_JSON_START = re.compile(r"(?:\[\s*)?\{\s*[\"']")
_JSON_PARTIAL = re.compile(r"(?:\[\s*)?(?:\{\s*)?")
_SEPARATOR = re.compile(r"\s*[;,]?\s*")  # between consecutive calls: `{...}; {...}`
_CLOSERS = {")": "(", "]": "[", "}": "{"}


@dataclass(frozen=True)
class ToolCall:
    """A complete call: OpenAI `{"id", "type": "function", "function": {"name", "arguments"}}`."""

    id: str
    name: str
    arguments: str  # JSON object text

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolCallDelta:
    """One streamed `delta.tool_calls[]` entry. herd sends each call whole, as soon as it is complete."""

    index: int
    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        function = {"name": self.name, "arguments": self.arguments}
        return {"index": self.index, "id": self.id, "type": "function", "function": function}


@dataclass
class ParserDelta:
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass
class ParsedOutput:
    content: str | None
    tool_calls: list[ToolCall]


def merge_deltas(deltas: Iterable[ParserDelta]) -> ParsedOutput:
    """The message a stream of deltas adds up to (what `parse` returns for the same text)."""
    content, calls = [], []
    for delta in deltas:
        content.append(delta.content)
        calls += [ToolCall(d.id, d.name, d.arguments) for d in delta.tool_calls]
    text = "".join(content)
    # Around calls, the text is the model's lead-in ("Let me check.\n"): trim it; otherwise keep it intact.
    if calls:
        text = text.strip()
    return ParsedOutput(text or None, calls)


class ToolParser:
    """Per-request parser. `feed(delta)` / `finish()` while streaming, or `parse(text)` once."""

    def __init__(self, pythonic: bool = True, json: bool = True) -> None:
        self.shapes = (pythonic, json)
        self._starts = ("[" if pythonic or json else "") + ("{" if json else "")
        self._wrapper_tail = ""  # the start of a possible wrapper token
        self._pending = ""  # text not yet decided: a possible call start, or an open bracket
        self._block: _Brackets | None = None
        self._after_call = False
        self._separator = ""  # text between calls, dropped if another call follows
        self._count = 0

    def parse(self, text: str) -> ParsedOutput:
        return merge_deltas([self.feed(text), self.finish()])

    def feed(self, text: str) -> ParserDelta:
        return self._run(self._strip_wrappers(text, final=False), final=False)

    def finish(self) -> ParserDelta:
        return self._run(self._strip_wrappers("", final=True), final=True)

    def _strip_wrappers(self, text: str, final: bool) -> str:
        buf, out = self._wrapper_tail + text, []
        while hits := [(at, w) for w in WRAPPERS if (at := buf.find(w)) >= 0]:
            at, wrapper = min(hits)
            out.append(buf[:at])
            buf = buf[at + len(wrapper) :]
        keep = 0 if final else _partial_suffix(buf, WRAPPERS)
        self._wrapper_tail = buf[len(buf) - keep :]
        out.append(buf[: len(buf) - keep])
        return "".join(out)

    def _run(self, text: str, final: bool) -> ParserDelta:
        self._pending += text
        delta = ParserDelta()
        while self._pending:
            if self._block is None and not self._start_block(delta, final):
                break
            if not self._close_block(delta, final):
                break
        if final:
            self._separator = ""  # a trailing separator after the last call is noise
        return delta

    def _close_block(self, delta: ParserDelta, final: bool) -> bool:
        # Pending text starts with an open block: wait for it to close, then emit calls or content.
        assert self._block is not None
        status, end = self._block.scan(self._pending)
        if status == "open" and not final:
            return False
        if status == "open":  # unterminated at the end of the output
            end = len(self._pending)
        block, self._pending = self._pending[:end], self._pending[end:]
        self._block = None
        calls = self._calls(block) if status == "closed" else None
        if calls is None:
            self._content(delta, block)
            return True
        self._separator, self._after_call = "", True
        for name, arguments in calls:
            delta.tool_calls.append(ToolCallDelta(self._count, f"call_{uuid.uuid4().hex[:24]}", name, arguments))
            self._count += 1
        return True

    def _start_block(self, delta: ParserDelta, final: bool) -> bool:
        # In scanning mode: emit content up to a possible call start; True once a block has begun.
        if self._after_call:
            sep = _SEPARATOR.match(self._pending)
            assert sep is not None
            if sep.end() == len(self._pending) and not final:
                return False
            self._separator, self._pending = self._pending[: sep.end()], self._pending[sep.end() :]
            self._after_call = False
        while self._pending:
            at = _first_of(self._pending, self._starts)
            self._content(delta, self._pending[:at])
            self._pending = self._pending[at:]
            if not self._pending:
                return False
            verdict = self._classify(self._pending, final)
            if verdict == "more":
                return False
            if verdict == "yes":
                self._block = _Brackets()
                return True
            self._content(delta, self._pending[0])
            self._pending = self._pending[1:]
        return False

    def _classify(self, text: str, final: bool) -> str:
        pythonic, json = self.shapes
        if (pythonic and _PY_START.match(text)) or (json and _JSON_START.match(text)):
            return "yes"
        if not final and ((pythonic and _PY_PARTIAL.fullmatch(text)) or (json and _JSON_PARTIAL.fullmatch(text))):
            return "more"
        return "no"

    def _calls(self, block: str) -> list[tuple[str, str]] | None:
        pythonic, json = self.shapes
        calls = (pythonic_calls(block) if pythonic else None) or (json_calls(block) if json else None)
        try:
            return [(name, arguments_json(args)) for name, args in calls] if calls else None
        except ValueError:
            return None

    def _content(self, delta: ParserDelta, text: str) -> None:
        if text:
            delta.content += self._separator + text
            self._separator = ""


class _Brackets:
    """Finds where a bracketed expression closes, across feeds, skipping brackets inside strings."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.quote = ""
        self.escaped = False
        self.pos = 0

    def scan(self, text: str) -> tuple[str, int]:
        """("closed", end) when text[:end] is balanced; ("broken", end) on a mismatched closer; else
        ("open", -1)."""
        for i in range(self.pos, len(text)):
            c = text[i]
            if self.quote:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == self.quote:
                    self.quote = ""
            elif c in "\"'":
                self.quote = c
            elif c in "([{":
                self.stack.append(c)
            elif c in _CLOSERS:
                if not self.stack or self.stack.pop() != _CLOSERS[c]:
                    return "broken", i + 1
                if not self.stack:
                    return "closed", i + 1
        self.pos = len(text)
        return "open", -1


def _first_of(text: str, chars: str) -> int:
    hits = [at for c in chars if (at := text.find(c)) >= 0]
    return min(hits, default=len(text))


def _partial_suffix(text: str, words: Iterable[str]) -> int:
    # Length of the longest suffix of text that is a proper prefix of one of words.
    words = tuple(words)
    for n in range(min(len(text), max(map(len, words)) - 1), 0, -1):
        if any(w.startswith(text[-n:]) for w in words):
            return n
    return 0


TOOL_PARSERS: dict[str, Callable[[], ToolParser]] = {
    "pythonic": partial(ToolParser, pythonic=True, json=False),
    "llama4_pythonic": partial(ToolParser, pythonic=True, json=False),  # vLLM's name
    "json": partial(ToolParser, pythonic=False, json=True),
    "llama4_json": partial(ToolParser, pythonic=False, json=True),
    "llama3_json": partial(ToolParser, pythonic=False, json=True),
    # Llama 4 writes both shapes (pythonic when offered tools Meta's way, JSON under HF's template).
    "llama4": partial(ToolParser, pythonic=True, json=True),
}


def get_tool_parser(name: str) -> ToolParser:
    """A fresh parser for one request; ValueError for an unknown name."""
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool parser {name!r}; accepted: {', '.join(sorted(TOOL_PARSERS))}")
    return TOOL_PARSERS[name]()
