"""Loading reads each checkpoint tensor straight into its parameter: no second copy of the weights.

The peak resident memory that a load adds is measured in a fresh process (VmHWM, reset after imports and
a warm-up load) and compared with the checkpoint's bytes. Keeping the whole file mapped while copying out
of it, as `safe_open` does, peaked at about 2x; a load that holds at most one tensor in flight stays near 1x.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import Llama4ForCausalLM, Llama4TextConfig

from herd.models.safetensors_mmap import SafetensorsError, mapped_tensor, read_index

from checkpoints import SCOUT_LIKE

# Wide enough (~190 MB in bf16) that the import-time noise of a process is small beside it.
WIDE = {**SCOUT_LIKE, "hidden_size": 768, "intermediate_size": 1024, "num_local_experts": 16, "head_dim": 64}

MEASURE = """
import json, sys
from pathlib import Path
import torch
from herd.layers.factory import LayerFactory
from herd.layers.quantization.unquantized import UnquantizedConfig
from herd.models.loader import load_model

def kib(field):
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))

factory = LayerFactory(UnquantizedConfig(cpu_packed=False))
load_model(sys.argv[2], dtype=torch.bfloat16, factory=factory)  # warm-up: first-use allocations, lazy imports
Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
before = kib("VmRSS")
model = load_model(sys.argv[1], dtype=torch.bfloat16, factory=factory)
print(json.dumps({"peak": (kib("VmHWM") - before) * 1024, "held": (kib("VmRSS") - before) * 1024}))
"""


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wide")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):  # no init work: the weights' values do not matter here
            model = Llama4ForCausalLM(Llama4TextConfig(**WIDE))
        model.to_empty(device="cpu")
        for p in model.parameters():
            p.data.normal_(0, 0.02)
        model.save_pretrained(path)
    finally:
        torch.set_default_dtype(previous)
    return path


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
def test_load_peak_memory_is_about_the_weights(wide_ckpt: Path, scout_ckpt) -> None:
    ckpt_bytes = sum(f.stat().st_size for f in wide_ckpt.glob("*.safetensors"))
    repo = Path(__file__).parent.parent
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(wide_ckpt), str(scout_ckpt[0])],
        capture_output=True,
        text=True,
        check=True,
        cwd=repo,
        env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    grew = json.loads(out.stdout.strip().splitlines()[-1])
    assert grew["held"] / ckpt_bytes < 1.1, grew
    assert grew["peak"] / ckpt_bytes < 1.2, grew


def test_mapped_tensors_match_the_file(tmp_path: Path) -> None:
    tensors = {
        "b": torch.randn(3, 5).bfloat16(),
        "a": torch.arange(7, dtype=torch.int32),
        "empty": torch.zeros(0, 4),
        "f8": torch.randn(4, 4).to(torch.float8_e4m3fn),
    }
    save_file(tensors, tmp_path / "x.safetensors")
    index = read_index(tmp_path / "x.safetensors")
    assert set(index) == set(tensors)
    for name, expected in tensors.items():
        got = mapped_tensor(index[name])
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
        got.view(torch.uint8).fill_(0)  # a private mapping: the file keeps its bytes
    again = mapped_tensor(read_index(tmp_path / "x.safetensors")["b"])
    assert torch.equal(again, tensors["b"])


def test_a_truncated_file_is_named(tmp_path: Path) -> None:
    save_file({"w": torch.ones(64, 64)}, tmp_path / "x.safetensors")
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(data[:-100])
    with pytest.raises(SafetensorsError, match="x.safetensors: tensor w"):
        read_index(tmp_path / "x.safetensors")
