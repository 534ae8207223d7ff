"""The HTTP app: routes, the API key, and error answers.

The asyncio event loop only parses, tokenizes (in a thread pool) and relays text, so it never waits
on a model; generations run on the worker's thread (see `worker`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..arguments import DEFAULT_METHOD
from ..config import OuroborosConfig
from ..errors import InvalidArgumentError, OuroborosError
from ..methods import get_method
from ..model_facts import context_length, vocab_size
from ..pool import PhrasePool
from ..runner import check_tree_attention
from ..vocab_subset import DEFAULT_SIZE
from .metrics import render_metrics
from .schema import (
    APIError,
    ChatOptions,
    Options,
    bad,
    check_content_type,
    check_token_ids,
    from_package_error,
    internal_error,
    parse_messages,
    parse_options,
    parse_prompt,
    parse_stop,
    require,
    sampling,
    token_budget,
)
from .worker import Job, Result, Worker, open_pool_file, tokenizer_fingerprint

log = logging.getLogger("ouroboros.server")

MAX_BODY_BYTES = 1024 * 1024
DEFAULT_MAX_TOKENS = 256
DEFAULT_MAX_QUEUE = 64
"""Requests that may wait behind the running one. At a few seconds per request on a CPU, the last of
64 waits minutes, about as long as a client usually waits; more would only turn 503s into timeouts."""
POOL_MODES = ("shared", "per-request")


def _json_response(body: dict, status: int = 200, headers: dict | None = None) -> Response:
    # ensure_ascii keeps the body valid even if an error message quotes a lone surrogate from the request
    return Response(json.dumps(body), status_code=status, headers=headers, media_type="application/json")


@dataclass
class _Settings:
    model_name: str
    api_key: bytes | None
    max_body_bytes: int
    default_max_tokens: int
    context_limit: int | None
    vocab_size: int
    created: int


def create_app(target, draft, tokenizer, *, config: OuroborosConfig | None = None, method: str = DEFAULT_METHOD,
               pool_mode: str = "shared", pool_file: str | os.PathLike | None = None,
               pool_save_interval: float = 300.0, api_key: str | None = None, model_name: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, default_max_tokens: int = DEFAULT_MAX_TOKENS,
               max_queue: int = DEFAULT_MAX_QUEUE, fast: bool | None = None, warm_up: bool = True,
               on_ready: Callable[[float], None] | None = None, max_batch: int = 1,
               kv_memory: float | None = None, draft_vocab: int | None = DEFAULT_SIZE) -> FastAPI:
    """The FastAPI app serving `target` (with `draft`); `method` defaults to `ouroboros serve`'s, so
    an app built in Python serves what the command does. Raises the package's errors (ValueError
    subclasses) for bad settings or an unusable pool file, before anything is served. The worker
    starts and stops with the app's lifespan; with `warm_up` it first runs one short generation
    (compiling the fast path), /health answering 503 "warming up" until then, and calls
    `on_ready(seconds)` when done. Requests that come meanwhile wait in the queue; up to `max_batch`
    of them are decoded together, joining and leaving at any step (`batching`), as many as fit
    `kv_memory` bytes of keys and values (default: half the memory available now; `Worker.kv_need`)."""
    config = OuroborosConfig() if config is None else config
    spec = get_method(method)
    if pool_mode not in POOL_MODES:
        raise InvalidArgumentError(f"pool mode must be one of {', '.join(POOL_MODES)}, got {pool_mode!r}")
    if pool_file is not None and pool_mode != "shared":
        raise InvalidArgumentError("--pool-file needs --pool shared: a per-request pool is never kept")
    if not pool_save_interval > 0:
        raise InvalidArgumentError(f"the pool save interval must be > 0 seconds, got {pool_save_interval}")
    if api_key is not None and not api_key:
        raise InvalidArgumentError("the API key is empty")
    if max_body_bytes < 1 or default_max_tokens < 1:
        raise InvalidArgumentError("max_body_bytes and default_max_tokens must be >= 1")
    if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
        raise InvalidArgumentError(f"max_queue must be an int >= 0, got {max_queue!r}")
    if spec.needs_draft and draft is None:
        raise InvalidArgumentError(f"method {method!r} needs a draft model")
    uses_draft = spec.takes_draft and draft is not None  # e.g. auto: a draft when given, else none
    check_tree_attention(target)
    if uses_draft:
        check_tree_attention(draft)
    fingerprint = tokenizer_fingerprint(tokenizer)
    pool = None
    if pool_mode == "shared":
        pool = (open_pool_file(Path(pool_file), config, fingerprint) if pool_file is not None
                else PhrasePool(config.level, config.pool_size))
    name = model_name or Path(getattr(target, "name_or_path", "") or "").name or "ouroboros"
    worker = Worker(target, draft, tokenizer, method=method, config=config, pool=pool, fast=fast,
                    pool_file=Path(pool_file) if pool_file is not None else None,
                    pool_metadata={"tokenizer_sha256": fingerprint, "level": config.level, "model": name},
                    save_interval=pool_save_interval, max_queue=max_queue, warm_up=warm_up, on_ready=on_ready,
                    max_batch=max_batch, kv_memory=kv_memory, draft_vocab=draft_vocab)
    limits = [limit for limit in map(context_length, [target, draft] if uses_draft else [target])
              if limit is not None]
    settings = _Settings(name, api_key.encode() if api_key is not None else None, max_body_bytes,
                         default_max_tokens, min(limits, default=None), vocab_size(target), int(time.time()))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(worker.stop)

    app = FastAPI(title="ouroboros", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.worker, app.state.model_name = worker, name
    _add_error_handlers(app, worker)
    authorized = [Depends(_authorize(settings))]

    @app.get("/health")
    async def health() -> Response:
        if not worker.alive():
            return _json_response({"status": "error", "detail": "the generation worker is not running"}, 503)
        if not worker.ready.is_set():
            return _json_response({"status": "warming up", "detail": "one generation runs before the first request "
                                   "(compiling the fast path); requests sent now wait for it"}, 503,
                                  headers={"Retry-After": "5"})
        return _json_response({"status": "ok"})

    @app.get("/metrics", dependencies=authorized)
    async def metrics() -> Response:
        text = render_metrics(worker.metrics, *worker.queue_depth())
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=authorized)
    async def models() -> Response:
        return _json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": settings.created, "owned_by": "ouroboros"}]})

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(request: Request) -> Response:
        body, options = await _read_options(request, settings, Options)
        prompt = parse_prompt(require(body, "prompt"))
        stop = parse_stop(body.get("stop"))
        ids = await run_in_threadpool(_encode_prompt, worker, prompt, settings.vocab_size)
        return await _generate(request, worker, settings, "completions", options, ids, "prompt", stop)

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(request: Request) -> Response:
        body, options = await _read_options(request, settings, ChatOptions)
        messages = parse_messages(require(body, "messages"))
        stop = parse_stop(body.get("stop"))
        ids = await run_in_threadpool(_encode_chat, worker, messages)
        return await _generate(request, worker, settings, "chat_completions", options, ids, "messages", stop)

    return app


def _add_error_handlers(app: FastAPI, worker: Worker) -> None:
    """Every error is an OpenAI error object: ours as raised, the package's input errors as 400s,
    Starlette's (404, 405) as they are; anything else is a bug, answered by `_InternalErrors`."""
    async def api_error(request: Request, exc: APIError) -> Response:
        if 400 <= exc.status < 500:
            worker.metrics.rejected += 1
        return _json_response(exc.body(), exc.status, exc.headers)

    async def package_error(request: Request, exc: OuroborosError) -> Response:
        return await api_error(request, from_package_error(exc))

    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return await api_error(request, APIError(exc.status_code, str(exc.detail), code=None))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(OuroborosError, package_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_middleware(_InternalErrors)


class _InternalErrors:
    """ASGI middleware for the exceptions no handler claims: the client gets a 500 saying only
    "internal error" and a request id; the log gets the traceback under the same id, once."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except ClientDisconnect:  # nobody left to answer, and nothing went wrong
            return
        except Exception:
            request_id = uuid.uuid4().hex
            log.exception("internal error (request id %s) on %s %s", request_id, scope["method"], scope["path"])
            if not started:  # else the response is cut short, which is all a client can be told
                await _json_response(internal_error(request_id).body(), 500)(scope, receive, send)


def _authorize(settings: _Settings):
    async def check(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # headers arrive decoded as latin-1, so encoding back gives the bytes the client sent
        if not (scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("latin-1"),
                                                                   settings.api_key)):
            raise APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return check


async def _read_options(request: Request, settings: _Settings, cls: type[Options]) -> tuple[Any, Options]:
    """The JSON body and its options, for the model this server serves."""
    body = await _read_json(request, settings.max_body_bytes)
    options = parse_options(cls, body)
    if options.model != settings.model_name:
        raise APIError(404, f"the model does not exist: this server serves {settings.model_name!r} "
                            "(see /v1/models)", param="model", code="model_not_found")
    return body, options


async def _read_json(request: Request, limit: int) -> Any:
    """The JSON body, read in chunks so that an oversized body is refused (413) without being kept;
    a body that is not declared as JSON is refused (415) before it is read."""
    too_large = APIError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    check_content_type(request.headers.get("content-type"))
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
    except ClientDisconnect:
        raise bad("the client disconnected while sending the request") from None
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise bad(f"the request body is not valid JSON: {exc}") from None


def _encode_prompt(worker: Worker, prompt: str | list[int], vocab_size: int) -> list[int]:
    if isinstance(prompt, list):
        check_token_ids(prompt, vocab_size)
        return prompt
    try:
        with worker.tokenizer_lock:
            return worker.tokenizer(prompt).input_ids
    except (ValueError, TypeError) as exc:  # e.g. a lone surrogate that JSON allows and the tokenizer refuses
        raise bad(f"the prompt cannot be tokenized: {exc}", "prompt") from None


def _encode_chat(worker: Worker, messages: list[dict]) -> list[int]:
    if not worker.tokenizer.chat_template:
        raise bad("the model has no chat template: use /v1/completions", "messages")
    try:
        with worker.tokenizer_lock:
            text = worker.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return worker.tokenizer(text, add_special_tokens=False).input_ids
    except Exception as exc:  # a template is the model's code: it refuses conversations with any exception
        raise bad(f"the messages cannot be formatted with the model's chat template: {exc}", "messages") from None


async def _generate(request: Request, worker: Worker, settings: _Settings, endpoint: str, options: Options,
                    ids: list[int], prompt_param: str, stop: list[str]) -> Response:
    """Queue the generation (or refuse it: 400, or 503 when full) and answer with its result or stream."""
    chat = endpoint == "chat_completions"
    prefix, obj = ("chatcmpl", "chat.completion") if chat else ("cmpl", "text_completion")
    request_id = f"{prefix}-{uuid.uuid4().hex}"
    max_tokens = token_budget(options, len(ids), prompt_param, settings.context_limit, settings.default_max_tokens)
    job = Job(request_id, ids, max_tokens, sampling(options), stop, options.stream)
    worker.submit(job, endpoint)
    head = {"id": request_id, "created": int(time.time()), "model": settings.model_name}
    if options.stream:
        return _JobStream(worker, job, _events(job, head, chat, options.include_usage))
    result = await _result(worker, job, request)
    if result is None:  # the client is gone; this response is never read
        return Response(status_code=499)
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                  "finish_reason": result.finish_reason}
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}
    return _json_response({**head, "object": obj, "choices": [choice], "usage": result.usage()})


async def _result(worker: Worker, job: Job, request: Request) -> Result | None:
    """The job's result, or None (and the job cancelled) if the client disconnects first."""

    async def final() -> Result:
        while True:
            kind, value = await job.events.get()
            if kind == "done":
                return value
            if kind == "error":
                raise value

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    tasks = [asyncio.ensure_future(final()), asyncio.ensure_future(disconnected())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        if not job.finished:
            worker.cancel(job)
    if tasks[0].done() and not tasks[0].cancelled():
        return tasks[0].result()
    return None


class _JobStream(StreamingResponse):
    """Server-sent events for a queued job, which is cancelled however the response ends: finished,
    cut by a disconnect, or never started because the client left first."""

    def __init__(self, worker: Worker, job: Job, events):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.worker, self.job = worker, job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.job.finished:
                self.worker.cancel(self.job)


async def _events(job: Job, head: dict, chat: bool, include_usage: bool):
    """The job's text as OpenAI's stream chunks, ending with its finish reason (or error) and [DONE]."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def event(choices: list, usage: dict | None = None) -> str:
        chunk = {**head, "object": obj, "choices": choices}
        if include_usage:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n"

    def choice(text: str | None, finish_reason: str | None = None, role: bool = False) -> dict:
        if not chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    if chat:
        yield event([choice(None, role=True)])
    while True:
        kind, value = await job.events.get()
        if kind == "text":
            yield event([choice(value)])
        elif kind == "done":
            yield event([choice(None, value.finish_reason)])
            if include_usage:
                yield event([], value.usage())
            break
        else:
            yield f"data: {json.dumps(value.body())}\n\n"
            break
    yield "data: [DONE]\n\n"
