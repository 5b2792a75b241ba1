"""Tensor-parallel ranks as processes: start them, have them meet, feed them each step's plan.

Rank 0 lives where the engine core is and drives the others through `TensorParallelDriver`, which looks
like one `Worker` to the core: every `execute(plan)` first broadcasts the plan (plain data, pickled over a
gloo group on the CPU, whatever the device), then runs rank 0's own worker. The other ranks
(`run_follower`) loop on that broadcast and run the same step on their shard of the model; the layers'
collectives (all-reduce after row-parallel layers and experts, all-gather of the vocabulary) go over the
default group: gloo on the CPU, NCCL on GPUs. Rank 0 samples; the next plan carries its tokens to all.

Ranks are processes started with `spawn` by herd itself, `tp_size // nnodes` on each node; node 0 also runs
the scheduler and the server, other nodes only their ranks (`run_node`). A rank that dies takes herd down
with a message naming it: a half model cannot serve anything, and its peers would otherwise wait.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing.connection
import multiprocessing.util
import os
import socket
import sys
import threading
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from herd.config.engine import LOG_FORMAT, EngineConfig
from herd.sampling import SampleResult
from herd.worker.kv_sizing import KVPlan
from herd.worker.plan import StepPlan
from herd.worker.prompt_logprobs import PromptLogprobsOut
from herd.worker.worker import Worker

logger = logging.getLogger(__name__)

# The plan broadcast waits as long as the server is idle: no timeout worth having.
CONTROL_TIMEOUT = timedelta(days=365)
# How long ranks wait for each other to start (loading a large checkpoint takes minutes).
START_TIMEOUT = timedelta(minutes=30)


def free_address() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def init_rank(config: EngineConfig, rank: int, address: str) -> Any:
    """Join the ranks' default group (the layers' collectives); return the CPU group plans travel on."""
    parallel, device = config.parallel, config.device.torch_device
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(rank % parallel.ranks_per_node)
    elif "OMP_NUM_THREADS" not in os.environ:
        # The node's ranks share its cores: more threads than cores would spin against each other.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // parallel.ranks_per_node))
    dist.init_process_group(
        backend, init_method=f"tcp://{address}", world_size=parallel.tp_size, rank=rank, timeout=START_TIMEOUT
    )
    return dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


def agree_kv_plan(plan: KVPlan, control: Any) -> KVPlan:
    """Every rank must hold the same blocks: the smallest plan (the rank with least free memory) wins."""
    plans: list[Any] = [None] * dist.get_world_size(control)
    dist.all_gather_object(plans, plan, group=control)
    return min(plans, key=lambda p: p.num_full_blocks)


class RankMonitor:
    """Watches this node's spawned ranks; one that exits while herd runs ends this process (status 1)."""

    def __init__(self, processes: dict[int, Any]) -> None:
        self.processes = processes
        self.closing = False
        self._reported = threading.Event()
        if processes:
            threading.Thread(target=self._watch, name="herd-rank-monitor", daemon=True).start()

    def wait_for_death(self, timeout: float) -> None:
        """Give the monitor a moment to name the rank that died (and end the process) first."""
        if self.processes:
            self._reported.wait(timeout)

    def _watch(self) -> None:
        by_sentinel = {p.sentinel: (rank, p) for rank, p in self.processes.items()}
        ready = multiprocessing.connection.wait(list(by_sentinel))
        if self.closing:
            return
        rank, process = by_sentinel[ready[0]]
        process.join(1)
        logger.error(
            "tensor-parallel rank %d (pid %d) died with exit code %s: stopping herd", rank, process.pid,
            process.exitcode,
        )  # fmt: skip
        sys.stderr.flush()
        self._reported.set()
        os._exit(1)  # the step in progress may be blocked in a collective that will never complete


def spawn_ranks(config: EngineConfig, address: str, ranks: range) -> dict[int, Any]:
    ctx = tmp.get_context("spawn")
    level = logging.getLogger().getEffectiveLevel()
    processes = {}
    for rank in ranks:
        process = ctx.Process(
            target=_follower_main, args=(config, rank, address, level), name=f"herd-tp{rank}", daemon=True
        )
        process.start()
        processes[rank] = process
    return processes


