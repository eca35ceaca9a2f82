"""The official `openai` client against a real server process: chat, streaming, completions, embeddings."""

from __future__ import annotations

import math

import openai
import pytest

import lmlab
from tests.serve.conftest import KEY


@pytest.fixture(scope="module")
def client(tiny_server):
    with openai.OpenAI(base_url=f"{tiny_server}/v1", api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_chat_matches_lmlab_generate(client, tiny):
    model, tok = tiny
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    ref = lmlab.generate(model, tok, prompt, max_new_tokens=12)[0]
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_chat_equals_non_streamed_for_the_same_seed(client):
    args = dict(
        model="tiny",
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=24,
        temperature=0.8,
        top_p=0.9,
        seed=1234,
    )
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.content and text == whole.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # it really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 24
    other = client.chat.completions.create(**{**args, "seed": 99})
    assert other.choices[0].message.content != whole.choices[0].message.content  # the seed matters


def test_n_stop_and_logprobs(client, tiny):
    model, tok = tiny
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        temperature=1.0,
        n=3,
        seed=7,
        logprobs=True,
        top_logprobs=2,
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)
    for c in r.choices:
        for entry in c.logprobs.content:
            assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
            assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
            assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-5
    # greedy logprobs: the chosen token is the most likely one, and matches lmlab.generate's record
    g = client.completions.create(model="tiny", prompt="The sky is", max_tokens=5, temperature=0, logprobs=3)
    ref = lmlab.generate(model, tok, "The sky is", max_new_tokens=5, logprobs=True)[0]
    lp = g.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(ref.logprobs, abs=1e-4)
    assert all(
        max(top.values()) == pytest.approx(chosen, abs=1e-5) for top, chosen in zip(lp.top_logprobs, lp.token_logprobs)
    )
    # a stop string cuts the text before it
    full = g.choices[0].text
    stop = full[len(full) // 2 :][:4]
    s = client.completions.create(model="tiny", prompt="The sky is", max_tokens=5, temperature=0, stop=[stop])
    assert s.choices[0].text == full[: full.index(stop)] and s.choices[0].finish_reason == "stop"


def test_completions_plain_streamed_and_batched_prompts(client, tiny):
    model, tok = tiny
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0)
    ref = lmlab.generate(model, tok, "Once upon a time", max_new_tokens=10)[0]
    assert r.object == "text_completion" and r.choices[0].text == ref.text
    streamed = client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == ref.text
    many = client.completions.create(model="tiny", prompt=["One", "Two two"], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in many.choices] == list(range(4))
    assert many.choices[0].text == many.choices[1].text == lmlab.generate(model, tok, "One", max_new_tokens=4)[0].text
    assert many.choices[3].text == lmlab.generate(model, tok, "Two two", max_new_tokens=4)[0].text
    assert many.usage.prompt_tokens == len(tok.encode("One")) + len(tok.encode("Two two"))
    ids = client.completions.create(model="tiny", prompt=[[1, 2, 3], [4, 5]], max_tokens=4, temperature=0)
    assert ids.choices[0].text == lmlab.generate(model, tok, [1, 2, 3], max_new_tokens=4)[0].text
    assert ids.usage.prompt_tokens == 5


def test_penalties_and_top_k_extension(client, tiny):
    model, tok = tiny
    r = client.completions.create(
        model="tiny", prompt="a a a a", max_tokens=12, temperature=0, presence_penalty=1.0, frequency_penalty=0.5
    )
    ref = lmlab.generate(model, tok, "a a a a", max_new_tokens=12, presence_penalty=1.0, frequency_penalty=0.5)[0]
    assert r.choices[0].text == ref.text
    k = client.completions.create(
        model="tiny", prompt="a", max_tokens=8, temperature=1.5, seed=3, extra_body={"top_k": 1}
    )  # top-k 1 makes sampling greedy
    assert k.choices[0].text == lmlab.generate(model, tok, "a", max_new_tokens=8)[0].text


def test_embeddings_float_and_base64(client, tiny):
    texts = ["The cat sat on the mat.", "A cat was sitting on a mat.", "Stock markets fell sharply."]
    floats = client.embeddings.create(model="tiny", input=texts, encoding_format="float")
    default = client.embeddings.create(model="tiny", input=texts)  # the client asks for base64 and decodes it
    assert len(floats.data) == 3 and [d.index for d in floats.data] == [0, 1, 2]
    for a, b in zip(floats.data, default.data):
        assert len(a.embedding) == tiny[0].cfg.d_model
        assert math.isclose(sum(x * x for x in a.embedding), 1.0, rel_tol=1e-4)
        assert a.embedding == pytest.approx(b.embedding, abs=1e-6)
    assert floats.usage.prompt_tokens == sum(len(tiny[1].encode(t)) for t in texts)
    # the same text embeds the same alone and in a batch (padding is masked out)
    alone = client.embeddings.create(model="tiny", input=texts[2], encoding_format="float")
    assert alone.data[0].embedding == pytest.approx(floats.data[2].embedding, abs=1e-4)


def test_a_chats_second_turn_reuses_the_first_turns_answer(client, tiny, tiny_server):
    """Through the API as the chat page sends it (the whole conversation each time): the second request
    reuses from the prefix cache every token it shares with the first request's prompt and answer (the
    answer's last token was never fed back), not only the first prompt."""
    import httpx

    from lmlab.serve.metrics import parse_metrics
    from lmlab.serve.prefix_cache import common_prefix

    model, tok = tiny

    def reused() -> float:
        return parse_metrics(httpx.get(f"{tiny_server}/metrics", timeout=30).text)["lmlab_prefix_cache_tokens_total"]

    messages = [{"role": "system", "content": "You are a helpful assistant who answers briefly."},
                {"role": "user", "content": "Name three colors of the rainbow, please."}]  # fmt: skip
    first = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    answer = lmlab.generate(model, tok, first, max_new_tokens=16)[0]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == answer.text
    messages += [{"role": "assistant", "content": answer.text}, {"role": "user", "content": "And two more?"}]
    second = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    before = reused()
    client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)
    want = min(common_prefix(tuple(first + answer.token_ids[:-1]), second), len(second) - 1)
    assert reused() - before == want and want > len(first)
