"""Train an EAGLE-3 draft for the demo model on its own data, on CPU (issue 22).

    PYTHONPATH=scripts .venv/bin/python -m demo.train_eagle3 --data /tmp/herd-demo/e3 --out herd/demo/draft

1. Features: the demo model (transformers, float32) reads each training dialog once; forward hooks keep the
   outputs of target layers `LAYER_IDS` (before the final norm) and the model's greedy choice at every position.
2. Draft vocabulary: the `--draft-vocab-size` target ids the model most often chooses in answers (d2t / t2d).
3. Training, EAGLE-3 style with the training-time test (SpecForge's TTT): step 0 sees the target's features;
   step k > 0 sees, at the same index, the draft's own output of step k - 1 one position further on, with the
   target's greedy token as input, attending to step-0 keys up to its index and to its own earlier steps' keys
   at that index, exactly what the draft sees when drafting k tokens ahead. Labels are the target's greedy
   tokens (what verification accepts), on answer tokens only (the draft runs only while answering).
4. Output in the published layout (SGLang/SpecForge): config.json + model.safetensors (bfloat16) with fc,
   midlayer.*, norm, lm_head, d2t, t2d and no embed_tokens: the draft shares the demo model's embedding.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from herd.models.eagle3_config import Eagle3Config
from herd.models.eagle3_model import Eagle3DraftModel

from demo.train import IGNORE, encode_record, image_tile, load_reference, read_jsonl, use_routed_experts

logger = logging.getLogger(__name__)

# Low, middle and last of the demo model's 5 layers (SGLang's default would pick layer 1 three times).
LAYER_IDS = (0, 2, 4)
TTT_STEPS = 3  # the draft proposes 3 tokens a round (--speculative-num-steps 3)
STEP_WEIGHT = 0.8  # SpecForge weighs TTT step k's loss by 0.8 ** k


@dataclasses.dataclass
class Sample:
    ids: torch.Tensor  # [T] the dialog's tokens
    aux: torch.Tensor  # [T, 3H] bfloat16: target layers' outputs
    greedy: torch.Tensor  # [T] the target's argmax at each position (its guess of the next token)
    answer: torch.Tensor  # [T] bool: the token is part of an assistant answer


def per_tile(model: Any) -> int:
    vision = model.config.vision_config
    return int((vision.image_size // vision.patch_size) ** 2 * vision.pixel_shuffle_ratio**2)


@torch.inference_mode()
def capture(
    model: Any, dialogs: Sequence[tuple[Sequence[int], dict[str, Any] | None]], layer_ids: Sequence[int] = LAYER_IDS
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(aux [T, 3H] float32, greedy [T]) per dialog (ids, picture), from one right-padded forward of the target."""
    layers = model.language_model.model.layers
    kept: dict[int, torch.Tensor] = {}

    def hook(index: int) -> Any:
        def keep(_module: Any, _args: Any, out: Any) -> None:
            kept[index] = out[0] if isinstance(out, tuple) else out

        return keep

    width = max(len(ids) for ids, _ in dialogs)
    input_ids = torch.zeros((len(dialogs), width), dtype=torch.long)
    mask = torch.zeros((len(dialogs), width), dtype=torch.long)
    for row, (ids, _) in enumerate(dialogs):
        input_ids[row, : len(ids)] = torch.tensor(list(ids))
        mask[row, : len(ids)] = 1
    kwargs: dict[str, Any] = {}
    tiles = [image_tile(image, model.config.vision_config.image_size) for _, image in dialogs if image]
    if tiles:  # in prompt order, as the model consumes them
        kwargs["pixel_values"] = torch.cat(tiles)
    handles = [layers[i].register_forward_hook(hook(i)) for i in sorted(set(layer_ids))]
    try:
        logits = model(input_ids=input_ids, attention_mask=mask, **kwargs).logits
    finally:
        for h in handles:
            h.remove()
    aux = torch.cat([kept[i] for i in layer_ids], dim=-1).float()
    greedy = logits.argmax(-1)
    return [(aux[row, : len(ids)], greedy[row, : len(ids)]) for row, (ids, _) in enumerate(dialogs)]


