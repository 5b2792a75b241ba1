"""The command line of `python -m herd.bench_serving`: sglang.bench_serving's flags, names and defaults."""

from __future__ import annotations

import argparse

from herd.bench.backends import BACKENDS
from herd.bench.images import IMAGE_CONTENTS, IMAGE_FORMATS

DATASETS = ("sharegpt", "random", "random-ids", "generated-shared-prefix", "image")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark the online serving throughput and latency of an OpenAI-compatible server "
        "(flags as sglang.bench_serving).",
    )
    _add_target_args(parser)
    _add_dataset_args(parser)
    _add_traffic_args(parser)
    _add_output_args(parser)
    return parser


def _add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=list(BACKENDS), default="sglang", help="API the server speaks.")
    p.add_argument("--base-url", default=None, help="Server base URL, instead of --host and --port.")
    p.add_argument("--host", default="127.0.0.1", help="Server host (default 127.0.0.1).")
    p.add_argument("--port", type=int, default=None, help="Server port (default: the backend's usual port).")
    p.add_argument("--model", default=None, help="Model name or path; default: the first of GET /v1/models.")
    p.add_argument("--served-model-name", default=None, help="Model name sent in requests (default --model).")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="Tokenizer folder or file (tokenizer.json / tokenizer.model); default: the model path, else the "
        "server's /get_model_info path.",
    )
    p.add_argument(
        "--extra-request-body",
        metavar='{"key1": "value1", "key2": "value2"}',
        default=None,
        help="JSON object merged into every request payload (e.g. sampling parameters).",
    )
    p.add_argument("--disable-stream", action="store_true", help="Send non-streaming requests.")
    p.add_argument("--disable-ignore-eos", action="store_true", help="Let generation stop at EOS.")


def _add_dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset-name", choices=DATASETS, default="sharegpt", help="Prompts to send.")
    p.add_argument("--dataset-path", default="", help="ShareGPT json file (never downloaded).")
    p.add_argument("--num-prompts", type=int, default=1000, help="Number of prompts (default 1000).")
    p.add_argument("--seed", type=int, default=1, help="Seed of prompts, lengths, images and arrivals.")
    p.add_argument("--apply-chat-template", action="store_true", help="Wrap prompts in the chat template.")
    p.add_argument("--sharegpt-output-len", type=int, default=None, help="Fixed output length for ShareGPT.")
    p.add_argument("--sharegpt-context-len", type=int, default=None, help="Drop ShareGPT pairs longer than this.")
    p.add_argument("--prompt-suffix", default="", help="Suffix of every ShareGPT prompt, before 'Assistant:'.")
    p.add_argument("--random-input-len", type=int, default=1024, help="Input tokens (random, image datasets).")
    p.add_argument("--random-output-len", type=int, default=1024, help="Output tokens (random, image datasets).")
    p.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="Lengths are uniform in [max(int(L * ratio), 1), L] (random, image datasets).",
    )
    g = p.add_argument_group("image dataset arguments")
    g.add_argument("--image-count", type=int, default=1, help="Images per request.")
    g.add_argument("--image-resolution", default="1080p", help="4k, 1080p, 720p, 360p or HEIGHTxWIDTH.")
    g.add_argument("--image-format", choices=IMAGE_FORMATS, default="jpeg", help="Image encoding.")
    g.add_argument("--image-content", choices=IMAGE_CONTENTS, default="random", help="Noise or white.")
    g = p.add_argument_group("generated-shared-prefix dataset arguments")
    g.add_argument("--gsp-num-groups", type=int, default=64, help="System prompts (groups).")
    g.add_argument("--gsp-prompts-per-group", type=int, default=16, help="Questions per system prompt.")
    g.add_argument("--gsp-system-prompt-len", type=int, default=2048, help="Tokens per system prompt.")
    g.add_argument("--gsp-question-len", type=int, default=128, help="Tokens per question.")
    g.add_argument("--gsp-output-len", type=int, default=256, help="Output tokens per request.")
    g.add_argument("--gsp-range-ratio", type=float, default=1.0, help="Length range ratio (default 1: fixed).")


def _add_traffic_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="Requests per second; inf (default) sends all at once, else Poisson arrivals.",
    )
    p.add_argument("--max-concurrency", type=int, default=None, help="Most requests in flight at once.")
    p.add_argument("--warmup-requests", type=int, default=1, help="Warmup requests before the run (default 1).")
    p.add_argument("--flush-cache", action="store_true", help="POST /flush_cache after the warmup.")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-file", default=None, help="JSONL file a line per run is appended to.")
    p.add_argument(
        "--output-details", action="store_true", help="Accepted for compatibility: details are always written."
    )
    p.add_argument("--disable-tqdm", action="store_true", help="No progress bar.")
    p.add_argument("--tag", default=None, help="A tag written into the JSONL record.")
