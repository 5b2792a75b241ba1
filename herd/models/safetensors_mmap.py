"""Safetensors tensors read one at a time through a memory map of their own, unmapped once loaded.

`safe_open` keeps the whole file mapped until it is closed and copies each tensor out of it; every page a
load touches then stays resident in the process (as file-backed memory) beside the parameters the bytes
were copied into, so a load peaked at about twice the weights. Here each tensor is a zero-copy view of a
private mapping of just its bytes: the parameter's `weight_loader` copies from it (a tensor-parallel rank
touches only its slice's pages) and the mapping goes as soon as the tensor is dropped, so at any moment at
most one checkpoint tensor is resident besides the model. The format: an 8-byte little-endian header length, a
JSON header `{name: {dtype, shape, data_offsets: [begin, end]}}`, then the data, offsets relative to it.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 2**20  # the format's own limit on the JSON header


class SafetensorsError(ValueError):
    """A file that is not valid safetensors; the message names it."""


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


def read_index(path: Path) -> dict[str, TensorEntry]:
    """Every tensor of one .safetensors file, in file order, from its header alone."""
    with path.open("rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise SafetensorsError(f"{path}: too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > _MAX_HEADER:
            raise SafetensorsError(f"{path}: header of {header_len} bytes")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: unreadable header ({e})") from e
    data_start = 8 + header_len
    size = path.stat().st_size
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        dtype, shape = DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"])
        begin, end = (data_start + int(o) for o in info["data_offsets"])
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize or end > size:
            raise SafetensorsError(f"{path}: tensor {name} {info['dtype']}{list(shape)} has bad offsets")
        entries[name] = TensorEntry(path, dtype, shape, begin, end)
    return dict(sorted(entries.items(), key=lambda item: item[1].begin))


def mapped_tensor(entry: TensorEntry) -> torch.Tensor:
    """The tensor as a view of a private (copy-on-write) mapping of its bytes. The tensor's storage holds
    the only reference to the mapping: it is unmapped as soon as the last view of the tensor is dropped
    (so drop it once its parameter is filled), and writes to it never reach the file."""
    nbytes = entry.end - entry.begin
    if nbytes == 0:
        return torch.empty(entry.shape, dtype=entry.dtype)
    start = entry.begin - entry.begin % mmap.ALLOCATIONGRANULARITY
    with entry.file.open("rb") as f:
        mm = mmap.mmap(f.fileno(), entry.end - start, access=mmap.ACCESS_COPY, offset=start)
    mm.madvise(mmap.MADV_WILLNEED)  # read ahead: the copy out of it touches every page in order
    flat = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=entry.begin - start)
    return flat.view(entry.dtype).view(entry.shape)
