"""The HTTP app: OpenAI's routes over the Engine, server-sent events, API keys, errors in OpenAI's shape, the chat page.

Handlers only validate, tokenize and translate: every forward happens in the engine's thread.
Events cross from that thread into the event loop with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmlab.errors import LmlabError
from lmlab.generate.config import GenerationConfig
from lmlab.serve import schemas as S
from lmlab.serve.engine import Delta, Done, Engine, Failed, QueueFull, Request
from lmlab.serve.metrics import Counter, Histogram

STATIC = Path(__file__).parent / "static"
ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/health", "/metrics", "/")
_DISCONNECTED = object()


class APIError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code=None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        """The JSON response of this error."""
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        body = S.error_body(self.message, self.type, self.param, self.code)
        return JSONResponse(body, status_code=self.status, headers=headers)


def _from_validation(e: ValidationError) -> APIError:
    first = e.errors()[0]
    loc = first["loc"]
    param = str(loc[0]) if loc else None
    where = ".".join(map(str, loc))
    return APIError(400, f"{where}: {first['msg']}" if where else first["msg"], param=param)


def _from_lmlab(e: LmlabError) -> APIError:
    return APIError(400, str(e), param=e.field)


class _Metered:
    """ASGI middleware: counts requests by endpoint and status, times them, refuses oversized bodies early."""

    def __init__(self, app, requests: Counter, latency: Histogram, max_body_bytes: int) -> None:
        self.app, self.requests, self.latency, self.max_body = app, requests, latency, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "/static" if path.startswith("/static/") else "other"
        start, status = time.monotonic(), [500]

        async def send_and_note(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                err = APIError(413, f"the request body is larger than {self.max_body} bytes", code="body_too_large")
                await err.response()(scope, receive, send_and_note)
            else:
                await self.app(scope, receive, send_and_note)
        finally:
            self.requests.inc(endpoint=endpoint, status=str(status[0]))
            self.latency.observe(time.monotonic() - start, endpoint=endpoint)


def create_app(
    engine: Engine,
    model_id: str,
    *,
    aliases: tuple[str, ...] = (),
    api_key: str | None = None,
    max_body_bytes: int = 4 * 1024 * 1024,
    request_timeout: float | None = 600.0,
    rag=None,
) -> FastAPI:
    """The FastAPI app serving `engine`'s model under the name `model_id` (or any of `aliases`).

    rag: a `lmlab.rag.chat.ChatGrounder`; chat completions then answer from its index with numbered sources,
    and the response's extension field `lmlab_rag` holds the sources and the citations the answer makes.
    """
    tokenizer, context = engine.tokenizer, engine.context
    names = {model_id, *aliases}
    app = FastAPI(title="lmlab", docs_url=None, redoc_url=None, openapi_url=None)
    registry = engine.registry
    requests = registry.add(
        Counter("lmlab_http_requests_total", "HTTP requests by endpoint and status", ["endpoint", "status"])
    )
    latency = registry.add(
        Histogram("lmlab_http_request_seconds", "Time to answer a request (streams: to the end)", ["endpoint"])
    )

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, str(e.detail), kind).response()

    @app.exception_handler(Exception)
    async def _crash(_, e: Exception):
        return APIError(500, f"internal error: {e}", "server_error").response()

    def check_key(request: HTTPRequest) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if not header:
            raise APIError(401, "no API key: send the header 'Authorization: Bearer KEY'", code="invalid_api_key")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    async def read_json(request: HTTPRequest) -> dict:
        body, size = bytearray(), 0
        async for chunk in request.stream():  # counted as it arrives: a chunked body has no content-length
            size += len(chunk)
            if size > max_body_bytes:
                raise APIError(413, f"the request body is larger than {max_body_bytes} bytes", code="body_too_large")
            body += chunk
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"malformed JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        return data

    def parse(model_cls, data: dict):
        try:
            body = model_cls.model_validate(data)
        except ValidationError as e:
            raise _from_validation(e) from None
        if body.model not in names:
            raise APIError(
                400,
                f"unknown model {body.model!r}; this server serves {model_id!r}",
                param="model",
                code="model_not_found",
            )
        # fields that would change the answer if honoured: refuse rather than silently ignore them
        extra = body.model_extra or {}
        for name in ("tools", "functions", "logit_bias"):
            if extra.get(name):
                raise APIError(400, f"{name} is not supported by this server", param=name)
        fmt = extra.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type", "text") != "text":
            raise APIError(400, "only the text response_format is supported", param="response_format")
        return body

    def sampling(body: S.SamplingBody, prompt_len: int, max_tokens: int | None, default_max: int) -> GenerationConfig:
        if prompt_len == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        if prompt_len >= context:
            raise APIError(
                400,
                f"the prompt has {prompt_len} tokens; this model's context is {context}",
                param="messages" if isinstance(body, S.ChatCompletionBody) else "prompt",
                code="context_length_exceeded",
            )
        max_tokens = max_tokens if max_tokens is not None else min(default_max, context - prompt_len)
        if prompt_len + max_tokens > context:
            raise APIError(
                400,
                f"max_tokens {max_tokens} + the prompt's {prompt_len} tokens exceed the context of {context}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if body.n is not None and body.n > engine.max_batch:
            raise APIError(400, f"n must be <= {engine.max_batch} (the server's --max-batch)", param="n")

        def given(x, default):
            return default if x is None else x

        try:
            return GenerationConfig(
                max_new_tokens=max_tokens,
                temperature=given(body.temperature, 1.0),
                top_p=given(body.top_p, 1.0),
                top_k=given(body.top_k, 0),
                min_p=given(body.min_p, 0.0),
                repetition_penalty=given(body.repetition_penalty, 1.0),
                presence_penalty=given(body.presence_penalty, 0.0),
                frequency_penalty=given(body.frequency_penalty, 0.0),
                num_return_sequences=given(body.n, 1),
                stop=body.stop_list(),
                seed=body.seed,
            )
        except LmlabError as e:
            raise _from_lmlab(e) from None

    def submit(prompts: list[list[int]], config: GenerationConfig, top_logprobs, ignore_eos: bool):
        """Engine requests for each prompt, their events merged into one queue as (prompt index, event)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        reqs = []
        try:
            for k, ids in enumerate(prompts):

                def on_event(ev, k=k):
                    loop.call_soon_threadsafe(queue.put_nowait, (k, ev))

                reqs.append(
                    engine.submit(Request(ids, config, on_event, top_logprobs, bool(ignore_eos), request_timeout))
                )
        except QueueFull as e:
            for r in reqs:
                engine.cancel(r)
            raise APIError(
                429, f"the server is busy ({e}); retry later", "rate_limit_error", code="queue_full"
            ) from None
        except LmlabError as e:
            for r in reqs:
                engine.cancel(r)
            raise _from_lmlab(e) from None
        return queue, reqs

    async def events(queue: asyncio.Queue, n_prompts: int) -> AsyncIterator[tuple[int, object]]:
        done = 0
        while done < n_prompts:
            k, ev = await queue.get()
            if ev is _DISCONNECTED:
                return
            if isinstance(ev, Done):
                done += 1
            yield k, ev
            if isinstance(ev, Failed):
                return

    async def watch_disconnect(request: HTTPRequest, queue: asyncio.Queue) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        queue.put_nowait((None, _DISCONNECTED))

    async def collect(request: HTTPRequest, queue, reqs, n: int):
        """Wait for a non-streamed answer: per choice its text, logprob entries and finish reason; plus usage."""
        texts, entries, reasons, used = {}, {}, {}, [0, 0]
        watcher = asyncio.create_task(watch_disconnect(request, queue))
        finished = False
        try:
            async for k, ev in events(queue, len(reqs)):
                if isinstance(ev, Delta):
                    i = k * n + ev.index
                    texts[i] = texts.get(i, "") + ev.text
                    entries.setdefault(i, []).extend(ev.logprobs)
                    if ev.finish_reason:
                        reasons[i] = ev.finish_reason
                elif isinstance(ev, Done):
                    used[0] += ev.prompt_tokens
                    used[1] += ev.completion_tokens
                elif isinstance(ev, Failed):
                    raise APIError(ev.status, ev.message, ev.type, code=ev.code)
            finished = len(reasons) == len(reqs) * n
        finally:
            watcher.cancel()
            if not finished:
                for r in reqs:
                    engine.cancel(r)
        return texts, entries, reasons, S.usage(*used)

    def sse(request_id: str, kind: str, queue, reqs, n: int, chat: bool, include_usage: bool, want_logprobs: bool,
            rag_info: dict | None = None):  # fmt: skip
        async def gen() -> AsyncIterator[str]:
            finished, used, offsets, full = False, [0, 0], {}, {}
            try:
                if chat:  # OpenAI opens each choice with the assistant role
                    for i in range(len(reqs) * n):
                        delta = {"role": "assistant", "content": ""}
                        choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": None}
                        yield _data(S.envelope(kind, request_id, model_id, [choice]))
                async for k, ev in events(queue, len(reqs)):
                    if isinstance(ev, Delta):
                        i = k * n + ev.index
                        if not ev.text and not ev.logprobs and not ev.finish_reason:
                            continue
                        lp = None
                        if want_logprobs:
                            if chat:
                                lp = S.chat_logprobs(ev.logprobs)
                            else:
                                lp = S.completion_logprobs(ev.logprobs, offsets.get(i, 0))
                        offsets[i] = offsets.get(i, 0) + len(ev.text)
                        full[i] = full.get(i, "") + ev.text
                        if chat:
                            choice = {"index": i, "delta": {"content": ev.text} if ev.text else {}}
                        else:
                            choice = {"index": i, "text": ev.text}
                        choice.update(logprobs=lp, finish_reason=ev.finish_reason)
                        yield _data(S.envelope(kind, request_id, model_id, [choice]))
                    elif isinstance(ev, Done):
                        used[0] += ev.prompt_tokens
                        used[1] += ev.completion_tokens
                    elif isinstance(ev, Failed):
                        yield _data(S.error_body(ev.message, ev.type, code=ev.code))
                        break
                else:
                    if rag_info is not None:  # the streamed text cannot be taken back: say what it cites at the end
                        info = rag.finish(full.get(0, ""), rag_info)[1]
                        yield _data(S.envelope(kind, request_id, model_id, []) | {"lmlab_rag": info})
                    if include_usage:
                        yield _data(S.envelope(kind, request_id, model_id, [], usage=S.usage(*used)))
                yield "data: [DONE]\n\n"
                finished = True
            finally:
                if not finished:  # the client went away mid-stream: free its rows now
                    for r in reqs:
                        engine.cancel(r)

        return StreamingResponse(gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @v1.get("/models")
    async def models():
        card = {"id": model_id, "object": "model", "created": 0, "owned_by": "lmlab", "max_model_len": context}
        return {"object": "list", "data": [card]}

    @v1.post("/completions")
    async def completions(request: HTTPRequest):
        body = parse(S.CompletionBody, await read_json(request))
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if body.best_of not in (None, 1) and body.best_of != body.n:
            raise APIError(400, "best_of is not supported", param="best_of")
        p = body.prompt
        if isinstance(p, str):
            prompts = [tokenizer.encode(p)]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        else:
            prompts = [tokenizer.encode(x) if isinstance(x, str) else list(x) for x in p]
        if not prompts:
            raise APIError(400, "the prompt is empty", param="prompt")
        if any(t < 0 or t >= tokenizer.vocab_size for ids in prompts for t in ids):
            raise APIError(400, "a prompt token id is outside the vocabulary", param="prompt")
        if any(len(ids) == 0 for ids in prompts):
            raise APIError(400, "the prompt is empty", param="prompt")
        # one config for every prompt, checked against the longest; 16 is OpenAI's default max_tokens here
        config = sampling(body, max(map(len, prompts)), body.max_tokens, 16)
        queue, reqs = submit(prompts, config, body.logprobs, body.ignore_eos)
        n = config.num_return_sequences
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return sse(S.new_id("cmpl"), "text_completion", queue, reqs, n, False, include, body.logprobs is not None)
        texts, entries, reasons, use = await collect(request, queue, reqs, n)
        choices = [
            {
                "index": i,
                "text": texts.get(i, ""),
                "logprobs": S.completion_logprobs(entries.get(i, [])) if body.logprobs is not None else None,
                "finish_reason": reasons.get(i),
            }
            for i in range(len(reqs) * n)
        ]
        return S.envelope("text_completion", S.new_id("cmpl"), model_id, choices, usage=use)

    @v1.post("/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body = parse(S.ChatCompletionBody, await read_json(request))
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        rag_info = None
        if rag is not None:
            messages, rag_info = await asyncio.to_thread(rag.prepare, messages)
            if rag_info["abstained"]:  # nothing relevant in the index: say so rather than let the model guess
                return _abstention(body.stream, rag.finish("", rag_info))
        try:
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except LmlabError as e:
            raise _from_lmlab(e) from None
        except Exception as e:  # the template itself refused the conversation (roles out of order, ...)
            raise APIError(400, f"the chat template failed on these messages: {e}", param="messages") from None
        ids = tokenizer.encode(prompt)
        top = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        config = sampling(body, len(ids), max_tokens, context)
        queue, reqs = submit([ids], config, top, body.ignore_eos)
        n = config.num_return_sequences
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return sse(S.new_id("chatcmpl"), "chat.completion.chunk", queue, reqs, n, True, include, top is not None,
                       rag_info)  # fmt: skip
        texts, entries, reasons, use = await collect(request, queue, reqs, n)
        extra = {}
        if rag_info is not None:
            texts[0], extra["lmlab_rag"] = rag.finish(texts.get(0, ""), rag_info)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": texts.get(i, "")},
                "logprobs": S.chat_logprobs(entries.get(i, [])) if top is not None else None,
                "finish_reason": reasons.get(i),
            }
            for i in range(n)
        ]
        return S.envelope("chat.completion", S.new_id("chatcmpl"), model_id, choices, usage=use) | extra

    def _abstention(stream: bool, answer: tuple[str, dict]):
        text, info = answer
        if not stream:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": "stop"}  # fmt: skip
            return S.envelope("chat.completion", S.new_id("chatcmpl"), model_id, [choice], usage=S.usage(0, 0)) | {
                "lmlab_rag": info
            }
        rid = S.new_id("chatcmpl")

        async def gen() -> AsyncIterator[str]:
            delta = {"role": "assistant", "content": text}
            yield _data(S.envelope("chat.completion.chunk", rid, model_id,
                                   [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": "stop"}]))  # fmt: skip
            yield _data(S.envelope("chat.completion.chunk", rid, model_id, []) | {"lmlab_rag": info})
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @v1.post("/embeddings")
    async def embeddings(request: HTTPRequest):
        body = parse(S.EmbeddingBody, await read_json(request))
        x = body.input
        if isinstance(x, str):
            rows = [tokenizer.encode(x)]
        elif x and all(isinstance(t, int) for t in x):
            rows = [list(x)]
        else:
            rows = [tokenizer.encode(t) if isinstance(t, str) else list(t) for t in x]
        if not rows or any(len(r) == 0 for r in rows):
            raise APIError(400, "every input needs at least one token", param="input")
        if any(len(r) > context for r in rows):
            raise APIError(
                400,
                f"an input is longer than the context of {context} tokens",
                param="input",
                code="context_length_exceeded",
            )
        if body.dimensions is not None and body.dimensions != engine.model.cfg.d_model:
            raise APIError(
                400, f"this model's embeddings have {engine.model.cfg.d_model} dimensions", param="dimensions"
            )
        vectors = await asyncio.wrap_future(engine.embed(rows))
        data = []
        for i, v in enumerate(vectors):
            emb = base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if body.encoding_format == "base64" else v
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = sum(map(len, rows))
        return {
            "object": "list",
            "data": data,
            "model": model_id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    app.include_router(v1)

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": model_id,
            "running": engine.running_requests,
            "waiting": engine.waiting_requests,
        }

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(registry.render(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(_Metered, requests=requests, latency=latency, max_body_bytes=max_body_bytes)
    return app


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
