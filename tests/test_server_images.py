"""Images through the real server with the official `openai` client: chat image_url parts and /generate's
image_data, from data: URLs, an HTTP server on 127.0.0.1 and an allowed local folder, against
transformers' Llama4ForConditionalGeneration.generate on the same tiny checkpoint; and every kind of bad
image answered with a 400 that names it, after which the server still serves.
"""

from __future__ import annotations

import http.server
import json
import random
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from PIL import Image

from herd.bench_serving import main as bench_main
from herd.config.server_args import ServerArgs
from herd.frontend.tokenizer import Tokenizer, load_tokenizer
from herd.multimodal import image_prompt_tokens, process_image

from local_web import data_url, encode, local_web
from server_fixtures import ServerThread, wait_idle

MODEL = "herd-vision"
MAX_TOKENS = 8
MAX_IMAGES = 3
HUGE_BYTES = 64 * 1024 * 1024  # declared by /huge, over herd's 32 MiB cap


def noise(seed: int, width: int, height: int) -> Image.Image:
    return Image.frombytes("RGB", (width, height), random.Random(seed).randbytes(width * height * 3))


WIDE = noise(1, 60, 50)  # several tiles of the checkpoint's 28 px, and a global view
SMALL = noise(2, 20, 20)  # one tile
TALL = noise(3, 30, 90)


def _huge(handler: http.server.BaseHTTPRequestHandler) -> None:
    # Says it is too big; nothing needs to be sent.
    handler.send_response(200)
    handler.send_header("Content-Type", "image/png")
    handler.send_header("Content-Length", str(HUGE_BYTES))
    handler.end_headers()


@pytest.fixture(scope="module")
def web() -> Iterator[str]:
    with local_web({"/tall.png": (200, {"Content-Type": "image/png"}, encode(TALL)), "/huge": _huge}) as url:
        yield url


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("media")
    (root / "allowed").mkdir()
    (root / "outside").mkdir()
    (root / "allowed" / "small.png").write_bytes(encode(SMALL))
    (root / "outside" / "small.png").write_bytes(encode(SMALL))
    return root


@pytest.fixture(scope="module")
def server(vision_ckpt, media: Path) -> Iterator[ServerThread]:
    args = ServerArgs(
        model_path=str(vision_ckpt[0]),
        dtype="float32",
        served_model_name=MODEL,
        enable_multimodal=True,
        allowed_local_media_path=str(media / "allowed"),
        allowed_media_domains=["127.0.0.1"],  # the test's web server; refused by default
        max_images_per_request=MAX_IMAGES,
        chunked_prefill_size=16,  # every image prompt is prefilled over several steps
        max_total_tokens=4096,
    )
    with ServerThread(args) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(vision_ckpt) -> Tokenizer:
    return load_tokenizer(vision_ckpt[0])


