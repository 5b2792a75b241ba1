"""Llama4ForConditionalGeneration: the text decoder with the vision tower in front of it (early fusion).

Images enter the token stream as features at the `<|patch|>` positions, in place of that token's
embedding; everything after the embedding is the text model unchanged. Module names are the checkpoint's
(`language_model.`, `vision_model.`, `multi_modal_projector.`), so loading is a name-for-name copy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from herd.config import ModelConfig
from herd.layers.attention import AttentionBackend
from herd.layers.factory import LayerFactory
from herd.models.llama4_text import Llama4ForCausalLM
from herd.models.llama4_vision import Llama4MultiModalProjector, Llama4VisionModel


class Llama4ForConditionalGeneration(nn.Module):
    def __init__(self, config: ModelConfig, factory: LayerFactory, backend: AttentionBackend) -> None:
        super().__init__()
        if config.vision is None:
            raise ValueError("Llama4ForConditionalGeneration needs a config with a vision tower")
        config.vision.check_shapes(config.hidden_size)
        self.config = config
        self.language_model = Llama4ForCausalLM(config, factory, backend, prefix="language_model.")
        self.vision_model = Llama4VisionModel(config.vision, factory)
        self.multi_modal_projector = Llama4MultiModalProjector(
            config.vision.vision_output_dim, config.hidden_size, factory
        )

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles [N, channels, S, S] (any images, any order) -> features [N, tokens_per_tile, hidden]."""
        return self.multi_modal_projector(self.vision_model(pixel_values))

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        metadata: Any,  # the attention backend's metadata of this step
        image_rows: torch.Tensor | None = None,  # [M] rows of the token axis that are image patches
        image_features: torch.Tensor | None = None,  # [M, hidden] their features, in the same order
    ) -> torch.Tensor:  # [T, H]
        embeds = None
        if image_rows is not None and image_features is not None:
            embeds = self.language_model.model.embed_tokens(input_ids)
            embeds[image_rows] = image_features.to(embeds.dtype)
        return self.language_model(input_ids, positions, metadata, inputs_embeds=embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)


def text_model(model: Llama4ForCausalLM | Llama4ForConditionalGeneration) -> Llama4ForCausalLM:
    """The decoder of either model kind (where the LM head and its tied embedding live)."""
    return model.language_model if isinstance(model, Llama4ForConditionalGeneration) else model
