"""Llama 4 image preprocessing against transformers' Llama4ImageProcessor / Llama4Processor.

The goldens come from scripts/make_vision_goldens.py (transformers needs torchvision for this processor,
which herd's environment does not have); the images are rebuilt from tests/vision_cases.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from herd import multimodal
from herd.multimodal import ProcessedImage, image_prompt_tokens, num_image_tokens, process_image

from vision_cases import CASES, Case, make_image

GOLDENS = json.loads((Path(__file__).parent / "fixtures" / "vision" / "llama4_preprocessing.json").read_text())
# transformers resizes uint8 natively on CPUs with AVX2 / AVX512 / ARM, else in float32: goldens made on one
# kind are bit-exact only on the same kind (the other path rounds differently by at most one level).
SAME_RESIZE_KERNEL = multimodal._native_uint8_resize() == (
    GOLDENS["made_with"]["cpu"] in ("AVX2", "AVX512") or GOLDENS["made_with"]["machine"] in ("aarch64", "arm64")
)


@pytest.fixture(scope="module")
def processed() -> dict[str, ProcessedImage]:
    return {c.name: process_image(make_image(c), c.tile_size, c.max_patches) for c in CASES}


def _sha256(pixels: torch.Tensor) -> str:
    return hashlib.sha256(pixels.contiguous().numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_tile_grid_and_shape_match_transformers(case: Case, processed: dict[str, ProcessedImage]) -> None:
    golden, out = GOLDENS["cases"][case.name], processed[case.name]
    assert list(out.grid) == golden["grid"]
    assert list(out.pixel_values.shape) == golden["pixel_values"]["shape"]
    assert out.pixel_values.dtype == torch.float32


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_pixel_values_match_transformers(case: Case, processed: dict[str, ProcessedImage]) -> None:
    golden, pixels = GOLDENS["cases"][case.name]["pixel_values"], processed[case.name].pixel_values
    flat = pixels.view(pixels.shape[0], -1)
    # Where they differ, the means and samples say which tile and how much.
    assert flat.double().mean(dim=1).tolist() == pytest.approx(golden["tile_means"], abs=1e-5)
    samples = flat[:, golden["sample_index"]]
    assert torch.allclose(samples, torch.tensor(golden["samples"]), atol=0.02), f"{samples} != {golden['samples']}"
    if SAME_RESIZE_KERNEL:
        assert _sha256(pixels) == golden["sha256"], "not bit for bit what transformers gives"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_prompt_layout_matches_transformers(case: Case, processed: dict[str, ProcessedImage]) -> None:
    golden, grid = GOLDENS["cases"][case.name], processed[case.name].grid
    assert "".join(image_prompt_tokens(grid, 2)) == golden["layout_2"]
    layout = image_prompt_tokens(grid, golden["tokens_per_tile"])
    assert hashlib.sha256("".join(layout).encode()).hexdigest() == golden["layout_sha256"]
    assert num_image_tokens(grid, golden["tokens_per_tile"]) == len(layout)


def test_layouts_of_one_tile_and_of_a_grid() -> None:
    p, x, y = "<|patch|>", "<|tile_x_separator|>", "<|tile_y_separator|>"
    start, image, end = "<|image_start|>", "<|image|>", "<|image_end|>"
    assert image_prompt_tokens((1, 1), 2) == [start, image, p, p, end]
    assert image_prompt_tokens((2, 2), 1) == [start, p, x, p, y, p, x, p, y, image, p, end]
    assert image_prompt_tokens((1, 3), 1) == [start, p, x, p, x, p, y, image, p, end]


def test_float_resize_path_stays_within_one_level(processed: dict[str, ProcessedImage], monkeypatch) -> None:
    # CPUs without a native uint8 kernel resize in float32 and round, as torchvision does there.
    monkeypatch.setattr(multimodal, "_native_uint8_resize", lambda: False)
    for case in [c for c in CASES if c.name in ("medium", "huge", "odd-tall", "rgba")]:
        out = process_image(make_image(case), case.tile_size, case.max_patches)
        assert out.grid == processed[case.name].grid
        # one uint8 level is 2/255 after normalisation, plus bfloat16 rounding
        assert (out.pixel_values - processed[case.name].pixel_values).abs().max() <= 2 / 255 + 1 / 64


def test_content_hash_is_of_the_pixels_the_model_sees() -> None:
    case = next(c for c in CASES if c.name == "medium")
    image = make_image(case)
    same = image.copy()
    other = image.copy()
    other.putpixel((3, 4), (0, 0, 0) if image.getpixel((3, 4)) != (0, 0, 0) else (1, 1, 1))
    assert process_image(image, 336).content_hash == process_image(same, 336).content_hash
    assert process_image(image, 336).content_hash != process_image(other, 336).content_hash
    # A palette image and its RGB rendering are the same picture; two palettes over the same indices are not.
    palette = make_image(next(c for c in CASES if c.name == "palette"))
    assert process_image(palette, 336).content_hash == process_image(palette.convert("RGB"), 336).content_hash
    repainted = palette.copy()
    repainted.putpalette(bytes(255 - b for b in palette.getpalette()))
    assert process_image(palette, 336).content_hash != process_image(repainted, 336).content_hash


def test_transparent_pixels_become_white() -> None:
    image = Image.new("RGBA", (10, 10), (10, 20, 30, 0))
    out = process_image(image, 28)
    assert torch.all(out.pixel_values[0, :, :10, :10] == 1.0)  # white after (x / 255 - 0.5) / 0.5
