from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter. Triton reads this when a kernel is defined, so it
# is set before anything (transformers included) imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The engine's CPU worker tunes its decode threads by timing steps (herd.worker.thread_tuner) unless the thread
# count is pinned; the suite pins it (here and in the servers it starts) so that no result depends on timing.
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))

from checkpoints import (
    MAVERICK_LIKE,
    SCOUT_LIKE,
    make_multimodal_checkpoint,
    make_real_vocab_checkpoint,
    make_text_checkpoint,
    make_vision_checkpoint,
)


@pytest.fixture(scope="session")
def scout_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """(path, transformers model) of a tiny Scout-like text checkpoint."""
    path = tmp_path_factory.mktemp("scout")
    return path, make_text_checkpoint(path, SCOUT_LIKE, seed=0)


@pytest.fixture(scope="session")
def maverick_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    path = tmp_path_factory.mktemp("maverick")
    return path, make_text_checkpoint(path, MAVERICK_LIKE, seed=1)


@pytest.fixture(scope="session")
def multimodal_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A Llama4ForConditionalGeneration checkpoint: text weights under `language_model.`."""
    path = tmp_path_factory.mktemp("multimodal")
    return path, make_multimodal_checkpoint(path, SCOUT_LIKE, seed=2)


@pytest.fixture(scope="session")
def real_vocab_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A tiny checkpoint over the real Llama 4 vocabulary with Meta's tokenizer.model: text in, text out."""
    path = tmp_path_factory.mktemp("real_vocab")
    return path, make_real_vocab_checkpoint(path, seed=3)


@pytest.fixture(scope="session")
def vision_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A multimodal checkpoint with a live vision tower, the real vocabulary and Meta's tokenizer.model."""
    path = tmp_path_factory.mktemp("vision")
    return path, make_vision_checkpoint(path, seed=4)
