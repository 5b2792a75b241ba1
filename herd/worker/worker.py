"""A worker: one rank's model, KV storage, per-step attention metadata and sampler.

The engine core drives its workers through three calls: `plan_kv_cache` (how many blocks fit beside the
weights), `init_kv_cache` (allocate them and bind them to the attention layers) and `execute(plan)` (run
one step, return the sampled tokens). Everything in a `StepPlan` is plain data, so more ranks (tensor
parallelism) mean more workers running the same plan, not another code path.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from functools import partial
from time import perf_counter

import torch

from herd.config.engine import EngineConfig
from herd.layers.attention import PagedKVStorage, bind_kv_cache, get_attention_backend
from herd.layers.attention.triton_backend import TritonBackend
from herd.layers.factory import LayerFactory
from herd.layers.quantization import QuantizationConfig
from herd.layers.quantization.select import select_quantization
from herd.layers.quantization.unquantized import UnquantizedConfig, cpu_packing_available
from herd.layers.triton_ops import triton_available
from herd.models.llama4 import Llama4ForConditionalGeneration, text_model
from herd.models.loader import load_model, resolve_dtype
from herd.multimodal import RequestImages
from herd.sampling import Sampler, SampleResult, SamplingState
from herd.speculative import make_proposer
from herd.worker.cpu_malloc import keep_freed_memory
from herd.worker.cuda_graphs import DecodeGraphRunner, build_decode_graphs, graphs_enabled
from herd.worker.huge_pages import move_to_huge_pages
from herd.worker.images import release_finished_images, step_image_features
from herd.worker.inputs import build_step_inputs
from herd.worker.kv_sizing import KVPlan, plan_kv_cache
from herd.worker.plan import StepPlan
from herd.worker.prompt_logprobs import PromptLogprobs, PromptLogprobsOut
from herd.worker.spec_step import propose, sample_chunks
from herd.worker.thread_tuner import ThreadTuner
from herd.worker.weight_memory import check_weights_fit

logger = logging.getLogger(__name__)

# A gap between two steps this many times longer than the first step's own work was the engine waiting for
# requests, not the step's cost.
IDLE_GAP = 3


@dataclass
class _Sequence:
    sampling: SamplingState
    images: RequestImages | None


class Worker:
    def __init__(self, config: EngineConfig, rank: int = 0) -> None:
        self.config, self.rank = config, rank
        self.device = config.device.torch_device
        self.dtype = resolve_dtype(config.load.dtype, config.model)
        if config.load.dtype == "auto" and self.dtype == torch.bfloat16 and not self._cpu_computes_bf16():
            # Without AVX-512 or AVX-NE-CONVERT, oneDNN emulates bf16: matmuls of 16-128 rows ran 5-10x slower
            # than fp32, the demo model's batch 5x (benchmarks/RESULTS.md). `--dtype bfloat16` keeps bf16 anyway.
            logger.info("worker %d: this CPU computes bfloat16 slowly; serving in float32 (--dtype auto)", rank)
            self.dtype = torch.float32
        compile_decode = config.device.enable_torch_compile
        self.backend = get_attention_backend(config.device.attention_backend)
        logger.info("worker %d: attention backend %s", rank, self.backend.name)
        self.model = load_model(
            config.load.model_path,
            dtype=self.dtype,
            device=self.device,
            load_format=config.load.load_format,
            attention_backend=self.backend,
            seed=config.load.seed,
            enable_multimodal=config.load.enable_multimodal,
            factory=LayerFactory(
                self._quant_config(),
                tp_rank=rank,
                tp_size=config.parallel.tp_size,
                ep_size=config.parallel.ep_size,
            ),
            config=config.model,
            check_memory=partial(
                check_weights_fit,
                device=self.device,
                mem_fraction=config.cache.mem_fraction_static,
                cpu_budget_gb=config.cache.cpu_memory_budget_gb,
                tp_size=config.parallel.tp_size,
                quantization=config.load.quantization,
            ),
        )
        if self.device.type == "cpu":
            move_to_huge_pages(self.model)
            # From here on a step's temporaries stay in the process instead of faulting in each step; set after
            # loading, whose one-off transients should go back to the system.
            keep_freed_memory()
        self.multimodal = isinstance(self.model, Llama4ForConditionalGeneration)
        # Rank 0 drafts (the next plan carries its drafts to every rank, like its samples).
        target = text_model(self.model)
        self.proposer = make_proposer(config.speculative, target, self.dtype, self.device) if rank == 0 else None
        self.last_drafts: dict[str, list[int]] = {}  # of the last step, for the engine core to collect
        self.last_draft_parents: dict[str, list[int]] = {}  # their trees (topk > 1), likewise
        if config.speculative.eagle_topk > 1 and config.parallel.tp_size > 1:
            # The accepted path's KV moves right after rank 0 verifies; the other ranks would need it in the plan.
            raise ValueError(
                f"--speculative-eagle-topk {config.speculative.eagle_topk} with --tp-size "
                f"{config.parallel.tp_size}: tree drafting runs on one rank only yet (use topk 1 or tp 1)"
            )
        if self.proposer is not None and self.proposer.aux_layer_ids:
            target.aux_layer_ids = self.proposer.aux_layer_ids
            compile_decode = False  # the compiled and graphed steps do not leave the auxiliary hidden states
        self.aux_layers = bool(target.aux_layer_ids)
        # Decode steps only: prefill shapes vary too much to be worth compiling. One graph per decode shape
        # family (dynamic sizes; inductor specialises sizes 0/1, and herd's GEMV serves up to GEMV_MAX_ROWS rows):
        # batch 1, 2..8, more. On the CPU it stays a flag, off by default: each family compiles for 5-36 s on
        # this project's 2-core machine the first time it runs (a server's first requests, and every test),
        # for a step no faster than eager's at 2 threads (benchmarks/RESULTS.md, "Compiled CPU decode step"):
        # a decode step's cost is its GEMVs, which run the same kernels compiled or not, and the Python that
        # compiling removes is partly replaced by guard checks (~0.3 ms a step) and the opaque experts/attention.
        self.compiled_decode = torch.compile(self.model, fullgraph=True, dynamic=True) if compile_decode else None
        self.sampler = Sampler()
        self.sequences: dict[str, _Sequence] = {}
        self.prompt_logprobs = PromptLogprobs()
        self.last_prompt_logprobs: PromptLogprobsOut = {}  # of the last step, for the engine core to collect
        self.kv_storage: PagedKVStorage | None = None
        self.block_size = 0
        self.chunk_size: int | None = None
        self.graphs: DecodeGraphRunner | None = None
        # The decode steps' thread count, measured against the load beside the engine (herd.worker.thread_tuner).
        # OMP_NUM_THREADS is the user's choice and is kept: set it for runs that must repeat bit for bit (fp32
        # GEMMs may sum in another order with another thread count).
        tunable = self.device.type == "cpu" and config.parallel.tp_size == 1 and "OMP_NUM_THREADS" not in os.environ
        self.thread_tuner = ThreadTuner(torch.get_num_threads()) if tunable and torch.get_num_threads() > 1 else None
        self._last_decode: tuple[int, float, float] | None = None  # batch, start, seconds in execute
        logger.info("worker %d: %s on %s, weights %.2f GiB", rank, config.model.architecture, self.device,
                    self.weight_bytes() / 2**30)  # fmt: skip

    def _cpu_computes_bf16(self) -> bool:
        return self.device.type != "cpu" or cpu_packing_available(self.device, torch.bfloat16)

    def _quant_config(self) -> QuantizationConfig:
        # oneDNN's packed weights are faster on the CPU; a compiled step keeps its linear layers unpacked (it cannot
        # lower packed ones) and runs the packed experts eagerly.
        packed = self.dtype != torch.float16 and cpu_packing_available(self.device, self.dtype)
        base = UnquantizedConfig(
            cpu_packed=packed,
            triton_moe=self.device.type == "cuda" and triton_available(),
            compiled=self.config.device.enable_torch_compile,
        )
        model = self.config.model
        checkpoint_quant = model.quantization if self.config.load.load_format != "dummy" else None
        return select_quantization(checkpoint_quant, model.weight_prefix, self.config.load.quantization, base)

    def weight_bytes(self) -> int:
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def plan_kv_cache(self) -> KVPlan:
        tp = self.config.parallel.tp_size
        return plan_kv_cache(self.config.cache, self.config.model, self.dtype, self.device, self.weight_bytes(), tp)

    def init_kv_cache(self, plan: KVPlan) -> None:
        device_config = self.config.device
        graphs = graphs_enabled(self.device, self.backend, device_config.disable_cuda_graph or self.aux_layers)
        scratch = 1 if graphs else 0  # a block per pool that CUDA graphs' padding rows write to
        self.kv_storage = PagedKVStorage(
            self.config.model,
            num_full_blocks=plan.num_full_blocks + scratch,
            num_local_blocks=plan.num_local_blocks + scratch,
            block_size=plan.block_size,
            dtype=self.dtype,
            device=self.device,
            tp_size=self.config.parallel.tp_size,  # this rank's KV heads only
        )
        self.block_size, self.chunk_size = plan.block_size, plan.chunk_size
        bind_kv_cache(self.model, self.kv_storage.layer)
        if graphs:
            assert isinstance(self.backend, TritonBackend)
            self.graphs = build_decode_graphs(
                self.compiled_decode or self.model,
                self.backend,
                max_bs=min(device_config.cuda_graph_max_bs, self.config.scheduler.max_running_requests),
                context_length=self.config.scheduler.context_length,
                num_full_blocks=plan.num_full_blocks,
                num_local_blocks=plan.num_local_blocks,
                block_size=plan.block_size,
                chunk=plan.chunk_size,
                device=self.device,
            )

    def execute(self, plan: StepPlan) -> list[list[SampleResult]]:
        """Run one step; per chunk that samples, in chunk order, the tokens it adds (several when drafts stand)."""
        tuner = self.thread_tuner
        if tuner is None or not plan.chunks:
            return self._execute(plan)
        start = perf_counter()
        if self._last_decode is not None:
            # A decode step costs from its start to the next step's: the engine's loop around it (scheduling,
            # sending tokens to the HTTP process) slows down with it when the cores are short. After an idle
            # wait the gap says nothing of the step.
            batch, began, busy = self._last_decode
            if start - began < IDLE_GAP * busy:
                tuner.record(batch, start - began)
        decode, batch = all(len(c.token_ids) == 1 for c in plan.chunks), len(plan.chunks)
        torch.set_num_threads(tuner.threads(batch) if decode else tuner.max_threads)
        results = self._execute(plan)
        self._last_decode = (batch, start, perf_counter() - start) if decode else None
        return results

    @torch.inference_mode()
    def _execute(self, plan: StepPlan) -> list[list[SampleResult]]:
        assert self.kv_storage is not None, "init_kv_cache first"
        self._update_sequences(plan)
        self.prompt_logprobs.update(plan)
        self.last_prompt_logprobs = {}
        self.last_drafts, self.last_draft_parents = {}, {}
        self.kv_storage.zero_blocks(plan.fresh_full_blocks, plan.fresh_local_blocks)
        if not plan.chunks:
            return []
        inputs = build_step_inputs(plan.chunks, self.block_size, self.chunk_size, self.device)
        metadata = self.backend.build_metadata(inputs.attention)
        image_inputs = None
        if self.multimodal:
            assert isinstance(self.model, Llama4ForConditionalGeneration)
            images_of = {c.seq_id: self.sequences[c.seq_id].images for c in plan.chunks}
            image_inputs = step_image_features(self.model, plan.chunks, images_of, inputs.query_starts, self.device)
            release_finished_images(plan.chunks, images_of)  # the features stay in image_inputs for this step
        if image_inputs is not None:
            hidden = self.model(inputs.input_ids, inputs.positions, metadata, *image_inputs)
        elif self.graphs is not None and self.graphs.can_run(inputs.attention.num_seqs, inputs.attention.is_decode):
            hidden = self.graphs.run(inputs.input_ids, inputs.positions, metadata)
        elif self.compiled_decode is not None and inputs.attention.is_decode:
            hidden = self.compiled_decode(inputs.input_ids, inputs.positions, metadata)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, metadata)
        if self.prompt_logprobs.wanted:
            starts = inputs.query_starts
            self.last_prompt_logprobs = self.prompt_logprobs.compute(self.model, hidden, plan.chunks, starts)
        states = {c.seq_id: self.sequences[c.seq_id].sampling for c in plan.chunks}
        paths: dict[str, list[int]] = {}  # per draft tree verified, the draft indices of its accepted path
        if not any(c.samples for c in plan.chunks):
            results: list[list[SampleResult]] = []
        else:
            # In the model's dtype: the sampler widens what it adjusts or draws from; a greedy batch's argmax needs
            # no fp32 copy.
            # Every rank: it gathers the vocabulary. Sample rows ascend, so as many as the step's rows are all of them.
            sampled = hidden if inputs.sample_rows.shape[0] == hidden.shape[0] else hidden[inputs.sample_rows]
            logits = self.model.compute_logits(sampled)
            if self.rank != 0:  # rank 0 samples; the next plan brings every rank the tokens it chose
                return []
            results = sample_chunks(self.sampler, logits, plan.chunks, states, paths)
            if paths:
                self._move_accepted_paths(plan, paths)
        if self.proposer is not None:
            aux = text_model(self.model).aux_hidden if self.aux_layers else None
            self.last_drafts = propose(self.proposer, plan.chunks, results, states, inputs.query_starts, aux, paths)
            self.last_draft_parents = self.proposer.last_parents
        return results

    def _move_accepted_paths(self, plan: StepPlan, paths: dict[str, list[int]]) -> None:
        """Each draft tree's accepted drafts were computed in the slots of their place in the tree, at the
        positions of their depth: copy their KV to the slots of those positions, where the sequence continues."""
        assert self.kv_storage is not None
        bs = self.block_size
        moves: dict[str, tuple[list[int], list[int]]] = {"full": ([], []), "local": ([], [])}
        for chunk in plan.chunks:
            path = paths.get(chunk.seq_id)
            if not path:
                continue
            first_draft = chunk.end - chunk.num_draft
            for depth, j in enumerate(path):
                if j == depth:  # already in place (a chain-shaped path so far)
                    continue
                src, dst = first_draft + j, first_draft + depth
                for name, table in (("full", chunk.full_blocks), ("local", chunk.local_blocks)):
                    if table:
                        moves[name][0].append(table[src // bs] * bs + src % bs)
                        moves[name][1].append(table[dst // bs] * bs + dst % bs)
        self.kv_storage.move_slots(moves["full"], moves["local"])

    def _update_sequences(self, plan: StepPlan) -> None:
        for seq_id in plan.finished_seq_ids:
            if self.proposer is not None:
                self.proposer.release(seq_id)
            seq = self.sequences.pop(seq_id, None)
            if seq is not None and seq.images is not None:
                seq.images.release(seq_id)
        for new in plan.new_sequences:
            # Only rank 0 samples: the other ranks keep no grammar (nor its vocabulary).
            params = new.params if self.rank == 0 else dataclasses.replace(new.params, grammar=None)
            state = SamplingState(params, new.prompt_token_ids, seed=new.seed, eos_token_ids=new.eos_token_ids)
            self.sequences[new.seq_id] = _Sequence(state, new.images)
