"""herd.worker.huge_pages: a CPU model's weights copied into huge pages, every tensor's value and sharing kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from herd.worker import huge_pages
from herd.worker.huge_pages import HUGE_PAGE, MIN_BYTES, move_to_huge_pages

needs_thp = pytest.mark.skipif(not huge_pages.huge_pages_available(), reason="the kernel gives no huge pages")


def uses(storage: torch.UntypedStorage) -> int:
    """Tensors and storage handles on a storage, this one included."""
    return torch._C._storage_Use_Count(storage._cdata)


def huge_kib_at(address: int) -> int:
    """AnonHugePages of the mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            begin, end = (int(part, 16) for part in head.split("-"))
            inside = begin <= address < end
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(1024, 2048, generator=gen).to(torch.bfloat16), requires_grad=False)
        # A method's copies: a buffer viewing the parameter's storage, one of its own, a plain attribute.
        self.register_buffer("rows", self.weight.data[512:], persistent=False)
        self.register_buffer("packed", torch.randint(-8, 8, (3000, 700), generator=gen, dtype=torch.int8))
        self.table = torch.randn(700, 400, generator=gen)
        self.norm = nn.Parameter(torch.ones(2048))  # below MIN_BYTES: stays


@needs_thp
def test_tensors_move_into_huge_pages_with_values_and_views_kept() -> None:
    model = nn.Sequential(Layer(), Layer())
    before = {name: t.clone() for name, t in model.state_dict(keep_vars=True).items()}
    table = model[0].table.clone()
    param = model[0].weight
    old_storage = param.untyped_storage()
    norm_ptr = model[0].norm.data_ptr()

    moved = move_to_huge_pages(model)

    layer = model[0]
    expected = 2 * sum(t.untyped_storage().nbytes() for t in (layer.weight, layer.packed, layer.table))
    assert moved == expected
    assert layer.weight is param and isinstance(layer.weight, nn.Parameter)
    for name, t in model.state_dict(keep_vars=True).items():
        assert torch.equal(t, before[name]), name
    assert torch.equal(layer.table, table)
    # The view still views the parameter; the old storage has no tensor left on it (freed with this handle).
    assert layer.rows.untyped_storage().data_ptr() == layer.weight.untyped_storage().data_ptr()
    assert layer.rows.data_ptr() == layer.weight.data_ptr() + 512 * 2048 * 2
    assert uses(old_storage) == 1
    assert layer.norm.data_ptr() == norm_ptr
    assert huge_kib_at(layer.weight.data_ptr()) >= 2048


@needs_thp
def test_a_storage_viewed_from_outside_the_model_stays() -> None:
    model = Layer()
    kept = model.packed[:10]  # e.g. a cache built before the move
    ptr = model.packed.data_ptr()
    move_to_huge_pages(model)
    assert model.packed.data_ptr() == ptr and kept.data_ptr() == ptr
    assert model.weight.untyped_storage().nbytes() >= MIN_BYTES
    assert huge_kib_at(model.weight.data_ptr()) >= 2048


def test_nothing_moves_where_the_kernel_gives_no_huge_pages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    mode = tmp_path / "enabled"
    mode.write_text("always madvise [never]\n")
    monkeypatch.setattr(huge_pages, "_THP_MODE", mode)
    model = Layer()
    ptr = model.weight.data_ptr()
    assert move_to_huge_pages(model) == 0
    assert model.weight.data_ptr() == ptr


@needs_thp
def test_the_engine_reads_its_weights_from_huge_pages(real_vocab_ckpt: tuple[Path, object]) -> None:
    from herd.llm import LLM  # the engine's worker moves its model after loading

    llm = LLM(str(real_vocab_ckpt[0]), dtype="bfloat16")
    model = llm.engine.core.workers[0].model
    large = [t for t in model.state_dict(keep_vars=True).values() if t.untyped_storage().nbytes() >= 4 * HUGE_PAGE]
    assert large
    for t in large:
        assert huge_kib_at(t.data_ptr()) >= 2048


@needs_thp
def test_no_mapping_for_the_copy_leaves_the_weights_where_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(huge_pages.mmap, "mmap", refuse)
    model = Layer()
    ptr = model.weight.data_ptr()
    assert move_to_huge_pages(model) == 0
    assert model.weight.data_ptr() == ptr
