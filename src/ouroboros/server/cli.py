"""`ouroboros serve`: its arguments, and the start that loads the pair, binds, and says what it serves."""

from __future__ import annotations

import argparse
import os
import socket
import sys

from ..arguments import (
    DEFAULT_METHOD,
    add_config_arguments,
    add_model_arguments,
    apply_threads,
    check_minimums,
    check_model_arguments,
    config_from_args,
    draft_vocab_from_args,
    fast_from_args,
    method_help,
)
from ..errors import InvalidArgumentError
from ..methods import METHODS, get_method
from ..static_runner import fast_path_blocker
from .app import DEFAULT_MAX_QUEUE, DEFAULT_MAX_TOKENS, POOL_MODES, create_app
from .kv_budget import GIB

API_KEY_ENV = "OUROBOROS_API_KEY"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_serve_parser(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="serve the pair over an OpenAI-compatible HTTP API",
                                  description=cmd_serve.__doc__)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    serve.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS, help=method_help())
    serve.add_argument("--model-name", help="the model id clients send (default: the target directory's name)")
    serve.add_argument("--api-key", default=None,
                       help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} if set, else none)")
    serve.add_argument("--pool", dest="pool_mode", default="shared", choices=POOL_MODES,
                       help="one warm phrase pool for all requests (shared, default) or a cold one per request")
    serve.add_argument("--pool-file", help="load the shared pool from this file at start, save it there on "
                                           "shutdown and periodically (a missing file starts cold)")
    serve.add_argument("--pool-save-interval", type=float, default=300.0,
                       help="seconds between saves of --pool-file (default 300)")
    serve.add_argument("--default-max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                       help=f"max_tokens when a request gives none (default {DEFAULT_MAX_TOKENS})")
    serve.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                       help=f"requests that may wait behind the running one; more get 503 with Retry-After "
                            f"(default {DEFAULT_MAX_QUEUE})")
    serve.add_argument("--max-batch", type=int, default=1,
                       help="requests decoded together, joining and leaving the batch at any step (continuous "
                            "batching; default 1: one at a time)")
    serve.add_argument("--kv-memory", type=float, default=None, metavar="GB",
                       help="GiB of keys and values the running requests may reserve together (their prompts plus "
                            "max_tokens in both models' caches); a request that does not fit waits, one that "
                            "never fits gets 400 (default: half the memory available once the models are loaded)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_model_arguments(serve)
    add_config_arguments(serve)
    serve.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the target (with its draft) over an OpenAI-compatible HTTP API: /v1/completions,
    /v1/chat/completions, /v1/models, /health and /metrics. Requests run one at a time, or with
    --max-batch N up to N together (continuous batching); Ctrl-C stops the server and saves --pool-file."""
    import uvicorn

    from ..loading import load_pair

    config = config_from_args(args)
    if not 0 <= args.port <= 65535:
        raise InvalidArgumentError(f"--port must be in 0..65535, got {args.port}")
    check_minimums(("--max-queue", args.max_queue, 0), ("--default-max-tokens", args.default_max_tokens, 1),
                   ("--max-batch", args.max_batch, 1))
    if args.kv_memory is not None and not args.kv_memory > 0:
        raise InvalidArgumentError(f"--kv-memory must be a number of GiB > 0, got {args.kv_memory}")
    if args.pool_file is not None and args.pool_mode != "shared":
        raise InvalidArgumentError("--pool-file needs --pool shared: a per-request pool is never kept")
    check_model_arguments(args, needs_draft=get_method(args.method).needs_draft, what=f"--method {args.method}")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    apply_threads(args)
    target, draft, tokenizer = load_pair(args.target, args.draft, dtype=args.dtype, device=args.device)
    app = create_app(target, draft, tokenizer, config=config, method=args.method, pool_mode=args.pool_mode,
                     pool_file=args.pool_file, pool_save_interval=args.pool_save_interval, api_key=api_key,
                     model_name=args.model_name, default_max_tokens=args.default_max_tokens,
                     max_queue=args.max_queue, fast=fast_from_args(args), on_ready=_say_ready,
                     max_batch=args.max_batch, kv_memory=args.kv_memory * GIB if args.kv_memory else None,
                     draft_vocab=draft_vocab_from_args(args))
    sock = _listen(args.host, args.port)
    compiles = fast_path_blocker(target, fast_from_args(args)) is None
    print(banner(f"http://{_url_host(args.host)}:{sock.getsockname()[1]}", app.state.model_name, args.method,
                 api_key is not None, args.max_queue, compiles, args.max_batch, app.state.worker.kv_memory,
                 app.state.worker.kv_per_token), flush=True)
    if api_key is None and args.host not in LOCAL_HOSTS:
        print(f"ouroboros serve: warning: listening on {args.host} without an API key: anyone who can reach "
              f"this port can use the models (set {API_KEY_ENV} or --api-key)", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: stopping is the normal way out
        pass
    finally:
        sock.close()
    if not server.started:
        print("ouroboros serve: error: the server did not start (the log above says why)", file=sys.stderr)
        return 1
    return 0


def banner(url: str, model: str, method: str, key_required: bool, max_queue: int, compiles: bool = False,
           max_batch: int = 1, kv_memory: int | None = None, kv_per_token: int | None = None) -> str:
    """What a user needs to connect: where, which model id to send, how it decodes, whether a key is
    needed, and that a warm-up runs first."""
    key = f"required (Authorization: Bearer ..., from --api-key or ${API_KEY_ENV})" if key_required else "none"
    warm_up = ("one generation compiles the fast path first (a minute or two on a small CPU)" if compiles
               else "one short generation first")
    return "\n".join([
        f"ouroboros serve: {url}/v1  (OpenAI-compatible; /health, /metrics)",
        f"  model id: {model}",
        f"  method:   {method}",
        f"  API key:  {key}",
        f"  queue:    {max_batch} running together + up to {max_queue} waiting, then 503 with Retry-After"
        if max_batch > 1 else f"  queue:    1 running + up to {max_queue} waiting, then 503 with Retry-After",
        *([f"  KV cache: {kv_memory / GIB:.1f} GiB for the running requests' keys and values (--kv-memory), "
           f"{kv_memory // kv_per_token} tokens at {kv_per_token // 1024} KiB each"] if kv_memory and kv_per_token
          else []),
        f"  warm-up:  {warm_up}; /health answers 503 \"warming up\" until ready, requests wait",
    ])


def _say_ready(seconds: float) -> None:
    print(f"ouroboros serve: ready (warm-up took {seconds:.1f} s)", file=sys.stderr, flush=True)


def _listen(host: str, port: int) -> socket.socket:
    """Bind before serving, so that the banner shows the real port and a taken one is a clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise InvalidArgumentError(f"cannot listen on {host} port {port} (--host/--port): "
                                   f"{exc.strerror or exc}") from None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
