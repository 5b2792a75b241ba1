"""The engine core in a child process: the same tokens as in process, errors from the child, and a pipe that
carries only each step's new tokens."""

from __future__ import annotations

import asyncio
import os
import queue
import shutil
import signal
import threading
from pathlib import Path

import pytest
from PIL import Image

from herd.config.server_args import ServerArgs
from herd.engine import CoreMessage, EngineCore
from herd.engine.client import InprocCoreClient, ProcessCoreClient
from herd.frontend.processor import InputProcessor, RequestError, load_frontend_tokenizer
from herd.models.loader import CheckpointError
from herd.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


class Driver:
    """Sends requests to a core client and collects its messages, synchronously."""

    def __init__(self, client: InprocCoreClient | ProcessCoreClient, args: ServerArgs) -> None:
        config = args.to_config()
        tokenizer = load_frontend_tokenizer(config.frontend)
        context = config.engine.scheduler.context_length
        self.processor = InputProcessor(config.frontend, config.engine.model, tokenizer, context, client.info)
        self.client = client
        self.messages: queue.Queue[CoreMessage] = queue.Queue()
        client.start(self.messages.put)
        self.ids = 0

    def add(self, prompt: list[int] | dict, params: SamplingParams = GREEDY) -> str:
        self.ids += 1
        request = self.processor.process(str(self.ids), prompt, params)
        self.client.add_requests(request.core_requests)
        return request.core_requests[0].request_id

    def next_message(self) -> CoreMessage:
        message = self.messages.get(timeout=120)
        assert message.dead is None, message.dead
        return message

    def run(self, prompts: list[list[int]] | list[dict]) -> dict[str, list[int]]:
        ids = [self.add(p) for p in prompts]
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        unfinished = set(ids)
        while unfinished:
            for out in self.next_message().outputs:
                tokens[out.request_id] += out.new_token_ids
                if out.finish_reason is not None:
                    unfinished.discard(out.request_id)
        return tokens

    def idle_stats(self) -> CoreMessage:
        """The first message once the core has nothing running (an abort or a call makes it send one)."""
        self.client.call(0, "stats")
        while True:
            message = self.next_message()
            if message.replies:
                return message


def in_process(args: ServerArgs) -> Driver:
    return Driver(InprocCoreClient(EngineCore(args.to_config().engine)), args)


def test_same_tokens_errors_and_counters_as_in_process(scout_ckpt) -> None:
    args = ServerArgs(model_path=str(scout_ckpt[0]), dtype="float32", max_total_tokens=64, page_size=4)
    prompts = [[5, 6, 7], list(range(10, 30))]
    local = in_process(args)
    expected = local.run(prompts)
    local.client.close()
    client = ProcessCoreClient(args.to_config().engine)
    try:
        driver = Driver(client, args)
        assert client.info.max_request_tokens == 64
        assert driver.run(prompts) == expected
        assert driver.idle_stats().stats.num_running == 0
        with pytest.raises(RequestError, match="cannot fit the KV cache"):
            driver.add(list(range(3, 80)), SamplingParams(max_tokens=8))
        gone = driver.add([5, 6], SamplingParams(max_tokens=50))
        message = driver.next_message()
        assert message.stats.num_running == 1 and message.stats.kv_usage > 0
        client.abort_requests([gone])
        client.call(1, "reset_prefix_cache")
        while not (message := driver.next_message()).replies:
            pass
        assert message.replies == [(1, True, None)]
        assert message.stats.num_running == 0 and message.stats.kv_usage == 0
    finally:
        client.close()
    assert not client.alive


def test_a_bad_checkpoint_fails_at_start(scout_ckpt, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        ServerArgs(model_path=str(tmp_path)).to_config()
    shutil.copy(scout_ckpt[0] / "config.json", tmp_path / "config.json")  # a config, but no weights
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):  # raised in the child, reported here
        ProcessCoreClient(ServerArgs(model_path=str(tmp_path)).to_config().engine)


