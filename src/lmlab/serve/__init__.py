"""Serving: an OpenAI-compatible HTTP server with continuous batching, metrics, API keys and a chat page.

`lmlab serve --model PATH` calls `serve` below; `Engine` is the scheduler, usable without HTTP.
"""

from lmlab.serve.engine import Engine, Request
from lmlab.serve.server import serve

__all__ = ["Engine", "Request", "serve"]
