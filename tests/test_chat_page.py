"""The chat page at `GET /` in a real headless browser (Debian's chromium driven by Playwright's Python API):
the demo model answers a typed question as a stream, a picture goes with a question, and stop aborts a reply
mid-stream; the server runs with --api-key, which the page asks for."""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from herd.config.server_args import ServerArgs

from demo import images
from server_fixtures import ServerThread, metrics, wait_idle, wait_until

playwright_api = pytest.importorskip("playwright.sync_api")

KEY = "sk-page-test"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    # `make test` installs it (apt-get); only a bare pytest run elsewhere can lack it.
    pytest.skip("no chromium on PATH (make test installs Debian's chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    args = ServerArgs(
        dtype="float32", context_length=2048, max_total_tokens=8192, api_key=KEY,
        enable_multimodal=True, tool_call_parser="pythonic",
    )  # fmt: skip
    with ServerThread(args) as running:
        yield running


@pytest.fixture(scope="module")
def page(server: ServerThread) -> Iterator[object]:
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1000, "height": 640})
        page.goto(server.url + "/")
        yield page
        browser.close()


def assistant_texts(page) -> list[str]:  # type: ignore[no-untyped-def]
    return page.locator(".msg.assistant .text").all_inner_texts()


def ask(page, text: str) -> None:  # type: ignore[no-untyped-def]
    page.fill("#input", text)
    page.press("#input", "Enter")


def test_page_asks_for_the_key_then_answers_streaming(server: ServerThread, page, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    page.wait_for_selector("#key-row:not([hidden])")  # /v1/models answered 401: the page asks for the key
    assert "api-key" in page.inner_text("#error").lower().replace(" ", "-")
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.getElementById('model').textContent === 'herd-demo'")
    assert page.is_visible("#image-label")  # --enable-multimodal: pictures can be attached

    chunks: list[str] = []
    page.on("response", lambda r: chunks.append(r.url) if r.url.endswith("/v1/chat/completions") else None)
    ask(page, "What is 12 * 34?")
    page.wait_for_selector(".msg.assistant[data-done]")
    answer = assistant_texts(page)[-1]
    # The demo model's answer, as the same request through the API without the page gives it.
    body = {"model": "herd-demo", "messages": [{"role": "user", "content": "What is 12 * 34?"}], "temperature": 0}
    direct = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert answer == direct.json()["choices"][0]["message"]["content"] and "408" in answer
    stats = page.inner_text("#stats")
    assert "TTFT" in stats and "tokens/s" in stats
    if os.environ.get("HERD_CHAT_SCREENSHOT"):  # how docs/chat-page.png was made
        page.screenshot(path=os.environ["HERD_CHAT_SCREENSHOT"])
    assert chunks  # the reply came over the API


def test_picture_goes_with_the_question(server: ServerThread, page, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(3)
    spec = images.random_spec(rng)
    _, question, _ = images.question(rng, spec)
    picture = tmp_path / "picture.png"
    images.render(spec).save(picture)
    sent: list[dict] = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else None)
    page.click("#clear")
    page.set_input_files("#image", str(picture))
    page.wait_for_selector("#attachments img")
    ask(page, question)
    page.wait_for_selector(".msg.assistant[data-done]")
    content = sent[-1]["messages"][-1]["content"]
    assert content[0]["type"] == "image_url" and content[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert content[1] == {"type": "text", "text": question}
    # The same picture and question through the API without the page: the same answer.
    body = {"model": "herd-demo", "messages": [{"role": "user", "content": content}], "temperature": 0}
    direct = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert assistant_texts(page)[-1] == direct.json()["choices"][0]["message"]["content"] != ""
    assert page.locator(".msg.user img").count() == 1


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "required": ["location", "unit"],
            "properties": {
                "location": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "description": "Unit", "enum": ["celsius", "fahrenheit"]},
            },
        },
    },
}


def test_tool_calls_are_shown_as_calls(server: ServerThread, page) -> None:  # type: ignore[no-untyped-def]
    page.click("#clear")
    page.fill("#tools", json.dumps([WEATHER]))
    question = "What is the weather in Paris in celsius?"
    ask(page, question)
    page.wait_for_selector(".msg.assistant[data-done]")
    shown = page.locator(".msg.assistant .tool-call").all_inner_texts()
    body = {"model": "herd-demo", "messages": [{"role": "user", "content": question}], "tools": [WEATHER]}
    direct = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "temperature": 0},
                        headers={"Authorization": f"Bearer {KEY}"}).json()  # fmt: skip
    calls = direct["choices"][0]["message"]["tool_calls"]
    assert calls and shown == [f"call {c['function']['name']}({c['function']['arguments']})" for c in calls]
    page.fill("#tools", "")


def test_stop_aborts_the_reply_mid_stream(server: ServerThread, page) -> None:  # type: ignore[no-untyped-def]
    # Slow every engine step down, so that the reply is still streaming when stop is pressed.
    step = server.engine.step
    slow = threading.Event()

    def slow_step():  # type: ignore[no-untyped-def]
        if slow.is_set():
            time.sleep(0.25)
        return step()

    server.engine.step = slow_step  # type: ignore[method-assign]
    auth = {"Authorization": f"Bearer {KEY}"}
    aborted = 'herd:requests_finished_total{finish_reason="abort"}'
    before = metrics(server.url, auth).get(aborted, 0.0)
    try:
        page.click("#clear")
        slow.set()
        ask(page, "What is 123 * 45?")
        page.wait_for_function("document.querySelector('.msg.assistant .text')?.textContent.length > 0")
        assert page.is_enabled("#stop")
        page.click("#stop")
        page.wait_for_selector(".msg.assistant.stopped")
        stopped = assistant_texts(page)[-1]
        # The server saw the fetch end and aborted the request (not finished it).
        wait_until(lambda: metrics(server.url, auth).get(aborted, 0.0) == before + 1, "the server to abort the reply")
        wait_until(lambda: not server.engine.has_unfinished_requests(), "the engine to drop the aborted request")
        time.sleep(0.5)
        assert assistant_texts(page)[-1] == stopped  # nothing more arrived
        assert not stopped.rstrip().endswith(".")  # the answer "... = 5535." was cut short
        assert page.is_enabled("#send") and not page.is_enabled("#stop")
    finally:
        slow.clear()
        del server.engine.step
    wait_idle(server.url, headers=auth)