def build_samples(
    records: Sequence[dict[str, Any]], model: Any, tokenizer: Tokenizer, max_len: int, batch_tokens: int = 4096
) -> list[Sample]:
    encoded = []
    for record in records:
        ids, labels = encode_record(record, tokenizer, per_tile(model))
        if len(ids) <= max_len:
            encoded.append((ids, labels, record.get("image")))
    encoded.sort(key=lambda e: len(e[0]))  # batches of similar length waste little on padding
    samples: list[Sample] = []
    start, i = time.perf_counter(), 0
    while i < len(encoded):
        n = max(1, batch_tokens // len(encoded[min(i + 15, len(encoded) - 1)][0]))
        group = encoded[i : i + min(n, 16)]
        i += len(group)
        for (ids, labels, _), (aux, greedy) in zip(group, capture(model, [(e[0], e[2]) for e in group]), strict=True):
            answer = torch.tensor(labels) != IGNORE
            samples.append(Sample(torch.tensor(ids), aux.to(torch.bfloat16), greedy, answer))
        if len(samples) // 16 % 20 == 0 or i == len(encoded):
            logger.info("features: %d / %d dialogs, %.0f s", i, len(encoded), time.perf_counter() - start)
    return samples


def choose_vocab(samples: Sequence[Sample], size: int, vocab: int) -> torch.Tensor:
    """The `size` target ids the model chooses most often in answers, sorted (the draft's vocabulary)."""
    counts: Counter[int] = Counter()
    for s in samples:
        counts.update(s.greedy[:-1][s.answer[1:]].tolist())  # choices of answer tokens
    ranked = [t for t, _ in counts.most_common()] + [t for t in range(vocab) if t not in counts]
    hot = torch.tensor(sorted(ranked[:size]))
    covered = sum(counts[t] for t in hot.tolist()) / max(1, sum(counts.values()))
    logger.info("draft vocabulary: %d of %d ids cover %.2f%% of answer tokens", size, vocab, 100 * covered)
    return hot


def draft_config(target: Any, draft_vocab_size: int, intermediate_size: int) -> dict[str, Any]:
    t = target.config.text_config
    return {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": t.hidden_size,
        "intermediate_size": intermediate_size,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "head_dim": t.head_dim,
        "num_hidden_layers": 1,
        "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vocab_size": t.vocab_size,
        "draft_vocab_size": draft_vocab_size,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(LAYER_IDS), "use_aux_hidden_state": True},
    }


def init_draft(config: dict[str, Any], target: Any, hot: torch.Tensor, seed: int) -> Eagle3DraftModel:
    """Random layer; embedding (frozen), head rows and final norm from the target, so the draft's output
    starts in the target's hidden space."""
    torch.manual_seed(seed)
    model = Eagle3DraftModel(Eagle3Config.from_dict(config))
    lm = target.language_model
    with torch.no_grad():
        model.embed_tokens.weight.copy_(lm.model.embed_tokens.weight)
        model.lm_head.weight.copy_(lm.lm_head.weight[hot])
        model.norm.weight.copy_(lm.model.norm.weight)
        # The layer starts near the identity on its residual stream.
        model.midlayer.self_attn.o_proj.weight.mul_(0.1)
        model.midlayer.mlp.down_proj.weight.mul_(0.1)
    model.embed_tokens.weight.requires_grad_(False)
    model.draft_to_target = hot
    return model


def collate(batch: Sequence[Sample], draft_index: torch.Tensor) -> dict[str, torch.Tensor]:
    """Right-padded tensors; `label[b, k, i]` is TTT step k's target at index i in draft ids (-100: no loss)."""
    width = max(len(s.ids) for s in batch)
    n, hdim = len(batch), batch[0].aux.shape[-1]
    ids = torch.zeros((n, width), dtype=torch.long)
    greedy = torch.zeros((n, width), dtype=torch.long)
    aux = torch.zeros((n, width, hdim))
    labels = torch.full((n, TTT_STEPS, width), IGNORE, dtype=torch.long)
    for b, s in enumerate(batch):
        t = len(s.ids)
        ids[b, :t], greedy[b, :t], aux[b, :t] = s.ids, s.greedy, s.aux.float()
        for k in range(TTT_STEPS):
            # Step k at index i predicts the token at i + k + 2: the target's choice at i + k + 1.
            m = t - k - 2
            if m <= 0:
                continue
            target = draft_index[s.greedy[k + 1 : k + 1 + m]]
            keep = s.answer[k + 2 : k + 2 + m] & (target >= 0)
            labels[b, k, :m] = torch.where(keep, target, IGNORE)
    return {"ids": ids, "greedy": greedy, "aux": aux, "labels": labels}


def ttt_loss(model: Eagle3DraftModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[float]]:
    ids, greedy, labels = batch["ids"], batch["greedy"], batch["labels"]
    width = ids.shape[1]
    index = torch.arange(width)
    # Step 0's input at index i is the dialog's token i + 1; step k's is the target's choice at i + k.
    embeds = [model.embed_tokens(torch.roll(ids, -1, 1))] + [
        model.embed_tokens(torch.roll(greedy, -k, 1)) for k in range(1, TTT_STEPS)
    ]
    hidden = model.fc(batch["aux"])
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    total, accs = torch.zeros(()), []
    for k in range(TTT_STEPS):
        causal = index[None, :] <= index[:, None]  # [T, T] step-0 keys
        diag = torch.eye(width, dtype=torch.bool)
        mask = torch.cat([causal] + [diag] * k, dim=1)  # earlier steps' keys at the same index, and its own
        out, key, value = model.layer(
            embeds[k],
            hidden,
            index + k,
            torch.cat(keys, 1) if keys else hidden.new_zeros((ids.shape[0], 0, *_kv_shape(model))),
            torch.cat(values, 1) if values else hidden.new_zeros((ids.shape[0], 0, *_kv_shape(model))),
            mask,
        )
        keys.append(key)
        values.append(value)
        logits = model.logits(out)
        loss = F.cross_entropy(logits.flatten(0, 1), labels[:, k].flatten(), ignore_index=IGNORE)
        total = total + STEP_WEIGHT**k * loss
        valid = labels[:, k] != IGNORE
        accs.append(float((logits.argmax(-1) == labels[:, k])[valid].float().mean()) if valid.any() else 0.0)
        hidden = out
    return total, accs


