"""The `herd` command line: `herd serve | generate | bench serving | bench plot`.

`herd serve` takes SGLang's `launch_server` flags (see `herd/launch_server.py`); `herd generate` runs
prompts offline with the same engine flags.
"""

from __future__ import annotations

import argparse
import logging
import sys

from herd.config.engine import LOG_FORMAT


def _generate(args: argparse.Namespace) -> int:
    from herd.config.server_args import server_args_from
    from herd.llm import LLM
    from herd.sampling import SamplingParams

    server_args = server_args_from(args)
    llm = LLM(**{"model": server_args.model_path, **{k: v for k, v in vars(server_args).items() if k != "model_path"}})
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.sampling_seed
    )
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params, use_tqdm=False)
    else:
        outputs = llm.generate(list(args.prompt), params, use_tqdm=False)
    for out in outputs:
        print(out.outputs[0].text)
    return 0


def main(argv: list[str] | None = None) -> int:
    from herd.config.server_args import ArgumentError, add_server_args

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="herd", description="Llama 4 inference and serving engine")
    sub = parser.add_subparsers(dest="command", required=True)
    # serve parses its own flags (launch_server), so that `herd serve` and `python -m herd.launch_server`
    # are one command line; `herd serve --help` lists them.
    sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API", add_help=False)
    # `herd bench serving` is `python -m herd.bench_serving` (sglang.bench_serving's flags).
    sub.add_parser("bench", help="benchmarks: `herd bench serving ...`, `herd bench plot FILE...`", add_help=False)
    gen = sub.add_parser("generate", help="generate text for one or more prompts, offline")
    add_server_args(gen)
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    gen.add_argument("--chat", action="store_true", help="format each prompt as a user turn of a chat")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--sampling-seed", type=int, default=None)
    if argv[:1] == ["serve"]:
        from herd.launch_server import main as serve

        return serve(argv[1:], prog="herd serve")
    if argv[:2] == ["bench", "serving"]:
        from herd.bench_serving import main as bench_serving

        return bench_serving(argv[2:], prog="herd bench serving")
    if argv[:2] == ["bench", "plot"]:
        from herd.bench.plot import main as bench_plot

        return bench_plot(argv[2:], prog="herd bench plot")
    if argv[:1] == ["bench"]:
        parser.error("herd bench: choose `herd bench serving ...` or `herd bench plot FILE...`")
    args = parser.parse_args(argv)
    logging.basicConfig(level=(args.log_level or "warning").upper(), format=LOG_FORMAT)
    try:
        return _generate(args)
    except (ArgumentError, ValueError) as e:
        print(f"herd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
