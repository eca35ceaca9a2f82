"""Every error the server answers, with its status and OpenAI's error shape."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.serve.conftest import KEY, auth

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


@pytest.fixture(scope="module")
def http(tiny_server):
    with httpx.Client(base_url=tiny_server, timeout=60) as c:
        yield c


@pytest.mark.parametrize(
    "change, param",
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 2040}, "max_tokens"),  # the prompt plus 2040 tokens exceed the context of 2048
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 17}, "n"),  # more choices than the batch holds
        ({"model": "gpt-4o"}, "model"),
        ({"messages": []}, "messages"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"top_k": -1}, "top_k"),
        ({"logit_bias": {"42": 100}}, "logit_bias"),  # would change the answer: refused, not ignored
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_bad_parameters_are_400(http, change, param):
    err = assert_error(http.post("/v1/chat/completions", json={**CHAT, **change}, headers=auth()), 400, param)
    assert err["type"] == "invalid_request_error"


def test_prompt_longer_than_the_context_is_400(http):
    body = {"model": "tiny", "prompt": list(range(5, 2105)), "max_tokens": 1}
    assert_error(http.post("/v1/completions", json=body, headers=auth()), 400, "prompt", "context_length_exceeded")
    long_text = "word " * 2200
    body = {"model": "tiny", "messages": [{"role": "user", "content": long_text}]}
    assert_error(
        http.post("/v1/chat/completions", json=body, headers=auth()), 400, "messages", "context_length_exceeded"
    )
    body = {"model": "tiny", "input": long_text}
    assert_error(http.post("/v1/embeddings", json=body, headers=auth()), 400, "input")


def test_malformed_json_is_400(http):
    h = {**auth(), "Content-Type": "application/json"}
    assert_error(
        http.post("/v1/chat/completions", content=b'{"model": "tiny", "messages": [', headers=h),
        400,
        code="invalid_json",
    )
    assert_error(http.post("/v1/completions", content=b"[1, 2]", headers=h), 400, code="invalid_json")
    assert_error(http.post("/v1/completions", json={"model": "tiny"}, headers=auth()), 400, "prompt")  # missing field


def test_missing_or_wrong_key_is_401(http, tiny_server):
    assert_error(http.get("/v1/models"), 401, code="invalid_api_key")
    assert_error(http.post("/v1/chat/completions", json=CHAT), 401, code="invalid_api_key")
    assert_error(http.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer nope"}), 401)
    assert_error(http.get("/v1/models", headers={"Authorization": KEY}), 401)  # no "Bearer"
    with (
        openai.OpenAI(base_url=f"{tiny_server}/v1", api_key="wrong", max_retries=0) as c,
        pytest.raises(openai.AuthenticationError) as e,
    ):
        c.models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    # the health check, metrics and the chat page itself stay open
    assert http.get("/health").status_code == 200 and http.get("/metrics").status_code == 200
    assert http.get("/").status_code == 200


def test_unknown_routes_are_404(http):
    assert_error(http.get("/v1/engines", headers=auth()), 404)
    assert_error(http.get("/nothing/here"), 404)
    assert_error(http.get("/static/missing.js"), 404)


def test_oversized_bodies_are_413(http):
    big = b'{"model": "tiny", "prompt": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    h = {**auth(), "Content-Type": "application/json"}
    assert_error(http.post("/v1/completions", content=big, headers=h), 413, code="body_too_large")

    def chunked():  # no Content-Length: the limit is enforced while the body arrives
        for i in range(0, len(big), 1 << 20):
            yield big[i : i + (1 << 20)]

    assert_error(http.post("/v1/completions", content=chunked(), headers=h), 413, code="body_too_large")


def test_errors_are_counted_in_metrics(http):
    http.get("/v1/models")
    http.post("/v1/chat/completions", json={**CHAT, "temperature": -1}, headers=auth())
    text = http.get("/metrics").text
    assert 'lmlab_http_requests_total{endpoint="/v1/models",status="401"}' in text
    assert 'lmlab_http_requests_total{endpoint="/v1/chat/completions",status="400"}' in text
