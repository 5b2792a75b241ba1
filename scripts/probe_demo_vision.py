"""How fast can the demo model's vision tower learn to see shapes? Train it alone (issue 7).

    .venv/bin/python scripts/probe_demo_vision.py --tokenizer /tmp/herd-demo/tokenizer --steps 800
    .venv/bin/python scripts/probe_demo_vision.py --tokenizer ... --shape-size 0.32-0.42 --size patch_size=4

The tower and projector of a freshly initialised demo model (`--size` changes demo.train.ModelSize fields,
as in train_demo_model.py) get a linear head over their mean-pooled features and learn, from one-shape
pictures, the shape's kind and color, with direct supervision; held-out accuracy of both is printed every
`--every` steps. In the full model the same signal arrives only through a few answer tokens, so what this
cannot learn quickly, the full model learns far more slowly.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

from demo import images
from demo.train import build_model, image_tile, model_size

KINDS = list(images.SHAPES)
COLORS = sorted(images.COLORS)


def pictures(rng: random.Random, n: int, sizes: tuple[float, float] | None, tile: int) -> tuple[torch.Tensor, ...]:
    """n one-shape pictures as (tiles, kind labels, color labels); `sizes` overrides the data's shape sizes."""
    tiles, kinds, colors = [], [], []
    for _ in range(n):
        spec = images.random_spec(rng)
        shape = spec["shapes"][0]
        if sizes is not None:
            shape["size"] = round(rng.uniform(*sizes), 3)
        spec["shapes"] = [shape]
        tiles.append(image_tile(spec, tile))
        kinds.append(KINDS.index(shape["kind"]))
        colors.append(COLORS.index(shape["color"]))
    return torch.cat(tiles), torch.tensor(kinds), torch.tensor(colors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, default=Path("/tmp/herd-demo/tokenizer"))
    parser.add_argument("--size", nargs="*", default=[], metavar="NAME=VALUE", help="ModelSize fields to change")
    parser.add_argument("--shape-size", default=None, help="LOW-HIGH shape size (fraction of the side) to draw")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--every", type=int, default=200, help="evaluate every this many steps")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    try:
        size = model_size(args.size)
        sizes = tuple(float(x) for x in args.shape_size.split("-")) if args.shape_size else None
    except ValueError as e:
        parser.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model(size, Tokenizer.from_file(str(args.tokenizer / "tokenizer.json")), seed=0)
    vision, projector = model.vision_model.to(args.device), model.multi_modal_projector.to(args.device)
    head = torch.nn.Linear(projector.linear_1.out_features, len(KINDS) + len(COLORS)).to(args.device)

    def logits(tiles: torch.Tensor) -> torch.Tensor:
        features = projector(vision(tiles.to(args.device)).last_hidden_state)
        return head(features.mean(dim=1))

    test = pictures(random.Random(1), 300, sizes, size.tile_size)
    optimizer = torch.optim.AdamW([*vision.parameters(), *projector.parameters(), *head.parameters()], lr=args.lr)
    rng = random.Random(0)
    start = time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.every == 0 or step == args.steps:
            with torch.no_grad():
                out = logits(test[0]).cpu()
            kind = (out[:, : len(KINDS)].argmax(1) == test[1]).float().mean().item()
            color = (out[:, len(KINDS) :].argmax(1) == test[2]).float().mean().item()
            print(f"step {step}: kind {kind:.2f} color {color:.2f} ({time.perf_counter() - start:.0f} s)", flush=True)
        if step == args.steps:
            break
        tiles, kinds, colors = pictures(rng, args.batch_size, sizes, size.tile_size)
        out = logits(tiles)
        loss = torch.nn.functional.cross_entropy(out[:, : len(KINDS)], kinds.to(args.device))
        loss = loss + torch.nn.functional.cross_entropy(out[:, len(KINDS) :], colors.to(args.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


if __name__ == "__main__":
    main()
