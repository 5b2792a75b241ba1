"""herd serving the packaged demo model with its defaults, as a new user starts it: its name in the API,
and prompt logprobs (`echo`) against transformers."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from herd.config.server_args import ServerArgs
from herd.demo import MODEL_PATH

from server_fixtures import ServerThread


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(ServerArgs(dtype="float32", context_length=2048, max_total_tokens=8192)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_models_lists_the_demo_by_name(server: ServerThread, client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["herd-demo"]
    card = httpx.get(f"{server.url}/v1/models").json()["data"][0]
    # vLLM's model card fields: who owns it and the longest sequence the server takes.
    assert card["owned_by"] == "herd" and card["max_model_len"] == 2048
    assert str(MODEL_PATH) not in card["id"]
    assert client.models.retrieve("herd-demo").id == "herd-demo"
