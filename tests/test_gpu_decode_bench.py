"""benchmarks/gpu_decode.py runs as-is (a CPU smoke run of the same code the GPU runs), its transformers peer
shares herd's weights and computes the same function, and its roofline arithmetic counts Scout's bytes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import gpu_decode


def test_smoke_run_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    argv = ["--device", "cpu", "--tiny", "--layers", "1", "--batch-sizes", "1,2", "--context", "8"]
    result = gpu_decode.main([*argv, "--prefill-tokens", "16", "--steps", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [r["batch"] for r in result["decode"]] == [1, 2]
    for row in result["decode"]:
        assert row["herd_eager_ms"] > 0 and row["transformers_ms"] > 0 and row["roofline_ms"] > 0
    assert result["prefill"]["herd_ms"] > 0
    checks = gpu_decode.check_targets(result)
    assert checks[0][0].startswith("decode batch 1")


def test_transformers_peer_is_the_same_model() -> None:
    cfg = json.loads((gpu_decode.CONFIGS / "tiny.json").read_text())
    cfg["num_hidden_layers"] = 4
    model = gpu_decode.build_herd(cfg, torch.device("cpu"), "torch_native")
    hf = gpu_decode.build_transformers_on(model, cfg)
    assert hf.model.layers[0].self_attn.k_proj.weight.data_ptr() != model.lm_head.weight.data_ptr()
    ids = torch.randint(0, cfg["vocab_size"], (12,), generator=torch.Generator().manual_seed(0))
    paged = gpu_decode.PagedBatch(model, cfg, 1, 12, 4)
    backend = model.model.layers[0].self_attn.attn.backend
    with torch.inference_mode():
        step = backend.build_metadata(paged.attention_batch([12], [12]))
        ours = model.compute_logits(model(ids, torch.arange(12), step)).float()
        theirs = hf(input_ids=ids[None]).logits[0].float()
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.9
    torch.testing.assert_close(ours, theirs, atol=0.1, rtol=0.05)


def test_decode_bytes_of_scout_at_batch_one() -> None:
    """Meta's 17B active parameters of Scout, less the input embedding table (1.03B) of which a step reads
    only its tokens' rows: 48 layers of attention, one routed and the shared expert, and the LM head."""
    cfg = json.loads((gpu_decode.CONFIGS / "scout_shape.json").read_text())
    weights = gpu_decode.decode_bytes(cfg, 48, 1, context=0) / 2
    assert 15.6e9 < weights < 16.6e9
