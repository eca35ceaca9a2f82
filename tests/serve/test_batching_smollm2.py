"""Batching changes nothing, on a real model: 16 concurrent greedy chats equal each one alone and lmlab.generate."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import lmlab
from lmlab.serve.metrics import parse_metrics
from tests.serve.conftest import running_server

QUESTIONS = [
    "What is the capital of France?",
    "Name three colors.",
    "Write a haiku about rain.",
    "What is 12 times 7?",
    "Who wrote Hamlet?",
    "Translate 'hello' to Spanish.",
    "What is photosynthesis?",
    "Give me a fruit.",
    "How many legs does a spider have?",
    "At what temperature does water boil?",
    "Tell me a joke.",
    "What is Python?",
    "Say hi.",
    "What is the largest planet?",
    "Explain gravity in one sentence.",
    "List two animals.",
]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def smol_server():
    with running_server("smollm2-135m-instruct") as url:
        yield url


def _ask(url: str, question: str) -> str:
    body = {
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_16_concurrent_greedy_chats_equal_each_alone(smol_server):
    before = parse_metrics(httpx.get(f"{smol_server}/metrics").text)
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda q: _ask(smol_server, q), QUESTIONS))
    after = parse_metrics(httpx.get(f"{smol_server}/metrics").text)
    # the requests really were decoded together: some steps ran more than 8 rows at once
    wide = 'lmlab_batch_rows_per_step_bucket{le="8"}'
    steps = "lmlab_batch_rows_per_step_count"
    assert (after[steps] - before[steps]) - (after[wide] - before[wide]) > 0, "the 16 requests never shared a step"
    alone = [_ask(smol_server, q) for q in QUESTIONS]
    assert together == alone
    assert "Paris" in together[0]

    # alone through the server is alone in lmlab.generate (all 16 are checked on a tiny model in test_engine.py;
    # a quarter here keeps this test short on two cores)
    model, tok = lmlab.load_pretrained("smollm2-135m-instruct")
    for question, answer in list(zip(QUESTIONS, together))[::4]:
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        assert answer == lmlab.generate(model, tok, prompt, max_new_tokens=MAX_TOKENS)[0].text
