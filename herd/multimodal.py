"""Llama 4 image preprocessing: tile grid, resize, pad, split, global view, normalisation, prompt layout.

Bit for bit what transformers' `Llama4ImageProcessor` (torchvision backend) gives, with Pillow and torch
only: tests/test_multimodal.py checks it against goldens that scripts/make_vision_goldens.py wrote with
transformers itself. Loading images from URLs and files is herd.frontend.media (re-exported here).
"""

from __future__ import annotations

import bisect
import hashlib
import platform
from dataclasses import dataclass, field
from functools import cache

import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "ProcessedImage",
    "PromptImage",
    "RequestImages",
    "image_prompt_tokens",
    "num_image_tokens",
    "process_image",
    "tile_grid",
    "to_rgb",
]

IMAGE_START = "<|image_start|>"
IMAGE_END = "<|image_end|>"
IMAGE = "<|image|>"  # the chat template's placeholder, and the marker of the global view in the layout
PATCH = "<|patch|>"
TILE_X_SEPARATOR = "<|tile_x_separator|>"
TILE_Y_SEPARATOR = "<|tile_y_separator|>"

_RESCALE = 1 / 255
_MEAN = _STD = 0.5


@dataclass
class ProcessedImage:
    pixel_values: torch.Tensor  # [num_tiles (+1 global view when num_tiles > 1), 3, tile, tile], float32
    grid: tuple[int, int]  # (rows, cols) of tiles
    content_hash: str  # hex sha256 of the RGB pixels the model sees (with their size)

    @property
    def num_tiles(self) -> int:
        return self.grid[0] * self.grid[1]


def process_image(image: Image.Image, tile_size: int, max_patches: int = 16) -> ProcessedImage:
    """One image as Llama 4's vision encoder takes it: the tiles of the best-fitting canvas, then (when
    there is more than one tile) the whole image squeezed into one tile as a global view."""
    rgb = to_rgb(image)
    width, height = rgb.size
    raw = rgb.tobytes()
    content_hash = hashlib.sha256(f"RGB:{width}x{height}:".encode() + raw).hexdigest()
    # pixels: [1, 3, H, W] uint8, contiguous, as transformers batches a PIL image
    pixels = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(1, height, width, 3).permute(0, 3, 1, 2)
    pixels = pixels.contiguous()

    rows, cols = tile_grid(height, width, tile_size, max_patches)
    canvas_h, canvas_w = rows * tile_size, cols * tile_size
    # Upscale at most to one tile: a small image is enlarged to fill a tile, never to fill a bigger canvas.
    fit_h = min(max(height, tile_size), canvas_h)
    fit_w = min(max(width, tile_size), canvas_w)
    new_h, new_w = _fit_without_distortion(height, width, fit_h, fit_w)
    resized = _resize(pixels, max(new_h, 1), max(new_w, 1))
    padded = F.pad(resized, (0, canvas_w - resized.shape[-1], 0, canvas_h - resized.shape[-2]), value=0)
    tiles = _split(_normalize(padded), rows, cols)
    if rows * cols > 1:
        global_view = _normalize(_resize(pixels, tile_size, tile_size))
        tiles = torch.cat([tiles, global_view])
    return ProcessedImage(tiles.float().contiguous(), (rows, cols), content_hash)


def image_prompt_tokens(grid: tuple[int, int], tokens_per_tile: int) -> list[str]:
    """The special tokens that stand for one image in the prompt (DESIGN.md §2): per tile row, each tile's
    patches with x separators between tiles and a y separator at the row's end (only when tiled); then
    <|image|> and the global view's (or the single tile's) patches."""
    rows, cols = grid
    tokens = [IMAGE_START]
    if rows * cols > 1:
        for _ in range(rows):
            for col in range(cols):
                tokens += [PATCH] * tokens_per_tile
                if col < cols - 1:
                    tokens.append(TILE_X_SEPARATOR)
            tokens.append(TILE_Y_SEPARATOR)
    tokens += [IMAGE, *[PATCH] * tokens_per_tile, IMAGE_END]
    return tokens


def num_image_tokens(grid: tuple[int, int], tokens_per_tile: int) -> int:
    """len(image_prompt_tokens(grid, tokens_per_tile)), without building the list."""
    tiles = grid[0] * grid[1]
    tiled = tiles * tokens_per_tile + tiles if tiles > 1 else 0  # each tile ends in one separator
    return 1 + tiled + 1 + tokens_per_tile + 1


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers converts it: anything transparent is composited onto white first."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def tile_grid(height: int, width: int, tile_size: int, max_patches: int) -> tuple[int, int]:
    """(rows, cols) of the canvas an image is fitted to: the one that needs the least upscaling, else the
    least downscaling; among canvases with the same scale, the smallest (least padding)."""
    canvases = torch.tensor(_canvases(max_patches)) * tile_size  # [N, 2]: (height, width) in pixels
    # float32, as transformers computes it: which scales tie decides between canvases.
    scales = torch.minimum(canvases[:, 0] / height, canvases[:, 1] / width)
    up = scales[scales >= 1]
    best = up.min() if len(up) > 0 else scales.max()
    chosen = canvases[scales == best]
    areas = chosen[:, 0] * chosen[:, 1]
    canvas_h, canvas_w = chosen[torch.argmin(areas)].tolist()  # argmin: the first of equal areas
    return canvas_h // tile_size, canvas_w // tile_size


