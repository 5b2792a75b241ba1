"""Images through the engine: token-identical to transformers' Llama4ForConditionalGeneration.generate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from herd.frontend.processor import RequestError
from herd.llm import LLM
from herd.models.llama4_text import Llama4ForCausalLM
from herd.multimodal import image_prompt_tokens, process_image
from herd.sampling import SamplingParams

from paged import assert_no_leaked_blocks

TILE, TOKENS_PER_TILE = 28, 4  # tests/checkpoints.py VISION_LIKE
MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
ONE_IMAGE = "Describe <|image|> in one word:"
TWO_IMAGES = "Compare <|image|> with <|image|>, then answer: which one is brighter?"


def image(seed: int, width: int, height: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


WIDE = image(1, 60, 50)  # 2 x 3 tiles + a global view
SMALL = image(2, 20, 20)  # one tile
OTHER = image(3, 60, 50)  # same size and grid as WIDE, different pixels


def expected_prompt(tokenizer, text: str | list[int], images: list[Image.Image]) -> tuple[list[int], torch.Tensor]:
    """The prompt ids and pixel values transformers gets: each <|image|> replaced by its image's layout."""
    ids = tokenizer.encode(text) if isinstance(text, str) else text
    placeholder = tokenizer.token_to_id("<|image|>")
    processed = [process_image(img, TILE) for img in images]
    out: list[int] = []
    for token in ids:
        if token == placeholder:
            out += [tokenizer.token_to_id(t) for t in image_prompt_tokens(processed.pop(0).grid, TOKENS_PER_TILE)]
        else:
            out.append(token)
    pixels = torch.cat([process_image(img, TILE).pixel_values for img in images])
    return out, pixels


_REFERENCE: dict[tuple, list[int]] = {}


@torch.no_grad()
def reference(ckpt, tokenizer, text: str | list[int], images: list[Image.Image]) -> list[int]:
    key = (str(text), tuple(id(i) for i in images))
    if key not in _REFERENCE:
        ids, pixels = expected_prompt(tokenizer, text, images)
        out = ckpt[1].generate(
            input_ids=torch.tensor([ids]),
            pixel_values=pixels,
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=200018,
        )
        _REFERENCE[key] = out[0, len(ids) :].tolist()
    return _REFERENCE[key]


def prompt(text: str, images: list[Image.Image]) -> dict:
    return {"prompt": text, "multi_modal_data": {"image": images}}


@pytest.fixture
def make_llm(vision_ckpt):
    """Multimodal LLMs over the vision checkpoint, counting encoded tiles; checks that no KV block leaked."""
    made: list[LLM] = []

    def make(**kwargs) -> LLM:
        llm = LLM(str(vision_ckpt[0]), dtype="float32", enable_multimodal=True, **kwargs)
        model = llm.engine.core.workers[0].model
        encode = model.encode_images
        llm.encoded_tiles = []  # type: ignore[attr-defined]

        def counting(pixels: torch.Tensor) -> torch.Tensor:
            llm.encoded_tiles.append(pixels.shape[0])  # type: ignore[attr-defined]
            return encode(pixels)

        model.encode_images = counting
        made.append(llm)
        return llm

    yield make
    for llm in made:
        assert_no_leaked_blocks(llm.engine)


def tiles(images: list[Image.Image]) -> int:
    return sum(process_image(img, TILE).pixel_values.shape[0] for img in images)


@pytest.mark.parametrize("chunked_prefill_size", [-1, 5, 3], ids=["whole-prompt", "prefill-5", "prefill-3"])
def test_one_and_two_images_match_transformers(vision_ckpt, make_llm, chunked_prefill_size: int) -> None:
    llm = make_llm(chunked_prefill_size=chunked_prefill_size, page_size=4)
    tokenizer = llm.get_tokenizer()
    cases = [(ONE_IMAGE, [WIDE]), (TWO_IMAGES, [SMALL, WIDE]), (ONE_IMAGE, [SMALL])]
    outputs = llm.generate([prompt(t, imgs) for t, imgs in cases], GREEDY, use_tqdm=False)
    for out, (text, imgs) in zip(outputs, cases, strict=True):
        ids, _ = expected_prompt(tokenizer, text, imgs)
        assert out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == reference(vision_ckpt, tokenizer, text, imgs)
    # Each image encoded once per request, however many steps its patch tokens were spread over.
    assert sum(llm.encoded_tiles) == sum(tiles(imgs) for _, imgs in cases)
    if chunked_prefill_size == 3:
        assert len(llm.encoded_tiles) > 1  # the images were reached in different steps


def test_images_change_the_answer(vision_ckpt, make_llm) -> None:
    """The model sees the pixels: the same text with another image gives other tokens (else nothing is tested)."""
    tokenizer = make_llm().get_tokenizer()
    assert reference(vision_ckpt, tokenizer, ONE_IMAGE, [WIDE]) != reference(vision_ckpt, tokenizer, ONE_IMAGE, [OTHER])


