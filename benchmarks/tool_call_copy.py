"""Does the demo model call the one tool it is offered, with the city from the question, for cities it never saw?

Starts herd's server on the shipped demo model (or `--model`), offers only `get_weather`, and asks about 50
cities that are in none of the demo's training data (scripts/demo/tools.py UNSEEN_CITIES: no pool has them and
no made-up name may be one) in phrasings its training data does not use (UNSEEN_WEATHER_QUESTIONS), in `auto`
mode at temperature 0. Counts, per phrasing: replies that call a tool, calls that name `get_weather` (the
grammar allows nothing else), calls whose `location` is the city exactly, and calls whose location is a piece
of the question (copied, if not all of it).

    python benchmarks/tool_call_copy.py                       # the constraint on (herd's default)
    python benchmarks/tool_call_copy.py --tool-call-constraint off
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from demo.tools import TOOLS, UNSEEN_CITIES, UNSEEN_WEATHER_QUESTIONS

DEMO = Path(__file__).resolve().parents[1] / "herd" / "demo" / "model"
WEATHER = [TOOLS["get_weather"].schema()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model: Path, port: int, constraint: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "herd.launch_server", "--model-path", str(model), "--dtype", "float32"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", "demo"]
    command += ["--tool-call-constraint", constraint]
    server = subprocess.Popen(command)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode}")
        time.sleep(1)
    server.kill()
    raise RuntimeError("the server did not start in 300 s")


def ask(client: openai.OpenAI, question: str) -> tuple[str | None, dict | None]:
    """The first call's name and parsed arguments (None, None when the reply calls nothing)."""
    out = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": question}], tools=WEATHER, temperature=0, max_tokens=60,  # type: ignore[arg-type]
    )  # fmt: skip
    calls = out.choices[0].message.tool_calls or []
    if not calls:
        return None, None
    return calls[0].function.name, json.loads(calls[0].function.arguments)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEMO, help="model folder (default: the packaged demo)")
    parser.add_argument("--tool-call-constraint", default="on", choices=["on", "off"])
    args = parser.parse_args()
    port = free_port()
    server = start_server(args.model, port, args.tool_call_constraint)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    try:
        for phrasing in UNSEEN_WEATHER_QUESTIONS:
            counts: Counter[str] = Counter()
            misses = []
            for city in UNSEEN_CITIES:
                question = phrasing.format(city)
                name, arguments = ask(client, question)
                location = str((arguments or {}).get("location", ""))
                counts["called"] += name is not None
                counts["get_weather"] += name == "get_weather"
                counts["exact"] += location == city
                counts["copied"] += bool(location) and location in question
                if location != city:
                    misses.append(f"{city}->{name}({location!r})")
            summary = {"phrasing": phrasing, "cities": len(UNSEEN_CITIES), **counts}
            print(json.dumps(summary))
            print("  misses:", ", ".join(misses[:12]), "..." if len(misses) > 12 else "")
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
