"""`herd bench plot FILE...`: PNG plots of `herd bench serving --output-file` results (matplotlib).

Each line of a results file is one run (SGLang's record: settings, metrics, per-request ttfts/latencies).
Runs are grouped into series by tag (`--tag`), else backend and file name, and ordered by concurrency:

- `throughput.png`: output and total token throughput against concurrency;
- `latency.png`: median and p99 TTFT and median and p99 TPOT against concurrency;
- `latency_cdf.png`: the distribution of end-to-end latency and TTFT of every request, one curve per run.

A run without --max-concurrency sits at its number of prompts (every request may be in flight at once).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

Record = dict[str, Any]


class PlotError(Exception):
    """A results file that cannot be plotted; the message names the file and what is wrong."""


def read_runs(paths: list[Path]) -> dict[str, list[Record]]:
    """Runs by series label, each series ordered by concurrency."""
    series: dict[str, list[Record]] = defaultdict(list)
    for path in paths:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise PlotError(f"cannot read {path}: {e}") from e
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise PlotError(
                    f"{path}:{number} is not JSON ({e}); give `herd bench serving --output-file` files"
                ) from e
            if not isinstance(record, dict) or "output_throughput" not in record:
                raise PlotError(f"{path}:{number} is not a `herd bench serving` result (no output_throughput)")
            label = record.get("tag") or f"{record.get('backend', '?')} ({path.stem})"
            series[label].append(record)
    if not series:
        raise PlotError("no runs in " + ", ".join(map(str, paths)))
    for runs in series.values():
        runs.sort(key=concurrency)
    return dict(series)


def concurrency(record: Record) -> float:
    value = record.get("max_concurrency")
    return float(value) if value else float(record.get("completed") or record.get("num_prompts") or 1)


def _metric(record: Record, key: str) -> float:
    value = record.get(key)
    return float(value) if isinstance(value, int | float) else math.nan


def plot_throughput(series: dict[str, list[Record]]) -> Any:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, runs in series.items():
        x = [concurrency(r) for r in runs]
        ax.plot(x, [_metric(r, "output_throughput") for r in runs], marker="o", label=f"{label}: output")
        ax.plot(x, [_metric(r, "total_throughput") for r in runs], marker="s", ls="--", label=f"{label}: total")
    ax.set(xlabel="concurrency (requests in flight)", ylabel="tokens/s", title="Throughput")
    _finish(ax)
    return fig


def plot_latency(series: dict[str, list[Record]]) -> Any:
    import matplotlib.pyplot as plt

    fig, (ttft, tpot) = plt.subplots(1, 2, figsize=(11, 4.5))
    for label, runs in series.items():
        x = [concurrency(r) for r in runs]
        for ax, name in ((ttft, "ttft"), (tpot, "tpot")):
            (line,) = ax.plot(x, [_metric(r, f"median_{name}_ms") for r in runs], marker="o", label=f"{label}: median")
            ax.plot(x, [_metric(r, f"p99_{name}_ms") for r in runs], marker="^", ls="--", color=line.get_color(),
                    label=f"{label}: p99")  # fmt: skip
    ttft.set(xlabel="concurrency (requests in flight)", ylabel="ms", title="Time to first token")
    tpot.set(xlabel="concurrency (requests in flight)", ylabel="ms", title="Time per output token")
    _finish(ttft)
    _finish(tpot)
    return fig


def plot_latency_cdf(series: dict[str, list[Record]]) -> Any:
    import matplotlib.pyplot as plt

    fig, (e2e, ttft) = plt.subplots(1, 2, figsize=(11, 4.5))
    for label, runs in series.items():
        for r in runs:
            name = f"{label} @ {concurrency(r):g}"
            for ax, key in ((e2e, "latencies"), (ttft, "ttfts")):
                values = sorted(1000 * v for v, err in zip(r.get(key) or [], r.get("errors") or [], strict=False)
                                if not err and v is not None)  # fmt: skip
                if values:
                    ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=name)
    e2e.set(xlabel="end-to-end latency (ms)", ylabel="share of requests", title="Latency CDF")
    ttft.set(xlabel="time to first token (ms)", ylabel="share of requests", title="TTFT CDF")
    _finish(e2e, log_x=False)
    _finish(ttft, log_x=False)
    return fig


def _finish(ax: Any, log_x: bool = True) -> None:
    if log_x:
        ax.set_xscale("log", base=2)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


PLOTS = {"throughput.png": plot_throughput, "latency.png": plot_latency, "latency_cdf.png": plot_latency_cdf}


def write_plots(paths: list[Path], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    series = read_runs(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, plot in PLOTS.items():
        fig = plot(series)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        written.append(out_dir / name)
    return written


def main(argv: list[str] | None = None, prog: str = "herd bench plot") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", type=Path, help="JSONL files written by `herd bench serving --output-file`")
    parser.add_argument("--output-dir", type=Path, help="where the PNGs go (default: the first file's folder)")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"{prog}: error: needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2
    try:
        written = write_plots(args.files, args.output_dir or args.files[0].parent)
    except PlotError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
