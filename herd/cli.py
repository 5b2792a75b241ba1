"""The `herd` command line: `herd generate | serve | ...`."""

from __future__ import annotations

import argparse
import logging
import sys

NOT_YET = {
    "serve": "the HTTP server is not implemented yet (issue 5)",
}


def _generate(args: argparse.Namespace) -> int:
    from herd.llm import LLM
    from herd.sampling import SamplingParams
    from herd.server_args import server_args_from

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
    from herd.server_args import ArgumentError, add_server_args

    parser = argparse.ArgumentParser(prog="herd", description="Llama 4 inference and serving engine")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one or more prompts, offline")
    add_server_args(gen)
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    gen.add_argument("--chat", action="store_true", help="format each prompt as a user turn of a chat")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--sampling-seed", type=int, default=None)
    for name, why in NOT_YET.items():
        sub.add_parser(name, help=f"(not yet: {why})", add_help=False)
    args, extra = parser.parse_known_args(argv)
    if args.command in NOT_YET:
        print(f"herd {args.command}: not supported yet: {NOT_YET[args.command]}.", file=sys.stderr)
        return 2
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _generate(args)
    except (ArgumentError, ValueError) as e:
        print(f"herd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
