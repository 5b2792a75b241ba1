"""Eager code inside a compiled decode step, as one opaque op: no graph break, no copy of what it touches.

Two parts of a CPU decode step do not trace well. The experts branch on which expert each row chose (a host
read) and run oneDNN-packed weights that fake tensors cannot hold; attention writes the step's K/V into the
paged cache, and a compiled graph that mutates a view of an input (each layer's K or V is a view of its pool)
copies the whole pool back every step: on the tiny checkpoint that made a compiled step 2-5 s instead of ms.

So the compiled graph calls `herd::opaque_call(handle, args)`: `handle` names a function registered with its
layer, which runs eagerly on the op's tensors and returns one new tensor. The op's schema declares no mutation,
so the cache it writes is never cloned, and its fake kernel gives the output's shape from the `fake` function
registered with it. That is sound here because nothing else in the graph reads
what the callable mutates (each layer's KV cache is read only by that layer's own opaque call).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# (owner, args) -> output; plain functions, not bound methods, so that the registry does not keep owners alive.
Run = Callable[[Any, list[torch.Tensor]], torch.Tensor]


@dataclass
class _Entry:
    run: Run
    fake: Run


# Handles are never reused, so a graph compiled for one model never calls another's layer; entries die with
# the module that registered them (the registry holds the module weakly).
_handles = itertools.count()
_owners: weakref.WeakValueDictionary[int, torch.nn.Module] = weakref.WeakValueDictionary()
_entries: dict[int, _Entry] = {}


def register(owner: torch.nn.Module, run: Run, fake: Run) -> int:
    """A handle for `run(owner, args)` (eager; may mutate owner's buffers), `fake(owner, args)` its output's
    shape and dtype (an empty tensor like the one `run` returns)."""
    handle = next(_handles)
    _owners[handle] = owner
    _entries[handle] = _Entry(run, fake)
    weakref.finalize(owner, _entries.pop, handle, None)
    return handle


def call(handle: int, args: list[torch.Tensor]) -> torch.Tensor:
    return torch.ops.herd.opaque_call(handle, args)


def _run(handle: int, args: list[torch.Tensor]) -> torch.Tensor:
    return _entries[handle].run(_owners[handle], args)


def _fake(handle: int, args: list[torch.Tensor]) -> torch.Tensor:
    return _entries[handle].fake(_owners[handle], args)


# Defined on a plain Library rather than with torch.library.custom_op: the dispatcher then calls `_run` directly,
# without custom_op's per-call Python wrapping (~60 us a call here, 8 calls a step on Llama 4's 4 layers).
_lib = torch.library.Library("herd", "FRAGMENT")
_lib.define("opaque_call(int handle, Tensor[] args) -> Tensor")
_lib.impl("opaque_call", _run, "CompositeExplicitAutograd")
torch.library.register_fake("herd::opaque_call", _fake, lib=_lib)
