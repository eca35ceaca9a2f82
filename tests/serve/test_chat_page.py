"""The chat page in headless Chromium (Debian's, driven by Playwright): type, watch the answer stream, move a slider."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.serve.conftest import KEY

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason="Debian chromium is missing: `make setup` installs it (apt-get install chromium)",
)


def _open(browser, url: str, requests: list, external: list | None = None):
    """The chat page of the server at `url` with the API key entered, its model listed; each chat
    request's JSON body goes to `requests`, and each URL outside the server to `external`."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1100, "height": 700})
    if external is not None:
        page.on("request", lambda r: external.append(r.url) if not r.url.startswith(url) else None)
    page.on(
        "request",
        lambda r: requests.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None,
    )
    page.goto(url + "/")
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.reload()  # the key comes back from localStorage, and the model list loads with it
    expect(page.locator("#model-name")).to_have_text("tiny")
    return page


def test_chat_page_streams_an_answer_and_sends_the_sliders(tiny_server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    shot = Path(os.environ.get("LMLAB_SCREENSHOT_DIR", tmp_path)) / "chat_page.png"
    requests = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            external = []
            page = _open(browser, tiny_server, requests, external)

            page.fill("#system", "You are terse.")
            page.fill("#temperature", "0")  # a slider: the label follows it
            expect(page.locator("#temperature-value")).to_have_text("0.00")
            page.fill("#max-tokens", "40")
            expect(page.locator("#max-tokens-value")).to_have_text("40")
            page.fill("#top-k", "5")
            expect(page.locator("#top-k-value")).to_have_text("5")

            page.fill("#input", "Hello there, who are you?")
            page.keyboard.press("Enter")
            expect(page.locator(".msg.user .text")).to_have_text("Hello there, who are you?")
            answer = page.locator(".msg.assistant").last
            expect(page.locator("#stats")).to_contain_text("tok/s", timeout=60_000)
            expect(page.locator("#send")).to_be_enabled(timeout=60_000)
            text = answer.locator(".text").inner_text()
            assert text.strip(), "no answer text appeared"
            assert int(answer.get_attribute("data-chunks")) > 1  # it arrived in pieces, not at once
            assert re.fullmatch(
                r"\d+ tokens · [\d.]+ tok/s · first token after [\d.]+ s", page.locator("#stats").inner_text()
            )
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not external, f"the page fetched something outside the server: {external}"
    sent = requests[-1]
    assert sent["stream"] is True and sent["temperature"] == 0 and sent["top_k"] == 5 and sent["max_tokens"] == 40
    assert sent["messages"][0] == {"role": "system", "content": "You are terse."}


def test_a_chat_that_outgrows_the_context_leaves_its_oldest_messages_out(tiny_dir, tmp_path):
    """A server with a 160-token context and 40-token answers: the third question no longer fits with the
    whole conversation, so the page sends it without the oldest question and answer (as `lmlab chat`
    drops them), says so, and the answer streams instead of an error."""
    from playwright.sync_api import expect, sync_playwright

    from tests.serve.conftest import running_server

    requests = []
    with (
        running_server(tiny_dir, "--api-key", KEY, "--no-compile", "--max-context", "160") as url,
        sync_playwright() as p,
    ):
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = _open(browser, url, requests)
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "40")
            for i in range(4):
                page.fill("#input", f"Question {i}: tell me something about the number {i * 7}, please.")
                page.keyboard.press("Enter")
                expect(page.locator(".msg.assistant")).to_have_count(i + 1)
                expect(page.locator("#stats")).to_contain_text("tok/s", timeout=60_000)
                expect(page.locator("#send")).to_be_enabled(timeout=60_000)
            notes = page.locator(".msg.note").all_inner_texts()
            errors = page.locator(".msg.error").count()
            page.screenshot(path=str(Path(os.environ.get("LMLAB_SCREENSHOT_DIR", tmp_path)) / "chat_page_long.png"))
        finally:
            browser.close()
    assert errors == 0 and notes and all("oldest messages no longer fit" in n for n in notes)
    # each turn's last request: the newest question last, and from the third on fewer messages than sent
    last = [r for r in requests if r["messages"][-1]["content"].startswith("Question")]
    by_question: dict[str, list] = {}
    for r in last:
        by_question[r["messages"][-1]["content"]] = r["messages"]
    counts = [len(m) for m in by_question.values()]
    assert len(counts) == 4 and counts[0] == 1 and counts[1] == 3
    assert min(counts[2:]) < 5 and all(m[0]["content"].startswith("Question") for m in by_question.values())