def test_images_cross_to_the_engine_process(vision_ckpt) -> None:
    # Pixels cross the pipe (pickled tensors): what arrives must give the same tokens.
    args = ServerArgs(model_path=str(vision_ckpt[0]), dtype="float32", enable_multimodal=True, max_total_tokens=512)
    palette = Image.frombytes("P", (40, 30), bytes(range(200)) * 6)
    palette.putpalette(bytes(range(256)) * 3)
    palette.info["transparency"] = 3
    noise = Image.frombytes("RGB", (50, 20), bytes((i * 37) % 256 for i in range(3000)))
    prompts = [
        {"prompt": "Compare <|image|> and <|image|>.", "multi_modal_data": {"image": [palette, noise]}},
        {"prompt": "What is <|image|>?", "multi_modal_data": {"image": [noise]}},
    ]
    local = in_process(args)
    expected = local.run(prompts)
    local.client.close()
    client = ProcessCoreClient(args.to_config().engine)
    try:
        assert Driver(client, args).run(prompts) == expected
    finally:
        client.close()


def test_the_pipe_carries_only_new_tokens(scout_ckpt) -> None:
    """A message at output token 4,000 is as large as one at token 10: no step re-sends the output so far."""
    args = ServerArgs(model_path=str(scout_ckpt[0]), dtype="float32", page_size=16)
    client = ProcessCoreClient(args.to_config().engine)
    try:
        driver = Driver(client, args)
        driver.add([5, 6, 7], SamplingParams(temperature=0, max_tokens=4001, ignore_eos=True))
        size_at: dict[int, int] = {}  # output tokens so far -> bytes of the message that brought the last one
        produced = 0
        while produced < 4001:
            message = driver.next_message()
            for out in message.outputs:
                produced += len(out.new_token_ids)
                size_at[produced] = message.nbytes
    finally:
        client.close()
    assert 0 < size_at[4000] <= 2 * size_at[10]


def test_messages_on_the_event_loop_and_the_death_of_the_process(scout_ckpt) -> None:
    """With a loop, the client reads the pipe on that loop (no thread of its own), and a killed engine process
    arrives as a last message naming the signal."""
    args = ServerArgs(model_path=str(scout_ckpt[0]), dtype="float32", max_total_tokens=64, page_size=4)
    client = ProcessCoreClient(args.to_config().engine)

    async def run() -> tuple[list[int], set[int], CoreMessage]:
        loop = asyncio.get_running_loop()
        messages: asyncio.Queue[CoreMessage] = asyncio.Queue()
        threads: set[int] = set()

        def on_message(message: CoreMessage) -> None:
            threads.add(threading.get_ident())
            messages.put_nowait(message)

        client.start(on_message, loop)
        config = args.to_config()
        processor = InputProcessor(config.frontend, config.engine.model, None, 64, client.info)
        request = processor.process("1", [5, 6, 7], GREEDY)
        client.add_requests(request.core_requests)
        tokens: list[int] = []
        while len(tokens) < GREEDY.max_tokens:
            message = await asyncio.wait_for(messages.get(), 120)
            tokens += [t for out in message.outputs for t in out.new_token_ids]
        os.kill(client._process.pid, signal.SIGKILL)
        while (message := await asyncio.wait_for(messages.get(), 60)).dead is None:
            pass
        return tokens, threads, message

    try:
        tokens, threads, last = asyncio.run(run())
    finally:
        client.close()
    assert threads == {threading.get_ident()}  # asyncio.run's loop runs on this thread
    assert tokens == in_process_tokens(args, [5, 6, 7])
    assert "killed by SIGKILL" in str(last.dead)
    assert not client.alive


def in_process_tokens(args: ServerArgs, prompt: list[int]) -> list[int]:
    local = in_process(args)
    try:
        return next(iter(local.run([prompt]).values()))
    finally:
        local.client.close()
