"""Tool calls as Llama 4 writes them, turned into (name, arguments) pairs.

Two shapes: pythonic, `[get_weather(city="Paris", days=3), f2()]`, whose arguments are Python literals
read from the syntax tree (never evaluated); and JSON, `{"name": ..., "parameters": {...}}` (or
"arguments"), alone or in a list. Anything else is not a call: the functions return None and the text
stays content.
"""

from __future__ import annotations

import ast
import json
import math
from typing import Any

# Names the model writes for JSON constants when it mixes the two syntaxes.
_NAME_CONSTANTS = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


def pythonic_calls(text: str) -> list[tuple[str, dict[str, Any]]] | None:
    """`[f(a=1), g(b="x")]` -> [("f", {"a": 1}), ("g", {"b": "x"})]; None unless it is exactly that."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
        if not isinstance(tree, ast.List) or not tree.elts:
            return None
        calls = []
        for node in tree.elts:
            # Keyword arguments only, as in Meta's format: positional ones have no parameter name.
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
                return None
            if any(kw.arg is None for kw in node.keywords):
                return None
            calls.append((node.func.id, {kw.arg: literal(kw.value) for kw in node.keywords}))
        return calls
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return None


def json_calls(text: str) -> list[tuple[str, dict[str, Any]]] | None:
    """`{"name": "f", "parameters": {...}}` or a list of them -> [("f", {...})]; None otherwise."""
    value = _load_json_or_literal(text)
    calls = []
    for item in value if isinstance(value, list) else [value]:
        call = _json_call(item)
        if call is None:
            return None
        calls.append(call)
    return calls or None


def arguments_json(arguments: dict[str, Any]) -> str:
    """The OpenAI `arguments` string; ValueError for values JSON cannot carry (NaN, infinity)."""
    return json.dumps(arguments, ensure_ascii=False, allow_nan=False)


def literal(node: ast.AST) -> Any:
    """The JSON value of a literal expression node (str, number, bool, None, list, tuple, dict, set)."""
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, str | int | float)):
        if isinstance(node.value, float) and not math.isfinite(node.value):
            raise ValueError("non-finite number")
        return node.value
    if isinstance(node, ast.Name) and node.id in _NAME_CONSTANTS:
        return _NAME_CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = literal(node.operand)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("sign on a non-number")
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.List | ast.Tuple | ast.Set):
        return [literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("dict unpacking")
        keys = [literal(k) for k in node.keys]  # type: ignore[arg-type]
        if not all(isinstance(k, str) for k in keys):
            raise ValueError("JSON object keys must be strings")
        return {k: literal(v) for k, v in zip(keys, node.values, strict=True)}
    raise ValueError(f"not a literal: {type(node).__name__}")


def _load_json_or_literal(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    # The model sometimes writes the JSON shape with Python quoting: {'name': 'f', 'parameters': {...}}.
    try:
        return literal(ast.parse(text.strip(), mode="eval").body)
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return None


def _json_call(item: Any) -> tuple[str, dict[str, Any]] | None:
    if not isinstance(item, dict):
        return None
    if isinstance(item.get("function"), dict):  # OpenAI's own shape
        item = item["function"]
    # Without its arguments key a {"name": ...} object is ordinary JSON content, not a call.
    if "parameters" not in item and "arguments" not in item:
        return None
    name = item.get("name")
    args = item.get("parameters", item.get("arguments"))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    if not isinstance(name, str) or not name or not isinstance(args, dict):
        return None
    return name, args
