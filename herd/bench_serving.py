"""`python -m herd.bench_serving`: sglang.bench_serving's serving benchmark, against any OpenAI-compatible
server (herd's, SGLang's, vLLM's, `transformers serve`).

    python -m herd.bench_serving --backend sglang-oai-chat --base-url http://127.0.0.1:30000 \\
        --dataset-name random --random-input-len 256 --random-output-len 64 --num-prompts 100 \\
        --max-concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from herd.bench.args import build_parser
from herd.bench.backends import BACKENDS, Backend
from herd.bench.datasets import (
    DatasetRow,
    SharedPrefixSpec,
    load_sharegpt_pairs,
    sample_generated_shared_prefix,
    sample_random,
    sample_sharegpt,
    with_chat_template,
)
from herd.bench.images import ImageSpec, sample_image
from herd.bench.metrics import calculate_metrics
from herd.bench.probe import served_model_path, served_models
from herd.bench.report import RunInfo, append_jsonl, result_block, result_record
from herd.bench.request import RequestOptions
from herd.bench.runner import BenchmarkError, RunConfig, auth_headers, raise_open_file_limit, run_benchmark
from herd.bench.tokenizer import BenchTokenizer, TokenizerError, load_bench_tokenizer

logger = logging.getLogger("herd.bench_serving")


def _image_rows(args: argparse.Namespace, tok: BenchTokenizer, rng: np.random.Generator) -> list[DatasetRow]:
    spec = ImageSpec(args.image_count, args.image_resolution, args.image_format, args.image_content)
    lens = (args.random_input_len, args.random_output_len, args.random_range_ratio)
    return sample_image(tok, rng, args.num_prompts, *lens, spec)


def _sharegpt_rows(args: argparse.Namespace, tok: BenchTokenizer, rng: np.random.Generator) -> list[DatasetRow]:
    if not args.dataset_path:
        raise ValueError("the sharegpt dataset needs --dataset-path (a local ShareGPT json file)")
    pairs = load_sharegpt_pairs(args.dataset_path)
    lens = (args.sharegpt_output_len, args.sharegpt_context_len)
    return sample_sharegpt(tok, rng, pairs, args.num_prompts, *lens, args.prompt_suffix)


def _shared_prefix_rows(args: argparse.Namespace, tok: BenchTokenizer, rng: np.random.Generator) -> list[DatasetRow]:
    groups = (args.gsp_num_groups, args.gsp_prompts_per_group)
    lens = (args.gsp_system_prompt_len, args.gsp_question_len, args.gsp_output_len, args.gsp_range_ratio)
    return sample_generated_shared_prefix(tok, rng, SharedPrefixSpec(*groups, *lens))


def _random_rows(args: argparse.Namespace, tok: BenchTokenizer, rng: np.random.Generator) -> list[DatasetRow]:
    texts = [p for p, _ in load_sharegpt_pairs(args.dataset_path)] if args.dataset_path else []
    lens = (args.random_input_len, args.random_output_len, args.random_range_ratio)
    ids = args.dataset_name == "random-ids"
    return sample_random(tok, rng, args.num_prompts, *lens, random_ids=ids, source_texts=texts)


_DATASETS = {
    "image": _image_rows,
    "sharegpt": _sharegpt_rows,
    "generated-shared-prefix": _shared_prefix_rows,
    "random": _random_rows,
    "random-ids": _random_rows,
}


def build_dataset(args: argparse.Namespace, tok: BenchTokenizer, backend: Backend) -> list[DatasetRow]:
    """The requests of a run, from the dataset flags; the same seed gives the same requests."""
    if args.dataset_name == "image" and not backend.is_chat:
        raise ValueError(f"the image dataset needs a chat backend (e.g. sglang-oai-chat), not {backend.name}")
    rows = _DATASETS[args.dataset_name](args, tok, np.random.default_rng(args.seed))
    if not args.apply_chat_template or args.dataset_name == "image":
        return rows
    if backend.is_chat:
        logger.warning("--apply-chat-template ignored: a chat endpoint applies the template itself")
        return rows
    return with_chat_template(tok, rows)


def _base_url(args: argparse.Namespace, backend: Backend) -> str:
    if args.base_url:
        return args.base_url.rstrip("/")
    return f"http://{args.host}:{args.port or backend.default_port}"


def _tokenizer_source(args: argparse.Namespace, base_url: str) -> str:
    """--tokenizer, else the model if it is a local path, else the server's path if it is local here, else
    the model name (a hub name for transformers)."""
    if args.tokenizer:
        return args.tokenizer
    if Path(args.model).exists():
        return args.model
    path = served_model_path(base_url)
    if path and Path(path).exists():
        logger.info("tokenizer: %s (the server's /get_model_info)", path)
        return path
    return args.model


def _default_output_file(args: argparse.Namespace) -> str:
    stem = f"{args.backend}_{datetime.now():%m%d}_{args.num_prompts}"
    if args.dataset_name == "image":
        lens = f"{args.random_input_len}_{args.random_output_len}"
        return f"{stem}_{lens}_{args.image_count}imgs_{args.image_resolution}.jsonl"
    if args.dataset_name.startswith("random"):
        return f"{stem}_{args.random_input_len}_{args.random_output_len}.jsonl"
    return f"{stem}_{args.dataset_name}.jsonl"


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("tag", "backend", "dataset_name", "model", "num_prompts", "seed", "sharegpt_output_len")
    keys += ("random_input_len", "random_output_len", "random_range_ratio")
    return {k: getattr(args, k) for k in keys}


def _run_config(args: argparse.Namespace, backend: Backend, base_url: str) -> RunConfig:
    extra = json.loads(args.extra_request_body) if args.extra_request_body else {}
    if not isinstance(extra, dict):
        raise ValueError("--extra-request-body must be a JSON object")
    return RunConfig(
        backend=backend,
        base_url=base_url,
        model=args.served_model_name or args.model,
        request_rate=args.request_rate,
        max_concurrency=args.max_concurrency,
        options=RequestOptions(not args.disable_stream, not args.disable_ignore_eos, auth_headers()),
        extra_request_body=extra,
        warmup_requests=args.warmup_requests,
        flush_cache=args.flush_cache,
        disable_tqdm=args.disable_tqdm,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    """Run one benchmark from parsed flags: print the result block, append the JSONL record. Returns 0 if any
    request succeeded."""
    backend = BACKENDS[args.backend]
    base_url = _base_url(args, backend)
    models = served_models(base_url)  # also the check that the server is there
    args.model = args.model or (models[0] if models else None)
    if args.model is None:
        raise BenchmarkError(f"{base_url}/v1/models lists no model; give one with --model")
    config = _run_config(args, backend, base_url)
    tok = load_bench_tokenizer(_tokenizer_source(args, base_url))
    rows = build_dataset(args, tok, backend)
    logger.info("#Input tokens: %d", sum(r.prompt_len for r in rows))
    logger.info("#Output tokens: %d", sum(r.output_len for r in rows))

    raise_open_file_limit()
    result = asyncio.run(run_benchmark(config, rows))
    itl_per_token = bool(result.accept_length) and backend.kind != "generate"
    metrics, output_lens = calculate_metrics(rows, result.outputs, result.duration_s, tok.count, itl_per_token)
    info = RunInfo(
        backend=args.backend,
        request_rate=args.request_rate,
        max_concurrency=args.max_concurrency,
        duration_s=result.duration_s,
        accept_length=result.accept_length,
        show_vision=args.dataset_name == "image",
    )
    print("\n" + result_block(metrics, info), flush=True)
    record = result_record(metrics, info, _settings(args), result.outputs, output_lens, result.server_info)
    append_jsonl(args.output_file or _default_output_file(args), record)
    if metrics.failed:
        first_error = next(o.error for o in result.outputs if not o.success)
        logger.warning("%d of %d requests failed; first error: %s", metrics.failed, len(rows), first_error)
    return 0 if metrics.completed else 1


def _show_progress_notes() -> None:
    # herd's own notes (warmup, token totals, failures) go to stderr as SGLang prints them; httpx's
    # per-request INFO lines stay off.
    herd_logger = logging.getLogger("herd")
    if not herd_logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        herd_logger.addHandler(handler)
        herd_logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog or "python -m herd.bench_serving").parse_args(argv)
    _show_progress_notes()
    try:
        return run(args)
    except (BenchmarkError, TokenizerError, ValueError, OSError) as e:
        print(f"bench_serving: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
