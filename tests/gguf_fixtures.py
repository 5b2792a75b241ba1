"""GGUF files made by llama.cpp's own converter from a tiny Llama 4 checkpoint that transformers wrote.

The converter (`convert_hf_to_gguf.py` with its `gguf-py`) is the one vendored in llama-cpp-python's source
package; `make venv` extracts it to `.venv/src/llama.cpp` (the tests never reach the network). It runs in a
subprocess so that its `gguf-py` never meets the PyPI `gguf` package herd reads files with.

The checkpoint follows what llama.cpp assumes of every Llama 4 GGUF (its metadata has no field for these):
chunked attention of 8192 with every 4th layer global and NoPE, temperature tuning with floor scale 8192 and
scale 0.1. Rows are 64 wide, a multiple of the 32-element blocks of Q8_0 / Q4_0 / Q5_1. The tokenizer is a
small byte-level BPE with Llama 4's pre-tokenizer regex and its 32 special tokens, trained on made-up words.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import Llama4ForCausalLM, Llama4TextConfig, PreTrainedTokenizerFast
from transformers.models.llama4.processing_llama4 import chat_template as LLAMA4_CHAT_TEMPLATE

from herd.frontend.tokenizer.tiktoken_bpe import TiktokenTokenizer

from checkpoints import widen

LLAMA_CPP = Path(sys.prefix) / "src" / "llama.cpp"
VOCAB = 512
SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|header_start|>",
    "<|header_end|>",
    "<|eom|>",
    "<|eot|>",
    "<|step|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|finetune_right_pad|>",
    "<|image_start|>",
    "<|image_end|>",
    "<|image|>",
    "<|patch|>",
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
]
SPECIALS += [f"<|reserved_special_token_{i}|>" for i in range(32 - len(SPECIALS))]
BOS, EOT = VOCAB - 32, VOCAB - 32 + SPECIALS.index("<|eot|>")

GGUF_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=64,
    intermediate_size_mlp=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=4,
    num_experts_per_tok=1,
    interleave_moe_layer_step=2,  # Maverick's dense/MoE alternation: both FFN kinds in the file
    use_qk_norm=True,
    # Scout's llama3 scaling (low == high); the original length is short so that the scaling changes angles.
    rope_scaling={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 16.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 1.0,
        "original_max_position_embeddings": 64,
    },
    attention_chunk_size=8192,
    floor_scale=8192,
    attn_scale=0.1,
    no_rope_layer_interval=4,
    bos_token_id=BOS,
    eos_token_id=[BOS + 1, BOS + SPECIALS.index("<|eom|>"), EOT],
    pad_token_id=BOS + SPECIALS.index("<|finetune_right_pad|>"),
    tie_word_embeddings=False,
)


def _corpus() -> list[str]:
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ne", "tu", "ra", "se", "vi", "do", "pa", "el", "in", "on", "ar", "us", "th"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    lines = []
    for _ in range(300):
        line = " ".join(rng.choice(words) for _ in range(12))
        lines.append(line.capitalize() + rng.choice([".", ",", "?", "!", ": 42", " (x)"]))
    return lines


def make_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(TiktokenTokenizer.PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - len(SPECIALS),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    assert tok.get_vocab_size() == VOCAB - len(SPECIALS), tok.get_vocab_size()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", BOS)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIALS[0], eos_token="<|eot|>", pad_token="<|finetune_right_pad|>"
    )
    fast.chat_template = LLAMA4_CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


# Rows 256 wide (the block of the K types) for tests/fixtures/gguf/tiny-kquants.gguf; one dense and one MoE layer.
KQUANT_LIKE = {
    **GGUF_LIKE,
    "hidden_size": 256,
    "intermediate_size": 256,
    "intermediate_size_mlp": 256,
    "num_hidden_layers": 2,
    "head_dim": 64,
}


def make_checkpoint(path: Path, config: dict | None = None, seed: int = 0) -> Llama4ForCausalLM:
    """A float32 Llama4ForCausalLM with its tokenizer, in the layout transformers writes.

    Every weight is a bfloat16 value, so that a BF16 GGUF holds the checkpoint exactly.
    """
    torch.manual_seed(seed)
    model = Llama4ForCausalLM(Llama4TextConfig(**(config or GGUF_LIKE))).float().eval()
    widen(model, seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    model.save_pretrained(path)
    make_tokenizer(path)
    return model


# Runs convert_hf_to_gguf.py with the pre-tokenizer forced to "llama4": the converter recognises a
# pre-tokenizer by the hash of how it splits a test text, and a home-made BPE has no known hash.
_CONVERT = """
import os, runpy, sys
root = sys.argv.pop(1)
sys.path[:0] = [root, os.path.join(root, "gguf-py")]
import conversion.base as base
for cls in vars(base).values():
    if isinstance(cls, type) and hasattr(cls, "get_vocab_base_pre"):
        cls.get_vocab_base_pre = lambda self, tokenizer: "llama4"
sys.argv[0] = os.path.join(root, "convert_hf_to_gguf.py")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert(checkpoint: Path, outfile: Path, outtype: str, *extra: str) -> Path:
    """`convert_hf_to_gguf.py CHECKPOINT --outtype OUTTYPE --outfile OUTFILE EXTRA...` (f32, bf16, q8_0, ...)."""
    if not (LLAMA_CPP / "convert_hf_to_gguf.py").is_file():
        raise FileNotFoundError(f"llama.cpp's converter is not at {LLAMA_CPP}: run `make venv` (it extracts it there)")
    cmd = [sys.executable, "-c", _CONVERT, str(LLAMA_CPP), str(checkpoint), "--outtype", outtype]
    done = subprocess.run([*cmd, "--outfile", str(outfile), *extra], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{done.stderr[-4000:]}")
    return outfile
