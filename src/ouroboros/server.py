"""`ouroboros serve`: an OpenAI-compatible HTTP server (completions, chat, streaming) on one model pair.

Requests queue and run one at a time on a single worker thread: the models, their caches and the
phrase pool are not thread-safe, and a CPU gains nothing from two generations at once. The asyncio
event loop only parses, tokenizes (in a thread pool) and relays text, so it never waits on a model.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import inspect
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .config import OuroborosConfig
from .generation import generate
from .methods import METHODS, get_method
from .model_facts import context_length, vocab_size
from .pool import PhrasePool
from .runner import check_tree_attention

log = logging.getLogger("ouroboros.server")

API_KEY_ENV = "OUROBOROS_API_KEY"
MAX_BODY_BYTES = 1024 * 1024
DEFAULT_MAX_TOKENS = 256
POOL_MODES = ("shared", "per-request")
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
SAMPLING_SUPPORTED = {"do_sample", "temperature", "top_p", "seed"} <= set(inspect.signature(generate).parameters)
"""Sampling arguments are newer than greedy `generate`; without them only temperature 0 is served."""

UNSUPPORTED_OPTIONS = {
    "best_of": [None, 1], "echo": [None, False], "logprobs": [None, False], "top_logprobs": [None, 0],
    "suffix": [None, ""], "presence_penalty": [None, 0], "frequency_penalty": [None, 0],
    "logit_bias": [None, {}], "tools": [None, []], "functions": [None, []],
    "response_format": [None, {"type": "text"}],
}
"""OpenAI options this server does not implement, with the values that mean "off": anything else is
refused rather than silently ignored."""


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {message, type, param, code}}` object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _json_response(body: dict, status: int = 200, headers: dict | None = None) -> Response:
    # ensure_ascii keeps the body valid even if an error message quotes a lone surrogate from the request
    return Response(json.dumps(body), status_code=status, headers=headers, media_type="application/json")


class _StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False


class _Options(BaseModel):
    """The scalar request fields, strictly typed ("5" is not an int, true is not a number)."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1)
    n: int | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    user: str | None = None


class _ChatOptions(_Options):
    max_completion_tokens: int | None = Field(None, ge=1)


def _parse_options(cls: type[_Options], body: Any) -> _Options:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    try:
        options = cls.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(part) for part in error["loc"]) or None
        raise _bad(f"{param}: {error['msg']}", param) from None
    if options.n not in (None, 1):
        raise _bad("n must be 1: this server returns one choice per request", "n")
    for name, allowed in UNSUPPORTED_OPTIONS.items():
        if body.get(name) not in allowed:
            raise _bad(f"{name} is not supported by this server (leave it out)", name)
    return options


def _parse_stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise _bad(f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings of 1 to "
                   f"{MAX_STOP_CHARS} characters", "stop")
    return stops