class TensorParallelDriver:
    """Rank 0: starts this node's other ranks and stands for all of them before the engine core."""

    def __init__(self, config: EngineConfig) -> None:
        parallel = config.parallel
        self.address = parallel.dist_init_addr or free_address()
        self.processes = spawn_ranks(config, self.address, range(1, parallel.ranks_per_node))
        self.monitor = RankMonitor(self.processes)
        self.control = init_rank(config, 0, self.address)
        self.worker = Worker(config, rank=0)
        self._closed = False
        # Before multiprocessing's own exit handler terminates the ranks (which the monitor would take for deaths).
        multiprocessing.util.Finalize(self, self.close, exitpriority=10)
        logger.info("tensor parallelism: %d ranks on %d node(s), meeting at %s", parallel.tp_size,
                    parallel.nnodes, self.address)  # fmt: skip

    def plan_kv_cache(self) -> KVPlan:
        return agree_kv_plan(self.worker.plan_kv_cache(), self.control)

    def init_kv_cache(self, plan: KVPlan) -> None:
        self.worker.init_kv_cache(plan)

    @property
    def last_prompt_logprobs(self) -> PromptLogprobsOut:
        return self.worker.last_prompt_logprobs  # rank 0's, like the samples

    @property
    def last_drafts(self) -> dict[str, list[int]]:
        return self.worker.last_drafts  # rank 0 drafts

    @property
    def last_draft_parents(self) -> dict[str, list[int]]:
        return self.worker.last_draft_parents

    def execute(self, plan: StepPlan) -> list[list[SampleResult]]:
        try:
            dist.broadcast_object_list([_for_followers(plan)], src=0, group=self.control)
            return self.worker.execute(plan)
        except dist.DistBackendError as e:  # a peer is gone mid-step (on this node the monitor names it)
            self.monitor.wait_for_death(timeout=2.0)
            logger.error("a collective with the other tensor-parallel ranks failed, a rank died: %s", e)
            sys.stderr.flush()
            os._exit(1)

    def close(self) -> None:
        """Tell every rank to stop, and leave the process group (so a later engine in this process can join one)."""
        if self._closed:
            return
        self._closed = True
        self.monitor.closing = True
        try:
            dist.broadcast_object_list([None], src=0, group=self.control)
        except RuntimeError:  # a rank is gone already: nothing to tell it
            logger.warning("could not tell every tensor-parallel rank to stop")
        for process in self.processes.values():
            process.join(10)
            if process.is_alive():
                process.kill()
        dist.destroy_process_group()


def _for_followers(plan: StepPlan) -> StepPlan:
    """The plan without compiled grammars: only rank 0 samples, and a grammar can be hundreds of kB."""
    if not any(new.params.grammar is not None for new in plan.new_sequences):
        return plan
    news = [dataclasses.replace(n, params=dataclasses.replace(n.params, grammar=None)) for n in plan.new_sequences]
    return dataclasses.replace(plan, new_sequences=news)


def run_follower(config: EngineConfig, rank: int, address: str) -> None:
    """A rank other than 0: load its shard, then run every plan rank 0 broadcasts until told to stop."""
    control = init_rank(config, rank, address)
    logger.info("tensor-parallel rank %d: pid %d", rank, os.getpid())
    worker = Worker(config, rank=rank)
    worker.init_kv_cache(agree_kv_plan(worker.plan_kv_cache(), control))
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=control)
        if box[0] is None:
            break
        worker.execute(box[0])
    dist.destroy_process_group()


def run_node(config: EngineConfig) -> None:
    """A node other than 0 (`--node-rank` > 0): run its ranks, the first in this process, until rank 0 stops."""
    parallel = config.parallel
    if parallel.dist_init_addr is None:
        raise ValueError("--node-rank above 0 needs --dist-init-addr, the host:port of node 0")
    first = parallel.node_rank * parallel.ranks_per_node
    processes = spawn_ranks(config, parallel.dist_init_addr, range(first + 1, first + parallel.ranks_per_node))
    monitor = RankMonitor(processes)
    run_follower(config, first, parallel.dist_init_addr)
    monitor.closing = True
    for process in processes.values():
        process.join(10)


def _follower_main(config: EngineConfig, rank: int, address: str, log_level: int) -> None:
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    try:
        run_follower(config, rank, address)
    except Exception:
        logger.exception("tensor-parallel rank %d failed", rank)
        sys.exit(1)
