"""compressed-tensors checkpoints (FP8 and W4A16, in the published layouts) give transformers' greedy tokens
on the dequantized weights, and what herd cannot run is refused at start naming the scheme."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from herd.layers.quantization.compressed_tensors import UnsupportedQuantizationError
from herd.layers.quantization.select import select_quantization
from herd.layers.quantization.unquantized import UnquantizedConfig
from herd.llm import LLM
from herd.models.loader import CheckpointError, load_model
from herd.sampling import SamplingParams

from checkpoints import CHUNK, MAVERICK_LIKE, SCOUT_LIKE
from ct_fixtures import MAVERICK_FP8_IGNORE, SHORT_IGNORE, make_ct_checkpoint
from test_engine import hf_greedy
from test_quantization_int8 import fake_quantize
from test_tensor_parallel import MAX_TOKENS as TP_TOKENS
from test_tensor_parallel import env as tp_env
from test_tensor_parallel import prompts as tp_prompts
from test_tensor_parallel import transformers_greedy

# W4A16's groups of 128 need inputs of 128 or more: a Scout-like model wide enough for two groups per row.
W4A16_LIKE = {**SCOUT_LIKE, "hidden_size": 256, "intermediate_size": 128, "intermediate_size_mlp": 128, "head_dim": 32}

CASES = {
    # Meta's Maverick FP8: multimodal layout, interleaved dense layers, only the routed experts quantized.
    "maverick_fp8": (MAVERICK_LIKE, "FP8_DYNAMIC", MAVERICK_FP8_IGNORE, True),
    # RedHatAI's FP8-dynamic / W4A16 Scout: attention, shared expert and experts quantized.
    "scout_fp8_dynamic": (SCOUT_LIKE, "FP8_DYNAMIC", SHORT_IGNORE, False),
    "scout_w4a16": (W4A16_LIKE, "W4A16", SHORT_IGNORE, False),
}


@pytest.fixture(scope="module", params=list(CASES))
def ct_ckpt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, str]:
    text_config, preset, ignore, multimodal = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    return path, make_ct_checkpoint(path, text_config, preset, ignore, multimodal=multimodal, seed=4), preset


def test_greedy_tokens_match_transformers_on_dequantized(ct_ckpt) -> None:
    path, ref, _ = ct_ckpt
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (2 * CHUNK + 3, 5)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    llm = LLM(str(path), dtype="float32", chunked_prefill_size=7)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [hf_greedy(ref, p, 32) for p in prompts]


def test_fp8_checkpoint_runs_as_int8_with_w8a16(ct_ckpt) -> None:
    """--quantization w8a16 on an FP8 checkpoint: w = q * s requantized per output channel (INT8 CPU GEMM)."""
    path, ref, _ = ct_ckpt
    if not path.name.startswith("maverick_fp8"):  # one FP8 case is enough (keeps the suite short)
        pytest.skip("run on Meta's Maverick FP8 layout only")
    ref = copy.deepcopy(ref)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name in ref.quantized_params:  # Linear [out, in] or fused experts [E, in, out]
                p.copy_(fake_quantize(p, in_dim=1))
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (2 * CHUNK + 3, 5)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    llm = LLM(str(path), dtype="float32", quantization="w8a16")
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [hf_greedy(ref, p, 32) for p in prompts]
    int8 = [n for n, b in llm.engine.core.workers[0].model.named_buffers() if b.dtype == torch.int8]
    assert int8 and not any(b.dtype == torch.float8_e4m3fn for b in llm.engine.core.workers[0].model.buffers())


def test_quantized_layers_stay_quantized_and_ignored_ones_do_not(ct_ckpt) -> None:
    path, _, preset = ct_ckpt
    model = load_model(path, dtype="float32")
    kinds = {name.rpartition(".")[2] for name, _ in model.named_buffers()}
    assert any(k.endswith("fp8") for k in kinds) == (preset == "FP8_DYNAMIC")
    assert any(k.endswith("int4") for k in kinds) == (preset == "W4A16")
    layer = model.model.layers[1].feed_forward  # a MoE layer in every case
    assert layer.router.weight.dtype == torch.float32  # the router is on every ignore list
    assert not hasattr(layer.experts, "gate_up_proj")  # the experts are quantized in every case
    shared = layer.shared_expert.gate_up_proj
    assert hasattr(shared, "weight") == (json.loads((path / "config.json").read_text())["quantization_config"]
                                         ["ignore"] == MAVERICK_FP8_IGNORE)  # fmt: skip


@pytest.fixture(scope="module")
def small_fp8_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    path = tmp_path_factory.mktemp("small_fp8")
    return path, make_ct_checkpoint(path, SCOUT_LIKE, "FP8_DYNAMIC", SHORT_IGNORE)


@pytest.fixture(scope="module")
def small_fp8(small_fp8_ckpt) -> Path:
    return small_fp8_ckpt[0]


def test_tensor_and_expert_parallel_ranks_load_their_slices_of_fp8(small_fp8_ckpt) -> None:
    """FP8 attention split by heads and columns (a row-parallel rank keeps every per-row scale), experts split
    by their intermediate dimension (tp 2) or whole (ep 2): transformers' tokens on the dequantized weights."""
    path, ref = small_fp8_ckpt
    batch = tp_prompts()
    spec = [(str(path), batch, config) for config in ({"tp_size": 2}, {"tp_size": 2, "ep_size": 2})]
    cmd = [sys.executable, str(Path(__file__).parent / "tp_generate.py"), json.dumps(spec), str(TP_TOKENS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=tp_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    expected = transformers_greedy(ref, batch, TP_TOKENS)
    assert [json.loads(line) for line in proc.stdout.splitlines()] == [expected, expected]


def _with_quant(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    change(config["quantization_config"])
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (
            lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=4),
            ["group_0", "float 4-bit", "not supported"],
        ),
        (lambda q: q["config_groups"]["group_0"]["weights"].update(symmetric=False), ["asymmetric", "not supported"]),
        (lambda q: q.update(format="marlin-24"), ["format marlin-24", "not supported"]),
        (lambda q: q.update(kv_cache_scheme={"num_bits": 8, "type": "float"}), ["kv_cache_scheme"]),
        (lambda q: q.update(quant_method="fbgemm_fp8"), ["quant_method 'fbgemm_fp8'", "not supported"]),
    ],
)
def test_unsupported_scheme_fails_at_start_naming_it(change, words: list[str], small_fp8: Path, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedQuantizationError) as error:
        load_model(_with_quant(small_fp8, tmp_path / "bad", change))
    for word in words:
        assert word in str(error.value)


def test_ignore_list_that_does_not_match_the_tensors_fails_naming_them(small_fp8: Path, tmp_path: Path) -> None:
    # The config now claims attention is stored in bf16, but the file holds FP8 q/k/v/o.
    bad = _with_quant(small_fp8, tmp_path / "bad", lambda q: q["ignore"].append("re:.*self_attn"))
    with pytest.raises(CheckpointError, match=r"self_attn\.q_proj\.weight_scale"):
        load_model(bad)


def test_quantization_flag_on_a_quantized_checkpoint_is_refused_unless_fp8_to_w8a16() -> None:
    w4a16 = {
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int",
                                                                          "strategy": "group", "group_size": 128}}},
    }  # fmt: skip
    with pytest.raises(UnsupportedQuantizationError, match="already quantized"):
        select_quantization(w4a16, "", "w8a16", UnquantizedConfig())
    with pytest.raises(UnsupportedQuantizationError, match="already quantized"):
        select_quantization(w4a16, "", "fp8", UnquantizedConfig())
