"""`lmlab serve --rag INDEX`: chat completions grounded in the index (the `lmlab_rag` extension field), streamed and
not, and the chat page showing each answer's sources (headless Chromium)."""

from __future__ import annotations

import json
import os
import urllib.request

import pytest

from lmlab.serve.server import launched
from tests.serve.conftest import make_tiny
from tests.serve.test_chat_page import ARGS, CHROMIUM


@pytest.fixture(scope="module")
def rag_server(tmp_path_factory, small_index):
    tiny = make_tiny(tmp_path_factory.mktemp("rag-serve") / "tiny")
    with launched(tiny, "--rag", str(small_index), "--no-compile") as url:
        yield url


def _post(url: str, body: dict) -> bytes:
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.read()


def test_chat_completion_returns_sources_and_citations(rag_server):
    body = {"model": "tiny", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "At what temperature is green tea brewed?"}]}  # fmt: skip
    r = json.loads(_post(rag_server, body))
    rag = r["lmlab_rag"]
    assert not rag["abstained"] and len(rag["sources"]) == 3 and rag["sources"][0]["doc_id"] == "tea.md"
    assert isinstance(rag["citations"], list) and isinstance(rag["removed_citations"], int)
    assert r["choices"][0]["message"]["role"] == "assistant"
    events = [json.loads(line[6:]) for line in _post(rag_server, body | {"stream": True}).decode().split("\n\n")
              if line.startswith("data: {")]  # fmt: skip
    assert events[-1]["lmlab_rag"]["sources"][0]["doc_id"] == "tea.md"
    far = json.loads(
        _post(rag_server, body | {"messages": [{"role": "user", "content": "Who won the 1998 World Cup?"}]})
    )
    assert far["lmlab_rag"]["abstained"] and far["choices"][0]["message"]["content"].startswith("I don't know")


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is missing (make setup installs it)")
def test_chat_page_shows_sources(rag_server):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.goto(rag_server + "/")
            expect(page.locator("#model-name")).to_have_text("tiny")
            page.fill("#max-tokens", "8")
            page.fill("#input", "How long does a worker bee live?")
            page.keyboard.press("Enter")
            sources = page.locator(".msg.assistant .sources li")
            expect(sources.first).to_contain_text("bees.md", timeout=60_000)
            assert sources.count() == 3
            expect(page.locator(".msg.assistant .sources-note")).to_contain_text("sources (cited:")
        finally:
            browser.close()
