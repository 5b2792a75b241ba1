"""Grammars of tool calls in the parser's own syntax, naming only the offered tools, with schema-valid args.

Built as xgrammar structural tags (JSON), which the frontend compiles like any other grammar:

- pythonic (Llama 4's `[get_weather(city="Paris"), f(x=1)]`): each call is `name(` + keyword arguments +
  `)`. Argument values are JSON values of the parameter's schema (xgrammar's JSON-schema grammar); the
  pythonic parser reads JSON strings, numbers, lists, objects and true/false/null as Python literals.
  Required parameters come first, in the schema's order, then the optional ones, each optional, in order.
- JSON (`{"name": "f", "parameters": {...}}`, calls separated by `; `): the tool's schema as the
  `parameters` value.

`required` (tool_choice "required" or a named function): the reply is calls and nothing else.
`auto`: free text until the model opens a call (`[` for pythonic, `{"name"` for JSON), then a call to
an offered tool until the call closes, then free text again. The catch: in auto mode a `[` in prose
must open a call (so the model cannot write `[1]` in plain text).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any, Literal

import xgrammar as xgr

Mode = Literal["required", "auto"]


def tool_call_structural_tag(
    tools: list[dict[str, Any]],
    *,
    pythonic: bool,
    json_shape: bool,
    mode: Mode,
    parallel: bool = True,
    only: str | None = None,
) -> str:
    """The structural tag (JSON text) for calls to `tools` (OpenAI tool dicts), or to `only` of them, in
    the shapes the parser reads (both: the model may write either, whatever its prompt asked for)."""
    if not (pythonic or json_shape):
        raise ValueError("a tool-call grammar needs at least one shape")
    functions = [t["function"] for t in tools if only is None or t["function"]["name"] == only]
    key = json.dumps([functions, pythonic, json_shape, mode, parallel], sort_keys=True)
    return _structural_tag(key)


@lru_cache(maxsize=128)
def _structural_tag(key: str) -> str:
    functions, pythonic, json_shape, mode, parallel = json.loads(key)
    kwargs = {f["name"]: _grammar(_kwargs(f.get("parameters") or {})) for f in functions} if pythonic else {}
    if mode == "required":
        shapes = [_pythonic_calls(kwargs, parallel)] if pythonic else []
        shapes += [_json_calls(functions, parallel)] if json_shape else []
        fmt = shapes[0] if len(shapes) == 1 else {"type": "or", "elements": shapes}
    else:
        triggers = (["["] if pythonic else []) + (['{"name": '] if json_shape else [])
        tags = (_pythonic_opened(kwargs) if pythonic else []) + (_json_tags(functions) if json_shape else [])
        fmt = {"type": "triggered_tags", "triggers": triggers, "tags": tags}
    return json.dumps({"type": "structural_tag", "format": fmt})


def _pythonic_calls(kwargs: dict[str, dict[str, Any]], parallel: bool) -> dict[str, Any]:
    calls = [_tag(f"{name}(", grammar, ")") for name, grammar in kwargs.items()]
    return _sequence(_const("["), _separated(calls, ", ", stop_after_first=not parallel), _const("]"))


def _pythonic_opened(kwargs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """auto mode: the trigger `[` must open `[name(` of an offered name; more calls may follow in the list."""
    calls = [_tag(f"{name}(", grammar, ")") for name, grammar in kwargs.items()]
    more = {"type": "optional", "content": _sequence(_const(", "), _separated(calls, ", "))}
    return [_tag(f"[{name}(", _sequence(grammar, _const(")"), more), "]") for name, grammar in kwargs.items()]


def _json_tags(functions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        _tag(
            f'{{"name": {json.dumps(f["name"])}, "parameters": ',
            # One space at most between tokens: the JSON shape stays on one line, as the parser reads it.
            {"type": "json_schema", "json_schema": f.get("parameters") or {"type": "object"}, "max_whitespace_cnt": 1},
            "}",
        )
        for f in functions
    ]


def _json_calls(functions: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    return _separated(_json_tags(functions), "; ", stop_after_first=not parallel)


def _kwargs(parameters: dict[str, Any]) -> xgr.Grammar:
    """`a=1, b="x"`: required parameters in order, then each optional one or not, in order."""
    props: dict[str, Any] = parameters.get("properties") or {}
    required = set(parameters.get("required") or ())
    needed = [k for k in props if k in required]
    optional = [k for k in props if k not in required]

    def arg(name: str, sep: str) -> xgr.Grammar:
        return xgr.Grammar.concat(_lit(f"{sep}{name}="), _value(props[name]))

    def maybe(name: str) -> xgr.Grammar:
        return xgr.Grammar.union(_lit(""), arg(name, ", "))

    if needed:
        return xgr.Grammar.concat(*(arg(k, ", " if i else "") for i, k in enumerate(needed)), *map(maybe, optional))
    # Nothing required: no arguments, or the optional ones from whichever comes first.
    starts = [xgr.Grammar.concat(arg(k, ""), *map(maybe, optional[i + 1 :])) for i, k in enumerate(optional)]
    return xgr.Grammar.union(_lit(""), *starts)


def _value(schema: Any) -> xgr.Grammar:
    return xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)


def _lit(text: str) -> xgr.Grammar:
    return xgr.Grammar.from_ebnf(f"root ::= {json.dumps(text)}")


# xgrammar's JSON rules end in lookahead assertions for what may follow a value in JSON (`,}]:`); after
# a keyword argument a `)` follows, which they would forbid in the mask. Dropping them only loosens.
_LOOKAHEAD = re.compile(r" \(=\(.*\)\)$", re.MULTILINE)


def _grammar(g: xgr.Grammar) -> dict[str, Any]:
    return {"type": "grammar", "grammar": _LOOKAHEAD.sub("", str(g))}


def _const(text: str) -> dict[str, Any]:
    return {"type": "const_string", "value": text}


def _tag(begin: str, content: dict[str, Any], end: str) -> dict[str, Any]:
    return {"type": "tag", "begin": begin, "content": content, "end": end}


def _sequence(*elements: dict[str, Any]) -> dict[str, Any]:
    return {"type": "sequence", "elements": list(elements)}


def _separated(tags: list[dict[str, Any]], separator: str, stop_after_first: bool = False) -> dict[str, Any]:
    return {
        "type": "tags_with_separator",
        "tags": tags,
        "separator": separator,
        "at_least_one": True,
        "stop_after_first": stop_after_first,
    }
