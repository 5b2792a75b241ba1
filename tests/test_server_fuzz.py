"""schemathesis against the server's own OpenAPI schema: whatever a generated request holds, no 5xx,
and the server is healthy and serving afterwards.

Bounded: a fixed number of examples per operation (derandomized, so a run repeats), a context of 64
tokens so that no generated request decodes for long, traffic only to 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from herd.config.server_args import ServerArgs

from server_fixtures import ServerThread

MODEL = "herd-fuzz"
EXAMPLES = 25  # per operation
# No 5xx; invalid data refused; every status and error body as the schema documents it.
CHECKS = [not_a_server_error, negative_data_rejection, status_code_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_server(real_vocab_ckpt) -> Iterator[ServerThread]:
    args = ServerArgs(
        model_path=str(real_vocab_ckpt[0]),
        dtype="float32",
        served_model_name=MODEL,
        context_length=64,
        max_total_tokens=4096,
        max_request_body_bytes=64 * 1024,
    )
    with ServerThread(args) as running:
        yield running


def test_no_request_makes_a_server_error(fuzz_server: ServerThread) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9, [op.label for op in operations]  # every route is in the schema
    for operation in operations:
        # Hypothesis drives each operation on its own (schemathesis' pytest plugin needs an older pytest).
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(case=operation.as_strategy())
        def fuzz(case) -> None:  # type: ignore[no-untyped-def]
            case.call_and_validate(checks=CHECKS, timeout=60)

        fuzz()


def test_healthy_after_fuzzing(fuzz_server: ServerThread) -> None:
    assert httpx.get(f"{fuzz_server.url}/health").status_code == 200
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3, "ignore_eos": True}
    assert (
        httpx.post(f"{fuzz_server.url}/v1/completions", json=body, timeout=60).json()["usage"]["completion_tokens"] == 3
    )


def test_every_route_documents_what_it_answers(fuzz_server: ServerThread) -> None:
    """A complete schema: every operation's success body has a schema (so the fuzzing checks it), and every
    error status has OpenAI's error shape."""
    spec = httpx.get(f"{fuzz_server.url}/openapi.json").json()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            ok = operation["responses"]["200"]
            content = ok.get("content", {})
            if path != "/health":  # an empty body
                assert content and all(c.get("schema") for c in content.values()), (method, path, ok)
            for status in ("400", "404", "500", "503", "504"):
                assert "ErrorResponse" in str(operation["responses"][status]), (method, path, status)
    for path in ("/v1/chat/completions", "/v1/completions", "/generate"):
        assert "text/event-stream" in spec["paths"][path]["post"]["responses"]["200"]["content"], path
