"""herd's tokenizers against Meta's reference Llama 4 tokenizer, and tokenizer.model against tokenizer.json."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from herd.frontend.chat import JinjaChatTemplate, Llama4ChatTemplate
from herd.frontend.tokenizer import HFTokenizer, TiktokenTokenizer, llama4_special_tokens, load_tokenizer

from llama4_tokenizers import MODEL_PATH, json_tokenizer, meta_tokenizer, tiktoken_tokenizer

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3:45pm, isn't it? I'll say we'd've won.",
    "chinese": "北京是中华人民共和国的首都，也是全国的政治和文化中心。你好，世界！",
    "emoji": "Party 🎉🎉 time! Family: 👩‍👩‍👧‍👦, flags 🇫🇷🇯🇵, skin tones 👋🏽 and ✅ done.",
    "code": 'def fib(n: int) -> int:\n    """Fibonacci."""\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n',
    "whitespace": "a  b   c\t\td\n\n\ne \r\n f    \n\n    \t \u3000 end   ",
    "mixed": "Ünïcödé café naïve — Привет, мир! مرحبا ॐ नमस्ते 12345678 3.14159 x²+y²",
    "specials": "before<|eot|>middle<|header_start|>user<|header_end|>after<|begin_of_text|>",
    "empty": "",
}


@pytest.fixture(scope="module")
def meta():
    return meta_tokenizer()


@pytest.fixture(scope="module", params=["tokenizer.model", "tokenizer.json"])
def tok(request):
    return tiktoken_tokenizer() if request.param == "tokenizer.model" else json_tokenizer()


def test_both_kinds_load_as_the_right_class():
    assert isinstance(tiktoken_tokenizer(), TiktokenTokenizer)
    assert isinstance(json_tokenizer(), HFTokenizer)
    # tokenizer.json's folder carries HF's jinja template; tokenizer.model alone falls back to the built-in.
    assert isinstance(json_tokenizer().chat_template, JinjaChatTemplate)
    assert isinstance(tiktoken_tokenizer().chat_template, Llama4ChatTemplate)


def test_special_tokens_match_meta(meta, tok):
    assert llama4_special_tokens() == list(meta.special_tokens)
    for name, token_id in meta.special_tokens.items():
        assert tok.token_to_id(name) == token_id
        assert tok.id_to_token(token_id) == name
    assert tok.vocab_size == meta.n_words == 202_048
    assert tok.bos_token_id == 200_000
    assert tok.eos_token_id == meta.special_tokens["<|eot|>"]
    assert tok.pad_token_id == meta.special_tokens["<|finetune_right_pad|>"]
    assert tok.all_special_ids == frozenset(meta.special_tokens.values())


def test_eos_token_ids(meta, tok):
    expected = {meta.special_tokens[t] for t in ("<|eot|>", "<|eom|>", "<|end_of_text|>")}
    assert set(tok.eos_token_ids) == expected


def test_generation_config_adds_stop_ids(tmp_path):
    (tmp_path / "tokenizer.model").symlink_to(MODEL_PATH)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 200005}))
    tok = load_tokenizer(tmp_path)
    assert set(tok.eos_token_ids) == {200001, 200005, 200007, 200008}


@pytest.mark.parametrize("name", TEXTS)
def test_encode_equals_meta(meta, tok, name):
    text = TEXTS[name]
    # Meta's default (no allowed_special) encodes special-token text as text; "all" makes it control tokens.
    assert tok.encode(text, add_special_tokens=False) == meta.encode(text, bos=False, eos=False, allowed_special="all")
    assert tok.encode(text, add_special_tokens=False, split_special_tokens=True) == meta.encode(
        text, bos=False, eos=False
    )
    assert tok.encode(text) == meta.encode(text, bos=True, eos=False, allowed_special="all")


@pytest.mark.parametrize("name", TEXTS)
def test_round_trip(tok, name):
    text = TEXTS[name]
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, add_special_tokens=False, split_special_tokens=True)) == text
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text.replace("<|eot|>", "").replace(
        "<|header_start|>", ""
    ).replace("<|header_end|>", "").replace("<|begin_of_text|>", "")


def test_long_runs_split_like_meta(meta):
    # Runs over 25k characters take Meta's split path (tiktoken fails on them otherwise).
    text = "a" * 30_000 + " " * 26_000 + "b"
    assert tiktoken_tokenizer().encode(text, add_special_tokens=False) == meta.encode(text, bos=False, eos=False)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=60))
def test_random_text_same_ids_everywhere(text):
    meta = meta_tokenizer()
    ids = tiktoken_tokenizer().encode(text, add_special_tokens=False)
    assert ids == json_tokenizer().encode(text, add_special_tokens=False)
    assert ids == meta.encode(text, bos=False, eos=False, allowed_special="all")
    assert tiktoken_tokenizer().decode(ids) == text


def test_random_ids_decode_the_same():
    rng = random.Random(0)
    a, b = tiktoken_tokenizer(), json_tokenizer()
    for _ in range(300):
        ids = [rng.randrange(a.vocab_size) for _ in range(rng.randint(1, 12))]
        assert a.decode(ids) == b.decode(ids) == meta_tokenizer().decode(ids)
        assert a.decode(ids, skip_special_tokens=True) == b.decode(ids, skip_special_tokens=True)


def test_vocabulary_forms_agree():
    a, b = tiktoken_tokenizer(), json_tokenizer()
    for token_id in [*range(0, 200_000, 997), 199_999, 200_000, 200_090, 202_047]:
        assert a.id_to_token(token_id) == b.id_to_token(token_id)
        assert b.token_to_id(a.id_to_token(token_id)) == token_id
        assert a.token_to_id(b.id_to_token(token_id)) == token_id
    assert a.token_to_id("not-a-token-at-all-xyz") is None
    assert a.id_to_token(10**7) is None


def test_missing_tokenizer_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "tokenizer.json")


def test_a_non_tiktoken_model_file_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x8b\x01\xff\xfe binary sentencepiece proto")
    with pytest.raises(ValueError, match="not a tiktoken BPE file"):
        load_tokenizer(tmp_path)
