"""SGLang's `image` dataset: synthetic images as data URLs, with random text, for chat endpoints.

Vision tokens are counted with Llama 4's rule (herd serves Llama 4): the image is fitted, without
distortion, to the grid of 336 px tiles (at most 16) that needs the least upscaling, else the least
downscaling; each tile is 144 patch tokens, a multi-tile image adds separators and a global view.
"""

from __future__ import annotations

import base64
import io
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image

from herd.bench.datasets import DatasetRow, random_lens, random_prompt
from herd.bench.tokenizer import BenchTokenizer

logger = logging.getLogger(__name__)

RESOLUTION_PRESETS = {"4k": (3840, 2160), "1080p": (1920, 1080), "720p": (1280, 720), "360p": (640, 360)}
IMAGE_FORMATS = ("jpeg", "png")
IMAGE_CONTENTS = ("random", "blank")

LLAMA4_TILE = 336
LLAMA4_MAX_TILES = 16
LLAMA4_TOKENS_PER_TILE = 144  # (336 / 14)^2 patches, pixel-shuffled by 0.5 in each direction


@dataclass(frozen=True)
class ImageSpec:
    """SGLang's --image-* flags."""

    count: int = 1
    resolution: str = "1080p"
    format: str = "jpeg"
    content: str = "random"


def parse_resolution(text: str) -> tuple[int, int]:
    """(width, height) of a preset (4k, 1080p, 720p, 360p) or of SGLang's custom "HEIGHTxWIDTH"."""
    key = text.strip().lower()
    if key in RESOLUTION_PRESETS:
        return RESOLUTION_PRESETS[key]
    parts = key.split("x")
    if len(parts) == 2 and all(p.isdigit() and int(p) > 0 for p in parts):
        return int(parts[1]), int(parts[0])
    raise ValueError(f"unsupported image resolution {text!r}: use 4k, 1080p, 720p, 360p or HEIGHTxWIDTH")


def llama4_tile_grid(width: int, height: int) -> tuple[int, int]:
    """(rows, columns) of tiles Llama 4's preprocessing fits an image of this size to."""
    grids = [(r, c) for r in range(1, LLAMA4_MAX_TILES + 1) for c in range(1, LLAMA4_MAX_TILES // r + 1)]
    # The limiting side decides how far an image can be scaled into a canvas without distortion.
    scales = [min(r * LLAMA4_TILE / height, c * LLAMA4_TILE / width) for r, c in grids]
    up = [s for s in scales if s >= 1]
    best = min(up) if up else max(scales)
    # Among canvases with the same scale, the smallest pads least.
    return min((g for g, s in zip(grids, scales, strict=True) if s == best), key=lambda g: g[0] * g[1])


def llama4_image_tokens(width: int, height: int) -> int:
    """Prompt tokens of one image: <|image_start|>, per tile 144 patches and a separator (x between tiles,
    y at a row's end) when tiled, <|image|> + 144 patches of the global view, <|image_end|>."""
    rows, cols = llama4_tile_grid(width, height)
    tiles = rows * cols
    tiled = tiles * (LLAMA4_TOKENS_PER_TILE + 1) if tiles > 1 else 0
    return 1 + tiled + 1 + LLAMA4_TOKENS_PER_TILE + 1


def image_data_url(rng: np.random.Generator, width: int, height: int, fmt: str, content: str) -> str:
    """A `data:image/<fmt>;base64,...` URL of a random-noise or white image."""
    if content == "blank":
        pixels = np.full((height, width, 3), 255, dtype=np.uint8)
    else:
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt.upper(), quality=85)
    return f"data:image/{fmt};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def sample_image(
    tok: BenchTokenizer,
    rng: np.random.Generator,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    spec: ImageSpec,
) -> list[DatasetRow]:
    """Requests of `spec.count` images and random text of the `random` dataset's lengths. The text length
    counts the chat-formatted prompt, as a chat server tokenizes it; vision tokens are Llama 4's."""
    if spec.format not in IMAGE_FORMATS:
        raise ValueError(f"unsupported image format {spec.format!r}: use {' or '.join(IMAGE_FORMATS)}")
    if spec.content not in IMAGE_CONTENTS:
        raise ValueError(f"unsupported image content {spec.content!r}: use {' or '.join(IMAGE_CONTENTS)}")
    width, height = parse_resolution(spec.resolution)
    if width * height >= 1920 * 1080 and spec.count * num_prompts >= 100:
        logger.warning("making %d images of %dx%d takes a while", spec.count * num_prompts, width, height)
    vision_len = spec.count * llama4_image_tokens(width, height)
    input_lens = random_lens(rng, input_len, range_ratio, num_prompts)
    output_lens = random_lens(rng, output_len, range_ratio, num_prompts)
    rows = []
    for n_in, n_out in zip(input_lens, output_lens, strict=True):
        text, _ = random_prompt(tok, rng, n_in)
        images = tuple(image_data_url(rng, width, height, spec.format, spec.content) for _ in range(spec.count))
        text_len = tok.chat_prompt_len([{"role": "user", "content": text}])
        rows.append(DatasetRow(text, text_len, n_out, vision_prompt_len=vision_len, image_data=images))
    return rows
