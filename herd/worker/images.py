"""Image features for a step: encode the images a prefill chunk reaches first, place their rows."""

from __future__ import annotations

import torch

from herd.models.llama4 import Llama4ForConditionalGeneration
from herd.multimodal import PromptImage, RequestImages
from herd.worker.plan import ScheduledChunk


def step_image_features(
    model: Llama4ForConditionalGeneration,
    chunks: list[ScheduledChunk],
    images_of: dict[str, RequestImages | None],
    query_starts: list[int],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows of the token axis that are image patches, their features) for this step, or None.

    Encodes, in one batch, the images whose patch tokens this step reaches while they have no features.
    """
    spans: list[tuple[PromptImage, int, int, int]] = []  # image, lo, hi, token-axis row of position 0
    for chunk, row in zip(chunks, query_starts[:-1], strict=True):
        images = images_of.get(chunk.seq_id)
        if images is None:
            continue
        overlapping = images.overlapping(chunk.start, chunk.end)
        if overlapping:
            images.hold(chunk.seq_id)  # again, after a preemption sent the sequence back to its prompt
        for img, lo, hi in overlapping:
            spans.append((img, lo, hi, row - chunk.start))
    if not spans:
        return None
    todo = list({id(img): img for img, *_ in spans if img.features is None}.values())
    if todo:
        tiles = torch.cat([img.pixel_values for img in todo]).to(device)
        features = model.encode_images(tiles)  # [tiles, tokens_per_tile, hidden]
        counts = [img.pixel_values.shape[0] for img in todo]
        for img, feats in zip(todo, features.split(counts), strict=True):
            img.features = feats.flatten(0, 1)
    rows, features = [], []
    for img, lo, hi, offset in spans:
        assert img.features is not None
        rows.append(torch.tensor(img.patch_positions[lo:hi]) + offset)
        features.append(img.features[lo:hi])
    return torch.cat(rows).to(device), torch.cat(features)


def release_finished_images(chunks: list[ScheduledChunk], images_of: dict[str, RequestImages | None]) -> None:
    """Chunks that reached past their prompt's last image no longer need its features."""
    for chunk in chunks:
        images = images_of.get(chunk.seq_id)
        if images is not None and chunk.end >= images.end:
            images.release(chunk.seq_id)
