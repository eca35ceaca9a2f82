"""`lmlab serve`: load a checkpoint, start the scheduler, and run the HTTP app under uvicorn."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from lmlab.errors import LmlabError


def model_name(path: str) -> str:
    """The id the server answers to: a packaged name as is, a path by its last component."""
    return Path(str(path).rstrip("/\\")).name or str(path)


def serve(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 16,
    max_queue: int = 64,
    max_context: int | None = None,
    request_timeout: float | None = 600.0,
    log_level: str = "info",
    device: str | None = None,
    rag: str | os.PathLike | None = None,
    compile: bool = True,
    keep_quantized: bool = False,
    draft: str | None = None,
    num_draft_tokens: int = 4,
    draft_confidence: float | None = None,
    speculate: str = "auto",
    draft_tree: str | None = "auto",
) -> None:
    """Serve `model` with OpenAI's API until interrupted; `api_key` falls back to $LMLAB_API_KEY.
    With `compile` (the default), decode steps run as compiled graphs once they are built: each batch
    size bucket's graph compiles in the background when first needed (a line says when it is
    ready), eager steps serving meanwhile. `keep_quantized` keeps a GGUF file's Q8_0/Q4_0/Q4_1 blocks
    quantized where lmlab's kernels run them (as `lmlab generate` and `chat` do): 2-2.5x the
    tokens/s for one client, about level for 16, where a batch is bound by multiply-adds, not by
    reading weights (benchmarks/serve.py [--keep-quantized], docs/compress.md). `draft` (a checkpoint,
    or ":N" for the model's first N layers) decodes a request that runs alone by speculative rounds
    (serve/engine.py) while those measure faster than plain steps (`speculate` "auto"; "always": every
    lone step), over a candidate tree of the draft's guesses where `draft_tree` says (as `lmlab
    generate --draft-tree`); with others running, the batch decodes as usual."""
    import uvicorn

    from lmlab.model.checkpoint import load_pretrained
    from lmlab.serve.app import create_app
    from lmlab.serve.engine import Engine

    api_key = api_key or os.environ.get("LMLAB_API_KEY") or None
    from lmlab.model.quantized import runs_quantized
    from lmlab.utils.device import default_device

    device = default_device(device)
    if keep_quantized and not runs_quantized(device):
        print("lmlab: --keep-quantized: lmlab's quantized kernels do not run here; loading float32 weights", flush=True)
    loaded, tokenizer = load_pretrained(model, device=device, dequantize="auto" if keep_quantized else True)
    if tokenizer is None:
        raise LmlabError("this checkpoint has no tokenizer; the server needs one", file=str(model))
    grounder = None
    if rag is not None:  # opened before the engine starts: a bad index fails fast, with one line
        from lmlab.rag.chat import ChatGrounder

        grounder = ChatGrounder(rag)
    speculative = {}
    if draft is not None:
        from lmlab.generate.speculative import load_draft

        speculative = {"draft": load_draft(draft, loaded, device), "num_draft_tokens": num_draft_tokens,
                       "speculate": speculate, "draft_tree": draft_tree}  # fmt: skip
        if draft_confidence is not None:
            speculative["draft_confidence"] = draft_confidence
    engine = Engine(
        loaded,
        tokenizer,
        max_batch=max_batch,
        max_queue=max_queue,
        max_context=max_context,
        compile=compile,
        **speculative,
    )
    engine_log = logging.getLogger("lmlab.serve")
    if not engine_log.handlers:  # the engine's lines (a graph compiled) beside uvicorn's
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("lmlab: %(message)s"))
        engine_log.addHandler(handler)
        engine_log.setLevel(logging.INFO)
    name = model_name(model)
    app = create_app(
        engine, name, aliases=(str(model),), api_key=api_key, request_timeout=request_timeout, rag=grounder
    )
    shown = f"[{host}]" if ":" in host else host
    print(f"lmlab: serving {name!r} on http://{shown}:{port} (chat page: http://{shown}:{port}/)", flush=True)
    # the scheduler runs in this (the main) thread, where the model's OpenMP work is fastest (see
    # Engine.serve_forever); HTTP in a thread of its own, which stops the engine when it ends
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5))

    def http() -> None:
        try:
            server.run()
        finally:
            engine.close()

    def stop(signum, frame) -> None:  # SIGTERM as Ctrl-C: a clean shutdown
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    thread = threading.Thread(target=http, name="lmlab-http", daemon=True)
    thread.start()
    try:
        engine.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        engine.close()
        thread.join(timeout=10)
    if not server.started:
        raise LmlabError(f"the HTTP server did not start on {shown}:{port} (see the error above)", field="port")


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launched(model: str | os.PathLike, *flags: str, port: int | None = None, startup_s: float = 180.0) -> Iterator[str]:
    """`lmlab serve` in a child process on a free loopback port: yields its base URL once /health answers, stops it
    after. For tests, benchmarks and demos; `flags` are extra CLI flags such as "--api-key", "KEY"."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "lmlab.cli", "serve", "--model", str(model), "--port", str(port), *flags]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise LmlabError(f"the server exited with {proc.returncode}:\n{proc.stdout.read()}")
            with (
                contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError),
                urllib.request.urlopen(f"{url}/health", timeout=2) as r,
            ):
                if r.status == 200:
                    break
            if time.monotonic() > deadline:
                raise LmlabError(f"the server did not answer /health within {startup_s:g}s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
