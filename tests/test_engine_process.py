"""EngineProcess: the engine in a child process answers like the in-process Engine."""

from __future__ import annotations

import pytest
from PIL import Image

from herd.engine import Engine, RequestError
from herd.engine_process import EngineProcess
from herd.sampling import SamplingParams
from herd.server_args import ServerArgs


def run(engine: Engine | EngineProcess, prompts: list[list[int]] | list[dict]) -> dict[str, list[int]]:
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, params)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] = out.outputs[0].token_ids
    return tokens


def test_same_tokens_errors_and_counters_as_in_process(scout_ckpt) -> None:
    args = ServerArgs(model_path=str(scout_ckpt[0]), dtype="float32", max_total_tokens=64, page_size=4)
    prompts = [[5, 6, 7], list(range(10, 30))]
    expected = run(Engine(args), prompts)
    engine = EngineProcess(args)
    try:
        assert engine.context_length == 131072 and engine.tokenizer is None
        assert run(engine, prompts) == expected
        assert engine.num_running() == engine.num_waiting() == 0 and not engine.has_unfinished_requests()
        with pytest.raises(RequestError, match="cannot fit the KV cache"):
            engine.add_request("big", list(range(3, 80)), SamplingParams(max_tokens=8))
        engine.add_request("gone", [5, 6], SamplingParams(max_tokens=50))
        engine.step()
        assert engine.num_running() == 1 and engine.kv.usage() > 0
        engine.abort("gone")
        assert engine.prefix_cache is not None
        engine.prefix_cache.clear()
        engine.step()  # refreshes the counters
        assert engine.num_running() == 0 and engine.kv.usage() == 0
    finally:
        engine.close()


def test_a_bad_checkpoint_fails_at_start(tmp_path) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        EngineProcess(ServerArgs(model_path=str(tmp_path)))


def test_images_cross_to_the_engine_process(vision_ckpt) -> None:
    # The server hands PIL images over the pipe (pickled): what arrives must be the same picture.
    args = ServerArgs(model_path=str(vision_ckpt[0]), dtype="float32", enable_multimodal=True, max_total_tokens=512)
    palette = Image.frombytes("P", (40, 30), bytes(range(200)) * 6)
    palette.putpalette(bytes(range(256)) * 3)
    palette.info["transparency"] = 3
    noise = Image.frombytes("RGB", (50, 20), bytes((i * 37) % 256 for i in range(3000)))
    prompts = [
        {"prompt": "Compare <|image|> and <|image|>.", "multi_modal_data": {"image": [palette, noise]}},
        {"prompt": "What is <|image|>?", "multi_modal_data": {"image": [noise]}},
    ]
    expected = run(Engine(args), prompts)
    engine = EngineProcess(args)
    try:
        assert run(engine, prompts) == expected
    finally:
        engine.close()
