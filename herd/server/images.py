"""The images of a request: found in its body, checked against the server's limits, loaded off the event loop.

Each image is named by where it sits in the request (`messages.0.content.1`, `image_data.2`), and that
name is the `param` of the 400 a bad image gets. The engine takes the loaded images in the prompt dict,
vLLM-style: `{"prompt_token_ids": ids, "multi_modal_data": {"image": [PIL images]}}`, with one
`<|image|>` placeholder token in the ids per image, in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from herd.frontend.media import MediaError, load_image_async
from herd.server.context import ServerContext
from herd.server.errors import bad_request


@dataclass(frozen=True)
class ImageRef:
    param: str  # where the image is in the request body, for errors
    url: str


async def load_images(ctx: ServerContext, refs: Sequence[ImageRef]) -> list[Image.Image]:
    """The images `refs` name, all at once; the first bad one (in request order) is a 400 naming it."""
    if not refs:
        return []
    if not ctx.config.enable_multimodal:
        raise bad_request("image input needs a server started with --enable-multimodal", refs[0].param)
    limit = ctx.config.max_images_per_request
    if len(refs) > limit:
        raise bad_request(
            f"too many images: {len(refs)} in one request, and this server takes at most {limit} "
            "(--max-images-per-request)",
            refs[limit].param,
        )
    config = ctx.config
    limits = {
        "allowed_local_media_path": config.allowed_local_media_path,
        "allowed_media_domains": config.allowed_media_domains,
        "timeout_s": config.media_fetch_timeout,
        "max_bytes": config.max_media_bytes,
        "max_pixels": config.max_image_pixels,
    }
    loads = [load_image_async(ref.url, **limits) for ref in refs]
    results = await asyncio.gather(*loads, return_exceptions=True)
    for ref, result in zip(refs, results, strict=True):
        if isinstance(result, MediaError):
            raise bad_request(f"{ref.param}: {result}", ref.param)
        if isinstance(result, BaseException):
            raise result
    return list(results)  # type: ignore[arg-type]


def with_images(prompt_ids: list[int], images: list[Image.Image]) -> dict[str, Any]:
    """The engine's prompt dict for token ids and their images (none: the plain ids)."""
    prompt: dict[str, Any] = {"prompt_token_ids": prompt_ids}
    if images:
        prompt["multi_modal_data"] = {"image": images}
    return prompt


def chat_image_refs(messages: Sequence[dict[str, Any]]) -> list[ImageRef]:
    """The `image_url` parts of chat messages (as dicts), in order."""
    refs = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "image_url":
                refs.append(ImageRef(f"messages.{i}.content.{j}", part["image_url"]["url"]))
    return refs


def template_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates take them: an image part is `{"type": "image"}` (what Hugging Face's
    llama-4 template renders as `<|image|>`), without its URL, which can be megabytes of base64."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            parts = [{"type": "image"} if p.get("type") == "image_url" else p for p in content]
            message = {**message, "content": parts}
        out.append(message)
    return out


def native_image_refs(image_data: Any, num_prompts: int, batched: bool) -> list[list[ImageRef]]:
    """SGLang's `image_data` of /generate, per prompt: a URL (or base64) or a list of them for one prompt;
    for a batch, one such entry (or null) per prompt."""
    if image_data is None:
        return [[] for _ in range(num_prompts)]
    if not batched:
        return [_refs_of(image_data, "image_data")]
    if not isinstance(image_data, list) or len(image_data) != num_prompts:
        raise bad_request(f"image_data must be a list with one entry per prompt ({num_prompts})", "image_data")
    return [[] if item is None else _refs_of(item, f"image_data.{i}") for i, item in enumerate(image_data)]


def _refs_of(item: Any, param: str) -> list[ImageRef]:
    if isinstance(item, str):
        return [ImageRef(param, item)]
    if isinstance(item, list) and all(isinstance(url, str) for url in item):
        return [ImageRef(f"{param}.{j}", url) for j, url in enumerate(item)]
    raise bad_request(f"{param} must be an image URL or base64 string, or a list of them", param)
