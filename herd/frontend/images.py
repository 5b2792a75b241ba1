"""The images of one request, in the frontend: preprocessing, prompt expansion, prefix-cache keys.

A prompt carries one `<|image|>` placeholder per image; each becomes the image's full token layout
(`herd.multimodal.image_prompt_tokens`), so the prompt length, and the scheduler's budget, is known before
any forward pass. The result (`RequestImages`: pixels and where their features go) travels with the
request to the worker, which encodes them when a prefill step first reaches their patch tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from herd.config import ModelConfig
from herd.frontend.tokenizer import Tokenizer
from herd.multimodal import ProcessedImage, PromptImage, RequestImages, image_prompt_tokens, process_image

IMAGE_PLACEHOLDER = "<|image|>"


class ImageInputError(ValueError):
    """Images that do not fit their prompt: the message says what to change."""


@dataclass
class ExpandedPrompt:
    token_ids: list[int]
    cache_key: list[int]  # token_ids with each image's patch tokens replaced by a value from its content hash
    images: RequestImages


def expand_images(
    data: Any, ids: list[int], config: ModelConfig, tokenizer: Tokenizer | None, enabled: bool
) -> ExpandedPrompt | None:
    """Preprocess a prompt's `multi_modal_data` (vLLM's shape: `{"image": img or [img, ...]}`, PIL images)
    and expand its placeholders; None when it holds no image."""
    if not isinstance(data, dict) or set(data) - {"image"}:
        raise ImageInputError("multi_modal_data must be a dict with an 'image' entry (herd's models take images)")
    images = data.get("image")
    images = list(images) if isinstance(images, list | tuple) else [] if images is None else [images]
    if not images:
        return None
    vision, patch = config.vision, config.image_token_index
    if not enabled:
        raise ImageInputError("image input needs multimodal support: start the server with --enable-multimodal")
    if vision is None or patch is None:
        raise ImageInputError(f"this model ({config.architecture}) has no vision tower: it cannot take images")
    if tokenizer is None:
        raise ImageInputError("image input needs the model's tokenizer, and this engine has none")
    placeholder = tokenizer.token_to_id(IMAGE_PLACEHOLDER)
    if placeholder is None:
        raise ImageInputError(f"the tokenizer has no {IMAGE_PLACEHOLDER} token: it cannot encode images")
    processed = []
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise ImageInputError(f"image {i}: multi_modal_data['image'] must be a PIL image or a list of them")
        try:
            processed.append(process_image(image, vision.image_size))
        except (ValueError, OSError) as e:  # pixels Pillow cannot decode or convert, or an unusable size
            raise ImageInputError(f"image {i}: {e}") from None
    layout = layout_converter(tokenizer.token_to_id, vision.tokens_per_tile, patch)
    return expand_prompt(ids, processed, placeholder, patch, layout)


def expand_prompt(
    ids: Sequence[int],
    processed: Sequence[ProcessedImage],
    placeholder_id: int,
    patch_id: int,
    layout_ids: Callable[[ProcessedImage], list[int]],
) -> ExpandedPrompt:
    """Replace the i-th `<|image|>` placeholder in `ids` by the i-th image's token layout."""
    slots = [i for i, t in enumerate(ids) if t == placeholder_id]
    if len(slots) != len(processed):
        raise ImageInputError(
            f"the prompt has {len(slots)} {IMAGE_PLACEHOLDER} placeholder(s) for {len(processed)} image(s): "
            f"put one {IMAGE_PLACEHOLDER} where each image goes (the llama-4 chat template does)"
        )
    out: list[int] = []
    key: list[int] = []
    images: list[PromptImage] = []
    prev = 0
    for slot, image in zip(slots, processed, strict=True):
        out += ids[prev:slot]
        key += ids[prev:slot]
        layout = layout_ids(image)
        positions = [len(out) + j for j, t in enumerate(layout) if t == patch_id]
        # A negative value is never a token id, and the same image gives the same value: cached KV of a
        # prefix is shared exactly when the images in it are the same.
        image_key = -1 - int(image.content_hash[:15], 16)
        key += [image_key if t == patch_id else t for t in layout]
        out += layout
        images.append(PromptImage(image.pixel_values, positions, image.content_hash))
        prev = slot + 1
    out += ids[prev:]
    key += ids[prev:]
    return ExpandedPrompt(out, key, RequestImages(images))


def layout_converter(
    token_to_id: Callable[[str], int | None], tokens_per_tile: int, patch_id: int
) -> Callable[[ProcessedImage], list[int]]:
    """ProcessedImage -> the ids of its token layout, checking that its patch tokens match its tiles."""
    ids: dict[str, int] = {}

    def to_id(token: str) -> int:
        if token not in ids:
            found = token_to_id(token)
            if found is None:
                raise ImageInputError(f"the tokenizer has no {token} token: it cannot encode images")
            ids[token] = found
        return ids[token]

    def convert(image: ProcessedImage) -> list[int]:
        layout = [to_id(t) for t in image_prompt_tokens(image.grid, tokens_per_tile)]
        num_patches = sum(t == patch_id for t in layout)
        if num_patches != image.pixel_values.shape[0] * tokens_per_tile:
            raise ImageInputError(
                f"an image's token layout has {num_patches} tokens with the model's image_token_index "
                f"({patch_id}) for {image.pixel_values.shape[0]} tile(s) of {tokens_per_tile} tokens: "
                "the tokenizer and config.json disagree on <|patch|>"
            )
        return layout

    return convert
