"""`ouroboros serve`: an OpenAI-compatible HTTP server (completions, chat, streaming) on one model pair.

- `schema`: what a request body may hold, checked before any work (OpenAI's error format);
- `worker`: the bounded job queue and the one thread that runs generations; `batching`: its loop
  with `--max-batch N` (continuous batching); `text`: a request's streamed text and result;
- `app`: the FastAPI app (routes, API key, error answers); `metrics`: the Prometheus counters;
- `cli`: the `serve` subcommand.
"""

from .app import DEFAULT_MAX_QUEUE, DEFAULT_MAX_TOKENS, MAX_BODY_BYTES, POOL_MODES, create_app
from .cli import API_KEY_ENV, add_serve_parser, cmd_serve
from .schema import APIError
from .worker import TextTracker, Worker, open_pool_file, tokenizer_fingerprint

__all__ = [
    "API_KEY_ENV", "APIError", "DEFAULT_MAX_QUEUE", "DEFAULT_MAX_TOKENS", "MAX_BODY_BYTES", "POOL_MODES", "Worker",
    "TextTracker", "add_serve_parser", "cmd_serve", "create_app", "open_pool_file", "tokenizer_fingerprint",
]