def test_prefix_cache_keys_images_by_content(vision_ckpt, make_llm) -> None:
    llm = make_llm(page_size=4)
    tokenizer = llm.get_tokenizer()
    first = llm.generate(prompt(ONE_IMAGE, [WIDE]), GREEDY, use_tqdm=False)[0]
    # Same text and layout, other pixels: only the text before the image may come from the cache.
    other = llm.generate(prompt(ONE_IMAGE, [OTHER]), GREEDY, use_tqdm=False)[0]
    before_image = first.prompt_token_ids.index(tokenizer.token_to_id("<|patch|>"))
    assert other.num_cached_tokens <= before_image
    assert other.outputs[0].token_ids == reference(vision_ckpt, tokenizer, ONE_IMAGE, [OTHER])
    # The same image again (a new PIL object with the same pixels): the prompt comes from the cache.
    again = llm.generate(prompt(ONE_IMAGE, [WIDE.copy()]), GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens >= len(again.prompt_token_ids) - 4
    assert (
        again.outputs[0].token_ids == first.outputs[0].token_ids == reference(vision_ckpt, tokenizer, ONE_IMAGE, [WIDE])
    )


def test_n_sequences_share_the_features(vision_ckpt, make_llm) -> None:
    llm = make_llm(disable_radix_cache=True)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, n=3)
    out = llm.generate(prompt(TWO_IMAGES, [WIDE, SMALL]), params, use_tqdm=False)[0]
    expected = reference(vision_ckpt, llm.get_tokenizer(), TWO_IMAGES, [WIDE, SMALL])
    assert [c.token_ids for c in out.outputs] == [expected] * 3
    assert sum(llm.encoded_tiles) == tiles([WIDE, SMALL])


def test_preempted_image_request(vision_ckpt, make_llm) -> None:
    llm = make_llm(max_total_tokens=80, page_size=4, chunked_prefill_size=8)
    cases = [(TWO_IMAGES, [WIDE, SMALL]), (ONE_IMAGE, [OTHER]), (ONE_IMAGE, [WIDE])]
    outputs = llm.generate([prompt(t, imgs) for t, imgs in cases], GREEDY, use_tqdm=False)
    assert llm.engine.core.scheduler.num_preemptions > 0
    tokenizer = llm.get_tokenizer()
    for out, (text, imgs) in zip(outputs, cases, strict=True):
        assert out.outputs[0].token_ids == reference(vision_ckpt, tokenizer, text, imgs)


def test_image_errors(vision_ckpt, make_llm, real_vocab_ckpt) -> None:
    llm = make_llm()
    with pytest.raises(RequestError, match=r"2 <\|image\|> placeholder\(s\) for 1 image\(s\)"):
        llm.generate(prompt(TWO_IMAGES, [WIDE]), GREEDY, use_tqdm=False)
    with pytest.raises(RequestError, match=r"1 <\|image\|> placeholder\(s\) for 2 image\(s\)"):
        llm.generate(prompt(ONE_IMAGE, [WIDE, SMALL]), GREEDY, use_tqdm=False)
    with pytest.raises(RequestError, match="PIL image"):
        llm.generate(prompt(ONE_IMAGE, ["cat.png"]), GREEDY, use_tqdm=False)  # type: ignore[list-item]
    with pytest.raises(RequestError, match="'image' entry"):
        llm.generate({"prompt": ONE_IMAGE, "multi_modal_data": {"video": [WIDE]}}, GREEDY, use_tqdm=False)
    text_only = LLM(str(real_vocab_ckpt[0]), dtype="float32", enable_multimodal=True)
    with pytest.raises(RequestError, match=r"no vision tower"):
        text_only.generate(prompt(ONE_IMAGE, [WIDE]), GREEDY, use_tqdm=False)


def test_chat_with_image_parts(vision_ckpt, make_llm) -> None:
    llm = make_llm()
    content = [{"type": "image", "image": SMALL}, {"type": "text", "text": "And this one?"}]
    messages = [{"role": "user", "content": [{"type": "text", "text": "Look."}, {"type": "image", "image": WIDE}]}]
    messages += [{"role": "assistant", "content": "A grid."}, {"role": "user", "content": content}]
    out = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    tokenizer = llm.get_tokenizer()
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert ids.count(tokenizer.token_to_id("<|image|>")) == 2
    assert out.outputs[0].token_ids == reference(vision_ckpt, tokenizer, ids, [WIDE, SMALL])


def test_multimodal_off_by_default(vision_ckpt) -> None:
    llm = LLM(str(vision_ckpt[0]), dtype="float32")
    assert isinstance(llm.engine.core.workers[0].model, Llama4ForCausalLM)  # no vision tower built or loaded
    with pytest.raises(RequestError, match="start the server with --enable-multimodal"):
        llm.generate(prompt(ONE_IMAGE, [WIDE]), GREEDY, use_tqdm=False)
    # Text still runs, and a prompt naming <|image|> without images is plain text.
    out = llm.generate({"prompt": ONE_IMAGE}, GREEDY, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == MAX_TOKENS


def test_prompt_token_ids_with_images(vision_ckpt, make_llm) -> None:
    llm = make_llm()
    tokenizer = llm.get_tokenizer()
    ids = tokenizer.encode(ONE_IMAGE)
    out = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": SMALL}}, GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == reference(vision_ckpt, tokenizer, ONE_IMAGE, [SMALL])


def test_engine_add_request_with_images(vision_ckpt, make_llm) -> None:
    engine = make_llm(chunked_prefill_size=4).engine
    engine.add_request("r", prompt(ONE_IMAGE, [WIDE]), GREEDY)
    images = engine.core.requests["r#0"].request.images
    assert images is not None
    done, kept_during_prefill = [], []
    while engine.has_unfinished_requests():
        outputs = engine.step()
        done += [o for o in outputs if o.finished]
        if not outputs:  # a prefill step that did not reach the end of the prompt
            kept_during_prefill.append(images.images[0].features is not None)
    assert done[0].outputs[0].token_ids == reference(vision_ckpt, engine.tokenizer, ONE_IMAGE, [WIDE])
    assert any(kept_during_prefill)  # encoded mid-prompt and kept for the following chunks
    assert images.images[0].features is None  # released once the prompt was done
