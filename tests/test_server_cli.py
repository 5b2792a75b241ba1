"""`herd serve` / `python -m herd.launch_server`: SGLang's flags, refused values named, a real launch."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from herd.cli import main as herd_main
from herd.config.server_args import NOT_YET, ServerArgs, default_served_model_name
from herd.demo import MODEL_PATH
from herd.launch_server import bind_socket, build_parser, parse_args
from herd.launch_server import main as launch_main


def test_sglang_command_line_is_accepted() -> None:
    args = parse_args(
        [
            "--model", "/models/scout",
            "--tp", "1",
            "--host", "0.0.0.0",
            "--port", "8000",
            "--context-length", "1000000",
            "--chat-template", "llama-4",
            "--mem-fraction-static", "0.8",
            "--tool-call-parser", "pythonic",
            "--enable-multimodal",
            "--trust-remote-code",
            "--enable-metrics",
            "--random-seed", "7",
            "--served-model-name", "scout",
            "--api-key", "k",
            "--log-level", "warning",
        ]
    )  # fmt: skip
    assert (args.model_path, args.tp_size, args.host, args.port) == ("/models/scout", 1, "0.0.0.0", 8000)
    assert (args.context_length, args.seed, args.tool_call_parser, args.served_model_name) == (
        1000000,
        7,
        "pythonic",
        "scout",
    )
    assert args.enable_multimodal and args.trust_remote_code and args.api_key == "k" and args.log_level == "warning"
    defaults = parse_args(["--model-path", "m"])
    assert (defaults.host, defaults.port, defaults.tp_size) == ("127.0.0.1", 30000, 1)
    assert (defaults.allowed_local_media_path, defaults.max_images_per_request) == (None, 10)


def test_image_flags(tmp_path: Path) -> None:
    # vLLM's --allowed-local-media-path; both flags are read by the server (herd/server/images.py).
    args = parse_args(
        ["--model-path", "m", "--allowed-local-media-path", str(tmp_path), "--max-images-per-request", "2"]
    )
    assert (args.allowed_local_media_path, args.max_images_per_request) == (str(tmp_path), 2)
    media = ["--allowed-media-domains", "a.example", "b.example", "--media-fetch-timeout", "2.5"]
    args = parse_args(["--model-path", "m", *media, "--max-media-bytes", "1000", "--max-image-pixels", "4096"])
    assert args.allowed_media_domains == ["a.example", "b.example"] and args.media_fetch_timeout == 2.5
    assert (args.max_media_bytes, args.max_image_pixels) == (1000, 4096)


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--tp", "2", "--ep", "3"], ["--ep-size 3", "must divide --tp-size 2"]),
        (["--nnodes", "2", "--tp", "2"], ["--nnodes 2", "--dist-init-addr"]),
        (["--nnodes", "2", "--tp", "2", "--dist-init-addr", "node0"], ["--dist-init-addr 'node0'", "host:port"]),
        (["--speculative-algorithm", "EAGLE3"], ["--speculative-algorithm EAGLE3", "--speculative-draft-model-path"]),
        (["--speculative-num-steps", "3"], ["--speculative-num-steps 3", "needs --speculative-algorithm"]),
        (["--speculative-algorithm", "MEDUSA"], ["--speculative-algorithm 'MEDUSA'", "NGRAM"]),
        (
            [
                *("--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", "d"),
                *("--speculative-num-steps", "3", "--speculative-num-draft-tokens", "6"),
            ],
            ["--speculative-num-draft-tokens 6", "--speculative-num-steps 3"],
        ),
        (
            [
                "--speculative-algorithm",
                "EAGLE3",
                "--speculative-draft-model-path",
                "d",
                *("--speculative-eagle-topk", "2", "--speculative-num-steps", "2"),
                *("--speculative-num-draft-tokens", "8"),
            ],
            ["--speculative-num-draft-tokens 8", "--speculative-num-steps 2", "--speculative-eagle-topk 2", "7"],
        ),
        (
            ["--speculative-algorithm", "NGRAM", "--speculative-draft-model-path", "d"],
            ["NGRAM", "--speculative-draft-model-path 'd'"],
        ),
        (
            ["--speculative-demo-draft", "--speculative-algorithm", "NGRAM"],
            ["--speculative-demo-draft", "--speculative-algorithm NGRAM"],
        ),
        (["--quantization", "int3"], ["--quantization", "not supported yet"]),
        (["--dp", "2"], ["--dp-size", "not supported yet"]),
        (["--port", "http"], ["--port", "invalid int"]),
        (["--port", "70000"], ["--port", "65535"]),
        (["--tool-call-parser", "hermes"], ["--tool-call-parser", "pythonic"]),
        (["--log-level", "loud"], ["--log-level", "debug"]),
        (["--dtype", "fp64"], ["--dtype", "bfloat16"]),
        (["--mem-fraction-static", "1.5"], ["--mem-fraction-static"]),
        (["--max-images-per-request", "-1"], ["--max-images-per-request", "0 or more"]),
        (["--allowed-local-media-path", "/no/such/folder"], ["--allowed-local-media-path", "not a folder"]),
        (["--media-fetch-timeout", "0"], ["--media-fetch-timeout", "positive"]),
        (["--max-image-pixels", "0"], ["--max-image-pixels", "positive integer"]),
        (["--allowed-media-domains", ""], ["--allowed-media-domains", "empty"]),
        (["--no-such-flag"], ["unrecognized arguments: --no-such-flag"]),
    ],
)
def test_bad_flags_fail_at_start_naming_the_flag(flags: list[str], words: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--model-path", "m", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, err


def test_model_path_defaults_to_the_packaged_demo_model() -> None:
    args = parse_args([])
    assert Path(args.model_path) == MODEL_PATH
    assert (MODEL_PATH / "config.json").is_file()


def test_help_lists_the_flags(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        herd_main(["serve", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--tp-size" in out and "--tool-call-parser" in out and "--speculative-algorithm" in out


def test_missing_checkpoint_fails_cleanly(tmp_path: Path, caplog) -> None:
    assert launch_main(["--model-path", str(tmp_path / "absent"), "--port", "0"]) == 1
    assert "--model-path" in caplog.text


def test_busy_port_fails_before_loading(tmp_path: Path, caplog) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert launch_main(["--model-path", str(tmp_path / "absent"), "--port", str(port)]) == 1
    assert f"--port {port}" in caplog.text


def test_launch_server_process(real_vocab_ckpt) -> None:
    """The real command line in its own process: startup line with the URL, a chat, a clean SIGINT stop."""
    cmd = [sys.executable, "-m", "herd.launch_server", "--model-path", str(real_vocab_ckpt[0]), "--port", "0"]
    cmd += ["--dtype", "float32", "--max-total-tokens", "1024", "--served-model-name", "cli-test"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        url = None
        assert proc.stderr is not None
        for line in proc.stderr:
            if match := re.search(r"serving cli-test at (http://\S+)", line):
                url = match.group(1)
                break
        assert url is not None, "no startup line"
        assert httpx.get(f"{url}/health").status_code == 200
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        out = client.chat.completions.create(
            model="cli-test", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
        )
        assert out.usage.completion_tokens <= 3
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[1]
        assert proc.returncode == 0, rest
        assert re.search(r"chatcmpl-\w+ finished \(\w+\): prompt \d+ tokens", rest), rest  # the per-request line
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_accepted_connections_set_tcp_nodelay() -> None:
    """uvicorn serves the socket through loop.create_server(sock=...), as here; asyncio turns Nagle off on each
    accepted connection only if the listening socket was made as TCP."""

    async def nodelay_of_accepted() -> int:
        loop = asyncio.get_running_loop()
        sock = bind_socket("127.0.0.1", 0)
        seen: asyncio.Future[int] = loop.create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                seen.set_result(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        server = await loop.create_server(Probe, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            value = await asyncio.wait_for(seen, 10)
            writer.close()
        return value

    assert asyncio.run(nodelay_of_accepted()) != 0


SGLANG_LAUNCH_LINES = [
    line
    for line in (Path(__file__).parent / "fixtures" / "sglang_llama4_launch.sh").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]


@pytest.mark.parametrize("line", SGLANG_LAUNCH_LINES, ids=range(len(SGLANG_LAUNCH_LINES)))
def test_sglang_llama4_launch_lines(line: str, capsys) -> None:
    """Each launch line of SGLang's Llama 4 docs and recipe, with `herd serve` in its place: accepted or
    refused as "not supported yet", never "unrecognized"; and with the unsupported flags turned off, it is
    accepted (so the refusal hides no other bad flag)."""
    words = shlex.split(line)
    assert words[:3] in (["python3", "-m", "sglang.launch_server"], ["python", "-m", "sglang.launch_server"])
    argv = words[3:]
    try:
        parse_args(argv)
    except SystemExit as e:
        assert e.code == 2
        err = capsys.readouterr().err
        assert "not supported yet" in err and "unrecognized" not in err, err
    namespace = build_parser().parse_args(argv)  # argparse alone: every flag known
    values = {name: getattr(namespace, name) for name in ServerArgs.field_names()}
    ServerArgs(**{**values, **NOT_YET, "quantization": None})  # fp8: --quantization takes only w8a16 yet


def test_hybrid_kvcache_ratio_sets_the_local_share() -> None:
    # SGLang's meaning: local/global KV tokens = (1 - r) + r * attention_chunk_size / context_length.
    chunk = json.loads((MODEL_PATH / "config.json").read_text())["text_config"]["attention_chunk_size"]
    context = 4096
    for argv, expected in (
        ([], 0.8),  # --swa-full-tokens-ratio's default
        (["--swa-full-tokens-ratio", "0.3"], 0.3),
        (["--hybrid-kvcache-ratio", "0"], 1.0),
        (["--hybrid-kvcache-ratio", "1"], chunk / context),
        (["--hybrid-kvcache-ratio"], 0.5 + 0.5 * chunk / context),  # the bare flag is 0.5, as in SGLang
    ):
        config = parse_args([*argv, "--context-length", str(context)]).to_config()
        assert config.engine.cache.swa_full_tokens_ratio == pytest.approx(expected), argv


def test_hybrid_kvcache_ratio_out_of_range_is_refused(capsys) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--hybrid-kvcache-ratio", "1.5"])
    assert "--hybrid-kvcache-ratio must be in [0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("model_path", "name"),
    [
        (str(MODEL_PATH), "herd-demo"),
        ("/models/Llama-4-Scout-17B-16E-Instruct", "Llama-4-Scout-17B-16E-Instruct"),
        ("/models/Llama-4-Scout-17B-16E-Instruct/", "Llama-4-Scout-17B-16E-Instruct"),
        ("meta-llama/Llama-4-Scout-17B-16E-Instruct", "meta-llama/Llama-4-Scout-17B-16E-Instruct"),  # a Hub id
    ],
)
def test_served_model_name_defaults_to_the_folder_name(model_path: str, name: str) -> None:
    assert default_served_model_name(model_path) == name
    assert parse_args(["--model-path", model_path, "--served-model-name", "x"]).served_model_name == "x"


def test_demo_model_is_served_as_herd_demo() -> None:
    assert parse_args([]).to_config().server.served_model_name == "herd-demo"
