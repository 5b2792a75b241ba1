"""herd.frontend.schema_support against xgrammar itself: what it lists as unenforced, xgrammar lets a breaking
document through; what it does not list, xgrammar refuses. A new xgrammar that changes either fails here."""

from __future__ import annotations

import json
from typing import Any

import pytest
import xgrammar as xgr
from xgrammar.testing import _is_grammar_accept_string

from herd.frontend.schema_support import ENFORCED_FORMATS, unenforced


def accepts(schema: dict[str, Any], document: str) -> bool:
    grammar = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=False)
    return bool(_is_grammar_accept_string(grammar, document))


# (schema, a document that breaks only the keyword under test)
UNENFORCED_CASES = [
    ({"not": {"type": "string"}}, '"x"'),
    ({"if": {"type": "integer"}, "then": {"minimum": 0}, "else": {"type": "string"}}, "true"),
    ({"allOf": [{"type": "integer"}, {"minimum": 5}]}, "1"),
    ({"$ref": "http://example.com/x.json"}, "1"),
    ({"type": "string", "format": "idn-email"}, '"@@ @@"'),
]
ENFORCED_CASES = [
    ({"type": "string", "pattern": "^a+$"}, '"b"'),
    ({"type": "integer", "multipleOf": 3}, "4"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1,1]"),
    ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 1}, "minContains": 2}, "[1]"),
    ({"type": "object", "if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}}, '{"a":1}'),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, '{"a":1}'),
    ({"type": "object", "propertyNames": {"pattern": "^a"}}, '{"b":1}'),
    ({"type": "object", "patternProperties": {"^a": {"type": "integer"}}}, '{"ab":"x"}'),
    ({"allOf": [{"type": "integer"}]}, '"a"'),
    ({"$defs": {"a": {"type": "integer"}}, "$ref": "#/$defs/a"}, '"x"'),
    ({"type": "number", "exclusiveMinimum": 0}, "0"),
    *[({"type": "string", "format": f}, '"@@ @@"') for f in sorted(ENFORCED_FORMATS)],
]


@pytest.mark.parametrize(("schema", "document"), UNENFORCED_CASES)
def test_what_is_listed_xgrammar_lets_through(schema: dict[str, Any], document: str) -> None:
    assert unenforced(schema)
    assert accepts(schema, document)


@pytest.mark.parametrize(("schema", "document"), ENFORCED_CASES)
def test_what_is_not_listed_xgrammar_refuses(schema: dict[str, Any], document: str) -> None:
    assert unenforced(schema) == []
    assert not accepts(schema, document)


def test_problems_are_found_anywhere_and_named_by_json_pointer() -> None:
    schema = {
        "type": "object",
        "properties": {
            "a/b": {"type": "array", "items": {"not": {"type": "null"}}},
            "c": {"anyOf": [{"type": "string", "format": "iri"}, {"type": "integer"}]},
        },
        "$defs": {"d": {"enum": [{"not": "data, not a schema"}]}},
    }
    supported = ", ".join(sorted(ENFORCED_FORMATS))
    assert unenforced(schema) == [
        "#/properties/a~1b/items: not is not supported",
        f"#/properties/c/anyOf/0: format 'iri' is not supported (supported: {supported})",
    ]
