"""Write tests/fixtures/vision/llama4_preprocessing.json: what transformers' Llama4ImageProcessor and
Llama4Processor make of the images in tests/vision_cases.py (tile grid, pixel values, prompt layout).

transformers' processor needs torchvision, which herd does not depend on, and installing it from the
package index into herd's environment replaces the CPU build of torch with a CUDA one. So this runs in an
environment of its own, with the same torch, transformers and Pillow as herd's and torchvision beside it:

    python3.11 -m venv /tmp/vision-ref
    /tmp/vision-ref/bin/pip install torch==2.13.0 transformers==5.25.0 pillow==13.0.0 numpy
    /tmp/vision-ref/bin/pip install --no-deps torchvision==0.28.0
    /tmp/vision-ref/bin/python scripts/make_vision_goldens.py

(the torchvision wheel from the index is built for CUDA: its compiled ops do not load against a CPU torch,
and the image transforms used here do not need them). Pixel values are stored as a sha256 of their
float32 bytes (the test checks them bit for bit), plus per-tile means and a few samples that say where a
mismatch is. The resize kernel transformers uses depends on the CPU (see `cpu` in the file); rerun this
where the test fails for that reason.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

import torch
import torch.library

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "vision" / "llama4_preprocessing.json"
sys.path.insert(0, str(ROOT / "tests"))  # the image recipes the test rebuilds

from vision_cases import CASES, make_image  # noqa: E402

PATCH_SIZE = 14  # Llama 4's vision patch; pixel shuffle 0.5 then keeps a quarter of the patches
SAMPLES_PER_TILE = 8


def import_torchvision() -> None:
    # torchvision registers fake kernels for its compiled ops (nms) at import; with the CUDA wheel over a
    # CPU torch those ops do not exist, so skip that registration: the transforms never call them.
    register_fake = torch.library.register_fake
    torch.library.register_fake = lambda *args, **kwargs: lambda fn: fn  # type: ignore[assignment]
    try:
        import torchvision  # noqa: F401
    finally:
        torch.library.register_fake = register_fake


def fingerprint(pixels: torch.Tensor) -> dict:
    values = pixels.float().contiguous()
    flat = values.view(values.shape[0], -1)
    gen = torch.Generator().manual_seed(0)
    index = torch.randint(0, flat.shape[1], (SAMPLES_PER_TILE,), generator=gen)
    return {
        "shape": list(values.shape),
        "dtype": str(pixels.dtype),
        "sha256": hashlib.sha256(values.numpy().tobytes()).hexdigest(),
        "tile_means": [round(m, 6) for m in flat.double().mean(dim=1).tolist()],
        "sample_index": index.tolist(),
        "samples": flat[:, index].tolist(),
    }


def main() -> None:
    import_torchvision()
    import transformers
    from transformers import Llama4ImageProcessor
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    cases = {}
    for case in CASES:
        processor = Llama4ImageProcessor(
            size={"height": case.tile_size, "width": case.tile_size}, max_patches=case.max_patches
        )
        out = processor(make_image(case), return_tensors="pt")
        rows, cols = out["aspect_ratios"][0].tolist()
        tokens_per_tile = (case.tile_size // PATCH_SIZE) ** 2 // 4
        # _prompt_split_image reads nothing from the processor instance.
        layout = Llama4Processor._prompt_split_image(None, (rows, cols), tokens_per_tile)
        cases[case.name] = {
            "grid": [rows, cols],
            "pixel_values": fingerprint(out["pixel_values"]),
            "tokens_per_tile": tokens_per_tile,
            "layout_sha256": hashlib.sha256(layout.encode()).hexdigest(),
            "layout_2": Llama4Processor._prompt_split_image(None, (rows, cols), 2),
        }
        print(f"{case.name}: {case.width}x{case.height} {case.mode} -> grid {rows}x{cols}")
    meta = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torchvision": sys.modules["torchvision"].__version__,
        "pillow": __import__("PIL").__version__,
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"made_with": meta, "cases": cases}, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
