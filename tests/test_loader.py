"""Loading checkpoints: layouts that must load, and mistakes that must be named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from herd.config import ConfigError
from herd.layers.quantization.compressed_tensors import UnsupportedQuantizationError
from herd.models.loader import CheckpointError, load_model

from checkpoints import SCOUT_LIKE, make_text_checkpoint, reference_logits
from paged import PagedRunner

IDS = list(range(3, 23))


def herd_logits(path: Path, **kwargs) -> torch.Tensor:
    model = load_model(path, dtype="float32", **kwargs)
    return PagedRunner(model, max_seqs=1, max_len=len(IDS)).step([(0, IDS)])


def rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a single-file checkpoint to `dst` with its tensors passed through `edit`."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = edit(load_file(src / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, dst / "model.safetensors")
    return dst


def test_sharded_checkpoint_with_index(tmp_path: Path) -> None:
    ref = make_text_checkpoint(tmp_path / "ckpt", SCOUT_LIKE, seed=0)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    torch.testing.assert_close(herd_logits(tmp_path / "sharded"), reference_logits(ref, IDS), atol=1e-4, rtol=0)


def test_per_expert_layout(scout_ckpt, tmp_path: Path) -> None:
    path, ref = scout_ckpt

    def split_experts(tensors: dict) -> dict:
        out = {}
        for name, t in tensors.items():
            if name.endswith("experts.gate_up_proj"):
                base, inter = name.removesuffix(".gate_up_proj"), t.shape[2] // 2
                for e in range(t.shape[0]):
                    out[f"{base}.{e}.gate_proj.weight"] = t[e, :, :inter].t()
                    out[f"{base}.{e}.up_proj.weight"] = t[e, :, inter:].t()
            elif name.endswith("experts.down_proj"):
                base = name.removesuffix(".down_proj")
                for e in range(t.shape[0]):
                    out[f"{base}.{e}.down_proj.weight"] = t[e].t()
            else:
                out[name] = t
        return out

    split = rewrite(path, tmp_path / "split", split_experts)
    torch.testing.assert_close(herd_logits(split), reference_logits(ref, IDS), atol=1e-4, rtol=0)


def test_missing_tensor_is_named(scout_ckpt, tmp_path: Path) -> None:
    path, _ = scout_ckpt
    gone = "model.layers.2.self_attn.k_proj.weight"
    bad = rewrite(path, tmp_path / "bad", lambda t: {k: v for k, v in t.items() if k != gone})
    with pytest.raises(CheckpointError, match=r"1 missing tensor\(s\): model\.layers\.2\.self_attn\.k_proj\.weight"):
        load_model(bad)


def test_missing_tensor_named_with_multimodal_prefix(multimodal_ckpt, tmp_path: Path) -> None:
    path, _ = multimodal_ckpt
    gone = "language_model.model.norm.weight"
    bad = rewrite(path, tmp_path / "bad", lambda t: {k: v for k, v in t.items() if k != gone})
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): language_model\.model\.norm\.weight"):
        load_model(bad)


def test_unexpected_tensor_is_named(scout_ckpt, tmp_path: Path) -> None:
    path, _ = scout_ckpt
    extra = "model.layers.0.self_attn.bogus.weight"
    bad = rewrite(path, tmp_path / "bad", lambda t: {**t, extra: torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"1 unexpected tensor\(s\): model\.layers\.0\.self_attn\.bogus\.weight"):
        load_model(bad)


def test_wrong_shape_is_named(scout_ckpt, tmp_path: Path) -> None:
    path, _ = scout_ckpt
    name = "model.layers.1.feed_forward.experts.down_proj"
    bad = rewrite(path, tmp_path / "bad", lambda t: {**t, name: t[name][:, :-1]})
    with pytest.raises(
        CheckpointError,
        match=r"wrong shape: .*experts\.down_proj: checkpoint \[4, 31, 64\] vs model \[4, 32, 64\]",
    ):
        load_model(bad)


def test_unknown_architecture(scout_ckpt, tmp_path: Path) -> None:
    path, _ = scout_ckpt
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen3MoeForCausalLM"]}))
    with pytest.raises(ConfigError, match="unsupported architecture 'Qwen3MoeForCausalLM'.*Llama4ForCausalLM"):
        load_model(bad)


def test_no_weights_at_all(scout_ckpt, tmp_path: Path) -> None:
    path, _ = scout_ckpt
    shutil.copy(path / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_model(tmp_path)


def test_dummy_load_format_needs_only_config(scout_ckpt, tmp_path: Path) -> None:
    path, _ = scout_ckpt
    shutil.copy(path / "config.json", tmp_path / "config.json")
    model = load_model(tmp_path, load_format="dummy")
    assert next(model.parameters()).dtype == torch.bfloat16
    logits = PagedRunner(model, max_seqs=1, max_len=len(IDS)).step([(0, IDS)])
    assert torch.isfinite(logits).all()
    again = load_model(tmp_path, load_format="dummy")
    assert torch.equal(model.lm_head.weight, again.lm_head.weight)  # seeded


@pytest.mark.parametrize(("dtype", "expected"), [("float16", torch.float16), ("auto", torch.float32)])
def test_dtype_selection(scout_ckpt, dtype: str, expected: torch.dtype) -> None:
    path, _ = scout_ckpt  # saved in float32, so "auto" is float32
    assert all(p.dtype == expected for p in load_model(path, dtype=dtype).parameters())


def test_bad_options_are_named(scout_ckpt) -> None:
    path, _ = scout_ckpt
    with pytest.raises(ValueError, match="unknown dtype 'fp64'; accepted: auto, bfloat16"):
        load_model(path, dtype="fp64")
    with pytest.raises(ValueError, match="unknown load format 'pt'"):
        load_model(path, load_format="pt")
    with pytest.raises(ValueError, match="unknown attention backend 'flashinfer'"):
        load_model(path, attention_backend="flashinfer")


def test_quantized_checkpoint_is_refused_clearly(scout_ckpt, tmp_path: Path) -> None:
    path, _ = scout_ckpt
    bad = tmp_path / "fp8"
    shutil.copytree(path, bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fbgemm_fp8"}
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedQuantizationError, match="quant_method 'fbgemm_fp8' is not supported"):
        load_model(bad)
