"""The real Llama 4 tokenizer (from llama-models) in every form the tokenizer tests compare.

Loading a 200k-token BPE takes about a second and building its tokenizer.json a few more, so each form is
built once per test process (functools.cache) and shared by the test modules.
"""

from __future__ import annotations

import atexit
import inspect
import json
import shutil
import sys
import tempfile
from functools import cache
from pathlib import Path
from typing import Any
from unittest import mock

import llama_models
from PIL import ImageFile

from herd.frontend.tokenizer import Tokenizer, load_tokenizer

MODEL_PATH = Path(llama_models.__file__).parent / "llama4" / "tokenizer.model"
_TORCHVISION = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


@cache
def meta_tokenizer() -> Any:
    from llama_models.llama4.tokenizer import Tokenizer as MetaTokenizer

    return MetaTokenizer.get_instance()


@cache
def meta_chat_format() -> Any:
    """Meta's reference ChatFormat. Its module imports torchvision for image transforms only: a stub
    stands in while it imports and is removed afterwards, so other tests still see no torchvision.
    Importing it also makes Pillow accept truncated images process-wide; that is undone too, so the tests of
    herd's corrupt-image errors do not depend on which tests ran before them."""
    stubs = {name: mock.MagicMock() for name in _TORCHVISION if name not in sys.modules}
    sys.modules.update(stubs)
    load_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        from llama_models.llama4.chat_format import ChatFormat
    finally:
        for name in stubs:
            del sys.modules[name]
        ImageFile.LOAD_TRUNCATED_IMAGES = load_truncated
    return ChatFormat(meta_tokenizer())


@cache
def hf_llama4_template() -> str:
    """The chat template Hugging Face ships with Llama 4 (Llama4Processor's default)."""
    from transformers.models.llama4 import processing_llama4

    return inspect.signature(processing_llama4.Llama4Processor.__init__).parameters["chat_template"].default


@cache
def tiktoken_tokenizer() -> Tokenizer:
    """herd's tokenizer read from Meta's tokenizer.model."""
    return load_tokenizer(MODEL_PATH)


@cache
def hf_folder() -> Path:
    """A Hugging Face-layout tokenizer folder built from tokenizer.model with transformers' converter."""
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    folder = Path(tempfile.mkdtemp(prefix="herd-llama4-tok-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    meta = meta_tokenizer()
    converted = TikTokenConverter(
        vocab_file=str(MODEL_PATH), pattern=meta.O200K_PATTERN, extra_special_tokens=list(meta.special_tokens)
    ).converted()
    # Like the tokenizer.json of HF's Llama 4 repos: add_special_tokens puts <|begin_of_text|> first.
    bos = ("<|begin_of_text|>", meta.special_tokens["<|begin_of_text|>"])
    converted.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[bos])
    converted.save(str(folder / "tokenizer.json"))
    config = {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot|>",
        "pad_token": {"content": "<|finetune_right_pad|>", "special": True},
        "chat_template": hf_llama4_template(),
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [200001, 200007, 200008]}))
    return folder


@cache
def json_tokenizer() -> Tokenizer:
    """herd's tokenizer read from the tokenizer.json of hf_folder()."""
    return load_tokenizer(hf_folder())


@cache
def transformers_tokenizer() -> Any:
    """transformers' own tokenizer over the same tokenizer.json, for chat-template comparisons."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(hf_folder() / "tokenizer.json"), bos_token="<|begin_of_text|>", eos_token="<|eot|>"
    )
