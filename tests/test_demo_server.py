"""herd serving the packaged demo model with its defaults, as a new user starts it: its name in the API,
and prompt logprobs (`echo`) against transformers."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
import torch

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


# -- prompt logprobs: echo on /v1/completions, logprob_start_len on /generate --------------------------------

# The demo model's arithmetic question as a chat prompt; a text prompt gets <|begin_of_text|> from the server.
PROMPT = "<|header_start|>user<|header_end|>\n\nWhat is 17 + 25?<|eot|><|header_start|>assistant<|header_end|>\n\n"


@pytest.fixture(scope="module")
def reference() -> tuple[list[int], torch.Tensor]:
    """The prompt's ids (the checkpoint's tokenizer.json, read by `tokenizers`) and transformers' float32
    log-softmax at every position: row p is the distribution of token p + 1."""
    from tokenizers import Tokenizer
    from transformers import Llama4ForConditionalGeneration

    tokenizer = Tokenizer.from_file(str(MODEL_PATH / "tokenizer.json"))
    ids = tokenizer.encode("<|begin_of_text|>" + PROMPT, add_special_tokens=False).ids
    model = Llama4ForConditionalGeneration.from_pretrained(MODEL_PATH, dtype=torch.float32, use_kernels=False).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return ids, torch.log_softmax(logits, dim=-1)


def test_echo_logprobs_equal_transformers(client: openai.OpenAI, reference: tuple[list[int], torch.Tensor]) -> None:
    ids, logprobs = reference
    for prompt in (ids, PROMPT):  # token ids (as lm_eval sends them) and text
        out = client.completions.create(model="herd-demo", prompt=prompt, echo=True, logprobs=3, max_tokens=2)
        lp = out.choices[0].logprobs
        # A text prompt is echoed as given; token ids as their text (with <|begin_of_text|>).
        assert out.choices[0].text.startswith(PROMPT if prompt == PROMPT else "<|begin_of_text|>" + PROMPT)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing comes before the first token
        want = [logprobs[p - 1, ids[p]].item() for p in range(1, len(ids))]
        assert lp.token_logprobs[1 : len(ids)] == pytest.approx(want, abs=1e-4)
        assert len(lp.tokens) == len(ids) + 2  # the prompt, then the two generated tokens
        for p in range(1, len(ids)):
            top = logprobs[p - 1].topk(3)
            assert sorted(lp.top_logprobs[p].values(), reverse=True) == pytest.approx(top.values.tolist(), abs=1e-4)


def test_echo_logprobs_do_not_come_from_the_prefix_cache(
    client: openai.OpenAI, reference: tuple[list[int], torch.Tensor]
) -> None:
    # The same prompt twice: the second could be served from the prefix cache, which keeps no hidden states.
    ids, logprobs = reference
    want = [logprobs[p - 1, ids[p]].item() for p in range(1, len(ids))]
    for _ in range(2):
        out = client.completions.create(model="herd-demo", prompt=ids, echo=True, logprobs=0, max_tokens=1)
        assert out.choices[0].logprobs.token_logprobs[1 : len(ids)] == pytest.approx(want, abs=1e-4)


def test_echo_with_max_tokens_0_scores_the_prompt_only(
    server: ServerThread, client: openai.OpenAI, reference: tuple[list[int], torch.Tensor]
) -> None:
    ids, _ = reference
    out = client.completions.create(model="herd-demo", prompt=PROMPT, echo=True, logprobs=1, max_tokens=0)
    assert out.choices[0].text == PROMPT and len(out.choices[0].logprobs.tokens) == len(ids)
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(ids)
    plain = client.completions.create(model="herd-demo", prompt=PROMPT, echo=True, max_tokens=0)
    assert plain.choices[0].text == PROMPT and plain.choices[0].logprobs is None
    refused = httpx.post(f"{server.url}/v1/completions", json={"model": "herd-demo", "prompt": "x", "max_tokens": 0})
    assert refused.status_code == 400 and "echo" in refused.json()["error"]["message"]


def test_echo_streamed(client: openai.OpenAI) -> None:
    stream = client.completions.create(model="herd-demo", prompt=PROMPT, echo=True, max_tokens=4, stream=True)
    text = "".join(chunk.choices[0].text for chunk in stream)
    whole = client.completions.create(model="herd-demo", prompt=PROMPT, echo=True, max_tokens=4, temperature=0)
    assert text.startswith(PROMPT) and whole.choices[0].text.startswith(PROMPT)


def test_generate_logprob_start_len(server: ServerThread, reference: tuple[list[int], torch.Tensor]) -> None:
    ids, logprobs = reference
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0}, "return_logprob": True}
    for start in (0, 5):
        meta = httpx.post(f"{server.url}/generate", json={**body, "logprob_start_len": start, "top_logprobs_num": 2})
        meta = meta.json()["meta_info"]
        entries = meta["input_token_logprobs"]
        assert [e[1] for e in entries] == ids[start:]
        assert (entries[0][0] is None) == (start == 0)
        first = max(start, 1)
        want = [logprobs[p - 1, ids[p]].item() for p in range(first, len(ids))]
        assert [e[0] for e in entries[first - start :]] == pytest.approx(want, abs=1e-4)
        top = meta["input_top_logprobs"][-1]
        assert [t[1] for t in top] == logprobs[len(ids) - 2].topk(2).indices.tolist()
    only_output = httpx.post(f"{server.url}/generate", json=body).json()["meta_info"]
    assert "input_token_logprobs" not in only_output and len(only_output["output_token_logprobs"]) == 1
    bad = httpx.post(f"{server.url}/generate", json={**body, "logprob_start_len": len(ids)})
    assert bad.status_code == 400 and "logprob_start_len" in bad.json()["error"]["message"]


def test_echo_with_n_and_several_prompts(client: openai.OpenAI, reference: tuple[list[int], torch.Tensor]) -> None:
    ids, logprobs = reference
    want = [logprobs[p - 1, ids[p]].item() for p in range(1, len(ids))]
    out = client.completions.create(
        model="herd-demo", prompt=[ids, ids[:8]], n=2, echo=True, logprobs=0, max_tokens=3, temperature=1.0, seed=1
    )
    assert len(out.choices) == 4
    for choice in out.choices[:2]:
        assert choice.logprobs.token_logprobs[1 : len(ids)] == pytest.approx(want, abs=1e-4)
    for choice in out.choices[2:]:
        assert choice.logprobs.token_logprobs[0] is None
        assert choice.logprobs.token_logprobs[1:8] == pytest.approx(want[:7], abs=1e-4)
