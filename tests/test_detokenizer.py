"""Streaming detokenization and stop strings on the real Llama 4 vocabulary."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from herd.frontend.detokenizer import IncrementalDetokenizer, StopStringMatcher

from llama4_tokenizers import json_tokenizer, tiktoken_tokenizer

REPLACEMENT = "\ufffd"
TEXT = (
    "Streaming 北京欢迎你 — naïve café. Emoji: 🎉👩‍👩‍👧‍👦🇯🇵👋🏽 and rare ones 𓀀𓂀🫠🪿.\n"
    "def f(x):\n\treturn x ** 2  # ok\n\n\n   spaces   end"
)


@pytest.fixture(scope="module")
def tok():
    return tiktoken_tokenizer()


@pytest.fixture(scope="module")
def partial_byte_ids(tok) -> list[int]:
    # Ids whose bytes are not whole UTF-8 characters: the tokens that split characters.
    ids = []
    for i in range(200_000):
        raw = tok._enc.decode_single_token_bytes(i)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            ids.append(i)
    return ids


def stream(tokenizer, ids: Sequence[int], **kwargs) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, **kwargs)
    deltas = [detok.add_token(i) for i in ids]
    deltas.append(detok.finish())
    return deltas, detok


@pytest.mark.parametrize("which", ["tokenizer.model", "tokenizer.json"])
def test_real_text_streams_exactly(which):
    tokenizer = tiktoken_tokenizer() if which == "tokenizer.model" else json_tokenizer()
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    deltas, detok = stream(tokenizer, ids)
    assert "".join(deltas) == detok.text == TEXT
    assert not any(REPLACEMENT in d for d in deltas)
    # Some characters here span several tokens: their first tokens produce nothing until they complete.
    assert deltas.count("") > 1


def test_split_character_is_held_then_released(tok):
    ids = tok.encode("𓀀", add_special_tokens=False)
    assert len(ids) > 1
    deltas, _ = stream(tok, ids)
    assert deltas[:-2] == [""] * (len(ids) - 1) and deltas[-2] == "𓀀" and deltas[-1] == ""


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), skip=st.booleans())
def test_random_ids_concatenate_to_decode(tok, partial_byte_ids, data, skip):
    # Mostly character-splitting ids, so partial and invalid UTF-8 sequences are common.
    any_id = st.integers(0, tok.vocab_size - 1)
    ids = data.draw(st.lists(st.one_of(st.sampled_from(partial_byte_ids), any_id), max_size=40))
    deltas, _ = stream(tok, ids, skip_special_tokens=skip)
    full = tok.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) == full
    if REPLACEMENT not in full:
        assert not any(REPLACEMENT in d for d in deltas)


class CountingTokenizer:
    def __init__(self, inner) -> None:
        self.inner = inner
        self.decoded = 0

    def decode(self, ids, skip_special_tokens=False):
        self.decoded += len(ids)
        return self.inner.decode(ids, skip_special_tokens)


def test_long_output_decodes_a_small_window_per_token(tok):
    ids = tok.encode(TEXT * 100, add_special_tokens=False)
    counting = CountingTokenizer(tok)
    deltas, _ = stream(counting, ids)
    assert "".join(deltas) == TEXT * 100
    assert counting.decoded < 8 * len(ids)  # re-decoding everything each step would be ~len(ids)**2 / 2


def test_stop_string_across_token_boundaries(tok):
    text = "Hello world, this is the end. More text."
    ids = tok.encode(text, add_special_tokens=False)
    deltas, detok = stream(tok, ids, stop=["lo wor", "the end"])
    assert "".join(deltas) == "Hel"
    assert detok.stopped and detok.stop_string == "lo wor"
    assert detok.add_token(ids[0]) == "" and detok.finish() == ""
    deltas, detok = stream(tok, ids, stop=["the end"], include_stop_str_in_output=True)
    assert "".join(deltas) == "Hello world, this is the end"


def test_text_that_only_looks_like_a_stop_is_released(tok):
    ids = tok.encode("Help is on the way", add_special_tokens=False)
    deltas, detok = stream(tok, ids, stop=["Hello", "wayward"])
    assert "".join(deltas) == "Help is on the way" and not detok.stopped
    assert deltas[-1] == "way"  # held back as a possible "wayward" until the output finished


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(min_size=1, max_size=50), data=st.data())
def test_stop_strings_on_random_text(tok, text, data):
    start = data.draw(st.integers(0, len(text) - 1))
    stop = text[start : data.draw(st.integers(start + 1, len(text)))]
    # Plain text: Hypothesis also draws string constants from the code under test, such as "<|tile_x_separator|>",
    # which would otherwise encode to a special token that the stream (rightly) does not print.
    ids = tok.encode(text, add_special_tokens=False, split_special_tokens=True)
    deltas, detok = stream(tok, ids, stop=[stop, "\x00never\x00"])
    assert "".join(deltas) == text[: text.find(stop)]
    assert detok.stop_string == stop


def test_stop_matcher_at_every_split():
    text = "abc STOP-ish STOP def"
    for cut in range(len(text) + 1):
        matcher = StopStringMatcher(["STOP ", "ish X"])
        out = matcher.feed(text[:cut]) + matcher.feed(text[cut:]) + matcher.flush()
        assert out == "abc STOP-ish " and matcher.matched == "STOP "


def test_no_stop_strings_passes_text_through():
    matcher = StopStringMatcher([""])  # empty stop strings are ignored
    assert [matcher.feed(c) for c in "ab"] == ["a", "b"] and matcher.flush() == ""
