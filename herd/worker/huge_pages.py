"""A CPU model's weights moved into transparent huge pages once they are loaded.

A decode step at batch 1 streams every weight from memory, and a stream crosses a 4 KiB page every 64 cache
lines: each crossing is a TLB miss, which in a virtual machine (nested paging) walks two sets of page tables.
In 2 MiB pages the same read takes one miss per 512 of them. On this project's 2-vCPU VM scout-mini decodes at
batch 1 in 29 tok/s from 4 KiB pages and 31.5 from huge ones, INT4 82 and 89 (benchmarks/RESULTS.md, "Weights in
huge pages").

Linux gives anonymous memory huge pages where madvise(MADV_HUGEPAGE) asks for them (its default THP mode,
"madvise", and "always"), in 2 MiB-aligned ranges of one mapping. PyTorch's allocator makes neither request
nor alignment, so the loaded weights are copied, storage by storage, into one 2 MiB-aligned mapping that asks;
each old storage is freed before the next is copied, so loading peaks at the model plus its largest storage.
Every tensor that shared a storage keeps sharing it (views, a method's packed copy of a parameter).
HERD_CPU_HUGE_PAGES=0 leaves the weights where they were loaded (to compare, as HERD_CPU_GEMV=0 does the kernels).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
MIN_BYTES = 256 << 10  # smaller storages (norms, biases, scales of small layers) span a few pages at most
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_available() -> bool:
    """Whether this kernel gives a mapping huge pages when asked (THP mode "always" or "madvise"), and
    HERD_CPU_HUGE_PAGES is not 0."""
    if os.environ.get("HERD_CPU_HUGE_PAGES", "1") == "0":
        return False
    try:
        mode = _THP_MODE.read_text()
    except OSError:
        return False
    return hasattr(mmap, "MADV_HUGEPAGE") and "[never]" not in mode


def _movable(t: torch.Tensor) -> bool:
    return (
        type(t) in (torch.Tensor, nn.Parameter)
        and t.device.type == "cpu"
        and t.layout == torch.strided
        and not t.is_mkldnn
        and not t.is_quantized
        and t.untyped_storage().nbytes() >= MIN_BYTES
    )


Slot = tuple[nn.Module, str, torch.Tensor]


def _by_storage(model: nn.Module) -> dict[int, list[Slot]]:
    """The model's movable parameters, buffers and plain tensor attributes, grouped by the storage they view."""
    groups: dict[int, list[Slot]] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers, vars(module)):
            for name, value in list(table.items()):
                if isinstance(value, torch.Tensor) and _movable(value):
                    groups.setdefault(value.untyped_storage().data_ptr(), []).append((module, name, value))
    return groups


def _address(mm: mmap.mmap) -> int:
    buffer = (ctypes.c_char * 1).from_buffer(mm)
    try:
        return ctypes.addressof(buffer)
    finally:
        del buffer  # a live export would keep the mapping from ever closing


def _held_elsewhere(group: list[Slot]) -> bool:
    """Whether something besides these tensors views their storage (a copy would then double its memory). The
    count is of tensors and storage handles: the tensors, the bases they were sliced from (which go with them),
    and the one handle taken here."""
    tensors = {id(t) for _, _, t in group} | {id(t._base) for _, _, t in group if t._base is not None}
    storage = group[0][2].untyped_storage()
    return torch._C._storage_Use_Count(storage._cdata) > len(tensors) + 1


def _rehome(group: list[Slot], new: torch.UntypedStorage) -> None:
    for module, name, t in group:
        moved = torch.empty(0, dtype=t.dtype).set_(new, t.storage_offset(), t.size(), t.stride())
        if isinstance(t, nn.Parameter):
            t.data = moved
        elif name in module._buffers:
            module._buffers[name] = moved
        else:
            setattr(module, name, moved)


def move_to_huge_pages(model: nn.Module) -> int:
    """Copy the model's CPU tensors of MIN_BYTES and more into huge pages; returns the bytes moved (0 where the
    kernel gives no huge pages). Call it before anything outside the modules keeps a tensor of the model: a
    storage that something else views stays where it is."""
    if not huge_pages_available():
        logger.info("weights stay in 4 KiB pages (HERD_CPU_HUGE_PAGES=0, or THP off in %s)", _THP_MODE)
        return 0
    groups = [group for group in _by_storage(model).values() if not _held_elsewhere(group)]
    if not groups:
        return 0
    sizes = [group[0][2].untyped_storage().nbytes() for group in groups]
    spans = [-(-size // 4096) * 4096 for size in sizes]  # each storage on pages of its own
    try:
        mm = mmap.mmap(-1, sum(spans) + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as e:  # e.g. strict overcommit accounting: the copy would briefly hold a storage twice
        logger.warning("weights stay in 4 KiB pages: no mapping of %d bytes for them (%s)", sum(spans), e)
        return 0
    mm.madvise(mmap.MADV_HUGEPAGE)
    offset = -_address(mm) % HUGE_PAGE
    with torch.no_grad():
        for i, size in enumerate(sizes):
            # The group leaves the list as it moves: its old storage is freed before the next one is copied.
            group, groups[i] = groups[i], []
            new = torch.frombuffer(mm, dtype=torch.uint8, count=size, offset=offset).untyped_storage()
            new.copy_(group[0][2].untyped_storage())
            _rehome(group, new)
            del group, new
            offset += spans[i]
    logger.info("weights in huge pages: %.2f GiB in %d storages", sum(sizes) / 2**30, len(sizes))
    return sum(sizes)
