"""Train the tiny demo Llama 4 (issue 7) with `transformers`, the numerical reference, on CPU.

The model is a `Llama4ForConditionalGeneration` small enough to train on two cores, yet with every Llama 4
feature live, so that herd's engine is exercised on all of them when it serves this checkpoint:
chunked local attention (chunk smaller than the tool dialogs, so training crosses chunk boundaries), a
global NoPE layer with attention temperature tuning (a small floor_scale, so the scale actually changes
within our sequence lengths), qk-norm, llama3 rope scaling, a MoE with a shared expert in every layer, and a
vision tower with pixel shuffle and projector fed Llama 4 image tiles.

Images are kept to one tile: a picture is rendered at exactly the tile size, so Llama4ImageProcessor's
resize/pad are identities and its output is one (3, tile, tile) tile normalized with mean = std = 0.5; the
prompt then carries `<|image_start|><|image|>` + N x `<|patch|>` + `<|image_end|>` (no tile separators for
a single tile), N the tokens per tile after pixel shuffle.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import json
import logging
import math
import multiprocessing
import random
import shutil
import types
from collections.abc import Sequence
from pathlib import Path
from time import perf_counter
from typing import Any

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from herd.frontend.chat.llama4 import Llama4ChatTemplate

from demo import images

logger = logging.getLogger(__name__)

IGNORE = -100
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """The knobs that set the model's size; the rest of the config is fixed Llama 4 structure."""

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    expert_size: int = 384  # intermediate size of each routed expert and of the shared expert
    num_experts: int = 4
    attention_chunk_size: int = 128  # tool dialogs are 200-500 tokens, so they cross chunk boundaries
    floor_scale: int = 32  # NoPE temperature tuning steps every 32 positions instead of every 8192
    tile_size: int = 64
    patch_size: int = 8
    vision_hidden_size: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    max_position_embeddings: int = 8192
    nope_interval: int = 4  # every nope_interval-th layer is a global NoPE layer (Llama 4: every 4th)

    @property
    def patches_per_tile(self) -> int:
        """Image tokens per tile: (tile/patch)^2 patches, 4 to a token after pixel shuffle (ratio 0.5)."""
        return (self.tile_size // self.patch_size) ** 2 // 4


FULL = ModelSize()
TINY = ModelSize(
    hidden_size=64,
    num_layers=4,
    num_heads=2,
    num_kv_heads=1,
    expert_size=64,
    attention_chunk_size=32,
    floor_scale=8,
    tile_size=32,
    patch_size=8,
    vision_hidden_size=32,
    vision_layers=1,
    vision_heads=2,
)


def model_size(overrides: Sequence[str]) -> ModelSize:
    """FULL with some fields changed, from NAME=INTEGER strings (the scripts' --size)."""
    fields = {f.name for f in dataclasses.fields(ModelSize)}
    changes = {}
    for item in overrides:
        name, _, value = item.partition("=")
        if name not in fields or not value.isdigit():
            raise ValueError(f"--size takes NAME=INTEGER with NAME one of {sorted(fields)}; got {item!r}")
        changes[name] = int(value)
    return dataclasses.replace(FULL, **changes)


def build_config(size: ModelSize, tokenizer: Tokenizer) -> Any:
    from transformers import Llama4Config

    def tid(token: str) -> int:
        i = tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(f"tokenizer has no {token}")
        return i

    eos = [tid("<|end_of_text|>"), tid("<|eom|>"), tid("<|eot|>")]
    head_dim = size.hidden_size // size.num_heads
    # Every 4th layer (index 3, 7, ...) is a global NoPE layer, the rest chunked rope layers, as in Llama 4;
    # with 4 layers that is exactly one NoPE layer, the last.
    no_rope_layers = [int((i + 1) % size.nope_interval != 0) for i in range(size.num_layers)]
    text = {
        "vocab_size": tokenizer.get_vocab_size(),
        "hidden_size": size.hidden_size,
        "intermediate_size": size.expert_size,
        "intermediate_size_mlp": size.expert_size * 2,  # dense-layer MLP; unused since every layer is MoE
        "num_hidden_layers": size.num_layers,
        "num_attention_heads": size.num_heads,
        "num_key_value_heads": size.num_kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": size.max_position_embeddings,
        "bos_token_id": tid("<|begin_of_text|>"),
        "eos_token_id": eos,
        "pad_token_id": tid("<|finetune_right_pad|>"),
        "num_local_experts": size.num_experts,
        "num_experts_per_tok": 1,
        "interleave_moe_layer_step": 1,  # MoE (routed + shared expert) in every layer
        "use_qk_norm": True,
        "no_rope_layers": no_rope_layers,
        "attention_chunk_size": size.attention_chunk_size,
        "attn_temperature_tuning": True,
        "floor_scale": size.floor_scale,
        "attn_scale": 0.1,
        # llama3 scaling with a small original context (1024): with theta 500k, frequencies whose wavelength
        # passes 256 tokens are smoothed or divided by 8, so the scaling shapes positions we train on.
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024,
        },
        "tie_word_embeddings": False,
    }
    vh = size.vision_hidden_size
    vision = {
        "hidden_size": vh,
        "num_hidden_layers": size.vision_layers,
        "num_attention_heads": size.vision_heads,
        # Pixel shuffle (ratio 0.5) turns vh channels into 4*vh, which the adapter's fc1 takes as input.
        "intermediate_size": 4 * vh,
        "image_size": size.tile_size,
        "patch_size": size.patch_size,
        "pixel_shuffle_ratio": 0.5,
        "projector_input_dim": 2 * vh,
        "projector_output_dim": 2 * vh,
        "vision_output_dim": 2 * vh,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }
    return Llama4Config(
        text_config=text,
        vision_config=vision,
        boi_token_index=tid("<|image_start|>"),
        eoi_token_index=tid("<|image_end|>"),
        image_token_index=tid("<|patch|>"),  # the features replace the <|patch|> embeddings
        tie_word_embeddings=False,
    )


