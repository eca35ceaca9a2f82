"""Load: 64 concurrent streaming clients, a full queue (429), and clients that leave mid-stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time

import httpx
import pytest

from lmlab.serve.metrics import parse_metrics
from tests.serve.conftest import auth, running_server

RUNNING, WAITING = "lmlab_requests_running", "lmlab_requests_waiting"


def metrics(url: str) -> dict[str, float]:
    return parse_metrics(httpx.get(f"{url}/metrics", timeout=30).text)


def wait_for(url: str, condition, what: str, limit_s: float = 60.0) -> dict[str, float]:
    """Poll /metrics until `condition(values)` holds; the limit only guards against a hang."""
    deadline = time.monotonic() + limit_s
    while True:
        m = metrics(url)
        if condition(m):
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: never happened; metrics {m}")
        time.sleep(0.02)


async def _stream_one(client: httpx.AsyncClient, i: int) -> tuple[str, list[str]]:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": f"client {i}: say something about the number {i * 7}"}],
        "max_tokens": 12 + i % 9,
        "temperature": 0 if i % 2 else 0.7,
        "seed": i,
        "stream": True,
    }
    text, reasons = [], []
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=auth()) as r:
        assert r.status_code == 200, await r.aread()
        lines = [line async for line in r.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line.removeprefix("data: "))
        assert "error" not in chunk, chunk
        choice = chunk["choices"][0]
        text.append(choice["delta"].get("content") or "")
        if choice["finish_reason"]:
            reasons.append(choice["finish_reason"])
    return "".join(text), reasons


def test_64_concurrent_streams_finish_and_leak_nothing(tiny_server):
    before = metrics(tiny_server)

    async def main():
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=tiny_server, limits=limits, timeout=120) as client:
            return await asyncio.wait_for(asyncio.gather(*(_stream_one(client, i) for i in range(64))), 240)

    results = asyncio.run(main())
    assert len(results) == 64
    assert all(len(reasons) == 1 for _, reasons in results)
    after = metrics(tiny_server)
    key = 'lmlab_http_requests_total{endpoint="/v1/chat/completions",status="200"}'
    assert after[key] - before.get(key, 0) == 64
    assert after[RUNNING] == 0 and after[WAITING] == 0
    assert after["lmlab_batch_rows"] == 0 and after["lmlab_kv_cache_used_tokens"] == 0
    assert after["lmlab_time_to_first_token_seconds_count"] - before["lmlab_time_to_first_token_seconds_count"] == 64


@pytest.fixture(scope="module")
def narrow_server(tiny_dir):
    """One row and one waiting place: easy to fill."""
    with running_server(
        tiny_dir, "--api-key", "sk-lmlab-test", "--max-batch", "1", "--max-queue", "1", "--no-compile"
    ) as url:
        yield url


LONG = {"model": "tiny", "prompt": "Count with me:", "max_tokens": 2000, "ignore_eos": True, "temperature": 0}


def test_full_queue_answers_429_and_a_disconnect_frees_the_slot(narrow_server):
    url = narrow_server
    generated_before = metrics(url)["lmlab_generated_tokens_total"]
    with httpx.Client(base_url=url, timeout=120) as http:
        # A holds the only row (2000 tokens: seconds of work)
        with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}, headers=auth()) as a:
            assert a.status_code == 200
            lines = a.iter_lines()
            assert next(line for line in lines if line).startswith("data: ")
            # B takes the only waiting place
            b_result = {}
            b = threading.Thread(
                target=lambda: b_result.update(
                    r=httpx.post(
                        f"{url}/v1/completions",
                        json={"model": "tiny", "prompt": "B", "max_tokens": 3, "temperature": 0},
                        headers=auth(),
                        timeout=120,
                    )
                )
            )
            b.start()
            wait_for(url, lambda m: m[WAITING] == 1 and m[RUNNING] == 1, "B queued behind A")
            # C finds the queue full
            c = http.post("/v1/completions", json={"model": "tiny", "prompt": "C", "max_tokens": 3}, headers=auth())
            assert c.status_code == 429, c.text
            err = c.json()["error"]
            assert err["type"] == "rate_limit_error" and err["code"] == "queue_full"
        # leaving A's stream closes the connection mid-stream: its row must be freed long before its 2000 tokens
        b.join(120)
        assert b_result["r"].status_code == 200 and b_result["r"].json()["choices"][0]["finish_reason"] == "length"
    m = wait_for(url, lambda m: m[RUNNING] == 0 and m[WAITING] == 0, "the server emptied")
    assert m["lmlab_generated_tokens_total"] - generated_before < 2000 + 3
    assert m['lmlab_requests_aborted_total{reason="cancelled"}'] >= 1
    assert m["lmlab_kv_cache_used_tokens"] == 0


def test_a_non_streamed_client_that_leaves_frees_its_slot(narrow_server):
    url = narrow_server
    before = metrics(url)

    def leave_early():
        with contextlib.suppress(httpx.TimeoutException):  # the client gives up and closes the connection
            httpx.post(f"{url}/v1/completions", json=LONG, headers=auth(), timeout=0.5)

    wait_for(url, lambda m: m[RUNNING] == 0, "idle at the start")
    leave_early()
    cancelled = 'lmlab_requests_aborted_total{reason="cancelled"}'
    m = wait_for(
        url,
        lambda m: m.get(cancelled, 0) - before.get(cancelled, 0) == 1 and m[RUNNING] == 0 and m[WAITING] == 0,
        "the abandoned request stopped",
    )
    assert m["lmlab_generated_tokens_total"] - before["lmlab_generated_tokens_total"] < 2000
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "next", "max_tokens": 2}, headers=auth())
    assert r.status_code == 200
