"""`tools` and `tool_choice` of a chat request: what the prompt offers and how the reply is read.

`tool_choice` "required" and named are enforced by a grammar of the parser's own call syntax (pythonic or
JSON) naming only the offered tools (or the named one) with arguments that follow each tool's schema
(herd.frontend.tool_grammar). In "auto" mode the model writes freely until it opens a call, and the same
grammar holds until the call closes (`--tool-call-constraint off` turns that off).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from herd.frontend.schema_support import unenforced
from herd.frontend.tokenizer import Tokenizer
from herd.frontend.tool_grammar import tool_call_structural_tag
from herd.frontend.tool_parser import ParsedOutput, ParserDelta, ToolParser, get_tool_parser, merge_deltas
from herd.sampling.grammar import StructuredOutput
from herd.server.errors import bad_request
from herd.server.protocol import ChatCompletionRequest, NamedToolChoice


@dataclass(frozen=True)
class ToolPlan:
    tools: list[dict[str, Any]] | None = None  # offered in the prompt; None: no tools
    parser_name: str | None = None  # None: the reply is plain content
    prefix: str = ""  # the reply's forced opening
    parallel: bool = True  # False: keep only the first call
    structured: StructuredOutput | None = None  # the grammar of the calls, when they are constrained
    forced: bool = False  # the reply must be calls (tool_choice "required" or a named function)

    def reader(self) -> ToolReader | None:
        if self.parser_name is None:
            return None
        return ToolReader(get_tool_parser(self.parser_name), self.prefix, self.parallel)


def plan_tools(
    req: ChatCompletionRequest, parser_name: str, tokenizer: Tokenizer, constrain_auto: bool = True
) -> ToolPlan:
    choice = req.tool_choice
    if not req.tools:
        if choice is not None and choice != "none":
            raise bad_request("tool_choice is only allowed when tools are given", "tool_choice")
        return ToolPlan()
    if choice == "none":  # the model must not call: it is not offered any tool
        return ToolPlan()
    names = [t.function.name for t in req.tools]
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    pythonic, json_shape = get_tool_parser(parser_name).shapes
    only = None
    if isinstance(choice, NamedToolChoice):
        only = choice.function.name
        if only not in names:
            raise bad_request(f"tool_choice names {only!r}, which is not among the tools: {names}", "tool_choice")
    forced = only is not None or choice == "required"
    _check_strict(req)
    structured = None
    if forced or constrain_auto:
        mode = "required" if forced else "auto"
        try:
            tag = tool_call_structural_tag(
                tools, pythonic=pythonic, json_shape=json_shape, mode=mode, parallel=req.parallel_tool_calls, only=only
            )
        except (RuntimeError, ValueError, TypeError) as e:  # a parameters schema xgrammar cannot use
            raise bad_request(f"tools: a function's parameters schema cannot be used: {e}", "tools") from e
        structured = StructuredOutput("structural_tag", tag, "tools")
    return ToolPlan(tools, parser_name, "", req.parallel_tool_calls, structured, forced)


def _check_strict(req: ChatCompletionRequest) -> None:
    """A function with `strict: true` whose parameters use what the grammar cannot enforce is a 400."""
    for i, tool in enumerate(req.tools or []):
        if tool.function.strict and tool.function.parameters is not None:
            problems = unenforced(tool.function.parameters)
            if problems:
                message = f"tools[{i}] ({tool.function.name}) is strict, and its parameters use what strict mode"
                raise bad_request(f"{message} cannot enforce: {'; '.join(problems)}", "tools")


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