def _kv_shape(model: Eagle3DraftModel) -> tuple[int, int]:
    return model.config.num_kv_heads, model.config.head_dim


def batches(samples: Sequence[Sample], tokens_per_batch: int, rng: random.Random) -> list[list[Sample]]:
    """Batches of similar length, about tokens_per_batch padded tokens each, in random order."""
    order = sorted(samples, key=lambda s: len(s.ids) + rng.random())
    out: list[list[Sample]] = []
    current: list[Sample] = []
    for s in order:
        if current and len(s.ids) * (len(current) + 1) > tokens_per_batch:
            out.append(current)
            current = []
        current.append(s)
    if current:
        out.append(current)
    rng.shuffle(out)
    return out


def train(model: Eagle3DraftModel, samples: Sequence[Sample], args: argparse.Namespace) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(args.seed)
    draft_index = torch.full((model.config.vocab_size,), -1, dtype=torch.long)
    draft_index[model.draft_to_target] = torch.arange(model.config.draft_vocab_size)
    plan = [b for _ in range(args.epochs) for b in batches(samples, args.batch_tokens, rng)]
    start, step = time.perf_counter(), 0
    for step, batch in enumerate(plan, 1):
        # Cosine decay to zero by the end of the plan or of the time budget, whichever comes first.
        done = max(step / len(plan), (time.perf_counter() - start) / args.max_seconds if args.max_seconds else 0.0)
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
        for group in opt.param_groups:
            group["lr"] = lr
        loss, accs = ttt_loss(model, collate(batch, draft_index))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        elapsed = time.perf_counter() - start
        if step % 50 == 0 or step == len(plan):
            acc = " ".join(f"{a:.3f}" for a in accs)
            logger.info("step %d/%d loss %.3f acc %s lr %.1e %.0f s", step, len(plan), loss.item(), acc, lr, elapsed)
        if args.max_seconds and elapsed > args.max_seconds:
            logger.info("time budget reached at step %d of %d", step, len(plan))
            break


def save(model: Eagle3DraftModel, config: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {
        name: t.detach().to(torch.bfloat16).contiguous()
        for name, t in model.state_dict().items()
        if name != "embed_tokens.weight"
    }
    hot = model.draft_to_target
    tensors["d2t"] = hot - torch.arange(len(hot))  # published d2t holds offsets
    t2d = torch.zeros(config["vocab_size"], dtype=torch.bool)
    t2d[hot] = True
    tensors["t2d"] = t2d
    save_file(tensors, str(out / "model.safetensors"))


def main() -> None:
    from herd.demo import MODEL_PATH

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with train.jsonl (scripts/make_demo_data.py)")
    parser.add_argument("--model", type=Path, default=MODEL_PATH)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dialogs", type=int, default=4000, help="training dialogs to read (a seeded sample)")
    parser.add_argument("--max-len", type=int, default=700)
    parser.add_argument("--draft-vocab-size", type=int, default=1024)
    parser.add_argument("--intermediate-size", type=int, default=768)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-seconds", type=float, default=0.0, help="stop training after this long (0: no limit)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, help="start from this saved draft (its vocabulary too)")
    parser.add_argument(
        "--features",
        type=Path,
        nargs="*",
        default=[],
        help="caches of target features: read if all present, else the first is written",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    target = load_reference(args.model).eval()
    use_routed_experts(target)  # same numbers, a quarter of the MoE work
    tokenizer = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    start = time.perf_counter()
    if args.features and all(f.is_file() for f in args.features):
        samples = [Sample(**s) for f in args.features for s in torch.load(f)]
    else:
        records = read_jsonl(args.data / "train.jsonl", limit=args.dialogs, seed=args.seed)
        samples = build_samples(records, target, tokenizer, args.max_len)
        if args.features:
            torch.save([dataclasses.asdict(s) for s in samples], args.features[0])
    tokens = sum(len(s.ids) for s in samples)
    logger.info("features of %d dialogs (%d tokens) in %.0f s", len(samples), tokens, time.perf_counter() - start)
    vocab = target.config.text_config.vocab_size
    if args.init:
        config = json.loads((args.init / "config.json").read_text())
        saved = load_file(str(args.init / "model.safetensors"))
        hot = torch.arange(config["draft_vocab_size"]) + saved.pop("d2t")
        model = init_draft(config, target, hot, args.seed)
        model.load_state_dict({k: v.float() for k, v in saved.items() if k != "t2d"}, strict=False)
    else:
        hot = choose_vocab(samples, args.draft_vocab_size, vocab)
        config = draft_config(target, args.draft_vocab_size, args.intermediate_size)
        model = init_draft(config, target, hot, args.seed)
    del target
    train(model, samples, args)
    save(model, config, args.out)
    logger.info("saved %s in %.0f s in all", args.out, time.perf_counter() - start)


if __name__ == "__main__":
    main()
