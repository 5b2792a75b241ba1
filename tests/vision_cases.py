"""The images the preprocessing goldens are made of, rebuilt the same way by the test and by
scripts/make_vision_goldens.py (which runs transformers' Llama4ImageProcessor in an environment with
torchvision). Pillow and the standard library only, so both environments make the same bytes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class Case:
    name: str
    width: int
    height: int
    mode: str = "RGB"
    pattern: str = "noise"  # "noise" (every byte random: the hardest input for a resize) or "gradient"
    tile_size: int = 336
    max_patches: int = 16


CASES = [
    Case("1x1", 1, 1),
    Case("2x3", 2, 3),
    Case("exact-tile", 336, 336),
    Case("just-under-tile", 335, 337),
    Case("exact-2x1", 336, 672),
    Case("wide-2to1", 200, 100),
    Case("tall-1to2", 100, 200),
    Case("small-odd", 77, 51, pattern="gradient"),
    Case("medium", 700, 500),
    Case("720p", 1280, 720),
    Case("1080p", 1920, 1080, pattern="gradient"),
    Case("huge", 4000, 3000),
    Case("extreme-wide", 2000, 20),
    Case("extreme-tall", 20, 2000),
    Case("line-wide", 5000, 1),
    Case("line-tall", 1, 5000),
    Case("odd", 777, 333),
    Case("odd-tall", 17, 1023, pattern="gradient"),
    Case("square-big", 1500, 1500),
    Case("rgba", 640, 480, mode="RGBA"),
    Case("la", 300, 400, mode="LA"),
    Case("grayscale", 500, 375, mode="L"),
    Case("palette", 450, 300, mode="P"),
    Case("palette-transparent", 333, 222, mode="P+transparency"),
    Case("bilevel", 400, 400, mode="1"),
    Case("cmyk", 350, 600, mode="CMYK"),
    Case("max4", 1000, 700, max_patches=4),
    Case("max1", 900, 300, max_patches=1),
    Case("tile28", 100, 60, tile_size=28),
    Case("tile28-tiny", 5, 9, tile_size=28),
    Case("tile28-wide", 300, 20, tile_size=28, pattern="gradient"),
]


def make_image(case: Case) -> Image.Image:
    """The case's image, the same bytes on every machine (random.Random is stable across Python versions)."""
    rng = random.Random(case.name)
    mode = "P" if case.mode == "P+transparency" else case.mode
    bands = {"1": 1, "L": 1, "P": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    w, h = case.width, case.height
    if case.pattern == "noise":
        data = rng.randbytes(w * h * bands)
    else:
        # value = (x * 255 / (w - 1) + y * 97 / (h - 1) + 60 * band) mod 256, a row at a time
        row = bytes((x * 255 // max(w - 1, 1) + b * 60) % 256 for x in range(w) for b in range(bands))
        shifts = [bytes((i + k) % 256 for i in range(256)) for k in range(256)]
        data = b"".join(row.translate(shifts[y * 97 // max(h - 1, 1) % 256]) for y in range(h))
    if mode == "1":
        image = Image.frombytes("L", (w, h), data).convert("1", dither=Image.Dither.NONE)
    else:
        image = Image.frombytes(mode, (w, h), data)
    if mode == "P":
        image.putpalette(rng.randbytes(256 * 3))
    if case.mode == "P+transparency":
        image.info["transparency"] = 7
    return image
