"""herd's built-in llama-4 chat template: Meta's reference prompt format, written in Python.

Token for token the same as `llama_models.llama4.chat_format.ChatFormat.encode_dialog_prompt` with
pythonic tool calls (tests/test_chat_template.py checks it). Tools are offered the way Meta's Llama 4
prompt-format guide does: a system message listing the functions as JSON and asking for
`[func_name1(param1=value1, ...), ...]`, the format the Instruct models were tuned on. Where Meta's
formatter has no answer (several tool calls in one message, nested dict arguments, images) herd keeps to
the format the model itself produces.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from herd.frontend.chat.base import ChatTemplate, Piece, continue_final_message

BEGIN_OF_TEXT = "<|begin_of_text|>"
IMAGE = "<|image|>"
_ROLE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")

# Meta's Llama 4 tool-calling system prompt (llama-models, models/llama4/prompt_format.md).
TOOL_INSTRUCTIONS = """\
You are a helpful assistant and an expert in function composition. You can answer general questions using your internal knowledge OR invoke functions when necessary. Follow these strict guidelines:

1. FUNCTION CALLS:
- ONLY use functions that are EXPLICITLY listed in the function list below
- If NO functions are listed (empty function list []), respond ONLY with internal knowledge or "I don't have access to [Unavailable service] information"
- If a function is not in the list, respond ONLY with internal knowledge or "I don't have access to [Unavailable service] information"
- If ALL required parameters are present AND the query EXACTLY matches a listed function's purpose: output ONLY the function call(s)
- Use exact format: [func_name1(param1=value1, param2=value2), func_name2(...)]
Examples:
CORRECT: [get_weather(location="Vancouver"), calculate_route(start="Boston", end="New York")] <- Only if get_weather and calculate_route are in function list
INCORRECT: get_weather(location="New York")
INCORRECT: Let me check the weather: [get_weather(location="New York")]
INCORRECT: [get_events(location="Singapore")] <- If function not in list

2. RESPONSE RULES:
- For pure function requests matching a listed function: ONLY output the function call(s)
- For knowledge questions: ONLY output text
- For missing parameters: ONLY request the specific missing parameters
- For unavailable services (not in function list): output ONLY with internal knowledge or "I don't have access to [Unavailable service] information". Do NOT execute a function call.
- If the query asks for information beyond what a listed function provides: output ONLY with internal knowledge about your limitations
- NEVER combine text and function calls in the same response
- NEVER suggest alternative functions when the requested service is unavailable
- NEVER create or invent new functions not listed below

3. STRICT BOUNDARIES:
- ONLY use functions from the list below - no exceptions
- NEVER use a function as an alternative to unavailable information
- NEVER call functions not present in the function list
- NEVER add explanatory text to function calls
- NEVER respond with empty brackets
- Use proper Python/JSON syntax for function calls
- Check the function list carefully before responding

4. TOOL RESPONSE HANDLING:
- When receiving tool responses: provide concise, natural language responses
- Don't repeat tool response verbatim
- Don't add supplementary information


Here is a list of functions in JSON format that you can invoke.

{functions}

