"""The `herd` command line: `herd serve | ...`."""

from __future__ import annotations

import argparse
import sys

NOT_YET = {
    "serve": "the HTTP server is not implemented yet (issue 5, after the engine in issue 4)",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="herd", description="Llama 4 inference and serving engine")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, why in NOT_YET.items():
        sub.add_parser(name, help=f"(not yet: {why})", add_help=False)
    args, _ = parser.parse_known_args(argv)
    if args.command in NOT_YET:
        print(f"herd {args.command}: not supported yet: {NOT_YET[args.command]}.", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
