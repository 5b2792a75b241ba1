"""herd's imports go one way: server -> frontend -> engine -> worker -> speculative -> models -> layers.

A layer may import itself, any layer below it, and the shared leaves (configs, sampling parameters,
image inputs); never one above it. kernels, the bottom layer, imports nothing of herd. Entry points (cli,
launch_server, llm, ...) may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import herd

LAYERS = ["server", "frontend", "engine", "worker", "speculative", "models", "layers", "kernels"]
# The sampler may call herd's CPU kernels (its argmax): kernels import nothing of herd.
LEAVES = {
    "config": {"config", "demo"},
    "sampling": {"sampling", "kernels"},
    "multimodal": {"multimodal"},
    "demo": set(),
}
# The benchmark client talks HTTP to any server: no engine code, only herd's tokenizer loader (it reads Meta's
# tokenizer.model, which transformers cannot).
CLIENT = {"bench": {"bench", "frontend"}}
ENTRY_POINTS = {"__init__", "cli", "launch_server", "llm", "bench_serving"}


def allowed(part: str) -> set[str]:
    if part == "kernels":
        return {"kernels"}
    if part in LAYERS:
        return set(LAYERS[LAYERS.index(part) :]) | set(LEAVES)
    return {**LEAVES, **CLIENT}[part]


def herd_imports(path: Path) -> set[str]:
    """The herd subpackages a module imports (at any depth: also inside functions and TYPE_CHECKING)."""
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "herd"]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            pieces = name.split(".")
            if pieces[0] == "herd" and len(pieces) > 1:
                parts.add(pieces[1])
    return parts


def test_imports_go_one_way() -> None:
    root = Path(herd.__file__).parent
    wrong = []
    for path in sorted(root.rglob("*.py")):
        part = path.relative_to(root).parts[0].removesuffix(".py")
        if part in ENTRY_POINTS:
            continue
        for imported in sorted(herd_imports(path) - allowed(part)):
            wrong.append(f"{path.relative_to(root.parent)} imports herd.{imported}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_layering_is_checked_everywhere() -> None:
    """Every top-level module of herd is either placed in the layering or an entry point."""
    root = Path(herd.__file__).parent
    tops = {p.name.removesuffix(".py") for p in root.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert tops <= set(LAYERS) | set(LEAVES) | set(CLIENT) | ENTRY_POINTS, tops
