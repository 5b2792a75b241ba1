"""The demo model's trainer (demo.train): assistant-only labels, single-tile image prompts, a loss that
falls on a repeated batch, and a bfloat16 checkpoint that transformers reloads and generates with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer

from demo import data
from demo import train as demo_train
from demo.tokenizer import save_tokenizer, train_tokenizer, training_texts
from demo.train import (
    FULL,
    IGNORE,
    TINY,
    BatchPlan,
    TrainArgs,
    build_model,
    collate,
    encode_record,
    encode_records,
    image_prompt,
    image_tile,
    load_model,
    model_size,
    prompt_labels,
    save,
    train,
    use_routed_experts,
)

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    return data.generate("train", dict.fromkeys(data.TASKS, 4), seed=0)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory, records: list[dict[str, Any]]) -> Path:
    more = data.generate("train", dict.fromkeys(data.TASKS, 30), seed=1)
    return save_tokenizer(train_tokenizer(training_texts(more), vocab_size=600), tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tokenizer(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tok_dir / "tokenizer.json"))


def _first(records: list[dict[str, Any]], task: str) -> dict[str, Any]:
    return next(r for r in records if r["task"] == task)


def test_labels_cover_exactly_the_assistant_turns(records: list[dict[str, Any]], tokenizer: Tokenizer) -> None:
    for task in ("arithmetic", "multiturn", "tool_answer", "image"):
        record = _first(records, task)
        ids, labels = encode_record(record, tokenizer, TINY.patches_per_tile)
        assert len(ids) == len(labels)
        # The labelled spans, decoded, are the assistant turns with their end token, in order.
        spans: list[list[int]] = []
        for i, label in enumerate(labels):
            if label == IGNORE:
                continue
            assert label == ids[i]
            if i == 0 or labels[i - 1] == IGNORE:
                spans.append([])
            spans[-1].append(label)
        turns = [m for m in record["messages"] if m["role"] == "assistant"]
        assert len(spans) == len(turns)
        for span, turn in zip(spans, turns, strict=True):
            text = tokenizer.decode(span, skip_special_tokens=False)
            end = "<|eom|>" if turn.get("tool_calls") else "<|eot|>"
            assert text.endswith(end)
            if turn.get("content"):
                assert text == turn["content"] + end
        # Headers, user text and tool results are never trained on.
        for token in ("<|header_start|>", "<|header_end|>", "<|begin_of_text|>", "<|patch|>"):
            assert tokenizer.token_to_id(token) not in [label for label in labels if label != IGNORE]


def test_prompt_loss_covers_every_token_but_the_image(records: list[dict[str, Any]], tokenizer: Tokenizer) -> None:
    record = _first(records, "image")
    ids, labels = encode_record(record, tokenizer, TINY.patches_per_tile)
    everything = prompt_labels(ids, labels, tokenizer)
    patch = tokenizer.token_to_id("<|patch|>")
    assert everything == [IGNORE if t == patch else t for t in ids]
    assert [e.labels for e in encode_records([record], tokenizer, TINY, 2048, prompt_loss=True)] == [everything]


def test_encoding_in_worker_processes_gives_the_same_examples(
    records: list[dict[str, Any]], tokenizer: Tokenizer
) -> None:
    alone = encode_records(records, tokenizer, TINY, max_len=2048, prompt_loss=True)
    shared = encode_records(records, tokenizer, TINY, max_len=2048, prompt_loss=True, workers=3)
    assert shared == alone
    assert [e.task for e in alone] == [r["task"] for r in records]


def test_model_size_overrides_name_the_fields() -> None:
    size = model_size(["num_layers=5", "patch_size=4"])
    assert (size.num_layers, size.patch_size, size.hidden_size) == (5, 4, 256)
    with pytest.raises(ValueError, match="num_layers"):
        model_size(["layers=5"])
    with pytest.raises(ValueError, match="INTEGER"):
        model_size(["num_layers=five"])


def test_batch_plan_takes_every_example_once_an_epoch(records: list[dict[str, Any]], tokenizer: Tokenizer) -> None:
    examples = encode_records(records, tokenizer, TINY, max_len=2048)
    plan = BatchPlan(examples, batch_size=3, seed=0, steps=100, pad_id=0, tile_size=TINY.tile_size)
    for number in (0, 1):
        batches = plan.epoch(number)
        assert sorted(i for batch in batches for i in batch) == list(range(len(examples)))
        assert len(batches) == -(-len(examples) // 3)
    assert plan.epoch(0) != plan.epoch(1)
    # Step i of the second epoch is that epoch's batch i, collated.
    first = plan[len(plan.epoch(0))]
    wanted = collate([examples[i] for i in plan.epoch(1)[0]], 0, TINY.tile_size)
    assert all(torch.equal(first[k], wanted[k]) for k in wanted)


def test_image_prompt_has_one_tile_of_patch_tokens(records: list[dict[str, Any]], tokenizer: Tokenizer) -> None:
    record = _first(records, "image")
    ids, _ = encode_record(record, tokenizer, TINY.patches_per_tile)
    patch, image = tokenizer.token_to_id("<|patch|>"), tokenizer.token_to_id("<|image|>")
    assert TINY.patches_per_tile == (32 // 8) ** 2 // 4 == 4
    assert ids.count(patch) == TINY.patches_per_tile and ids.count(image) == 1
    expected = tokenizer.encode(image_prompt(TINY.patches_per_tile), add_special_tokens=False).ids
    start = ids.index(tokenizer.token_to_id("<|image_start|>"))
    assert ids[start : start + len(expected)] == expected
    tile = image_tile(record["image"], TINY.tile_size)
    assert tile.shape == (1, 3, TINY.tile_size, TINY.tile_size)
    assert tile.min() >= -1.0 and tile.max() <= 1.0


def test_trains_and_checkpoint_reloads(
    records: list[dict[str, Any]], tok_dir: Path, tokenizer: Tokenizer, tmp_path: Path
) -> None:
    from transformers import Llama4ForConditionalGeneration

    pad = tokenizer.token_to_id("<|finetune_right_pad|>")
    examples = encode_records(records, tokenizer, TINY, max_len=2048)
    # A fixed batch with an image and a dialog longer than the attention chunk, so every path is trained.
    batch = [e for e in examples if e.image is not None][:2] + sorted(examples, key=lambda e: -len(e.input_ids))[:2]
    assert max(len(e.input_ids) for e in batch) > TINY.attention_chunk_size
    model = build_model(TINY, tokenizer, seed=0)
    args = TrainArgs(max_steps=12, batch_size=4, lr=1e-2, warmup_steps=1, log_every=4, threads=2)
    losses = train(model, examples, args, pad, TINY.tile_size, fixed_batch=batch)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses

    # Same seed, same losses: training is reproducible, also when stopped early on the same 12-step schedule
    # (a 5-step schedule would decay the learning rate sooner and change the later losses).
    again = train(build_model(TINY, tokenizer, seed=0), examples, TrainArgs(**{**vars(args), "stop_after": 5}), pad,
                  TINY.tile_size, fixed_batch=batch)  # fmt: skip
    assert again == pytest.approx(losses[:5], rel=1e-4)
    with pytest.raises(ValueError, match="--stop-after"):
        train(model, examples, TrainArgs(**{**vars(args), "stop_after": 0}), pad, TINY.tile_size, fixed_batch=batch)

    out = save(model, tmp_path / "model", tok_dir)
    assert {p.name for p in out.iterdir()} >= {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["temperature"], generation["top_p"]) == (0.6, 0.9)
    assert tokenizer.token_to_id("<|eot|>") in generation["eos_token_id"]

    loaded = Llama4ForConditionalGeneration.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    further = load_model(out, TINY)  # to train further
    assert further.dtype == torch.float32
    assert not further.use_kernels  # transformers' own layers, not Hub kernels fetched on a GPU
    with pytest.raises(ValueError, match="--size"):
        load_model(out, FULL)  # FULL cuts pictures into other patches than this model's
    inputs = collate(batch[:1], pad, TINY.tile_size)
    with torch.no_grad():
        reference = model(**inputs).loss
        reloaded = loaded.float()(**inputs).loss
    assert reloaded.item() == pytest.approx(reference.item(), rel=0.05)  # bfloat16 rounding only
    prompt = inputs["input_ids"][:, :8]
    generated = loaded.generate(input_ids=prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > prompt.shape[1]


def test_time_budget_fixes_the_step_count_at_the_end_of_warmup(
    records: list[dict[str, Any]], tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = iter(range(10**6))  # a fake clock: each reading is one second after the last, one reading a step
    monkeypatch.setattr(demo_train, "perf_counter", lambda: float(next(clock)))
    pad = tokenizer.token_to_id("<|finetune_right_pad|>")
    examples = encode_records(records, tokenizer, TINY, max_len=2048)
    args = TrainArgs(max_steps=1000, batch_size=4, lr=1e-3, warmup_steps=30, log_every=10, max_seconds=45.0)
    losses = train(build_model(TINY, tokenizer, seed=0), examples, args, pad, TINY.tile_size, fixed_batch=examples[:2])
    # 30 warmup steps take 30 s at 1 s a step, so 15 more fit in 45 s, and the schedule ends there.
    assert len(losses) == 45
    # A budget larger than max_steps needs: max_steps still caps the run.
    clock = iter(range(10**6))
    capped = TrainArgs(**{**vars(args), "max_steps": 40})
    assert len(train(build_model(TINY, tokenizer, seed=0), examples, capped, pad, TINY.tile_size, examples[:2])) == 40


def test_routed_experts_match_transformers_dense_moe(tokenizer: Tokenizer) -> None:
    """The trainer's MoE shortcut gives transformers' numbers: same loss, same gradients."""
    reference, routed = build_model(TINY, tokenizer, seed=0), build_model(TINY, tokenizer, seed=0)
    use_routed_experts(routed)
    torch.manual_seed(1)
    ids = torch.randint(0, tokenizer.get_vocab_size(), (2, 40))
    losses = []
    for model in (reference, routed):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-5)
    for (name, a), (_, b) in zip(reference.named_parameters(), routed.named_parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
