"""Scout-shaped decode and prefill on one GPU: herd (triton kernels, CUDA graphs on and off) against
transformers (eager) on the very same dummy weights, each step beside its HBM roofline.

The model is Scout's layer (hidden 5120, 40/8 heads of 128, 16 experts top-1 + a shared expert in every
layer, intermediate 8192, chunk 8192, NoPE every 4th layer, vocabulary 202,048) with as many layers as fit
(--layers 0), random bf16 weights drawn on the GPU. transformers' model is built on the meta device and
pointed at herd's tensors (views, no copy: q/k/v are row slices of herd's fused qkv), so both fit at once
and both read the same bytes.

Reported per batch size: step time (model + logits of the sampled rows) for herd eager, herd with CUDA
graphs and transformers; the step's bytes (every weight a step touches: attention, shared expert, router,
the experts the batch routes to, the LM head, the KV cache it reads) over the device-to-device bandwidth
measured here; and the TPOT extrapolated to Scout's 48 layers. Prefill: one --prefill-tokens sequence,
its FLOPs over the bf16 matmul rate measured here.

    python benchmarks/gpu_decode.py --out /tmp/gpu_decode.json           # on a GPU
    python benchmarks/gpu_decode.py --device cpu --tiny --layers 1       # a smoke run of the same code
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import Llama4ForCausalLM as HFLlama4
from transformers import Llama4TextConfig

from herd.config import ModelConfig
from herd.layers.attention import AttentionBatch, PagedKVStorage, PoolTables, bind_kv_cache, get_attention_backend
from herd.layers.factory import LayerFactory
from herd.layers.parameters import materialize
from herd.layers.quantization.unquantized import UnquantizedConfig
from herd.layers.triton_ops import triton_available
from herd.models.llama4_text import Llama4ForCausalLM
from herd.models.loader import process_weights_after_loading
from herd.worker.cuda_graphs import build_decode_graphs

CONFIGS = Path(__file__).parent / "configs"
SCOUT_LAYERS = 48


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="benchmarks/configs/tiny.json instead of Scout's shape")
    p.add_argument("--layers", type=int, default=0, help="0: as many as fit in --weight-fraction of the GPU")
    p.add_argument("--weight-fraction", type=float, default=0.55, help="of GPU memory for weights (--layers 0)")
    p.add_argument("--batch-sizes", default="1,8,64,256")
    p.add_argument("--context", type=int, default=1024, help="tokens already in each sequence's KV cache")
    p.add_argument("--prefill-tokens", type=int, default=8192)
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per figure (after 3 warm-up)")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--no-graphs", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    p.add_argument("--check-targets", type=Path, default=None, help="only check a result JSON against the targets")
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if min(args.batch_sizes) < 1 or args.layers < 0 or args.context < 1 or args.prefill_tokens < 1:
        p.error("batch sizes, --context and --prefill-tokens must be positive, --layers at least 0")
    return args


# -- the models ------------------------------------------------------------------------------------------


def layer_params(cfg: dict[str, Any]) -> dict[str, int]:
    h, d = cfg["hidden_size"], cfg["head_dim"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    return {
        "attention": h * (heads + 2 * kv) * d + heads * d * h,
        "expert": 3 * h * cfg["intermediate_size"],
        "experts": cfg["num_local_experts"] * 3 * h * cfg["intermediate_size"],
        "shared": 3 * h * cfg["intermediate_size"],
        "router": h * cfg["num_local_experts"],
        "embedding": cfg["vocab_size"] * h,
    }


def fitting_layers(cfg: dict[str, Any], device: torch.device, fraction: float) -> int:
    p = layer_params(cfg)
    per_layer = 2 * (p["attention"] + p["experts"] + p["shared"] + p["router"])
    free, _ = torch.cuda.mem_get_info(device)
    n = int((free * fraction - 2 * 2 * p["embedding"]) // per_layer)
    n = min(n, SCOUT_LAYERS)
    return max(1, n // 4 * 4 if n >= 4 else n)  # whole groups of 3 chunked + 1 NoPE layers


def build_herd(cfg: dict[str, Any], device: torch.device, backend_name: str) -> Llama4ForCausalLM:
    config = ModelConfig.from_dict(cfg)
    backend = get_attention_backend(backend_name)
    triton_moe = device.type == "cuda" and triton_available()
    factory = LayerFactory(UnquantizedConfig(triton_moe=triton_moe))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = Llama4ForCausalLM(config, factory, backend)
    finally:
        torch.set_default_dtype(previous)
    materialize(model, device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:  # ~1/sqrt(fan_in): activations of order 1, and a router that spreads tokens over experts
                fan_in = param.shape[-2] if name.endswith(("gate_up_proj", "down_proj")) else param.shape[-1]
                param.normal_(0.0, (3.0 if "router" in name else 1.0) / math.sqrt(fan_in), generator=gen)
    process_weights_after_loading(model)
    return model.eval()


def build_transformers_on(herd: Llama4ForCausalLM, cfg: dict[str, Any]) -> torch.nn.Module:
    """transformers' Llama 4 whose every parameter is a view of herd's (no second copy of the weights)."""
    with torch.device("meta"):
        hf = HFLlama4(Llama4TextConfig(**cfg, attn_implementation="eager")).to(torch.bfloat16)
    ours = dict(herd.named_parameters())
    q_rows = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_rows = cfg["num_key_value_heads"] * cfg["head_dim"]
    shared = cfg["intermediate_size"]  # Llama 4's shared expert is as wide as a routed one

    def source(name: str) -> torch.Tensor:
        prefix, _, leaf = name.rpartition("self_attn.")
        if leaf in ("q_proj.weight", "k_proj.weight", "v_proj.weight"):
            qkv = ours[prefix + "self_attn.qkv_proj.weight"]
            start = {"q": 0, "k": q_rows, "v": q_rows + kv_rows}[leaf[0]]
            return qkv[start : start + (q_rows if leaf[0] == "q" else kv_rows)]
        prefix, _, leaf = name.rpartition("shared_expert.")
        if leaf in ("gate_proj.weight", "up_proj.weight"):
            gate_up = ours[prefix + "shared_expert.gate_up_proj.weight"]
            return gate_up[:shared] if leaf.startswith("gate") else gate_up[shared:]
        return ours[name]

    for name, _ in list(hf.named_parameters()):
        module_name, _, leaf = name.rpartition(".")
        module = hf.get_submodule(module_name)
        module._parameters[leaf] = torch.nn.Parameter(source(name), requires_grad=False)
    # The only buffers are the rotary frequencies: computed again, off the meta device.
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf.config).to(herd.lm_head.weight.device)
    assert not any(b.is_meta for b in hf.buffers()), "a transformers buffer left on the meta device"
    return hf.eval()


# -- timing ----------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, steps: int, warmup: int = 3) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device bytes per second (read + write) of a large copy."""
    n = (1 << 30) if device.type == "cuda" else (1 << 24)
    src, dst = torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
    return 2 * n / timed(lambda: dst.copy_(src), device, steps=10)


