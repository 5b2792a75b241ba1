"""GGUF files (llama.cpp's format): open one file or a split set, check every tensor, read the model config.

Reading and dequantizing are the `gguf` package's (`GGUFReader`, `gguf.quants`). What herd adds: a split set
(`NAME-00001-of-0000N.gguf`) opened as one model, every tensor checked before anything loads (a type the
`gguf` package cannot dequantize, or data past the end of a truncated file, fails at start naming the tensor
and its type), and the config llama.cpp derives for `general.architecture = llama4`. That metadata has no
field for several Llama 4 facts, so llama.cpp fixes them and so does herd (llama.cpp's `llama4.cpp`):
chunked attention of 8192 with every 4th layer global and NoPE (no chunking and RoPE everywhere when
`llama4.attention.sliding_window` is 0), temperature tuning with floor scale 8192 and scale 0.1, and qk-norm
on every model but the 128-expert one (Maverick). Llama 3 RoPE scaling arrives as the per-frequency divisors
of the `rope_freqs.weight` tensor that the converter writes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, ReaderField
from gguf.quants import dequantize

from herd.config.fields import ConfigError

_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")
# llama.cpp's fixed Llama 4 values (src/models/llama4.cpp), absent from the metadata.
LLAMA4_CHUNK = 8192
LLAMA4_NO_ROPE_INTERVAL = 4
LLAMA4_FLOOR_SCALE = 8192.0
LLAMA4_ATTN_SCALE = 0.1
MAVERICK_EXPERTS = 128  # the only Llama 4 without qk-norm
ROPE_FREQS = "rope_freqs.weight"
# What `dtype="auto"` becomes, by the type of the token embedding.
_AUTO_DTYPE = {
    GGMLQuantizationType.F32: "float32",
    GGMLQuantizationType.F16: "float16",
    GGMLQuantizationType.BF16: "bfloat16",
}


class GGUFError(ConfigError):
    """A GGUF file herd cannot load: the message names the file and, where one is at fault, the tensor."""


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix == ".gguf"


@dataclass(frozen=True)
class GGUFModel:
    """The readers of one model's files (the first holds the metadata) and where each tensor lives."""

    files: tuple[Path, ...]
    readers: tuple[GGUFReader, ...]

    @property
    def metadata(self) -> dict[str, ReaderField]:
        return self.readers[0].fields

    def value(self, key: str, default: Any = None) -> Any:
        field = self.metadata.get(key)
        return default if field is None else field.contents()

    def tensors(self) -> list[Any]:  # gguf.ReaderTensor, in file order
        return [t for r in self.readers for t in r.tensors]


def split_files(path: Path) -> tuple[Path, ...]:
    """All files of the model at `path`: itself, or every split when it is the first of a split set."""
    match = _SPLIT.match(path.name)
    if match is None:
        return (path,)
    if int(match["index"]) != 1:
        first = path.with_name(f"{match['stem']}-00001-of-{match['count']}.gguf")
        raise GGUFError(f"{path} is split {int(match['index'])} of a split GGUF; pass the first split, {first}")
    count = int(match["count"])
    files = tuple(path.with_name(f"{match['stem']}-{i:05d}-of-{match['count']}.gguf") for i in range(1, count + 1))
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise GGUFError(f"{path} is the first of {count} splits, but these are missing: {', '.join(missing)}")
    return files


def open_gguf(path: str | Path, *, cached: bool = True) -> GGUFModel:
    """Open (memory-map) the model's files and check every tensor; nothing is read into memory yet.

    The metadata readers (config, tokenizer) share one cached opening. The weight loader asks for its own
    (cached=False), so that the memory map, and the file pages it touched, go once loading is done.
    """
    resolved = Path(path).resolve()
    return _open(resolved) if cached else _open.__wrapped__(resolved)


@cache
def _open(path: Path) -> GGUFModel:
    if not path.is_file():
        raise GGUFError(f"GGUF file not found: {path}")
    files = split_files(path)
    readers = tuple(_read(f) for f in files)
    model = GGUFModel(files, readers)
    names = [t.name for t in model.tensors()]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise GGUFError(f"{path}: tensors found in more than one split: {', '.join(dupes[:8])}")
    return model