You can answer general questions or invoke tools when necessary.
In addition to tool calls, you should also augment your responses by using the tool outputs."""  # noqa: E501


class Llama4ChatTemplate(ChatTemplate):
    """System, user, assistant (with pythonic tool calls), tool results (header `ipython`), images."""

    name = "llama-4"

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> list[Piece]:
        # Other kwargs are template variables meant for jinja templates (bos_token, ...): not used here.
        continue_final = continue_final_message(kwargs, add_generation_prompt)
        messages = list(messages)
        pieces = [Piece(BEGIN_OF_TEXT, trusted=True)]
        if tools:
            system = None
            if messages and messages[0].get("role") == "system":
                system = _plain_text(messages.pop(0).get("content"))
            # llama-stack's default: the tool prompt first, then the user's own system message.
            text = tool_system_prompt(tools) + ("\n" + system if system else "")
            pieces += [_header("system"), Piece(text, trusted=False), Piece("<|eot|>", trusted=True)]
        for i, message in enumerate(messages):
            pieces += _message_pieces(message, end=not (continue_final and i == len(messages) - 1))
        if add_generation_prompt:
            pieces.append(_header("assistant"))
        return pieces


def tool_system_prompt(tools: Sequence[dict[str, Any]]) -> str:
    """The system message that offers `tools` (OpenAI tool definitions) for pythonic calls."""
    functions = []
    for tool in tools:
        # OpenAI wraps the definition: {"type": "function", "function": {...}}; a bare definition works too.
        fn = tool["function"] if isinstance(tool.get("function"), dict) else tool
        entry = {"name": fn["name"]}
        if fn.get("description") is not None:
            entry["description"] = fn["description"]
        entry["parameters"] = fn.get("parameters") or {}
        functions.append(entry)
    return TOOL_INSTRUCTIONS.replace("{functions}", _json_block(functions))


def format_tool_calls(tool_calls: Sequence[dict[str, Any]]) -> str:
    """OpenAI tool calls as one pythonic list: `[f(a=1, b="x"), g()]`."""
    calls = []
    for call in tool_calls:
        fn = call.get("function", call)
        args = fn.get("arguments") or {}
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise ValueError(f"tool call {fn.get('name')!r}: arguments are not valid JSON") from e
        if not isinstance(args, dict):
            raise ValueError(f"tool call {fn.get('name')!r}: arguments must be a JSON object")
        calls.append(f"{fn['name']}({', '.join(f'{k}={python_literal(v)}' for k, v in args.items())})")
    return "[" + ", ".join(calls) + "]"


def python_literal(value: Any) -> str:
    """A JSON value as Python source that `ast.literal_eval` reads back (Meta writes `"text"`, `True`)."""
    if isinstance(value, str):
        # JSON string escapes are all valid Python escapes; plain strings come out as Meta's `"text"`.
        return json.dumps(value, ensure_ascii=False)
    if value is None or isinstance(value, bool | int | float):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(python_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{python_literal(str(k))}: {python_literal(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"cannot write {type(value).__name__} as a tool-call argument")


def _message_pieces(message: dict[str, Any], end: bool) -> list[Piece]:
    role = message.get("role")
    # The role is written into the trusted header, so it must not smuggle control tokens in.
    if not isinstance(role, str) or not _ROLE.fullmatch(role):
        raise ValueError(f"invalid message role: {role!r}")
    is_tool = role in ("tool", "ipython")
    pieces = [_header("ipython" if is_tool else role), *_content_pieces(message.get("content"))]
    tool_calls = message.get("tool_calls") if role == "assistant" else None
    if tool_calls:
        pieces.append(Piece(format_tool_calls(tool_calls), trusted=False))
    if end:
        # Meta ends tool results and assistant turns that call tools with end-of-message.
        pieces.append(Piece("<|eom|>" if is_tool or tool_calls else "<|eot|>", trusted=True))
    return pieces


def _content_pieces(content: Any) -> list[Piece]:
    if content is None:
        return []
    if isinstance(content, str):
        return [Piece(content, trusted=False)]
    if isinstance(content, dict):
        return [Piece(json.dumps(content, ensure_ascii=False), trusted=False)]
    pieces = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            pieces.append(Piece(part["text"], trusted=False))
        elif kind in ("image_url", "image"):
            # One placeholder per image; the multimodal preprocessor expands it into the tile layout.
            pieces.append(Piece(IMAGE, trusted=True))
        else:
            raise ValueError(f"unsupported content part: {part!r}")
    return pieces


def _plain_text(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(p.text for p in _content_pieces(content) if not p.trusted)


def _header(role: str) -> Piece:
    return Piece(f"<|header_start|>{role}<|header_end|>\n\n", trusted=True)


def _json_block(value: Any, depth: int = 0) -> str:
    # Meta's layout: objects one key per line (4-space indent), lists of scalars on one line.
    pad, close = "    " * (depth + 1), "    " * depth
    if isinstance(value, dict) and value:
        items = [f"{pad}{json.dumps(k, ensure_ascii=False)}: {_json_block(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + close + "}"
    if isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        return "[\n" + ",\n".join(pad + _json_block(v, depth + 1) for v in value) + "\n" + close + "]"
    return json.dumps(value, ensure_ascii=False)
