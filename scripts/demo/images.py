"""Synthetic pictures for the demo model: a background plus one to three shapes in named colors.

A picture is stored as a spec (plain JSON) and rendered on demand, so the data files stay small and the
trainer can pick any resolution. Shapes are drawn without anti-aliasing: every named color appears in
the image as its exact RGB value, which the tests rely on.
"""

from __future__ import annotations

import random
from typing import Any

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 20),
    "purple": (130, 50, 170),
    "pink": (245, 130, 190),
    "brown": (120, 75, 35),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")


def random_spec(rng: random.Random) -> dict[str, Any]:
    """A background and 1-3 shapes of distinct kinds and colors, each in its own cell of a 2 x 2 grid.

    Shapes are large (30-42% of the side) because a 64-pixel tile cut into 8-pixel patches shows a smaller
    circle, square and triangle as nearly the same blob; the cells keep them apart.
    """
    n = rng.randint(1, 3)
    kinds = rng.sample(SHAPES, n)
    colors = rng.sample(sorted(COLORS), n)
    cells = rng.sample(range(4), n)
    shapes = []
    for kind, color, cell in zip(kinds, colors, cells, strict=True):
        # Coordinates are fractions of the image side, so one spec renders at any size.
        size = rng.uniform(0.30, 0.42)
        x = (cell % 2 + 0.5) / 2 + rng.uniform(-0.03, 0.03)
        y = (cell // 2 + 0.5) / 2 + rng.uniform(-0.03, 0.03)
        shapes.append({"kind": kind, "color": color, "x": round(x, 3), "y": round(y, 3), "size": round(size, 3)})
    return {"background": rng.choice(sorted(BACKGROUNDS)), "shapes": shapes}


def render(spec: dict[str, Any], size: int = 224) -> Image.Image:
    """The RGB picture a spec describes, `size` pixels square."""
    image = Image.new("RGB", (size, size), BACKGROUNDS[spec["background"]])
    draw = ImageDraw.Draw(image)
    for shape in spec["shapes"]:
        cx, cy, half = shape["x"] * size, shape["y"] * size, shape["size"] * size / 2
        fill = COLORS[shape["color"]]
        if shape["kind"] == "circle":
            draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
        elif shape["kind"] == "square":
            draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
        elif shape["kind"] == "triangle":
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
        else:
            raise ValueError(f"unknown shape kind {shape['kind']!r}")
    return image


def question(rng: random.Random, spec: dict[str, Any]) -> tuple[str, str, str]:
    """(subtask, question, answer) about the picture."""
    shapes = spec["shapes"]
    shape = rng.choice(shapes)
    subtask = rng.choice(["color", "count", "which"])
    if subtask == "color":
        q = rng.choice(["What color is the {}?", "Which color does the {} have?", "What is the color of the {}?"])
        return subtask, q.format(shape["kind"]), f"The {shape['kind']} is {shape['color']}."
    if subtask == "count":
        n = len(shapes)
        q = rng.choice(["How many shapes are there?", "How many shapes are in the picture?", "Count the shapes."])
        return subtask, q, f"There {'is' if n == 1 else 'are'} {n} shape{'' if n == 1 else 's'}."
    q = rng.choice(["Which shape is {}?", "What shape is {}?", "Which shape has the color {}?"])
    return subtask, q.format(shape["color"]), f"The {shape['kind']} is {shape['color']}."
