"""Request fields -> `SamplingParams`, with the checkpoint's defaults for what the request leaves out."""

from __future__ import annotations

import dataclasses
from typing import Any

from herd.sampling import SamplingParams
from herd.server.errors import bad_request, param_of

MAX_N = 128  # OpenAI's limit; it also bounds how many sequences one request can put into the batch
_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


def build_sampling_params(
    values: dict[str, Any], defaults: dict[str, Any], default_max_tokens: int | None
) -> SamplingParams:
    """SamplingParams from `values` (None = not given, then the default applies); 400 on a bad value.

    `defaults` are the checkpoint's generation_config.json values; what neither gives keeps vLLM's default.
    `default_max_tokens` differs per API (None: up to the context length).
    """
    given = {k: v for k, v in values.items() if v is not None}
    given.setdefault("max_tokens", default_max_tokens)
    unknown = set(given) - _FIELDS
    assert not unknown, f"not SamplingParams fields: {unknown}"
    n = given.get("n", 1)
    if isinstance(n, int) and n > MAX_N:
        raise bad_request(f"n must be at most {MAX_N}, got {n}", "n")
    for name, value in defaults.items():
        given.setdefault(name, value)
    try:
        return SamplingParams(**given)
    except ValueError as e:
        raise bad_request(str(e), param_of(str(e), _FIELDS)) from e
    except TypeError as e:  # a value of the wrong kind that pydantic let through (e.g. a stop list of lists)
        raise bad_request(str(e)) from e
