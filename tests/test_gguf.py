"""`--model-path file.gguf`: files written by llama.cpp's own converter from a checkpoint transformers made.

References: transformers on the checkpoint the files came from (F32 and BF16 files hold it exactly), and
transformers on the weights the `gguf` package dequantizes from a quantized file, placed by gguf-py's own
tensor-name map (not herd's); transformers' tokenizer for the tokenizer rebuilt from the metadata.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import Llama4ForCausalLM, Llama4TextConfig, PreTrainedTokenizerFast

from herd.config import ModelConfig
from herd.config.gguf import GGUFError
from herd.frontend.tokenizer import HFTokenizer, load_tokenizer
from herd.llm import LLM
from herd.sampling import SamplingParams

from gguf_fixtures import BOS, EOT, KQUANT_LIKE, convert, make_checkpoint
from test_engine import hf_greedy
from test_quantization_int8 import dequantized_reference as int8_reference
from test_quantization_online import dequantized_reference as online_reference
from test_quantization_online import int4_groups

MAX_TOKENS = 32


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("gguf")
    hf = root / "hf"
    model = make_checkpoint(hf)
    out: dict[str, object] = {"hf": hf, "model": model}
    for kind in ("f32", "bf16", "q8_0"):
        # Each file alone in its folder: no tokenizer.json beside it, so the tokenizer comes from the file.
        (root / kind).mkdir()
        out[kind] = convert(hf, root / kind / f"tiny-{kind}.gguf", kind)
    (root / "split").mkdir()
    convert(hf, root / "split" / "tiny.gguf", "f32", "--split-max-tensors", "20")
    out["split"] = sorted((root / "split").glob("*.gguf"))
    return out


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [[BOS, *torch.randint(0, BOS, (n,), generator=gen).tolist()] for n in (21, 4)]


def herd_greedy(path: Path, **kwargs: object) -> list[list[int]]:
    llm = LLM(str(path), dtype="float32", chunked_prefill_size=7, **kwargs)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts()], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def file_types(path: Path) -> set[str]:
    return {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("kind", ["f32", "bf16"])
def test_unquantized_file_gives_the_checkpoints_greedy_tokens(files, kind: str) -> None:
    assert file_types(files[kind]) == {"F32", kind.upper()}  # norms and rope_freqs stay F32
    want = [hf_greedy(files["model"], p, MAX_TOKENS) for p in prompts()]
    assert herd_greedy(files[kind]) == want


def test_first_split_loads_the_whole_model(files) -> None:
    splits = files["split"]
    assert [p.name for p in splits] == [f"tiny-{i:05d}-of-{len(splits):05d}.gguf" for i in range(1, len(splits) + 1)]
    assert len(splits) >= 2
    assert herd_greedy(splits[0]) == [hf_greedy(files["model"], p, MAX_TOKENS) for p in prompts()]
    with pytest.raises(GGUFError, match="pass the first split"):
        ModelConfig.from_hf(splits[1])


def dequantized_reference(model: torch.nn.Module, path: Path, num_layers: int = 4) -> torch.nn.Module:
    """The transformers model with every weight replaced by the file's, as the gguf package dequantizes it."""
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA4, num_layers)

    def read(hf_name: str) -> torch.Tensor:
        key = hf_name if hf_name.endswith(".weight") else f"{hf_name}.weight"  # fused experts lack the suffix
        t = tensors[names.get_name(key, try_suffixes=(".weight",))]
        return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("experts.gate_up_proj"):  # the converter stores gate and up apart, each [E, I, H]
                gate, up = (read(name.replace("gate_up_proj", part)) for part in ("gate_proj", "up_proj"))
                p.copy_(torch.cat([gate, up], dim=1).transpose(1, 2))
            elif name.endswith("experts.down_proj"):  # stored [E, H, I]
                p.copy_(read(name).transpose(1, 2))
            else:
                p.copy_(read(name))
    return ref


def test_q8_0_file_gives_transformers_tokens_on_the_dequantized_weights(files) -> None:
    assert "Q8_0" in file_types(files["q8_0"])
    ref = dequantized_reference(files["model"], files["q8_0"])
    got = herd_greedy(files["q8_0"])
    assert got == [hf_greedy(ref, p, MAX_TOKENS) for p in prompts()]
    # The quantization is not a no-op: the checkpoint itself continues differently somewhere.
    assert got != [hf_greedy(files["model"], p, MAX_TOKENS) for p in prompts()]


def test_q8_0_file_repacked_to_int8_by_w8a16(files) -> None:
    """--quantization w8a16 on a Q8_0 file: the dequantized blocks requantized per output channel."""
    ref = int8_reference(dequantized_reference(files["model"], files["q8_0"]))
    assert herd_greedy(files["q8_0"], quantization="w8a16") == [hf_greedy(ref, p, MAX_TOKENS) for p in prompts()]


KQUANTS = Path(__file__).parent / "fixtures" / "gguf" / "tiny-kquants.gguf"  # made by make_kquants.py beside it


