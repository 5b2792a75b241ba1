"""Tensor and expert parallelism over torch.distributed (gloo on the CPU), against transformers.

The multi-process runs are few and tiny (2 cores): each starts its ranks as processes of its own. Greedy fp32
tokens must be those of transformers (and so of one rank) through `LLM`, and through the server with the
two ranks on two "nodes" of 127.0.0.1; a rank killed mid-request must fail the request and stop the server.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import torch

from herd.config.server_args import ArgumentError, ServerArgs
from herd.layers.factory import LayerFactory
from herd.models.loader import load_model

from server_fixtures import metrics, wait_until

TESTS = Path(__file__).parent
# Past two chunk boundaries (chunk 8) with chunked prefill 7, from short and long prompts.
PROMPT_LENS = [1, 7, 9, 17, 25]
MAX_TOKENS = 19


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(3, 256, (n,), generator=gen).tolist() for n in PROMPT_LENS]


@torch.no_grad()
def transformers_greedy(model, batch: list[list[int]], max_new_tokens: int = MAX_TOKENS) -> list[list[int]]:
    out = []
    for ids in batch:
        full = model.generate(
            torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        out.append(full[0, len(ids) :].tolist())
    return out


def env() -> dict[str, str]:
    """The suite's environment for rank processes, without the OMP_NUM_THREADS conftest pins: ranks on one
    machine then share its cores, as a user's would."""
    root = str(TESTS.parent)
    path = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    inherited = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return {**inherited, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_tp_and_ep_tokens_match_transformers(scout_ckpt, maverick_ckpt) -> None:
    """Experts split by their intermediate dimension (tp) or whole (ep; attention and dense layers stay split
    by heads and columns). The all-MoE model both ways, the dense/MoE-interleaved one with whole experts (and
    with split ones over two nodes, below); one rank's tokens equal transformers' too (test_engine.py)."""
    batch = prompts()
    tp, ep = {"tp_size": 2}, {"tp_size": 2, "ep_size": 2}
    ngram = {**tp, "speculative_algorithm": "NGRAM", "speculative_num_draft_tokens": 4}  # rank 0's drafts, all verify
    jobs = [(scout_ckpt, tp), (scout_ckpt, ep), (maverick_ckpt, ep), (maverick_ckpt, ngram)]
    spec = [(str(ckpt[0]), batch, config) for ckpt, config in jobs]
    cmd = [sys.executable, str(TESTS / "tp_generate.py"), json.dumps(spec), str(MAX_TOKENS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(runs) == len(jobs)
    expected = {ckpt[0]: transformers_greedy(ckpt[1], batch) for ckpt in (scout_ckpt, maverick_ckpt)}
    for (ckpt, config), tokens in zip(jobs, runs, strict=True):
        assert tokens == expected[ckpt[0]], (ckpt[0].name, config)


def test_each_rank_holds_half_of_the_sharded_weights(scout_ckpt) -> None:
    path = scout_ckpt[0]
    whole = dict(load_model(path, dtype="float32").named_parameters())
    ranks = [dict(load_model(path, dtype="float32", factory=LayerFactory(tp_rank=r, tp_size=2)).named_parameters())
             for r in range(2)]  # fmt: skip
    replicated = {n for n in whole if n.endswith("norm.weight") or ".router." in n}
    sharded_bytes = sum(p.numel() * p.element_size() for n, p in whole.items() if n not in replicated)
    assert sharded_bytes > 0.9 * sum(p.numel() * p.element_size() for p in whole.values())
    for params in ranks:
        assert params.keys() == whole.keys()
        for name in replicated:
            assert params[name].shape == whole[name].shape, name
        rank_bytes = sum(p.numel() * p.element_size() for n, p in params.items() if n not in replicated)
        assert rank_bytes * 2 == sharded_bytes
        for name in whole.keys() - replicated:  # every sharded tensor is halved, not just the total
            assert params[name].numel() * 2 == whole[name].numel(), name


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        ({"tp_size": 3}, ["num_attention_heads 4", "--tp-size 3", "vocab_size 256", "intermediate_size 32"]),
        ({"tp_size": 8}, ["num_attention_heads 4", "--tp-size 8"]),
        ({"tp_size": 2, "ep_size": 2, "nnodes": 1}, []),
        ({"tp_size": 4, "ep_size": 3}, ["--ep-size 3", "--tp-size 4"]),
        ({"tp_size": 2, "nnodes": 2}, ["--dist-init-addr"]),
        ({"tp_size": 3, "nnodes": 2, "dist_init_addr": "127.0.0.1:1"}, ["--nnodes 2", "--tp-size 3"]),
    ],
)
def test_splits_that_do_not_divide_are_named(scout_ckpt, flags: dict, words: list[str]) -> None:
    if not words:
        ServerArgs(model_path=str(scout_ckpt[0]), **flags).to_config()
        return
    with pytest.raises(ArgumentError) as info:
        ServerArgs(model_path=str(scout_ckpt[0]), **flags).to_config()
    for word in words:
        assert word in str(info.value)


def test_experts_that_do_not_divide_are_named(tmp_path: Path, scout_ckpt) -> None:
    config = json.loads((scout_ckpt[0] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_local_experts": 3}))
    with pytest.raises(ArgumentError, match=r"num_local_experts 3 is not a multiple of --ep-size 2"):
        ServerArgs(model_path=str(tmp_path), tp_size=2, ep_size=2).to_config()


def serve(path: Path, *flags: str, threads: int | None = None) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "herd.launch_server", "--model-path", str(path), "--dtype", "float32"]
    cmd += ["--chunked-prefill-size", "7", "--max-total-tokens", "512", *flags]
    variables = env() if threads is None else {**env(), "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=variables)


class Log:
    """A server's stderr, read on a thread (so that the pipe never fills), searchable as it arrives."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = 120.0) -> re.Match[str]:
        """The first match of pattern in the log; the timeout only bounds a hang."""
        with self.changed:
            ok = self.changed.wait_for(lambda: self._search(pattern) is not None, timeout)
            assert ok, f"no {pattern!r} in the log:\n{self.text[-4000:]}"
            return self._search(pattern)  # type: ignore[return-value]

    def _search(self, pattern: str) -> re.Match[str] | None:
        return next((m for line in self.lines if (m := re.search(pattern, line))), None)

    @property
    def text(self) -> str:
        return "".join(self.lines)


def generate(url: str, ids: list[int], max_new_tokens: int = MAX_TOKENS) -> list[int]:
    body = {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens,
                                                  "ignore_eos": True}}  # fmt: skip
    return httpx.post(f"{url}/generate", json=body, timeout=120).raise_for_status().json()["output_ids"]


def stop(*procs: subprocess.Popen[str]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_two_nodes_serve_the_same_tokens(maverick_ckpt) -> None:
    path, model = maverick_ckpt
    nodes = ["--tp-size", "2", "--nnodes", "2", "--dist-init-addr", f"127.0.0.1:{free_port()}"]
    # Both "nodes" on this machine's cores: one thread each, or their ranks spin against each other.
    node1 = serve(path, *nodes, "--node-rank", "1", threads=1)
    node0 = serve(path, *nodes, "--node-rank", "0", "--port", "0", "--served-model-name", "tp", threads=1)
    log0, log1 = Log(node0), Log(node1)
    try:
        url = log0.wait_for(r"serving tp at (http://\S+)").group(1)
        batch = prompts()[3:4]  # 17 prompt tokens: three prefill chunks of 7, decoding past two attention chunks
        assert [generate(url, ids) for ids in batch] == transformers_greedy(model, batch)
        node0.send_signal(signal.SIGINT)
        assert node0.wait(timeout=60) == 0, log0.text[-4000:]
        assert node1.wait(timeout=60) == 0, log1.text[-4000:]  # node 0 told its rank to stop
    finally:
        stop(node0, node1)


def test_a_dead_rank_fails_requests_and_stops_the_server(scout_ckpt) -> None:
    node = serve(scout_ckpt[0], "--tp-size", "2", "--port", "0", "--served-model-name", "tp")
    log = Log(node)
    try:
        url = log.wait_for(r"serving tp at (http://\S+)").group(1)
        pid = int(log.wait_for(r"tensor-parallel rank 1: pid (\d+)").group(1))
        errors: list[object] = []

        def long_request() -> None:  # in flight when the rank dies
            try:
                generate(url, prompts()[1], max_new_tokens=400)
            except httpx.HTTPError as e:
                errors.append(e)

        thread = threading.Thread(target=long_request)
        thread.start()
        wait_until(lambda: metrics(url)["herd:num_requests_running"] == 1, "the request to run")
        os.kill(pid, signal.SIGKILL)
        thread.join(timeout=30)
        assert not thread.is_alive(), "the request in flight hangs"
        assert errors, "the request in flight did not fail"
        assert node.wait(timeout=30) != 0
        log.thread.join(timeout=10)
        assert re.search(r"rank 1 \(pid \d+\) died", log.text), log.text[-4000:]
    finally:
        stop(node)