def matmul_flops(device: torch.device) -> float:
    n = 8192 if device.type == "cuda" else 256
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device=device) for _ in range(2))
    return 2 * n**3 / timed(lambda: a @ b, device, steps=10)


# -- herd's steps ----------------------------------------------------------------------------------------


class PagedBatch:
    """`batch` sequences of `context` tokens each in contiguous blocks of both pools; decode or one prefill."""

    def __init__(self, model: Llama4ForCausalLM, cfg: dict[str, Any], batch: int, tokens: int, block: int):
        self.device = model.lm_head.weight.device
        self.config = model.config
        self.block = block
        self.chunk = cfg["attention_chunk_size"]
        self.per_seq = -(-tokens // block) + 1
        self.blocks = batch * self.per_seq
        self.kv = PagedKVStorage(
            self.config,
            num_full_blocks=self.blocks + 1,
            num_local_blocks=self.blocks + 1,
            block_size=block,
            dtype=torch.bfloat16,
            device=self.device,
        )
        self.kv.full.zero_()
        self.kv.local.zero_()
        bind_kv_cache(model, self.kv.layer)

    def attention_batch(self, new_tokens: list[int], context_lens: list[int]) -> AttentionBatch:
        starts = [0]
        for n in new_tokens:
            starts.append(starts[-1] + n)
        tables = [list(range(i * self.per_seq, (i + 1) * self.per_seq)) for i in range(len(new_tokens))]
        slots = [
            tables[i][p // self.block] * self.block + p % self.block
            for i, (n, ctx) in enumerate(zip(new_tokens, context_lens, strict=True))
            for p in range(ctx - n, ctx)
        ]
        pool = PoolTables(block_tables=tables, slot_mapping=torch.tensor(slots, device=self.device))
        return AttentionBatch(
            query_start_loc=starts,
            context_lens=context_lens,
            block_size=self.block,
            chunk_size=self.chunk,
            full=pool,
            local=pool,
            device=self.device,
        )


def herd_decode(model, cfg, args, batch: int, graphs: bool) -> float:
    device = model.lm_head.weight.device
    paged = PagedBatch(model, cfg, batch, args.context + 1, args.block_size)
    backend = next(m.backend for m in model.modules() if hasattr(m, "backend"))
    step = backend.build_metadata(paged.attention_batch([1] * batch, [args.context + 1] * batch))
    ids = torch.randint(0, cfg["vocab_size"], (batch,), device=device)
    positions = torch.full((batch,), args.context, device=device)
    if graphs:
        runner = build_decode_graphs(
            model,
            backend,
            max_bs=batch,
            context_length=args.context + 1,
            num_full_blocks=paged.blocks,
            num_local_blocks=paged.blocks,
            block_size=args.block_size,
            chunk=cfg["attention_chunk_size"],
            device=device,
        )
        forward: Callable[[], torch.Tensor] = lambda: runner.run(ids, positions, step)  # noqa: E731
    else:
        forward = lambda: model(ids, positions, step)  # noqa: E731
    try:
        with torch.inference_mode():
            return timed(lambda: model.compute_logits(forward()), device, args.steps)
    finally:
        release(model)


def herd_prefill(model, cfg, args) -> float:
    device = model.lm_head.weight.device
    n = args.prefill_tokens
    paged = PagedBatch(model, cfg, 1, n, args.block_size)
    backend = next(m.backend for m in model.modules() if hasattr(m, "backend"))
    ids = torch.randint(0, cfg["vocab_size"], (n,), device=device)
    positions = torch.arange(n, device=device)

    def run() -> torch.Tensor:
        step = backend.build_metadata(paged.attention_batch([n], [n]))
        return model.compute_logits(model(ids, positions, step)[-1:])

    try:
        with torch.inference_mode():
            return timed(run, device, max(3, args.steps // 5), warmup=2)
    finally:
        release(model)


def release(model: Llama4ForCausalLM) -> None:
    """Unbind and free a run's KV cache before the next one allocates its own."""
    bind_kv_cache(model, lambda index: None)
    if model.lm_head.weight.is_cuda:
        torch.cuda.empty_cache()


def head_time(model, args, batch: int) -> float:
    device = model.lm_head.weight.device
    hidden = torch.randn(batch, model.config.hidden_size, dtype=torch.bfloat16, device=device)
    with torch.inference_mode():
        return timed(lambda: model.compute_logits(hidden), device, args.steps)


def transformers_decode(hf, cfg, args, batch: int) -> float:
    device = hf.lm_head.weight.device
    ids = torch.randint(0, cfg["vocab_size"], (batch, args.context), device=device)
    # Prefill in pieces: transformers runs every expert on every token, so one piece stays near 2k tokens.
    piece = max(1, 2048 // batch)
    with torch.inference_mode():
        cache = None
        for start in range(0, args.context, piece):
            out = hf(input_ids=ids[:, start : start + piece], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
        nxt = ids[:, -1:]

        # Each step adds its token to the cache: the context grows by steps + warm-up tokens, a few percent.
        return timed(lambda: hf(input_ids=nxt, past_key_values=cache, use_cache=True), device, args.steps)


# -- bytes and FLOPs -------------------------------------------------------------------------------------


def decode_bytes(cfg: dict[str, Any], layers: int, batch: int, context: int) -> float:
    """Bytes one decode step must read: every weight it touches once, the experts its rows route to (expected
    distinct experts under uniform routing), the LM head and the KV cache of each sequence."""
    p = layer_params(cfg)
    experts = cfg["num_local_experts"] * (1 - (1 - 1 / cfg["num_local_experts"]) ** batch)
    per_layer = p["attention"] + p["shared"] + p["router"] + experts * p["expert"]
    kv_token = 2 * cfg["num_key_value_heads"] * cfg["head_dim"]
    nope = sum(1 for i in range(layers) if (i + 1) % cfg.get("no_rope_layer_interval", 4) == 0)
    visible_local = min(context + 1, cfg["attention_chunk_size"])
    kv = batch * kv_token * (nope * (context + 1) + (layers - nope) * visible_local)
    return 2 * (layers * per_layer + p["embedding"] + kv)  # bf16


def prefill_flops(cfg: dict[str, Any], layers: int, tokens: int) -> float:
    p = layer_params(cfg)
    dense = 2 * tokens * layers * (p["attention"] + p["shared"] + p["router"] + p["expert"])
    h = cfg["num_attention_heads"] * cfg["head_dim"]
    attention = 2 * 2 * h * layers * tokens * min(tokens, cfg["attention_chunk_size"]) / 2  # causal half
    return dense + attention + 2 * p["embedding"]  # the LM head on the last token


def check_targets(result: dict[str, Any]) -> list[tuple[str, float, float, bool]]:
    """Issue 19's targets: (what, measured, target, met)."""
    rows = {r["batch"]: r for r in result["decode"]}
    checks = []
    if 1 in rows:
        checks.append(("decode batch 1, fraction of HBM roofline", rows[1]["of_roofline"], 0.70))
        if "herd_graphs_ms" in rows[1]:
            checks.append(("batch 1, graphs off / on", rows[1]["herd_eager_ms"] / rows[1]["herd_graphs_ms"], 1.5))
    if 64 in rows and "speedup_vs_transformers" in rows[64]:
        checks.append(("decode batch 64, x transformers' throughput", rows[64]["speedup_vs_transformers"], 5.0))
    if "prefill" in result:
        checks.append(("prefill, fraction of bf16 matmul peak", result["prefill"]["of_matmul_peak"], 0.50))
    return [(what, got, target, got >= target) for what, got, target in checks]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.check_targets is not None:
        result = json.loads(args.check_targets.read_text())
        for what, got, target, met in check_targets(result):
            print(f"{'MET' if met else 'NOT MET'}: {what}: {got:.2f} (target {target:.2f})")
        return result
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --tiny for a smoke run")
    cfg = json.loads((CONFIGS / ("tiny.json" if args.tiny else "scout_shape.json")).read_text())
    cfg["num_hidden_layers"] = args.layers or (
        fitting_layers(cfg, device, args.weight_fraction) if device.type == "cuda" else 4
    )
    layers = cfg["num_hidden_layers"]
    backend = "triton" if device.type == "cuda" else "torch_native"
    model = build_herd(cfg, device, backend)
    bandwidth, peak = copy_bandwidth(device), matmul_flops(device)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "layers": layers,
        "context": args.context,
        "backend": backend,
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "bf16_matmul_TFLOPs": peak / 1e12,
        "decode": [],
    }
    print(f"{result['device']}: {layers} Scout-shaped layers, copy {bandwidth / 1e9:.0f} GB/s, "
          f"bf16 matmul {peak / 1e12:.0f} TFLOP/s", flush=True)  # fmt: skip
    hf = None if args.no_transformers else build_transformers_on(model, cfg)
    graphs = device.type == "cuda" and not args.no_graphs
    for batch in args.batch_sizes:
        row: dict[str, Any] = {"batch": batch}
        row["herd_eager_ms"] = 1e3 * herd_decode(model, cfg, args, batch, graphs=False)
        if graphs:
            row["herd_graphs_ms"] = 1e3 * herd_decode(model, cfg, args, batch, graphs=True)
        best = row.get("herd_graphs_ms", row["herd_eager_ms"])
        roofline = decode_bytes(cfg, layers, batch, args.context) / bandwidth
        row["roofline_ms"] = 1e3 * roofline
        row["of_roofline"] = roofline * 1e3 / best
        head = 1e3 * head_time(model, args, batch)
        row["tpot_48_layers_ms"] = head + (best - head) * SCOUT_LAYERS / layers
        if hf is not None:
            row["transformers_ms"] = 1e3 * transformers_decode(hf, cfg, args, batch)
            row["speedup_vs_transformers"] = row["transformers_ms"] / best
        result["decode"].append(row)
        print(json.dumps(row), flush=True)
    prefill = herd_prefill(model, cfg, args)
    flops = prefill_flops(cfg, layers, args.prefill_tokens)
    result["prefill"] = {
        "tokens": args.prefill_tokens,
        "herd_ms": 1e3 * prefill,
        "TFLOPs": flops / prefill / 1e12,
        "of_matmul_peak": flops / prefill / peak,
    }
    print(json.dumps(result["prefill"]), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
