"""`herd bench plot`: PNGs of `herd bench serving --output-file` results, their curves drawn from the records.

The records come from a real `herd bench serving` run against herd (two concurrencies, a few requests)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from herd.bench.plot import plot_latency, plot_latency_cdf, plot_throughput, read_runs
from herd.bench_serving import main as bench_main
from herd.cli import main as herd_main
from herd.config.server_args import ServerArgs

from server_fixtures import ServerThread

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")


@pytest.fixture(scope="module")
def results(real_vocab_ckpt, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("bench") / "runs.jsonl"
    args = ServerArgs(model_path=str(real_vocab_ckpt[0]), dtype="float32", max_total_tokens=8192)
    with ServerThread(args) as server:
        for concurrency in ("1", "4"):
            argv = ["--base-url", server.url, "--output-file", str(path), "--disable-tqdm", "--num-prompts", "8"]
            argv += ["--dataset-name", "random", "--random-input-len", "16", "--random-output-len", "4"]
            assert bench_main([*argv, "--max-concurrency", concurrency, "--tag", "herd"]) == 0
    yield path


def test_plot_command_writes_pngs(results: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert herd_main(["bench", "plot", str(results), "--output-dir", str(tmp_path)]) == 0
    written = capsys.readouterr().out.split()
    assert [Path(p).name for p in written] == ["throughput.png", "latency.png", "latency_cdf.png"]
    for path in written:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width >= 600


def test_curves_are_the_records_values(results: Path) -> None:
    records = [json.loads(line) for line in results.read_text().splitlines()]
    series = read_runs([results])
    assert list(series) == ["herd"]
    lines = {line.get_label(): line for line in plot_throughput(series).axes[0].get_lines()}
    output = lines["herd: output"]
    assert list(output.get_xdata()) == [1.0, 4.0]
    assert list(output.get_ydata()) == pytest.approx([r["output_throughput"] for r in records])
    ttft_axes = plot_latency(series).axes[0]
    median = next(line for line in ttft_axes.get_lines() if line.get_label() == "herd: median")
    assert list(median.get_ydata()) == pytest.approx([r["median_ttft_ms"] for r in records])
    cdf = plot_latency_cdf(series).axes[0].get_lines()[0]
    assert sorted(cdf.get_xdata()) == pytest.approx(sorted(1000 * v for v in records[0]["latencies"]))
    assert cdf.get_ydata()[-1] == pytest.approx(1.0)


def test_a_file_that_is_not_results_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"hello": 1}\n')
    assert herd_main(["bench", "plot", str(bad)]) == 2
    assert "not a `herd bench serving` result" in capsys.readouterr().err
