"""`tools` and `tool_choice` of a chat request: what the prompt offers and how the reply is read.

herd has no constrained decoding yet, so `tool_choice` "required" and named are enforced by starting the
assistant's reply with the opening of a call, which the model then continues: `[` or `[name(` in Llama 4's
pythonic format, `{"name": "` or `{"name": "name", "parameters": ` in the JSON one. The reply is read as
that opening plus what the model wrote, so the parsed calls are whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from herd.frontend.chat import Llama4ChatTemplate
from herd.frontend.tokenizer import Tokenizer
from herd.frontend.tool_parser import ParsedOutput, ParserDelta, ToolParser, get_tool_parser, merge_deltas
from herd.server.errors import bad_request
from herd.server.protocol import ChatCompletionRequest, NamedToolChoice


@dataclass(frozen=True)
class ToolPlan:
    tools: list[dict[str, Any]] | None = None  # offered in the prompt; None: no tools
    parser_name: str | None = None  # None: the reply is plain content
    prefix: str = ""  # the reply's forced opening
    parallel: bool = True  # False: keep only the first call

    def reader(self) -> ToolReader | None:
        if self.parser_name is None:
            return None
        return ToolReader(get_tool_parser(self.parser_name), self.prefix, self.parallel)


def plan_tools(req: ChatCompletionRequest, parser_name: str, tokenizer: Tokenizer) -> ToolPlan:
    choice = req.tool_choice
    if not req.tools:
        if choice is not None and choice != "none":
            raise bad_request("tool_choice is only allowed when tools are given", "tool_choice")
        return ToolPlan()
    if choice == "none":  # the model must not call: it is not offered any tool
        return ToolPlan()
    names = [t.function.name for t in req.tools]
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    pythonic = _writes_pythonic(get_tool_parser(parser_name), tokenizer)
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in names:
            raise bad_request(f"tool_choice names {name!r}, which is not among the tools: {names}", "tool_choice")
        prefix = f"[{name}(" if pythonic else f'{{"name": "{name}", "parameters": '
    elif choice == "required":
        prefix = "[" if pythonic else '{"name": "'
    else:
        prefix = ""
    return ToolPlan(tools, parser_name, prefix, req.parallel_tool_calls)


def _writes_pythonic(parser: ToolParser, tokenizer: Tokenizer) -> bool:
    # A parser reading both shapes: the model writes what its prompt asked for. herd's llama-4 template
    # asks for Meta's pythonic calls; the checkpoints' jinja templates ask for JSON.
    pythonic, json = parser.shapes
    if pythonic and json:
        return isinstance(tokenizer.chat_template, Llama4ChatTemplate)
    return pythonic


class ToolReader:
    """A choice's tool parser, fed the forced prefix first, keeping one call when parallel calls are off."""

    def __init__(self, parser: ToolParser, prefix: str, parallel: bool) -> None:
        self.parser = parser
        self.prefix = prefix
        self.parallel = parallel
        self.num_calls = 0

    def feed(self, text: str) -> ParserDelta:
        text, self.prefix = self.prefix + text, ""
        return self._limit(self.parser.feed(text))

    def finish(self) -> ParserDelta:
        first = self.feed("") if self.prefix else ParserDelta()
        last = self._limit(self.parser.finish())
        return ParserDelta(first.content + last.content, first.tool_calls + last.tool_calls)

    def parse(self, text: str) -> ParsedOutput:
        return merge_deltas([self.feed(text), self.finish()])

    def _limit(self, delta: ParserDelta) -> ParserDelta:
        if not self.parallel:
            delta.tool_calls = delta.tool_calls[: max(0, 1 - self.num_calls)]
        self.num_calls += len(delta.tool_calls)
        return delta