def test_k_and_iq_types_give_transformers_tokens_on_the_dequantized_weights() -> None:
    assert file_types(KQUANTS) >= {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ2_XXS", "IQ3_S", "IQ4_XS", "IQ4_NL"}
    torch.manual_seed(0)
    skeleton = Llama4ForCausalLM(Llama4TextConfig(**KQUANT_LIKE)).float().eval()
    ref = dequantized_reference(skeleton, KQUANTS, KQUANT_LIKE["num_hidden_layers"])
    assert herd_greedy(KQUANTS) == [hf_greedy(ref, p, MAX_TOKENS) for p in prompts()]


def test_k_and_iq_types_repacked_to_int4_by_w4a16() -> None:
    """--quantization w4a16 on the K/IQ file: each dequantized tensor requantized to INT4 groups (herd's rule)."""
    torch.manual_seed(0)
    skeleton = Llama4ForCausalLM(Llama4TextConfig(**KQUANT_LIKE)).float().eval()
    ref = online_reference(dequantized_reference(skeleton, KQUANTS, KQUANT_LIKE["num_hidden_layers"]), int4_groups)
    assert herd_greedy(KQUANTS, quantization="w4a16") == [hf_greedy(ref, p, MAX_TOKENS) for p in prompts()]


TEXTS = [
    "Kalomi netura sevi, dopa elin onar!",
    "  leading spaces and\ttabs\n\nnew lines 12345 678",
    "ünïcödé ✓ 漢字 and emoji 🦙",
    "<|header_start|>user<|header_end|>\n\nhello<|eot|>",
]


def test_tokenizer_from_metadata_matches_the_checkpoints(files) -> None:
    ours = load_tokenizer(files["q8_0"])
    theirs = PreTrainedTokenizerFast.from_pretrained(files["hf"])
    assert isinstance(ours, HFTokenizer)
    assert ours.vocab_size == len(theirs)
    for text in TEXTS:
        ids = theirs(text).input_ids
        assert ours.encode(text) == ids
        assert ours.decode(ids) == theirs.decode(ids)
    assert (ours.bos_token_id, ours.pad_token_id) == (theirs.bos_token_id, theirs.pad_token_id)
    assert theirs.convert_tokens_to_ids("<|eot|>") in ours.eos_token_ids
    assert (
        ours.encode("<|eot|>", add_special_tokens=False, split_special_tokens=True)
        == theirs("<|eot|>", add_special_tokens=False, split_special_tokens=True).input_ids
    )
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Kalomi netura?"},
        {"role": "assistant", "content": "Sevi."},
        {"role": "user", "content": "Dopa!"},
    ]
    want = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours.apply_chat_template(messages, tokenize=False) == want


def test_a_tokenizer_beside_the_file_wins(files, tmp_path: Path) -> None:
    shutil.copy(files["q8_0"], tmp_path / "m.gguf")
    tok = PreTrainedTokenizerFast.from_pretrained(files["hf"])
    tok.add_tokens(["<|extra_beside|>"])  # tells the two apart
    tok.save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path / "m.gguf").token_to_id("<|extra_beside|>") == len(tok) - 1


def test_config_from_metadata(files) -> None:
    ours = ModelConfig.from_hf(files["q8_0"])
    theirs = ModelConfig.from_hf(files["hf"])
    same = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size")
    same += ("intermediate_size_mlp", "num_experts", "num_experts_per_tok", "rope_theta", "attention_chunk_size")
    same += ("layers", "bos_token_id", "floor_scale", "attn_scale", "tie_word_embeddings")
    assert {k: getattr(ours, k) for k in same} == {k: getattr(theirs, k) for k in same}
    assert EOT in ours.eos_token_ids  # the converter writes <|eot|> as EOS; the tokenizer adds the other stops
    assert ours.torch_dtype == "bfloat16" and ModelConfig.from_hf(files["f32"]).torch_dtype == "float32"


def test_truncated_file_fails_at_start_naming_the_tensor(files, tmp_path: Path) -> None:
    data = Path(files["q8_0"]).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    # The first tensor, in the file's listing, whose data the cut removed.
    lost = next(t for t in gguf.GGUFReader(files["q8_0"]).tensors if t.data_offset + t.n_bytes > len(data) - 1000)
    with pytest.raises(GGUFError, match=rf"tensor '{lost.name}' \({lost.tensor_type.name}.*truncated"):
        LLM(str(cut), dtype="float32")
    (tmp_path / "header.gguf").write_bytes(data[:100])
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        ModelConfig.from_hf(tmp_path / "header.gguf")


def test_another_architecture_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "clip.gguf"
    writer = gguf.GGUFWriter(path, arch="clip")  # what a vision projector (mmproj) file holds
    writer.add_tensor("v.patch_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match="holds a 'clip' model.*herd runs llama4"):
        LLM(str(path))


@pytest.mark.parametrize(
    ("raw_type", "what"),
    [(99, "ggml type 99, which the gguf package does not know"), (9, "type Q8_1, which the gguf package cannot")],
)
def test_unsupported_tensor_type_fails_at_start_naming_the_tensor(files, tmp_path: Path, raw_type, what) -> None:
    path = tmp_path / "odd.gguf"
    shutil.copy(files["q8_0"], path)
    reader = gguf.GGUFReader(path, "r+")  # gguf-py's own in-place editing, as gguf_set_metadata.py does
    victim = next(t for t in reader.tensors if t.tensor_type == gguf.GGMLQuantizationType.Q8_0)
    victim.field.parts[4][0] = int(raw_type)
    reader.data.flush()
    del reader
    with pytest.raises(GGUFError, match=rf"tensor '{victim.name}' has {what}.*accepted: F32, F16"):
        LLM(str(path), dtype="float32")