@cache
def _canvases(max_patches: int) -> list[tuple[int, int]]:
    # Every (rows, cols) with rows * cols <= max_patches, grouped by aspect ratio in the order a ratio first
    # appears going down from max_patches tiles. The order matters: argmin keeps the first of equal areas.
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for n in range(max_patches, 0, -1):
        for rows in (d for d in range(1, n + 1) if n % d == 0):
            by_ratio.setdefault(rows / (n // rows), []).append((rows, n // rows))
    return [grid for grids in by_ratio.values() for grid in grids]


def _fit_without_distortion(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    # The largest size of the image's aspect ratio inside the target; the limiting side fills it exactly.
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(int(height * scale_w), target_h), target_w
    return target_h, min(int(width * scale_h), target_w)


def _resize(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    # Bilinear with antialiasing, as torchvision's resize: on CPUs with a native uint8 kernel it runs on the
    # bytes; elsewhere in float32, rounded back. The two can differ by one level, so keep the same choice.
    if (height, width) == tuple(pixels.shape[-2:]):
        return pixels
    if _native_uint8_resize():
        return F.interpolate(pixels, size=[height, width], mode="bilinear", align_corners=False, antialias=True)
    out = F.interpolate(pixels.float(), size=[height, width], mode="bilinear", align_corners=False, antialias=True)
    return out.round_().to(torch.uint8)


@cache
def _native_uint8_resize() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


def _normalize(pixels: torch.Tensor) -> torch.Tensor:
    # In bfloat16, as Meta's reference and transformers do: the model was trained on these rounded values.
    x = pixels.to(torch.bfloat16) * _RESCALE
    mean = torch.tensor([_MEAN] * 3, dtype=torch.bfloat16).view(-1, 1, 1)
    std = torch.tensor([_STD] * 3, dtype=torch.bfloat16).view(-1, 1, 1)
    return x.sub(mean).div_(std)


def _split(image: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    # image: [1, C, rows * T, cols * T] -> [rows * cols, C, T, T], row by row
    _, c, h, w = image.shape
    tiles = image.view(c, rows, h // rows, cols, w // cols).permute(1, 3, 0, 2, 4)
    return tiles.reshape(rows * cols, c, h // rows, w // cols)


@dataclass(eq=False)
class PromptImage:
    pixel_values: torch.Tensor  # [tiles (+ global view), channels, S, S], on the CPU until encoded
    patch_positions: list[int]  # prompt positions of its `<|patch|>` tokens, ascending (one per feature row)
    content_hash: str
    features: torch.Tensor | None = None  # [len(patch_positions), hidden] from first use to the end of prefill

    def span(self, start: int, end: int) -> tuple[int, int]:
        """Indices [lo, hi) of the patch tokens at positions in [start, end)."""
        return bisect.bisect_left(self.patch_positions, start), bisect.bisect_left(self.patch_positions, end)


@dataclass(eq=False)
class RequestImages:
    """A prompt's images, shared by the sequences of its request (n > 1) so each image is encoded once.

    Its features are kept while some sequence still has image tokens to compute (`holders`), then dropped;
    a sequence recomputed after preemption holds them again (and they are encoded again).
    """

    images: list[PromptImage]
    end: int = field(init=False)  # one past the last patch position of any image
    holders: set[str] = field(init=False, default_factory=set)  # sequences whose prefill has not passed `end`

    def __post_init__(self) -> None:
        self.end = max(img.patch_positions[-1] + 1 for img in self.images)

    def hold(self, seq_id: str) -> None:
        self.holders.add(seq_id)

    def release(self, seq_id: str) -> None:
        self.holders.discard(seq_id)
        if not self.holders:
            self.drop_features()

    def overlapping(self, start: int, end: int) -> list[tuple[PromptImage, int, int]]:
        """(image, lo, hi) for every image with patch tokens at positions in [start, end)."""
        if start >= self.end:  # decoding, or past the images: the common case costs one comparison
            return []
        spans = ((img, *img.span(start, end)) for img in self.images)
        return [(img, lo, hi) for img, lo, hi in spans if hi > lo]

    def drop_features(self) -> None:
        for img in self.images:
            img.features = None
