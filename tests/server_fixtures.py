"""Helpers for the server tests: a real server in a background thread, a model that writes a chosen
text, and reading /metrics.

`make_chain_checkpoint` builds a tiny Llama 4 over the real vocabulary whose greedy output is fixed by its
weights: every decoder layer's output projections are zero, so the last hidden state is the embedding of
the current token, and the LM head maps chosen tokens to their successors with a large logit. Prompts that
end in a chain's first token are continued along it, whatever came before: a way to make the model write
an exact tool call, in order, which logit_bias alone cannot do.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import Llama4ForCausalLM, Llama4TextConfig

from herd.config.server_args import ServerArgs
from herd.frontend.async_engine import AsyncEngine
from herd.frontend.tokenizer import load_tokenizer
from herd.launch_server import bind_socket, make_server, url_of

from checkpoints import REAL_VOCAB_LIKE, llama4_tokenizer_model

CHAIN_LOGIT = 4.0  # per unit of the normalised hidden state: ~23 vs 0, so even temperature 1 follows the chain


class ServerThread:
    """herd's real server (uvicorn, the engine core in a thread) on 127.0.0.1 and a free port, for a `with`
    block. `engine` is the engine core itself, for tests that hold or break its steps."""

    def __init__(self, args: ServerArgs) -> None:
        self.args = args = replace(args, host="127.0.0.1", port=0)
        config = args.to_config()
        async_engine = AsyncEngine.create(config, in_process=True)
        self.tokenizer = async_engine.tokenizer
        self.engine = async_engine.client.core
        sock = bind_socket(args.host, args.port)
        self.url = url_of(sock)
        self.server = make_server(config.server, async_engine, sock)
        self.app = self.server.config.app
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        wait_until(lambda: self.server.started, "the server to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @contextlib.contextmanager
    def paused(self) -> Iterator[threading.Event]:
        """Hold the engine thread at its next step until the block ends; the event yielded is set once it
        waits there (so a request sent after entering is then inside the engine, and cannot finish)."""
        gate, waiting = threading.Event(), threading.Event()
        step = self.engine.step

        def gated_step():  # type: ignore[no-untyped-def]
            waiting.set()
            gate.wait()
            return step()

        self.engine.step = gated_step  # type: ignore[method-assign]
        try:
            yield waiting
        finally:
            del self.engine.step  # back to the class's method
            gate.set()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll until condition() holds; the timeout only bounds a hang, no test measures time."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def metrics(url: str, headers: dict[str, str] | None = None) -> dict[str, float]:
    """Every sample of /metrics by name (labels as name{k="v"})."""
    text = httpx.get(f"{url}/metrics", headers=headers).raise_for_status().text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_idle(url: str, headers: dict[str, str] | None = None) -> None:
    """Wait until the engine runs and queues nothing (herd:num_requests_running back to 0)."""

    def idle() -> bool:
        m = metrics(url, headers)
        return m["herd:num_requests_running"] == 0 and m["herd:num_requests_waiting"] == 0

    wait_until(idle, "herd:num_requests_running to return to 0")


def make_chain_checkpoint(path: Path, chains: list[tuple[str, str]]) -> None:
    """A real-vocabulary checkpoint that, after a prompt ending in the last token of `start`, writes
    `text` then <|eot|>, for each (start, text) of chains. Chains may share tokens only where they agree
    on the next one (a bigram model has one successor per token)."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(llama4_tokenizer_model(), path / "tokenizer.model")
    tokenizer = load_tokenizer(path)
    eot = tokenizer.token_to_id("<|eot|>")
    successor: dict[int, int] = {}
    for start, text in chains:
        ids = [tokenizer.encode(start, add_special_tokens=False)[-1], *tokenizer.encode(text, add_special_tokens=False)]
        for a, b in zip(ids, [*ids[1:], eot], strict=True):
            assert successor.setdefault(a, b) == b, f"chains disagree after token {tokenizer.decode([a])!r}"
    config = Llama4TextConfig(**{**REAL_VOCAB_LIKE, "tie_word_embeddings": False})
    assert len(successor) <= config.hidden_size, "one hidden dimension per chain token"
    model = Llama4ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj", "down_proj.weight", "embed_tokens.weight")):
                p.zero_()  # layers add nothing to the residual stream; unknown tokens embed to 0
            elif name == "lm_head.weight":
                p.zero_()
            elif name == "model.norm.weight":
                p.fill_(1.0)
        for dim, (a, b) in enumerate(successor.items()):
            model.model.embed_tokens.weight[a, dim] = 1.0
            model.lm_head.weight[b, dim] = CHAIN_LOGIT
    model.save_pretrained(path)