@torch.no_grad()
def reference(vision_ckpt, tokenizer: Tokenizer, ids: list[int], images: list[Image.Image]) -> list[int]:
    """transformers' greedy tokens for a prompt with one <|image|> placeholder per image."""
    model = vision_ckpt[1]
    vision = model.config.vision_config
    tokens_per_tile = int((vision.image_size // vision.patch_size) ** 2 * vision.pixel_shuffle_ratio**2)
    processed = [process_image(img, vision.image_size) for img in images]
    placeholder = tokenizer.token_to_id("<|image|>")
    assert ids.count(placeholder) == len(images)
    expanded: list[int] = []
    for token in ids:
        layout = image_prompt_tokens(processed.pop(0).grid, tokens_per_tile) if token == placeholder else None
        expanded += [tokenizer.token_to_id(t) for t in layout] if layout else [token]
    out = model.generate(
        input_ids=torch.tensor([expanded]),
        pixel_values=torch.cat([process_image(img, vision.image_size).pixel_values for img in images]),
        max_new_tokens=MAX_TOKENS,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=200018,
    )
    return out[0, len(expanded) :].tolist()


def chat_ids(tokenizer: Tokenizer, content: list[dict[str, Any]]) -> list[int]:
    """The prompt ids the chat template gives, with each image part as its placeholder."""
    parts = [{"type": "image"} if p["type"] == "image_url" else p for p in content]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
    assert isinstance(ids, list)
    return ids


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def ask(client: openai.OpenAI, content: list[dict[str, Any]], **kwargs: Any) -> Any:
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": content}],  # type: ignore[misc, list-item]
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        extra_body={"ignore_eos": True},
        **kwargs,
    )


def check_answer(vision_ckpt, tokenizer: Tokenizer, reply: Any, content: list[dict], images: list[Image.Image]):
    expected = reference(vision_ckpt, tokenizer, chat_ids(tokenizer, content), images)
    assert reply.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert reply.usage.completion_tokens == MAX_TOKENS


def test_one_image(client: openai.OpenAI, vision_ckpt, tokenizer: Tokenizer) -> None:
    content = [image_part(data_url(encode(WIDE))), text_part("What is in this picture?")]
    check_answer(vision_ckpt, tokenizer, ask(client, content), content, [WIDE])


def test_two_images_one_fetched_over_http(client: openai.OpenAI, web: str, vision_ckpt, tokenizer: Tokenizer) -> None:
    content = [
        text_part("Compare "),
        image_part(data_url(encode(SMALL))),
        text_part(" with "),
        image_part(f"{web}/tall.png"),
    ]
    check_answer(vision_ckpt, tokenizer, ask(client, content), content, [SMALL, TALL])


def test_image_and_long_text_with_chunked_prefill(client: openai.OpenAI, vision_ckpt, tokenizer: Tokenizer) -> None:
    long_text = " ".join(f"word{i}" for i in range(150))
    content = [text_part(long_text), image_part(data_url(encode(WIDE), "image/jpeg")), text_part(long_text)]
    reply = ask(client, content)
    check_answer(vision_ckpt, tokenizer, reply, content, [WIDE])
    assert reply.usage.prompt_tokens > 20 * 16  # the server prefills 16 tokens a step: many steps


def test_streamed_answer_with_an_image(client: openai.OpenAI, vision_ckpt, tokenizer: Tokenizer) -> None:
    content = [image_part(data_url(encode(TALL))), text_part("Describe it.")]
    chunks = list(ask(client, content, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected = reference(vision_ckpt, tokenizer, chat_ids(tokenizer, content), [TALL])
    assert text == tokenizer.decode(expected, skip_special_tokens=True)


def test_local_files_under_the_allowed_folder(client: openai.OpenAI, media: Path, vision_ckpt, tokenizer) -> None:
    for url in (f"file://{media}/allowed/small.png", str(media / "allowed" / "small.png"), "small.png"):
        content = [image_part(url), text_part("What is it?")]
        check_answer(vision_ckpt, tokenizer, ask(client, content), content, [SMALL])


def test_generate_with_image_data(server: ServerThread, vision_ckpt, tokenizer: Tokenizer) -> None:
    # SGLang's native API: the client formats the prompt, with <|image|> where each image goes.
    content = [text_part("Which is larger, "), image_part(""), text_part(" or "), image_part("")]
    text = tokenizer.decode(chat_ids(tokenizer, content))
    body = {
        "text": text,
        "image_data": [data_url(encode(SMALL)), data_url(encode(WIDE))],
        "sampling_params": {"temperature": 0, "max_new_tokens": MAX_TOKENS, "ignore_eos": True},
    }
    r = httpx.post(f"{server.url}/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    ids = tokenizer.encode(text, add_special_tokens=True)
    assert r.json()["output_ids"] == reference(vision_ckpt, tokenizer, ids, [SMALL, WIDE])
    # A batch: image_data has one entry per prompt, null for a prompt without images.
    plain = {**body, "text": [text, "Just text."], "image_data": [body["image_data"], None]}
    r = httpx.post(f"{server.url}/generate", json=plain, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()[0]["output_ids"] == reference(vision_ckpt, tokenizer, ids, [SMALL, WIDE])


def _bomb() -> str:
    return data_url(encode(Image.new("1", (20000, 20000))))  # 400 Mpixels in a few tens of kB


BAD_CHAT_IMAGES = {
    "corrupt": (lambda web, media: data_url(encode(WIDE)[:200]), "corrupt"),
    "not-an-image": (lambda web, media: data_url(b"hello, world"), "cannot decode the image"),
    "unsupported-format": (lambda web, media: data_url(encode(SMALL, "PPM"), "image/ppm"), "unsupported image format"),
    "too-many-pixels": (lambda web, media: _bomb(), "image too large"),
    "too-many-bytes": (lambda web, media: f"{web}/huge", "image too large: more than"),
    "missing-url": (lambda web, media: f"{web}/missing.png", "HTTP 404"),
    "unreachable-url": (lambda web, media: "http://127.0.0.1:1/x.png", "cannot fetch"),
    "outside-the-folder": (lambda web, media: str(media / "outside" / "small.png"), "outside the allowed"),
    "dot-dot": (lambda web, media: "../outside/small.png", "outside the allowed"),
    "bad-base64": (lambda web, media: "this is not base64!", "not valid base64"),
}


@pytest.mark.parametrize("case", list(BAD_CHAT_IMAGES))
def test_bad_image_is_a_400_naming_the_part(client: openai.OpenAI, web: str, media: Path, case: str) -> None:
    make_url, message = BAD_CHAT_IMAGES[case]
    content = [text_part("Look: "), image_part(data_url(encode(SMALL))), image_part(make_url(web, media))]
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, content)
    error = e.value.response.json()["error"]
    assert error["param"] == "messages.0.content.2"
    assert message in error["message"] and error["message"].startswith("messages.0.content.2: ")
    # The server keeps serving.
    assert ask(client, [text_part("Still there?")]).choices[0].finish_reason == "length"


def test_too_many_images(client: openai.OpenAI) -> None:
    url = data_url(encode(SMALL))
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, [image_part(url)] * (MAX_IMAGES + 1))
    error = e.value.response.json()["error"]
    assert "--max-images-per-request" in error["message"] and f"at most {MAX_IMAGES}" in error["message"]
    assert error["param"] == f"messages.0.content.{MAX_IMAGES}"
    assert ask(client, [image_part(url)] * MAX_IMAGES).usage.completion_tokens == MAX_TOKENS


def test_generate_bad_images(server: ServerThread) -> None:
    sampling = {"max_new_tokens": 2}
    cases = [
        ({"text": "<|image|>?", "image_data": data_url(b"junk")}, "image_data"),
        ({"text": ["<|image|>?", "<|image|>!"], "image_data": [None, [data_url(b"junk")]]}, "image_data.1.0"),
        ({"text": ["a", "b"], "image_data": [data_url(encode(SMALL))]}, "image_data"),
        ({"text": "<|image|>?", "image_data": {"url": "x"}}, "image_data"),
    ]
    for body, param in cases:
        r = httpx.post(f"{server.url}/generate", json={**body, "sampling_params": sampling})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    # One placeholder per image, as the engine expands them.
    r = httpx.post(f"{server.url}/generate", json={"text": "No placeholder.", "image_data": data_url(encode(SMALL))})
    assert r.status_code == 400 and "placeholder" in r.json()["error"]["message"]
    assert httpx.post(f"{server.url}/generate", json={"text": "ok", "sampling_params": sampling}).status_code == 200


def test_local_files_need_the_flag(server: ServerThread, media: Path) -> None:
    args = replace(server.args, allowed_local_media_path=None)
    with ServerThread(args) as other:
        client = openai.OpenAI(base_url=f"{other.url}/v1", api_key="none", max_retries=0)
        for url in (f"file://{media}/allowed/small.png", str(media / "allowed" / "small.png")):
            with pytest.raises(openai.BadRequestError, match="local files are not allowed"):
                ask(client, [image_part(url)])
        assert ask(client, [image_part(data_url(encode(SMALL)))]).usage.completion_tokens == MAX_TOKENS


def test_image_url_to_127_0_0_1_refused_unless_allowed(server: ServerThread, web: str) -> None:
    args = replace(server.args, allowed_media_domains=None, max_image_pixels=20 * 20)
    with ServerThread(args) as other:
        client = openai.OpenAI(base_url=f"{other.url}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="resolves to 127.0.0.1, a loopback") as e:
            ask(client, [image_part(f"{web}/tall.png")])
        assert "--allowed-media-domains" in e.value.response.json()["error"]["message"]
        # The pixel cap is the flag's: a 20x20 image passes, a 30x90 one does not.
        assert ask(client, [image_part(data_url(encode(SMALL)))]).usage.completion_tokens == MAX_TOKENS
        with pytest.raises(openai.BadRequestError, match="more than the limit of 400 pixels"):
            ask(client, [image_part(data_url(encode(TALL)))])
    # The module's server names 127.0.0.1 in --allowed-media-domains.
    assert ask(client_of(server), [image_part(f"{web}/tall.png")]).usage.completion_tokens == MAX_TOKENS


def client_of(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def test_bench_image_dataset_against_herd(server: ServerThread, tmp_path: Path) -> None:
    out = tmp_path / "image.jsonl"
    flags = ["--backend", "sglang-oai-chat", "--dataset-name", "image", "--image-count", "2"]
    flags += ["--image-resolution", "40x60", "--random-input-len", "24", "--random-output-len", "4"]
    argv = ["--base-url", server.url, "--output-file", str(out), "--disable-tqdm", "--num-prompts", "3"]
    assert bench_main([*argv, *flags]) == 0
    record = json.loads(out.read_text().splitlines()[-1])
    assert record["completed"] == 3 and record["errors"] == [""] * 3
    wait_idle(server.url)