def image_tile(spec: dict[str, Any], tile_size: int) -> torch.Tensor:
    """Llama4ImageProcessor's output for a one-tile picture: (1, 3, tile, tile), (x/255 - 0.5) / 0.5.

    The processor rescales and normalizes in bfloat16 (as Meta's code does), so we round through bfloat16
    too: the model then trains on exactly the values the processor would give it at inference.
    """
    image = images.render(spec, size=tile_size)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(tile_size, tile_size, 3)
    x = pixels.permute(2, 0, 1).to(torch.bfloat16) * (1 / 255)
    x = (x - 0.5) / 0.5
    return x.float().unsqueeze(0)


def image_prompt(patches_per_tile: int) -> str:
    """What one single-tile image becomes in the prompt (Llama4Processor._prompt_split_image, 1x1 tiles)."""
    return "<|image_start|><|image|>" + "<|patch|>" * patches_per_tile + "<|image_end|>"


def encode_record(record: dict[str, Any], tokenizer: Tokenizer, patches_per_tile: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for a dialog: labels are the ids on assistant turns (answer + <|eot|>/<|eom|>) and
    IGNORE everywhere else (system, user, tool results, and the assistant header, which the server writes).

    The dialog is tokenized piece by piece at the turn boundaries, exactly as at inference, where the prompt
    (ending in the assistant header) is encoded alone and the answer's ids are appended to it.
    """
    template = Llama4ChatTemplate()
    messages, tools = record["messages"], record.get("tools")
    expansion = image_prompt(patches_per_tile)
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # the text encoded so far; every later render must extend it
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = template.render_text(messages[:i], tools=tools, add_generation_prompt=True)
        full = template.render_text(messages[: i + 1], tools=tools, add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError(f"chat template is not prefix-stable on record {record.get('key')}")
        context = prompt[len(done) :].replace("<|image|>", expansion)
        context_ids = tokenizer.encode(context, add_special_tokens=False).ids
        answer_ids = tokenizer.encode(full[len(prompt) :], add_special_tokens=False).ids
        ids += context_ids + answer_ids
        labels += [IGNORE] * len(context_ids) + answer_ids
        done = full
    return ids, labels


@dataclasses.dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    image: dict[str, Any] | None
    task: str | None = None


def prompt_labels(ids: list[int], labels: list[int], tokenizer: Tokenizer) -> list[int]:
    """Labels on every token but the image's: the system, user and tool text is trained on too.

    A model trained from scratch on answers alone sees too few tokens to learn to copy what the question
    says (operands, names, arguments): on a first run it answered in the right shapes with the wrong content.
    Predicting the prompts as well gives it many times the signal at the same compute.
    """
    patch = tokenizer.token_to_id("<|patch|>")
    return [IGNORE if (t == patch and label == IGNORE) else t for t, label in zip(ids, labels, strict=True)]


def _encode(
    records: Sequence[dict[str, Any]], tokenizer: Tokenizer, size: ModelSize, max_len: int, prompt_loss: bool
) -> list[Example]:
    out = []
    for record in records:
        ids, labels = encode_record(record, tokenizer, size.patches_per_tile)
        if prompt_loss:
            labels = prompt_labels(ids, labels, tokenizer)
        if len(ids) <= max_len:
            out.append(Example(ids, labels, record.get("image"), record.get("task")))
    return out


def encode_records(
    records: Sequence[dict[str, Any]],
    tokenizer: Tokenizer,
    size: ModelSize,
    max_len: int,
    prompt_loss: bool = False,
    workers: int = 1,
) -> list[Example]:
    """Examples of the records no longer than `max_len` tokens, in order; `workers` processes share the work."""
    if workers <= 1:
        out = _encode(records, tokenizer, size, max_len, prompt_loss)
    else:
        step = math.ceil(len(records) / workers)
        parts = [records[i : i + step] for i in range(0, len(records), step)]
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            done = pool.map(_encode, parts, *[itertools.repeat(x) for x in (tokenizer, size, max_len, prompt_loss)])
            out = [e for part in done for e in part]
    if len(out) < len(records):
        logger.warning("dropped %d records longer than %d tokens", len(records) - len(out), max_len)
    return out


def collate(batch: Sequence[Example], pad_id: int, tile_size: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, labels and attention mask; pixel_values for the batch's images, in prompt order."""
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
    tiles = [image_tile(e.image, tile_size) for e in batch if e.image is not None]
    if tiles:
        out["pixel_values"] = torch.cat(tiles)
    return out


class BatchPlan(torch.utils.data.Dataset):
    """Step i's collated batch: seeded epochs of batches of similar length (sorted within pools of 64 batches,
    to cut padding). Indexable by step, so DataLoader workers can collate (and render pictures) ahead."""

    def __init__(
        self,
        examples: Sequence[Example],
        batch_size: int,
        seed: int,
        steps: int,
        pad_id: int,
        tile_size: int,
        fixed_batch: Sequence[Example] | None = None,
    ) -> None:
        self.examples, self.batch_size, self.seed, self.steps = examples, batch_size, seed, steps
        self.pad_id, self.tile_size, self.fixed_batch = pad_id, tile_size, fixed_batch
        self._epoch: tuple[int, list[list[int]]] | None = None

    def __len__(self) -> int:
        return self.steps

    def epoch(self, number: int) -> list[list[int]]:
        """The batches (lists of example indices) of one epoch."""
        rng = random.Random(f"{self.seed}|{number}")
        order = list(range(len(self.examples)))
        rng.shuffle(order)
        pool = 64 * self.batch_size
        out: list[list[int]] = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start : start + pool], key=lambda i: len(self.examples[i].input_ids))
            out += [chunk[j : j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
        rng.shuffle(out)
        return out

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        if self.fixed_batch is not None:
            return collate(self.fixed_batch, self.pad_id, self.tile_size)
        per_epoch = math.ceil(len(self.examples) / self.batch_size)
        number, index = divmod(step, per_epoch)
        if self._epoch is None or self._epoch[0] != number:
            self._epoch = (number, self.epoch(number))
        batch = [self.examples[i] for i in self._epoch[1][index]]
        return collate(batch, self.pad_id, self.tile_size)


@dataclasses.dataclass
class TrainArgs:
    max_steps: int = 6000  # about one epoch of the demo data (~96k dialogs, ~6.1M tokens)
    batch_size: int = 16
    lr: float = 5e-4  # 2e-3 and 3e-3 never learn to copy from the prompt (a 300-step copy-task probe); 5e-4 does
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    max_len: int = 1152
    log_every: int = 50
    threads: int | None = None
    device: str = "cpu"
    loader_workers: int = 0  # processes collating batches ahead of the training step
    # With a time budget, max_steps is an upper bound: the step count is fixed at the end of warmup (where the
    # schedule starts depending on it) from the speed measured so far, and logged, so a run can be repeated.
    max_seconds: float | None = None
    # Stop after this many steps of the max_steps schedule: repeats a run that its time budget cut short.
    stop_after: int | None = None


# A time budget measures the speed from this step on: the first steps are slower (allocator, caches, workers).
SETTLE_STEPS = 10


def lr_at(step: int, args: TrainArgs) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _routed_experts_forward(self: Any, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama4TextMoe.forward, computing only the experts each token chose.

    transformers runs every expert on every token, with the input of an unchosen expert scaled by
    sigmoid(-inf) = 0; as the experts have no biases, an unchosen expert's output and its gradients are exactly
    zero, so skipping it changes no number and saves (E - k) / (E + 1) of the MoE work.
    """
    x = hidden_states.reshape(-1, self.hidden_dim)
    logits = torch.nn.functional.linear(x, self.router.weight)
    top_value, top_index = torch.topk(logits, self.top_k, dim=1)
    scores = torch.sigmoid(top_value.float()).to(x.dtype)
    experts = self.experts
    out = self.shared_expert(x)
    for e in range(self.num_experts):
        token, slot = torch.nonzero(top_index == e, as_tuple=True)
        if token.numel() == 0:
            continue
        routed = x[token] * scores[token, slot, None]
        gate, up = (routed @ experts.gate_up_proj[e]).chunk(2, dim=-1)
        out = out.index_add(0, token, (up * experts.act_fn(gate)) @ experts.down_proj[e])
    return out, logits


def use_routed_experts(model: Any) -> None:
    """Make every MoE layer of a transformers Llama 4 compute only the chosen experts (same numbers, less work)."""
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    for module in model.modules():
        if isinstance(module, Llama4TextMoe):
            module.forward = types.MethodType(_routed_experts_forward, module)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_model(size: ModelSize, tokenizer: Tokenizer, seed: int) -> Any:
    from transformers import Llama4ForConditionalGeneration

    seed_everything(seed)  # the initial weights depend on the seed only
    model = Llama4ForConditionalGeneration(build_config(size, tokenizer))
    return model.float()


def load_reference(path: Path) -> Any:
    """A saved demo model in float32 with transformers' own layers.

    use_kernels=False: on a GPU, from_pretrained otherwise swaps layers for Hub kernels, which needs the network
    and is not the reference code the demo model is trained and checked against.
    """
    from transformers import Llama4ForConditionalGeneration

    return Llama4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32, use_kernels=False)


def load_model(path: Path, size: ModelSize) -> Any:
    """A saved demo model in float32, to train further; its pictures must be cut as `size` cuts them."""
    model = load_reference(path)
    vision = model.config.vision_config
    if (vision.image_size, vision.patch_size) != (size.tile_size, size.patch_size):
        raise ValueError(
            f"{path} has {vision.image_size}-pixel tiles of {vision.patch_size}-pixel patches; the data is encoded "
            f"for {size.tile_size} and {size.patch_size}: pass the model's sizes with --size"
        )
    return model


def train(
    model: Any,
    examples: Sequence[Example],
    args: TrainArgs,
    pad_id: int,
    tile_size: int,
    fixed_batch: Sequence[Example] | None = None,
) -> list[float]:
    """Train in place; returns the loss of every step. `fixed_batch` repeats one batch (for tests)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_seconds is not None and args.warmup_steps < 30:
        raise ValueError("a time budget needs at least 30 warmup steps to measure the speed in")
    if args.stop_after is not None and args.stop_after < 1:
        raise ValueError(f"--stop-after takes a step count of at least 1; got {args.stop_after}")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 rounds far less than the bfloat16 checkpoint does
    seed_everything(args.seed)
    model.to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    plan = BatchPlan(examples, args.batch_size, args.seed, args.max_steps, pad_id, tile_size, fixed_batch)
    loader = torch.utils.data.DataLoader(
        plan,
        batch_size=None,
        num_workers=args.loader_workers,
        prefetch_factor=8 if args.loader_workers else None,
        pin_memory=device.type == "cuda",
    )
    schedule = args
    model.train()
    losses: list[torch.Tensor] = []
    tokens = 0
    start = perf_counter()
    calibrated_at = 0.0
    bar = tqdm(total=args.max_steps, desc="train", unit="step", dynamic_ncols=True, disable=None)
    for step, inputs in enumerate(loader):
        if step in (schedule.max_steps, args.stop_after):
            break
        tokens += int(inputs["attention_mask"].sum())  # counted on the host: no wait for the device
        inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, schedule)
        loss = model(**inputs).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.detach())
        bar.update()
        elapsed = perf_counter() - start
        if args.max_seconds is not None:
            if step == SETTLE_STEPS:
                calibrated_at = elapsed
            if step == args.warmup_steps - 1:
                per_step = (elapsed - calibrated_at) / (step - SETTLE_STEPS)
                steps = min(args.max_steps, step + 1 + int((args.max_seconds - elapsed) / per_step))
                schedule = dataclasses.replace(args, max_steps=steps)
                bar.total = steps
                logger.info("time budget %.0f s: %d steps (%.1f ms a step)", args.max_seconds, steps, 1e3 * per_step)
            elif elapsed > args.max_seconds:
                logger.warning(
                    "time budget spent at step %d of %d (to repeat this run: --max-steps %d --stop-after %d)",
                    step + 1,
                    schedule.max_steps,
                    schedule.max_steps,
                    step + 1,
                )
                break
        if (step + 1) % args.log_every == 0 or step + 1 == schedule.max_steps:
            recent = torch.stack(losses[-args.log_every :]).float()
            if not torch.isfinite(recent).all():
                raise FloatingPointError(f"loss is not finite by step {step}")
            bar.set_postfix(loss=f"{recent[-1].item():.3f}")
            logger.info(
                "step %d/%d loss %.4f (mean of last %d) lr %.2e %.0f tok/s",
                step + 1,
                schedule.max_steps,
                recent.mean().item(),
                len(recent),
                lr_at(step, schedule),
                tokens / elapsed,
            )
    bar.close()
    model.eval()
    values = torch.stack(losses).float().tolist()
    if not all(math.isfinite(v) for v in values):
        raise FloatingPointError("loss is not finite")
    return values


@torch.no_grad()
def answer_accuracy(
    model: Any, examples: Sequence[Example], pad_id: int, tile_size: int, batch_size: int = 64
) -> dict[str, tuple[int, int]]:
    """(right, total) per task: an example is right when every labelled token is the model's top choice given
    the reference before it (teacher forcing), a quick stand-in for greedy decoding's exact match."""
    device = next(model.parameters()).device
    counts: dict[str, list[int]] = {}
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        inputs = {k: v.to(device) for k, v in collate(batch, pad_id, tile_size).items()}
        labels = inputs.pop("labels")[:, 1:]
        predicted = model(**inputs).logits[:, :-1].argmax(-1)
        right = ((predicted == labels) | (labels == IGNORE)).all(dim=1).tolist()
        for example, ok in zip(batch, right, strict=True):
            row = counts.setdefault(example.task or "?", [0, 0])
            row[0] += ok
            row[1] += 1
    return {task: (row[0], row[1]) for task, row in sorted(counts.items())}


def save(model: Any, out: Path, tokenizer_dir: Path) -> Path:
    """bfloat16 safetensors + config.json + generation_config.json (Meta's sampling defaults) + tokenizer."""
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model.cpu()
    text = model.config.text_config
    model.generation_config = GenerationConfig(
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        pad_token_id=text.pad_token_id,
        do_sample=True,
        temperature=0.6,
        top_p=0.9,
    )
    # Cast a copy of the weights rather than the model: model.to(bfloat16) would also cast the vision rope's
    # complex frequency buffer to real, breaking the in-memory model.
    state = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}
    model.save_pretrained(out, state_dict=state)
    # save_pretrained records the dtype of the (float32) parameters; the file holds bfloat16, so say so, and
    # from_pretrained then loads bfloat16 by default.
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    for sub in (config, config.get("text_config") or {}, config.get("vision_config") or {}):
        if "dtype" in sub:
            sub["dtype"] = "bfloat16"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, out / name)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    logger.info("saved %s (%.1f MB of weights)", out, size / 1e6)
    return out


def read_jsonl(path: Path, limit: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The records of a .jsonl file; with `limit`, a seeded sample (the file is ordered by task)."""
    with path.open(encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return records if limit is None or limit >= len(records) else random.Random(seed).sample(records, limit)


def parameter_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())
