"""The serving benchmark client against herd's own server, end to end."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from herd.bench_serving import main
from herd.config.server_args import ServerArgs

from server_fixtures import ServerThread, wait_idle
from test_bench_serving import METRIC_LABELS, block_values


@pytest.fixture(scope="module")
def server(real_vocab_ckpt) -> Iterator[ServerThread]:
    args = ServerArgs(model_path=str(real_vocab_ckpt[0]), dtype="float32", max_total_tokens=8192)
    with ServerThread(args) as running:
        yield running


def run(server: ServerThread, out_file: Path, *flags: str) -> int:
    argv = ["--base-url", server.url, "--output-file", str(out_file), "--disable-tqdm"]
    return main([*argv, "--num-prompts", "20", "--max-concurrency", "4", *flags])


@pytest.mark.parametrize("backend", ["sglang-oai-chat", "sglang"])
def test_random_dataset_against_herd(
    server: ServerThread, backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--dataset-name", "random", "--random-input-len", "48", "--random-output-len", "8"]
    assert run(server, tmp_path / "run.jsonl", "--backend", backend, *flags) == 0
    values = block_values(capsys.readouterr().out)
    assert [label for label in METRIC_LABELS if label not in values] == []
    assert values["Successful requests:"] == "20"
    record = json.loads((tmp_path / "run.jsonl").read_text().splitlines()[-1])
    # The model name and tokenizer came from the server; output lengths from its usage reports.
    assert record["completed"] == 20 and record["errors"] == [""] * 20
    assert all(1 <= n <= 8 for n in record["output_lens"])
    wait_idle(server.url)


def test_image_dataset_is_refused_without_enable_multimodal(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--dataset-name", "image", "--image-count", "1", "--image-resolution", "32x32"]
    rc = run(server, tmp_path / "image.jsonl", "--backend", "openai-chat", *flags, "--random-output-len", "4")
    assert rc != 0
    assert "--enable-multimodal" in capsys.readouterr().err
    wait_idle(server.url)
