"""Speculative decoding through the real server: every route answers as it does without speculation."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from herd.config.server_args import ServerArgs

from server_fixtures import ServerThread, make_chain_checkpoint, metrics

MODEL = "herd-test"
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}
# The checkpoint writes TEXT after a ":"; the prompt already holds it, so prompt lookup drafts it right.
TEXT = " one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
PROMPT = f"count:{TEXT}\ncount:"
MESSAGES = [{"role": "user", "content": PROMPT}]


def start(path: Path, **spec: Any) -> ServerThread:
    args = ServerArgs(
        model_path=str(path),
        dtype="float32",
        served_model_name=MODEL,
        context_length=512,
        max_total_tokens=4096,
        chunked_prefill_size=16,  # prompts prefill in several steps, beside other requests' verify steps
        **spec,
    )
    return ServerThread(args)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, ServerThread]]:
    """(without speculation, with NGRAM), on one checkpoint."""
    path = tmp_path_factory.mktemp("chain")
    make_chain_checkpoint(path, [("count:", TEXT)])
    with start(path) as plain, start(path, speculative_algorithm="NGRAM", speculative_num_draft_tokens=6) as spec:
        yield plain, spec


def clients(servers) -> list[openai.OpenAI]:
    return [openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0) for s in servers]


@pytest.mark.parametrize("max_tokens", [1, 2, 7, 40])
def test_completions_chat_and_streaming_match(servers, max_tokens: int) -> None:
    plain, spec = clients(servers)
    answers = []
    for client in (plain, spec):
        done = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=max_tokens, **GREEDY)
        chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=max_tokens, **GREEDY)
        stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=max_tokens, stream=True, **GREEDY)
        streamed = "".join(chunk.choices[0].text for chunk in stream)
        assert done.usage.completion_tokens == max_tokens  # never a token past the limit
        assert chat.usage.completion_tokens == max_tokens
        answers.append((done.choices[0].text, chat.choices[0].message.content, streamed))
    assert answers[0] == answers[1]
    assert answers[1][0] == answers[1][2]


def test_stop_strings_and_n(servers) -> None:
    plain, spec = clients(servers)
    full = plain.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, **GREEDY).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    outs = [
        c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, stop=[stop], n=2, **GREEDY)
        for c in (plain, spec)
    ]
    texts = [[choice.text for choice in out.choices] for out in outs]
    assert texts[0] == texts[1] and texts[0][0] == texts[0][1] == full[: full.index(stop)]
    assert all(choice.finish_reason == "stop" for choice in outs[1].choices)
    assert outs[0].usage.completion_tokens == outs[1].usage.completion_tokens  # no token past the stop string


def test_sampling_n_and_native_generate(servers) -> None:
    spec = servers[1]
    params = {"max_new_tokens": 9, "temperature": 0, "ignore_eos": True}
    outs = [httpx.post(f"{s.url}/generate", json={"text": PROMPT, "sampling_params": params}).json() for s in servers]
    assert outs[0]["output_ids"] == outs[1]["output_ids"] and len(outs[1]["output_ids"]) == 9
    events = []
    body = {"text": PROMPT, "sampling_params": params, "stream": True}
    with httpx.stream("POST", f"{spec.url}/generate", json=body) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["text"] == outs[1]["text"]
    # Sampled: n completions of exactly max_tokens tokens each, whatever the drafts.
    sampled = clients(servers)[1].completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=11,
        n=3,
        temperature=0.9,
        top_p=0.9,
        seed=5,
        extra_body={"ignore_eos": True},
    )
    assert [len(c.logprobs.tokens) if c.logprobs else None for c in sampled.choices] == [None] * 3
    assert sampled.usage.completion_tokens == 33


def test_accept_length_in_metrics_and_server_info(servers) -> None:
    plain, spec = servers
    m = metrics(spec.url)
    assert m["herd:spec_verify_ct_total"] > 0
    assert m["herd:spec_accept_length"] == pytest.approx(
        m["herd:spec_accepted_tokens_total"] / m["herd:spec_verify_ct_total"]
    )
    assert m["herd:spec_accept_length"] > 2.0  # the drafts copied from the prompt were right
    info = httpx.get(f"{spec.url}/get_server_info").json()
    assert info["internal_states"][0]["avg_spec_accept_length"] == pytest.approx(m["herd:spec_accept_length"])
    assert "avg_spec_accept_length" not in httpx.get(f"{plain.url}/get_server_info").json()["internal_states"][0]


def test_bench_serving_prints_the_accept_length(servers, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from herd.bench_serving import main

    plain, spec = servers
    flags = ["--dataset-name", "random", "--random-input-len", "16", "--random-output-len", "6", "--disable-tqdm"]
    for server, shown in ((spec, True), (plain, False)):
        out_file = tmp_path / "run.jsonl"
        argv = ["--base-url", server.url, "--output-file", str(out_file), "--num-prompts", "4", "--backend", "sglang"]
        assert main([*argv, *flags]) == 0
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Accept length:")]
        assert bool(lines) == shown, lines
        if shown:
            assert float(lines[0].split()[-1]) >= 1.0