class _CheckedReader(GGUFReader):
    """GGUFReader that checks each tensor's type and extent first, so that the error names the tensor.

    GGUFReader itself stops at an unknown type with only the number, and at data past the end of a
    truncated file with a numpy reshape error.
    """

    def _build_tensors(self, start_offs: int, fields: list[ReaderField]) -> None:
        size = len(self.data)
        for field in fields:
            _, name_data, _, dims, raw_dtype, offset = field.parts
            name = bytes(name_data).decode("utf-8", errors="replace")
            try:
                qtype = GGMLQuantizationType(int(raw_dtype[0]))
            except ValueError:
                raise GGUFError(
                    f"tensor {name!r} has ggml type {int(raw_dtype[0])}, which the gguf package does not know; "
                    f"accepted: {accepted_types()}"
                ) from None
            if not _dequantizable(qtype):
                raise GGUFError(
                    f"tensor {name!r} has type {qtype.name}, which the gguf package cannot dequantize; "
                    f"accepted: {accepted_types()}"
                )
            block, type_size = GGML_QUANT_SIZES[qtype]
            n_bytes = int(np.prod(dims)) * type_size // block
            end = start_offs + int(offset[0]) + n_bytes
            if end > size:
                raise GGUFError(
                    f"tensor {name!r} ({qtype.name}, {n_bytes} bytes) ends at byte {end}, past the end of the "
                    f"file ({size} bytes): the file is truncated"
                )
        super()._build_tensors(start_offs, fields)


def _read(file: Path) -> GGUFReader:
    try:
        return _CheckedReader(file, "r")
    except GGUFError as e:
        raise GGUFError(f"{file}: {e}") from None
    except (ValueError, IndexError, OSError) as e:  # a header cut short or not GGUF at all
        raise GGUFError(f"{file} is not a readable GGUF file: {e}") from None


@cache
def _dequantizable(qtype: GGMLQuantizationType) -> bool:
    """Whether `gguf.quants.dequantize` handles the type: asked of it with one zero block."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    try:
        dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def accepted_types() -> str:
    return ", ".join(t.name for t in GGMLQuantizationType if _dequantizable(t))


def dequantized(tensor: Any, index: int | None = None) -> np.ndarray:
    """A tensor (or its `index`-th slice along the first axis) as float32, in torch's dimension order."""
    data = tensor.data if index is None else tensor.data[index]
    return np.array(dequantize(data, tensor.tensor_type), dtype=np.float32, copy=True)


def gguf_config_dict(path: str | Path) -> tuple[dict[str, Any], tuple[float, ...] | None]:
    """The Hugging Face `config.json` equivalent of a llama4 GGUF, and its RoPE frequency divisors (or None)."""
    model = open_gguf(path)
    arch = model.value("general.architecture")
    if arch != "llama4":
        raise GGUFError(f"{model.files[0]} holds a {arch!r} model (general.architecture); herd runs llama4")

    def key(name: str, default: Any = None, required: bool = False) -> Any:
        value = model.value(f"llama4.{name}", default)
        if value is None and required:
            raise GGUFError(f"{model.files[0]} lacks the metadata key llama4.{name}")
        return value

    tensors = {t.name: t for t in model.tensors()}
    hidden, heads = key("embedding_length", required=True), key("attention.head_count", required=True)
    experts = key("expert_count", 0)
    vocab = key("vocab_size") or len(model.value("tokenizer.ggml.tokens", []))
    chunked = key("attention.sliding_window") != 0
    num_layers = key("block_count", required=True)
    embed = tensors.get("token_embd.weight")
    eos = [model.value(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    raw: dict[str, Any] = {
        "architectures": ["Llama4ForCausalLM"],
        "model_type": "llama4_text",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": key("attention.key_length", hidden // heads),
        "intermediate_size": key("expert_feed_forward_length", required=experts > 0),
        "intermediate_size_mlp": key("feed_forward_length", required=True),
        "num_local_experts": experts,
        "num_experts_per_tok": key("expert_used_count", 1),
        "interleave_moe_layer_step": key("interleave_moe_layer_step", 1),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": key("rope.freq_base", 500000.0),
        "max_position_embeddings": key("context_length", 131072),
        "attention_chunk_size": LLAMA4_CHUNK if chunked else None,
        "no_rope_layers": [] if chunked else [1] * num_layers,
        "no_rope_layer_interval": LLAMA4_NO_ROPE_INTERVAL,
        "floor_scale": LLAMA4_FLOOR_SCALE,
        "attn_scale": LLAMA4_ATTN_SCALE,
        "use_qk_norm": experts != MAVERICK_EXPERTS,
        "bos_token_id": model.value("tokenizer.ggml.bos_token_id"),
        "eos_token_id": sorted({i for i in eos if i is not None}),
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": _AUTO_DTYPE.get(embed.tensor_type, "bfloat16") if embed is not None else None,
    }
    freqs = tensors.get(ROPE_FREQS)
    factors = tuple(float(f) for f in dequantized(freqs).reshape(-1)) if freqs is not None else None
    return raw, factors