def _parse_prompt(prompt: Any) -> str | list[int]:
    """A string or a list of token ids, possibly wrapped in a one-element list (OpenAI's batch form)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    if isinstance(prompt, list) and all(isinstance(p, (str, list)) for p in prompt):
        raise _bad("only one prompt per request is supported", "prompt")
    raise _bad("prompt must be a string or a list of token ids", "prompt")


CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _parse_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of {role, content} objects", "messages")
    parsed = []
    for i, message in enumerate(messages):
        param = f"messages.{i}"
        if not isinstance(message, dict):
            raise _bad(f"{param} must be an object with role and content", param)
        role = message.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise _bad(f"{param}.role must be one of {', '.join(CHAT_ROLES)}", f"{param}.role")
        content = message.get("content")
        if content is None and role == "assistant":
            content = ""
        elif isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _bad(f"{param}.content: only text parts are supported", f"{param}.content")
            content = "\n".join(p["text"] for p in content)
        elif not isinstance(content, str):
            raise _bad(f"{param}.content must be a string or a list of text parts", f"{param}.content")
        parsed.append({"role": CHAT_ROLES[role], "content": content})
    return parsed


class TextTracker:
    """A transformers-style streamer that turns new token ids into text as soon as it is final.

    Text is final once it cannot change: no trailing half of a multi-byte character (decoded as
    U+FFFD until the rest arrives) and no tail that could still grow into a stop string. A stop
    string cuts the text where it begins and sets `stopped`, which ends generation.
    """

    def __init__(self, decode, stop: list[str], on_text=None):
        self._decode, self._stop, self._on_text = decode, stop, on_text
        self._ids: list[int] = []
        self._prompt_seen = False
        self.text = ""
        self.sent = 0
        self.stopped = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first call carries the prompt
            self._prompt_seen = True
            return
        if self.stopped:
            return
        self._ids += value.reshape(-1).tolist()
        self.text = self._decode(self._ids)
        cut = min((i for i in (self.text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self.stopped = True
            self._send(cut)
        else:
            self._send(self._final_end())

    def end(self) -> None:
        """Nothing to do: the caller flushes with `finish` once it knows why generation ended."""

    def finish(self) -> None:
        self._send(len(self.text))

    def _final_end(self) -> int:
        end = len(self.text.rstrip("\ufffd"))
        held = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, end), held, -1):
                if self.text.endswith(s[:k], 0, end):
                    held = k
                    break
        return end - held

    def _send(self, end: int) -> None:
        if end > self.sent:
            if self._on_text is not None:
                self._on_text(self.text[self.sent:end])
            self.sent = end


@dataclass
class Result:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class Job:
    """One request's generation. The worker reports to the request's coroutine through its event loop:
    ("text", delta) while streaming, then ("done", Result) or ("error", APIError)."""

    def __init__(self, prompt_ids: list[int], max_tokens: int, sampling: dict, stop: list[str], stream: bool):
        self.prompt_ids, self.max_tokens, self.sampling, self.stop, self.stream = (
            prompt_ids, max_tokens, sampling, stop, stream)
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.finished = False

    def emit(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


@dataclass
class Metrics:
    requests: dict = field(default_factory=lambda: {"completions": 0, "chat_completions": 0})
    finished: dict = field(default_factory=lambda: {"stop": 0, "length": 0, "aborted": 0, "error": 0})
    rejected: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    target_forwards: int = 0
    generation_seconds: float = 0.0
    last_tokens_per_second: float = 0.0
    pool_phrases: int = 0
    """Updated by the worker between jobs, so that a scrape never iterates the pool while it changes."""


class Engine:
    """The loaded pair, the job queue and the worker thread that runs one job at a time.

    The shared phrase pool is touched only by the worker (periodic saves happen between jobs) and,
    after the worker has stopped, by the final save: so it needs no lock.
    """

    def __init__(self, target, draft, tokenizer, *, method: str, config: OuroborosConfig, pool: PhrasePool | None,
                 pool_file: Path | None, pool_metadata: dict, save_interval: float):
        self.target, self.draft, self.tokenizer = target, draft, tokenizer
        self.method, self.config, self.pool = method, config, pool
        self.pool_file, self.pool_metadata, self.save_interval = pool_file, pool_metadata, save_interval
        self.tokenizer_lock = threading.Lock()
        """Held for every tokenizer call: Rust tokenizers can fail when used from two threads at once."""
        self.metrics = Metrics(pool_phrases=len(pool) if pool is not None else 0)
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._closing = False
        self._dirty = False
        self._next_save = time.monotonic() + save_interval
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="ouroboros-worker", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def queue_depth(self) -> tuple[int, int]:
        """(waiting, running)"""
        with self._cond:
            return len(self._waiting), int(self._running is not None)

    def check_open(self) -> None:
        if self._closing:
            raise APIError(503, "the server is shutting down", type="server_error")

    def submit(self, job: Job, endpoint: str) -> None:
        with self._cond:
            self.check_open()
            self._waiting.append(job)
            self.metrics.requests[endpoint] += 1
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Stop a job whose client went away: drop it from the queue, or end its generation at the next step."""
        job.cancelled.set()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                self.metrics.finished["aborted"] += 1
                job.finished = True

    def stop(self) -> None:
        """Refuse waiting jobs, stop the running one, wait for the worker, then save the pool."""
        with self._cond:
            self._closing = True
            waiting, self._waiting = list(self._waiting), deque()
            running = self._running
            self._cond.notify_all()
        for job in waiting:
            job.finished = True
            job.emit("error", APIError(503, "the server is shutting down", type="server_error"))
        if running is not None:
            running.cancelled.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            if self._thread.is_alive():
                log.error("the generation worker did not stop; the phrase pool is not saved")
                return
        self.save_pool()

    def save_pool(self) -> None:
        if self.pool_file is None or self.pool is None:
            return
        try:
            self.pool.save(self.pool_file, metadata={**self.pool_metadata, "saved_at": time.time()})
            self._dirty = False
        except OSError as exc:
            log.error("cannot save the phrase pool to %s: %s", self.pool_file, exc)

    def decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _work(self) -> None:
        while True:
            with self._cond:
                if not self._waiting and not self._closing:
                    self._cond.wait(self._seconds_to_save())
                if self._closing:
                    return
                job = self._waiting.popleft() if self._waiting else None
                self._running = job
            if job is not None:
                try:
                    self._run(job)
                finally:
                    with self._cond:
                        self._running = None
            if self.pool_file is not None and time.monotonic() >= self._next_save:
                if self._dirty:
                    self.save_pool()
                self._next_save = time.monotonic() + self.save_interval

    def _seconds_to_save(self) -> float | None:
        return None if self.pool_file is None else max(self._next_save - time.monotonic(), 0.0)

    def _run(self, job: Job) -> None:
        tracker = TextTracker(self.decode, job.stop, (lambda text: job.emit("text", text)) if job.stream else None)
        try:
            out = generate(self.target, torch.tensor([job.prompt_ids], device=self.target.device), draft=self.draft,
                           method=self.method, max_new_tokens=job.max_tokens, config=self.config,
                           pool=self.pool, streamer=tracker,
                           stopping=lambda new_ids: job.cancelled.is_set() or tracker.stopped, **job.sampling)
            tracker.finish()
        except Exception as exc:  # a bug or an exhausted machine must fail this request, not the server
            log.exception("generation failed")
            out, error = None, APIError(500, f"generation failed: {exc}", type="server_error")
        if out is None:
            finish = "error"
        else:
            finish = "stop" if tracker.stopped else out.finish_reason
        with self._cond:  # cancel() updates the same counters from the event loop's thread
            m = self.metrics
            self._dirty = self.pool is not None
            m.pool_phrases = len(self.pool) if self.pool is not None else 0
            m.finished["aborted" if job.cancelled.is_set() else finish] += 1
            if out is not None:
                s = out.stats
                m.prompt_tokens += len(job.prompt_ids)
                m.generated_tokens += s.new_tokens
                m.target_forwards += s.target_forwards
                m.generation_seconds += s.wall_time
                m.last_tokens_per_second = s.tokens_per_second
            job.finished = True
        if out is None:
            job.emit("error", error)
        else:
            job.emit("done", Result(tracker.text, finish, len(job.prompt_ids), out.stats.new_tokens))


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the sorted vocabulary: phrases are token ids, which mean nothing under another tokenizer."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def open_pool_file(path: Path, config: OuroborosConfig, fingerprint: str) -> PhrasePool:
    """The saved pool at `path`, or a cold one if there is none. A damaged or incompatible file stops
    the start (ValueError naming it) instead of being replaced, since it may hold hours of phrases."""
    if not path.parent.is_dir():
        raise ValueError(f"phrase pool file {str(path)!r}: the directory {str(path.parent)!r} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise ValueError(f"phrase pool file {str(path)!r}: the directory {str(path.parent)!r} is not writable")
    if not path.exists():
        return PhrasePool(config.level, config.pool_size)
    pool, metadata = PhrasePool.load(path)
    hint = "delete it or pass another --pool-file"
    if metadata.get("tokenizer_sha256") != fingerprint:
        raise ValueError(f"phrase pool file {str(path)!r} was saved for another tokenizer: {hint}")
    if pool.level != config.level:
        raise ValueError(f"phrase pool file {str(path)!r} holds {pool.level}-grams but --level is "
                         f"{config.level}: {hint}, or pass --level {pool.level}")
    if pool.capacity != config.pool_size:
        pool = PhrasePool.from_state_dict({**pool.state_dict(), "capacity": config.pool_size})
    return pool


@dataclass
class _Settings:
    model_name: str
    api_key: bytes | None
    max_body_bytes: int
    default_max_tokens: int
    context_limit: int | None
    vocab_size: int
    created: int


def create_app(target, draft, tokenizer, *, config: OuroborosConfig | None = None, method: str = "ouroboros",
               pool_mode: str = "shared", pool_file: str | os.PathLike | None = None,
               pool_save_interval: float = 300.0, api_key: str | None = None, model_name: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> FastAPI:
    """The FastAPI app serving `target` (with `draft`). Raises ValueError for bad settings or an
    unusable pool file, before anything is served. The worker starts and stops with the app's lifespan."""
    config = OuroborosConfig() if config is None else config
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if pool_mode not in POOL_MODES:
        raise ValueError(f"pool mode must be one of {', '.join(POOL_MODES)}, got {pool_mode!r}")
    if pool_file is not None and pool_mode != "shared":
        raise ValueError("--pool-file needs --pool shared: a per-request pool is never kept")
    if not pool_save_interval > 0:
        raise ValueError(f"the pool save interval must be > 0 seconds, got {pool_save_interval}")
    if api_key is not None and not api_key:
        raise ValueError("the API key is empty")
    if max_body_bytes < 1 or default_max_tokens < 1:
        raise ValueError("max_body_bytes and default_max_tokens must be >= 1")
    check_tree_attention(target)
    if get_method(method).needs_draft:
        if draft is None:
            raise ValueError(f"method {method!r} needs a draft model")
        check_tree_attention(draft)
    fingerprint = tokenizer_fingerprint(tokenizer)
    pool = None
    if pool_mode == "shared":
        pool = (open_pool_file(Path(pool_file), config, fingerprint) if pool_file is not None
                else PhrasePool(config.level, config.pool_size))
    name = model_name or Path(getattr(target, "name_or_path", "") or "").name or "ouroboros"
    engine = Engine(target, draft, tokenizer, method=method, config=config, pool=pool,
                    pool_file=Path(pool_file) if pool_file is not None else None,
                    pool_metadata={"tokenizer_sha256": fingerprint, "level": config.level, "model": name},
                    save_interval=pool_save_interval)
    limits = [context_length(m) for m in ([target, draft] if get_method(method).needs_draft else [target])]
    limits = [limit for limit in limits if limit is not None]
    settings = _Settings(name, api_key.encode() if api_key is not None else None, max_body_bytes,
                         default_max_tokens, min(limits) if limits else None, vocab_size(target), int(time.time()))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    app = FastAPI(title="ouroboros", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.engine = engine
    _add_error_handlers(app, engine)
    authorized = [Depends(_authorize(settings))]

    @app.get("/health")
    async def health() -> Response:
        if not engine.alive():
            return _json_response({"status": "error", "detail": "the generation worker is not running"}, 503)
        return _json_response({"status": "ok"})

    @app.get("/metrics", dependencies=authorized)
    async def metrics() -> Response:
        return Response(_render_metrics(engine), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=authorized)
    async def models() -> Response:
        return _json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": settings.created, "owned_by": "ouroboros"}]})

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(request: Request) -> Response:
        body = await _read_json(request, settings.max_body_bytes)
        options = _parse_options(_Options, body)
        _check_model(options, settings)
        if "prompt" not in body:
            raise _bad("prompt: Field required", "prompt")
        prompt = _parse_prompt(body["prompt"])
        stop = _parse_stop(body.get("stop"))
        ids = await run_in_threadpool(_encode_prompt, engine, prompt, settings.vocab_size)
        job = _make_job(settings, options, options.max_tokens, "max_tokens", ids, "prompt", stop)
        return await _respond(request, engine, job, "completions", options, name)

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(request: Request) -> Response:
        body = await _read_json(request, settings.max_body_bytes)
        options = _parse_options(_ChatOptions, body)
        _check_model(options, settings)
        if "messages" not in body:
            raise _bad("messages: Field required", "messages")
        messages = _parse_messages(body["messages"])
        stop = _parse_stop(body.get("stop"))
        ids = await run_in_threadpool(_encode_chat, engine, messages)
        if options.max_completion_tokens is not None:  # OpenAI's newer name for max_tokens
            max_tokens, max_param = options.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens, max_param = options.max_tokens, "max_tokens"
        job = _make_job(settings, options, max_tokens, max_param, ids, "messages", stop)
        return await _respond(request, engine, job, "chat_completions", options, name)

    return app


def _add_error_handlers(app: FastAPI, engine: Engine) -> None:
    async def api_error(request: Request, exc: APIError) -> Response:
        if 400 <= exc.status < 500:
            engine.metrics.rejected += 1
        return _json_response(exc.body(), exc.status, exc.headers)

    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return await api_error(request, APIError(exc.status_code, str(exc.detail), code=None))

    async def unexpected(request: Request, exc: Exception) -> Response:
        # Starlette re-raises the exception after this response, so uvicorn logs the traceback
        return _json_response(APIError(500, "internal server error", type="server_error").body(), 500)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


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


async def _read_json(request: Request, limit: int) -> Any:
    """The JSON body, read in chunks so that an oversized body is refused (413) without being kept."""
    too_large = APIError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
    except ClientDisconnect:
        raise _bad("the client disconnected while sending the request") from None
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise _bad(f"the request body is not valid JSON: {exc}") from None


def _check_model(options: _Options, settings: _Settings) -> None:
    if options.model != settings.model_name:
        raise APIError(404, f"the model does not exist: this server serves {settings.model_name!r} "
                            "(see /v1/models)", param="model", code="model_not_found")


def _encode_prompt(engine: Engine, prompt: str | list[int], vocab_size: int) -> list[int]:
    if isinstance(prompt, list):
        if any(not 0 <= t < vocab_size for t in prompt):
            raise _bad(f"prompt token ids must be in [0, {vocab_size})", "prompt")
        return prompt
    try:
        with engine.tokenizer_lock:
            return engine.tokenizer(prompt).input_ids
    except Exception as exc:  # e.g. a lone surrogate that JSON allows and the tokenizer cannot encode
        raise _bad(f"the prompt cannot be tokenized: {exc}", "prompt") from None


def _encode_chat(engine: Engine, messages: list[dict]) -> list[int]:
    if not engine.tokenizer.chat_template:
        raise _bad("the model has no chat template: use /v1/completions", "messages")
    try:
        with engine.tokenizer_lock:
            text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return engine.tokenizer(text, add_special_tokens=False).input_ids
    except Exception as exc:  # templates raise on conversations they do not accept
        raise _bad(f"the messages cannot be formatted with the model's chat template: {exc}", "messages") from None


def _make_job(settings: _Settings, options: _Options, max_tokens: int | None, max_param: str, ids: list[int],
              prompt_param: str, stop: list[str]) -> Job:
    """Check the prompt against the context and choose greedy or sampled decoding."""
    if not ids:
        raise _bad("the prompt is empty", prompt_param)
    limit = settings.context_limit
    if limit is not None:
        if len(ids) >= limit:
            raise _bad(f"the prompt has {len(ids)} tokens but the model's context is {limit} tokens",
                       prompt_param, "context_length_exceeded")
        if max_tokens is not None and len(ids) + max_tokens > limit:
            raise _bad(f"the prompt ({len(ids)} tokens) + {max_param} ({max_tokens}) exceeds the model's context "
                       f"of {limit} tokens", max_param, "context_length_exceeded")
    if max_tokens is None:
        max_tokens = settings.default_max_tokens if limit is None else min(settings.default_max_tokens,
                                                                            limit - len(ids))
    sampling = {}
    # temperature 0 (the default here, unlike OpenAI's 1) or top_p 0 leave only the most likely token: greedy
    if options.temperature and options.top_p != 0:
        if not SAMPLING_SUPPORTED:
            raise _bad("sampling (temperature > 0) is not supported by this version of ouroboros: "
                       "send temperature 0 for greedy decoding", "temperature")
        sampling = {"do_sample": True, "temperature": options.temperature, "top_p": options.top_p or 1.0}
        if options.seed is not None:
            sampling["seed"] = options.seed
    return Job(ids, max_tokens, sampling, stop, options.stream)


async def _respond(request: Request, engine: Engine, job: Job, endpoint: str, options: _Options,
                   model: str) -> Response:
    chat = endpoint == "chat_completions"
    prefix, obj = ("chatcmpl", "chat.completion") if chat else ("cmpl", "text_completion")
    head = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
    if options.stream:
        engine.check_open()
        include_usage = options.stream_options is not None and options.stream_options.include_usage
        return StreamingResponse(_stream(engine, job, endpoint, head, chat, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    engine.submit(job, endpoint)
    result = await _result(engine, job, request)
    if result is None:  # the client is gone; this response is never read
        return Response(status_code=499)
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                  "finish_reason": result.finish_reason}
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}
    return _json_response({**head, "object": obj, "choices": [choice], "usage": result.usage()})


async def _result(engine: Engine, job: Job, request: Request) -> Result | None:
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
            engine.cancel(job)
    if tasks[0].done() and not tasks[0].cancelled():
        return tasks[0].result()
    return None


async def _stream(engine: Engine, job: Job, endpoint: str, head: dict, chat: bool, include_usage: bool):
    """Server-sent events in OpenAI's chunk format; a disconnect cancels this generator, and the job.

    The job is submitted here rather than before: a response that never starts never runs this
    generator, and so would never reach the `finally` that cancels its job.
    """
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

    try:
        engine.submit(job, endpoint)
    except APIError as exc:  # shutting down since check_open
        yield f"data: {json.dumps(exc.body())}\n\ndata: [DONE]\n\n"
        return
    try:
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
    finally:
        if not job.finished:
            engine.cancel(job)


def _render_metrics(engine: Engine) -> str:
    """Prometheus text exposition format (version 0.0.4)."""
    m = engine.metrics
    waiting, running = engine.queue_depth()
    lines: list[str] = []

    def metric(name: str, kind: str, help: str, samples) -> None:
        lines.extend([f"# HELP ouroboros_{name} {help}", f"# TYPE ouroboros_{name} {kind}"])
        if not isinstance(samples, dict):
            samples = {"": samples}
        for labels, value in samples.items():
            lines.append(f"ouroboros_{name}{labels} {value}")

    metric("requests_total", "counter", "Generation requests accepted into the queue, by endpoint.",
           {f'{{endpoint="{k}"}}': v for k, v in m.requests.items()})
    metric("requests_finished_total", "counter",
           "Generation requests finished, by reason (aborted: the client disconnected).",
           {f'{{reason="{k}"}}': v for k, v in m.finished.items()})
    metric("requests_rejected_total", "counter", "Requests answered with a 4xx error.", m.rejected)
    metric("prompt_tokens_total", "counter", "Prompt tokens of generated requests.", m.prompt_tokens)
    metric("generated_tokens_total", "counter", "Tokens generated.", m.generated_tokens)
    metric("target_forwards_total", "counter", "Target model forwards (verification steps).", m.target_forwards)
    metric("generation_seconds_total", "counter", "Seconds spent generating.", round(m.generation_seconds, 6))
    metric("tokens_per_second", "gauge", "Generation speed of the last finished request.",
           round(m.last_tokens_per_second, 3))
    metric("mean_accepted_tokens", "gauge", "Tokens generated per target forward since the start.",
           round(m.generated_tokens / m.target_forwards, 4) if m.target_forwards else 0)
    metric("queue_depth", "gauge", "Requests waiting for the worker.", waiting)
    metric("requests_running", "gauge", "Requests being generated (0 or 1).", running)
    metric("pool_phrases", "gauge", "Phrases in the shared phrase pool.", m.pool_phrases)
    return "\n".join(lines) + "\n"


def add_serve_parser(subparsers) -> None:
    from .arguments import add_config_arguments, add_model_arguments

    serve = subparsers.add_parser("serve", help="serve the pair over an OpenAI-compatible HTTP API")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--method", default="ouroboros", choices=METHODS)
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
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_model_arguments(serve)
    add_config_arguments(serve)
    serve.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .arguments import apply_threads, config_from_args
    from .loading import load_pair

    config = config_from_args(args)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.pool_file is not None and args.pool_mode != "shared":
        raise ValueError("--pool-file needs --pool shared: a per-request pool is never kept")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    apply_threads(args)
    target, draft, tokenizer = load_pair(args.target, args.draft, dtype=args.dtype, device=args.device)
    app = create_app(target, draft, tokenizer, config=config, method=args.method, pool_mode=args.pool_mode,
                     pool_file=args.pool_file, pool_save_interval=args.pool_save_interval, api_key=api_key,
                     model_name=args.model_name, default_max_tokens=args.default_max_tokens)
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"ouroboros serve: warning: listening on {args.host} without an API key: anyone who can reach "
              f"this port can use the models (set {API_KEY_ENV} or --api-key)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
