"""Which parts of a JSON schema the grammar backend would not enforce, so `strict` can refuse them.

xgrammar (0.2.9) compiles almost any schema, but it drops a few keywords without a word: output made under
such a schema can break it. With `strict: true` the client asked for every keyword to hold, so those are a
400 naming the field; without it they are best effort, as in OpenAI's non-strict mode, and logged.

The lists below come from probing xgrammar with a schema and a document that breaks only the keyword in
question (tests/test_schema_support.py keeps them honest): it refused the document for every keyword not
listed here, and accepted it for these.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

# Keywords whose constraint xgrammar ignores.
UNENFORCED = {"not": "not", "else": "if/then/else's else", "$dynamicRef": "$dynamicRef"}
# `format` values xgrammar turns into a grammar; any other is ignored.
ENFORCED_FORMATS = frozenset(
    {
        "email", "date", "time", "date-time", "duration", "uri", "uri-reference", "uri-template", "uuid",
        "ipv4", "ipv6", "hostname", "json-pointer", "relative-json-pointer",
    }
)  # fmt: skip
# Keywords whose value maps names to subschemas, and those whose value is a subschema or a list of them.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_VALUES = (
    "items", "prefixItems", "additionalProperties", "unevaluatedProperties", "unevaluatedItems", "contains",
    "propertyNames", "anyOf", "oneOf", "allOf", "if", "then", "else", "not",
)  # fmt: skip


def unenforced(schema: Any) -> list[str]:
    """What in `schema` the backend would not enforce, as "<JSON pointer>: <why>" lines (empty: all of it)."""
    return list(_walk(schema, "#"))


def _walk(schema: Any, at: str) -> Iterator[str]:
    if not isinstance(schema, dict):
        return
    for keyword, why in UNENFORCED.items():
        if keyword in schema:
            yield f"{at}: {why} is not supported"
    all_of = schema.get("allOf")
    if isinstance(all_of, list) and len(all_of) > 1:
        yield f"{at}: allOf with more than one schema is not supported"
    ref = schema.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        yield f"{at}: $ref {ref!r} is not supported (only references inside the schema, starting with '#')"
    fmt = schema.get("format")
    if isinstance(fmt, str) and fmt not in ENFORCED_FORMATS:
        yield f"{at}: format {fmt!r} is not supported (supported: {', '.join(sorted(ENFORCED_FORMATS))})"
    for keyword in _SCHEMA_MAPS:
        value = schema.get(keyword)
        if isinstance(value, dict):
            for name, sub in value.items():
                yield from _walk(sub, f"{at}/{keyword}/{_escape(name)}")
    for keyword in _SCHEMA_VALUES:
        value = schema.get(keyword)
        if isinstance(value, list):
            for i, sub in enumerate(value):
                yield from _walk(sub, f"{at}/{keyword}/{i}")
        else:
            yield from _walk(value, f"{at}/{keyword}")


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")  # JSON pointer (RFC 6901)
