"""Request fields that constrain the output (`response_format`, SGLang's regex / ebnf / json_schema) ->
the `StructuredOutput` that `SamplingParams` carries. Whether the grammar compiles is the frontend's
check (herd.frontend.structured), which answers a 400 naming the same field."""

from __future__ import annotations

import dataclasses
import json

from herd.sampling import SamplingParams
from herd.sampling.grammar import StructuredOutput
from herd.server.errors import bad_request
from herd.server.protocol import ResponseFormat

RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def from_response_format(rf: ResponseFormat | None) -> StructuredOutput | None:
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return StructuredOutput("json_object", "", "response_format")
    if rf.type == "json_schema":
        field = "response_format.json_schema.schema"
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise bad_request("response_format json_schema needs json_schema.schema, a JSON schema object", field)
        strict = bool(rf.json_schema.strict)
        return StructuredOutput("json_schema", json.dumps(rf.json_schema.schema_), field, strict)
    accepted = list(RESPONSE_FORMATS)
    raise bad_request(f"response_format type must be one of {accepted}, got {rf.type!r}", "response_format")


def from_native(json_schema: str | None, regex: str | None, ebnf: str | None) -> StructuredOutput | None:
    """SGLang's sampling_params.{json_schema, regex, ebnf}: at most one of them."""
    given = {k: v for k, v in (("json_schema", json_schema), ("regex", regex), ("ebnf", ebnf)) if v is not None}
    if len(given) > 1:
        raise bad_request(f"give at most one of json_schema, regex and ebnf, got {sorted(given)}", "sampling_params")
    if not given:
        return None
    kind, spec = next(iter(given.items()))
    return StructuredOutput(kind, spec, f"sampling_params.{kind}")  # type: ignore[arg-type]


def constrained(params: SamplingParams, structured: StructuredOutput | None) -> SamplingParams:
    return params if structured is None else dataclasses.replace(params, structured=structured)
