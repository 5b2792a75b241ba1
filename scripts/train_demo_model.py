"""Train the tiny demo Llama 4 (issue 7) with transformers on the demo data; save it in Hugging Face layout.

    .venv/bin/python scripts/make_demo_data.py --out /tmp/herd-demo/data
    .venv/bin/python scripts/make_demo_tokenizer.py --data /tmp/herd-demo/data --out /tmp/herd-demo/tokenizer
    .venv/bin/python scripts/train_demo_model.py --data /tmp/herd-demo/data --tokenizer /tmp/herd-demo/tokenizer \\
        --out /tmp/herd-demo/model --threads 2

On a GPU: `--device cuda --batch-size 64 --loader-workers 3`; `--max-seconds S` trains for as many steps as fit
in S seconds, a count fixed at the end of warmup and logged; to repeat the run, pass it as --max-steps and, if
the budget ran out before the schedule's end, the step it stopped at as --stop-after (also logged).
`--size patch_size=4` changes one of demo.train.ModelSize's fields. Smoke run: add `--max-steps 5
--limit 200`. The logic lives in scripts/demo/train.py.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tokenizers import Tokenizer

from demo.train import (
    TrainArgs,
    answer_accuracy,
    build_model,
    encode_records,
    load_model,
    model_size,
    parameter_count,
    read_jsonl,
    save,
    train,
    use_routed_experts,
)


def main() -> None:
    defaults = TrainArgs()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("/tmp/herd-demo/data"), help="folder with train.jsonl")
    parser.add_argument("--tokenizer", type=Path, default=Path("/tmp/herd-demo/tokenizer"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/herd-demo/model"))
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--max-len", type=int, default=defaults.max_len, help="drop longer dialogs")
    parser.add_argument("--log-every", type=int, default=defaults.log_every)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--answers-only", action="store_true", help="loss on the assistant turns only")
    parser.add_argument("--limit", type=int, default=None, help="train on a seeded sample of this many records")
    parser.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--loader-workers", type=int, default=defaults.loader_workers)
    parser.add_argument("--encode-workers", type=int, default=1, help="processes tokenizing the dialogs")
    parser.add_argument("--max-seconds", type=float, default=None, help="time budget (--max-steps is then a cap)")
    parser.add_argument(
        "--stop-after", type=int, default=None, help="stop after this many steps of the --max-steps schedule"
    )
    parser.add_argument("--size", nargs="*", default=[], metavar="NAME=VALUE", help="ModelSize fields to change")
    parser.add_argument("--init", type=Path, default=None, help="train this saved model further (not fresh weights)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        size = model_size(args.size)
    except ValueError as e:
        parser.error(str(e))
    tokenizer = Tokenizer.from_file(str(args.tokenizer / "tokenizer.json"))
    records = read_jsonl(args.data / "train.jsonl", args.limit, args.seed)
    examples = encode_records(
        records, tokenizer, size, args.max_len, prompt_loss=not args.answers_only, workers=args.encode_workers
    )
    lengths = sorted(len(e.input_ids) for e in examples)
    logging.info(
        "%d dialogs, %d tokens (median %d, max %d), %d with labels on tokens past the %d-token chunk",
        len(examples),
        sum(lengths),
        lengths[len(lengths) // 2],
        lengths[-1],
        sum(n > size.attention_chunk_size for n in lengths),
        size.attention_chunk_size,
    )
    model = build_model(size, tokenizer, args.seed) if args.init is None else load_model(args.init, size)
    if args.device == "cpu":
        use_routed_experts(model)  # on a GPU the dense form needs no host sync to find each expert's tokens
    n = parameter_count(model)
    logging.info("parameters: %d (%.1f M, %.1f MB in bfloat16)", n, n / 1e6, 2 * n / 1e6)
    train_args = TrainArgs(
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=min(args.warmup_steps, max(1, args.max_steps // 10)),
        seed=args.seed,
        max_len=args.max_len,
        log_every=args.log_every,
        threads=args.threads,
        device=args.device,
        loader_workers=args.loader_workers,
        max_seconds=args.max_seconds,
        stop_after=args.stop_after,
    )
    pad_id = tokenizer.token_to_id("<|finetune_right_pad|>")
    train(model, examples, train_args, pad_id, size.tile_size)
    heldout = args.data / "heldout.jsonl"
    if heldout.exists():
        held = encode_records(read_jsonl(heldout), tokenizer, size, args.max_len)
        scores = answer_accuracy(model, held, pad_id, size.tile_size)
        logging.info("held-out answers, teacher-forced: %s", ", ".join(f"{t} {r}/{n}" for t, (r, n) in scores.items()))
    save(model, args.out, args.tokenizer)


if __name__ == "__main__":
    main()
