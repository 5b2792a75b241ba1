"""Load an EAGLE-3 draft for a Llama 4 target, in the layout SGLang and SpecForge publish.

A checkpoint folder holds config.json (see `Eagle3Config`) and model.safetensors (or pytorch_model.bin) with
`fc.weight [H, 3 * target H]`, `midlayer.*` (one decoder layer whose q/k/v take [2H]: embedding ++ hidden),
`norm.weight`, `lm_head.weight [draft vocab, H]`, `d2t` (int64 [draft vocab], target id = draft id + d2t[id]),
`t2d` (bool [vocab], which target ids the draft can propose), and `embed_tokens.weight` only when the draft
has its own: published Llama 4 drafts leave it out and share the target's (SGLang `set_embed`). Names follow
SGLang's `LlamaForCausalLMEagle3.load_weights` (python/sglang/srt/models/llama_eagle3.py); a leading `model.`
and trainer layouts with `layers.0.` for `midlayer.` are accepted.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from herd.models.eagle3_config import Eagle3Config, default_target_layer_ids
from herd.models.eagle3_drafter import Eagle3Drafter
from herd.models.eagle3_model import Eagle3DraftModel

__all__ = ["Eagle3Config", "Eagle3Drafter", "default_target_layer_ids", "load_eagle3_draft", "read_draft_tensors"]

logger = logging.getLogger(__name__)

_OPTIONAL = {"embed_tokens.weight", "d2t", "t2d", "lm_head.weight"}


def load_eagle3_draft(
    path: str | Path,
    target_text_config: Any,
    dtype: torch.dtype,
    device: torch.device | str,
    target_embedding: torch.Tensor | None = None,
) -> Eagle3Drafter:
    """Build the drafter for a target.

    target_text_config: herd's `ModelConfig`, a transformers text config, or its dict (hidden_size,
    vocab_size, num_hidden_layers / num_layers). target_embedding: the target's `embed_tokens` weight
    [vocab, H], used (not copied) when the draft ships none. Raises ValueError when the draft does not fit
    the target, naming both numbers.
    """
    cfg = Eagle3Config.from_hf(path)
    hidden, vocab, layers = _target_dims(target_text_config)
    if cfg.target_hidden_size != hidden:
        raise ValueError(f"draft hidden_size {cfg.target_hidden_size} does not match target hidden_size {hidden}")
    if cfg.vocab_size != vocab:
        raise ValueError(f"draft vocab_size {cfg.vocab_size} does not match target vocab_size {vocab}")
    if cfg.num_hidden_layers != 1:
        raise ValueError(f"draft has {cfg.num_hidden_layers} decoder layers; herd runs one-layer EAGLE-3 drafts")
    layer_ids = cfg.resolve_layer_ids(layers)
    tensors = read_draft_tensors(Path(path))
    with torch.device("meta"):  # no random init: every weight comes from the checkpoint or the target
        model = Eagle3DraftModel(cfg)
    _load(model, cfg, tensors, target_embedding, dtype, torch.device(device))
    logger.info(
        "EAGLE-3 draft %s: hidden %d, draft vocabulary %d of %d, target layers %s",
        path,
        cfg.hidden_size,
        cfg.draft_vocab_size,
        cfg.vocab_size,
        list(layer_ids),
    )
    return Eagle3Drafter(model, layer_ids)


def read_draft_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a draft folder, under its canonical name (`midlayer.*`, no `model.` prefix)."""
    files = sorted(path.glob("*.safetensors"))
    raw: dict[str, torch.Tensor] = {}
    if files:
        from safetensors.torch import load_file

        for f in files:
            raw.update(load_file(f))
    elif (path / "pytorch_model.bin").is_file():
        raw = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"no model.safetensors or pytorch_model.bin in {path}")
    return {_canonical(name): t for name, t in raw.items()}


def _canonical(name: str) -> str:
    name = name.removeprefix("model.")
    return "midlayer." + name.removeprefix("layers.0.") if name.startswith("layers.0.") else name


def _target_dims(target: Any) -> tuple[int, int, int]:
    """(hidden size, vocabulary, layers) of a herd ModelConfig, a transformers config, or a config dict."""
    if isinstance(target, dict):
        text = target.get("text_config", target)
        get = text.get
    else:
        text = getattr(target, "text_config", None) or target
        get = lambda key: getattr(text, key, None)  # noqa: E731
    layers = get("num_hidden_layers") or get("num_layers")
    hidden, vocab = get("hidden_size"), get("vocab_size")
    if not all(isinstance(v, int) for v in (hidden, vocab, layers)):
        raise ValueError("target config needs integer hidden_size, vocab_size and num_hidden_layers")
    return hidden, vocab, layers


def _load(
    model: Eagle3DraftModel,
    cfg: Eagle3Config,
    tensors: dict[str, torch.Tensor],
    embedding: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    expected = {name: p.shape for name, p in model.state_dict().items()}
    missing = sorted(set(expected) - set(tensors) - _OPTIONAL)
    if missing:
        raise ValueError(f"draft checkpoint lacks {', '.join(missing)}")
    unused = sorted(set(tensors) - set(expected) - _OPTIONAL)
    if unused:
        logger.warning("draft checkpoint tensors not used: %s", ", ".join(unused))
    if "embed_tokens.weight" not in tensors:
        if embedding is None:
            raise ValueError("the draft has no embed_tokens: pass the target's embedding (target_embedding)")
        tensors = {**tensors, "embed_tokens.weight": embedding}
    if "lm_head.weight" not in tensors:
        if not cfg.tie_word_embeddings:
            raise ValueError("draft checkpoint lacks lm_head.weight")
        tensors = {**tensors, "lm_head.weight": tensors["embed_tokens.weight"]}
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        if got != tuple(shape):
            what = "target embedding" if name == "embed_tokens.weight" and embedding is not None else name
            raise ValueError(f"draft {what} has shape {list(got)}, expected {list(shape)} from its config")
    # assign=True: the target's embedding is used as it is (no copy when dtype and device already agree).
    model.load_state_dict({name: tensors[name].to(device=device, dtype=dtype) for name in expected}, assign=True)
    model.requires_grad_(False)
    model.draft_to_target = _draft_to_target(cfg, tensors.get("d2t")).to(device)


def _draft_to_target(cfg: Eagle3Config, d2t: torch.Tensor | None) -> torch.Tensor:
    ids = torch.arange(cfg.draft_vocab_size)
    if d2t is None:
        if cfg.draft_vocab_size != cfg.vocab_size:
            raise ValueError(
                f"draft_vocab_size {cfg.draft_vocab_size} differs from vocab_size {cfg.vocab_size} but there is no d2t"
            )
        return ids
    if tuple(d2t.shape) != (cfg.draft_vocab_size,):
        raise ValueError(f"d2t has shape {list(d2t.shape)}, expected [{cfg.draft_vocab_size}]")
    target = ids + d2t.long()
    if int(target.min()) < 0 or int(target.max()) >= cfg.vocab_size:
        raise ValueError(f"d2t maps draft ids outside the target vocabulary of {cfg.vocab_size}")
    return target
