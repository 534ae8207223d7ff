"""The job queue and the worker thread: requests run one at a time on the loaded pair, or with
`max_batch` > 1 as rows of one continuously batched decoding (`batching`).

The models, their caches and the phrase pool are not thread-safe, so one thread runs every
generation. The queue is bounded: beyond `max_queue` waiting requests a new one is refused at once
(503 with Retry-After) rather than left to wait for minutes and time out.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections import deque
from pathlib import Path

import torch

from ..aot import MAX_ROWS
from ..config import OuroborosConfig
from ..engine import Engine
from ..errors import ConfigError, InvalidArgumentError, OuroborosError
from ..generation import generate
from ..methods import get_method
from ..model_facts import kv_bytes_per_token
from ..pool import PhrasePool
from ..vocab_subset import DEFAULT_SIZE
from .batching import run_batched
from .kv_budget import GIB, default_kv_memory, reserved
from .metrics import Metrics
from .schema import APIError, from_package_error, internal_error
from .text import Result, TextTracker

log = logging.getLogger("ouroboros.server")

WARM_UP_TEXT = "Write a Python function that returns the n-th Fibonacci number, with a docstring."
WARM_UP_TOKENS = 32
"""The warm-up generations' length: enough steps for every forward shape a request meets to run once."""


class Job:
    """One request's generation. The worker reports to the request's coroutine through its event loop:
    ("text", delta) while streaming, then ("done", Result) or ("error", APIError)."""

    def __init__(self, id: str, prompt_ids: list[int], max_tokens: int, sampling: dict, stop: list[str],
                 stream: bool):
        self.id, self.prompt_ids, self.max_tokens, self.sampling, self.stop, self.stream = (
            id, prompt_ids, max_tokens, sampling, stop, stream)
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.finished = False
        self.arrived = time.monotonic()

    def emit(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", type="server_error")


class Worker:
    """The loaded pair, the job queue and the worker thread that runs one job at a time.

    The shared phrase pool is touched only by the worker (periodic saves happen between jobs) and,
    after the worker has stopped, by the final save: so it needs no lock.
    """

    def __init__(self, target, draft, tokenizer, *, method: str, config: OuroborosConfig, pool: PhrasePool | None,
                 pool_file: Path | None, pool_metadata: dict, save_interval: float, max_queue: int,
                 fast: bool | None = None, warm_up: bool = True, on_ready=None, max_batch: int = 1,
                 kv_memory: float | None = None, draft_vocab: int | None = DEFAULT_SIZE):
        self.target, self.draft, self.tokenizer = target, draft, tokenizer
        self.warm_up = warm_up
        self.ready = threading.Event()
        """Set once the warm-up generations are done: until then /health answers 503 "warming up"."""
        if not warm_up:
            self.ready.set()
        self.on_ready = on_ready
        """Called with the warm-up's seconds once ready (the CLI prints it)."""
        self.method, self.config, self.pool = method, config, pool
        self.pool_file, self.pool_metadata, self.save_interval = pool_file, pool_metadata, save_interval
        self.max_queue = max_queue
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= MAX_ROWS:
            raise InvalidArgumentError(f"max_batch must be an int in 1..{MAX_ROWS}, got {max_batch!r}")
        self.max_batch = max_batch  # requests decoded together (`batching`); 1: one at a time
        if kv_memory is not None and (isinstance(kv_memory, bool) or not isinstance(kv_memory, (int, float))
                                      or not kv_memory > 0):
            raise InvalidArgumentError(f"kv_memory must be a number of bytes > 0, got {kv_memory!r}")
        self.kv_memory = int(kv_memory) if kv_memory is not None else default_kv_memory(target)
        """Bytes of keys and values the running requests may reserve together (`kv_need`)."""
        uses_draft = draft is not None and get_method(method).takes_draft
        self.kv_per_token = kv_bytes_per_token(target) + (kv_bytes_per_token(draft) if uses_draft else 0)
        self.engine = Engine(target, draft, fast=fast, draft_vocab=draft_vocab)
        """The pair's runners and cost tables (`ouroboros.engine`), shared by every request."""
        # auto's costs are measured (or read from the cache) now, not on the first request
        self.costs = self.engine.costs(progress=True) if get_method(method).needs_costs else None
        self.tokenizer_lock = threading.Lock()
        """Held for every tokenizer call: Rust tokenizers can fail when used from two threads at once."""
        self.metrics = Metrics(pool_phrases=len(pool) if pool is not None else 0)
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        """The jobs being generated: one at a time, or up to `max_batch` rows of one batch."""
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
            return len(self._waiting), len(self._running)

    def next_jobs(self, room: int, idle: bool) -> list[Job] | None:
        """Up to `room` waiting jobs in arrival order, as many as fit `kv_memory` beside the running ones
        (a first one that does not fit waits, and so do the ones behind it: first come, first served);
        awaited while `idle`; None once closing."""
        with self._cond:
            if idle and not self._waiting and not self._closing:
                self._cond.wait(self.seconds_to_save())
            if self._closing:
                return None
            jobs = []
            while (self._waiting and len(jobs) < room
                   and self.kv_need(self._running + jobs + [self._waiting[0]]) <= self.kv_memory):
                jobs.append(self._waiting.popleft())
            self._running += jobs
            return jobs

    def kv_need(self, jobs: list[Job]) -> int:
        """Bytes of keys and values `jobs` reserve decoded together (`kv_budget.reserved`)."""
        return reserved([(len(job.prompt_ids), job.max_tokens) for job in jobs], self.kv_per_token)

    def stepped(self, jobs: list[Job], rows: int) -> None:
        """After a batched step of `rows` rows (0: none ran): the jobs now running, and the counters."""
        with self._cond:
            self._running = list(jobs)
            self.metrics.batch_steps += bool(rows)
            self.metrics.batch_rows += rows

    def submit(self, job: Job, endpoint: str) -> None:
        """Queue `job`, or refuse it (503) when shutting down or when `max_queue` jobs already wait
        behind the running one."""
        with self._cond:
            if self._closing:
                raise _shutting_down()
            if len(self._waiting) + bool(self._running) > self.max_queue:
                raise APIError(503, f"the server is busy: {len(self._waiting)} requests are already waiting "
                                    f"(--max-queue {self.max_queue}); retry later", type="server_error",
                               code="queue_full", headers={"Retry-After": str(self._retry_after())})
            need = self.kv_need([job])
            if need > self.kv_memory:
                raise APIError(400, f"the prompt ({len(job.prompt_ids)} tokens) and max_tokens ({job.max_tokens}) "
                                    f"need {need / GIB:.2f} GiB of KV cache, over this server's "
                                    f"{self.kv_memory / GIB:.2f} GiB (--kv-memory): lower max_tokens or shorten "
                                    "the prompt", param="max_tokens")
            self._waiting.append(job)
            self.metrics.requests[endpoint] += 1
            self._cond.notify()

    def _retry_after(self) -> int:
        """Seconds until the queue has likely drained by one place: the mean generation time so far
        times the requests ahead (at least 1). Called with the lock held."""
        m = self.metrics
        done = m.finished["stop"] + m.finished["length"]
        mean = m.generation_seconds / done if done else 1.0
        return max(1, math.ceil(mean * (len(self._waiting) + 1)))

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
            running = list(self._running)
            self._cond.notify_all()
        for job in waiting:
            job.finished = True
            job.emit("error", _shutting_down())
        for job in running:
            job.cancelled.set()
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

    def _warm_up(self) -> None:
        """Short generations before the first request, through the draft when one is used and then
        the served method, so that no user pays the fast path's compiling or loading (measured
        before: the first request after start took 96.7 s, the next 7.8 s). Their runners give their
        KV buffers back to the pool, and the first request's runners take them, with the graphs made
        for them. They use fresh phrase pools and count in no metric. A failure is logged: requests
        are then served as they come, compiling where they must."""
        if not self.warm_up:
            return
        start = time.perf_counter()
        try:
            with self.tokenizer_lock:
                ids = self.tokenizer(self._warm_up_text(), add_special_tokens=False).input_ids
            takes_draft = self.draft is not None and get_method(self.method).takes_draft
            # the draft first (auto may not run it), then the served method itself, as a request would
            for method in dict.fromkeys(["ouroboros" if takes_draft else self.method, self.method]):
                generate(self.target, torch.tensor([ids], device=self.target.device), draft=self.draft,
                         method=method, max_new_tokens=WARM_UP_TOKENS, config=self.config,
                         pool=PhrasePool(self.config.level, self.config.pool_size), costs=self.costs,
                         engine=self.engine)
            if self.max_batch > 1:  # the batched forwards' costs (measured once per machine) and shapes
                generate(self.target, [ids, ids[: len(ids) // 2]], draft=self.draft, method=self.method,
                         max_new_tokens=WARM_UP_TOKENS, config=self.config, engine=self.engine, eos_token_id=[])
        except Exception:
            log.exception("the warm-up generation failed; serving without it")
        finally:
            self.ready.set()
        if self.on_ready is not None:
            self.on_ready(time.perf_counter() - start)

    def _warm_up_text(self) -> str:
        """A chat request's text where the tokenizer has a chat template (a prompt of the length and
        shape requests bring), else a plain prompt."""
        messages = [{"role": "user", "content": WARM_UP_TEXT}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return WARM_UP_TEXT

    def _work(self) -> None:
        self._warm_up()
        if self.max_batch > 1:
            run_batched(self)
            return
        while True:
            with self._cond:
                if not self._waiting and not self._closing:
                    self._cond.wait(self.seconds_to_save())
                if self._closing:
                    return
                job = self._waiting.popleft() if self._waiting else None
                self._running = [job] if job is not None else []
            if job is not None:
                try:
                    self._run(job)
                finally:
                    with self._cond:
                        self._running = []
            self.save_pool_when_due()

    def save_pool_when_due(self) -> None:
        if self.pool_file is not None and time.monotonic() >= self._next_save:
            if self._dirty:
                self.save_pool()
            self._next_save = time.monotonic() + self.save_interval

    def seconds_to_save(self) -> float | None:
        return None if self.pool_file is None else max(self._next_save - time.monotonic(), 0.0)

    def _run(self, job: Job) -> None:
        tracker = self.tracker(job)
        self.conclude(job, tracker, *self.run_alone(job, tracker))

    def tracker(self, job: Job) -> TextTracker:
        """The job's text tracker, streaming to its client when it asked for a stream."""
        return TextTracker(self.decode, job.stop, (lambda text: job.emit("text", text)) if job.stream else None)

    def run_alone(self, job: Job, tracker: TextTracker, *, until=None, generator: torch.Generator | None = None):
        """(`generate`'s output, None) for `job` alone, streamed through `tracker`, or (None, its
        APIError). `until(new_ids)` True after a step ends it early; `generator` replaces the job's
        seed as its random stream (so that whoever continues the job can continue the stream)."""
        sampling = {k: v for k, v in job.sampling.items() if generator is None or k != "seed"}
        try:
            out = generate(self.target, torch.tensor([job.prompt_ids], device=self.target.device), draft=self.draft,
                           method=self.method, max_new_tokens=job.max_tokens, config=self.config,
                           pool=self.pool, streamer=tracker, costs=self.costs, engine=self.engine,
                           generator=generator, **sampling,
                           stopping=lambda new_ids: (job.cancelled.is_set() or tracker.stopped
                                                     or (until is not None and until(new_ids))))
            return out, None
        except OuroborosError as exc:  # a request `generate` refuses that the schema let through
            return None, from_package_error(exc)
        except Exception:  # a bug or an exhausted machine must fail this request, not the server
            log.exception("generation failed (request id %s)", job.id)
            return None, internal_error(job.id)

    def conclude(self, job: Job, tracker: TextTracker, out, error) -> None:
        """Count the job and send its end: the final text and usage, or its error."""
        if out is not None:
            tracker.finish()
        finish = self.record(job, out, tracker)
        if out is None:
            job.emit("error", error)
        else:
            job.emit("done", Result(tracker.text, finish, len(job.prompt_ids), out.stats.new_tokens))

    def handed_over(self) -> None:
        """A job that ran alone joined the batch (counted in /metrics)."""
        with self._cond:
            self.metrics.handoffs += 1

    def others_waiting(self) -> bool:
        """Whether a request waits for the worker (or the server is closing)."""
        with self._cond:
            return bool(self._waiting) or self._closing

    def record(self, job: Job, out, tracker: TextTracker) -> str:
        """Count the finished job in the metrics, mark it finished, and return its finish reason."""
        if out is None:
            finish = "error"
        else:
            finish = "stop" if tracker.stopped else out.finish_reason
        with self._cond:  # cancel() updates the same counters from the event loop's thread
            m = self.metrics
            self._dirty = self.pool is not None
            m.pool_phrases = len(self.pool) if self.pool is not None else 0
            m.finished["aborted" if job.cancelled.is_set() else finish] += 1
            if tracker.first_token_at is not None:
                m.first_token.observe(tracker.first_token_at - job.arrived)
            if out is not None:
                s = out.stats
                m.prompt_tokens += len(job.prompt_ids)
                m.generated_tokens += s.new_tokens
                m.target_forwards += s.target_forwards
                m.generation_seconds += s.wall_time
                m.last_tokens_per_second = s.tokens_per_second
                m.count_events(s.events, s.plan_start)
            job.finished = True
        return finish


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the sorted vocabulary: phrases are token ids, which mean nothing under another tokenizer."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def open_pool_file(path: Path, config: OuroborosConfig, fingerprint: str) -> PhrasePool:
    """The saved pool at `path`, or a cold one if there is none. A damaged or incompatible file stops
    the start (ConfigError naming it) instead of being replaced, since it may hold hours of phrases."""
    if not path.parent.is_dir():
        raise ConfigError(f"phrase pool file {str(path)!r}: the directory {str(path.parent)!r} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise ConfigError(f"phrase pool file {str(path)!r}: the directory {str(path.parent)!r} is not writable")
    if not path.exists():
        return PhrasePool(config.level, config.pool_size)
    pool, metadata = PhrasePool.load(path)
    hint = "delete it or pass another --pool-file"
    if metadata.get("tokenizer_sha256") != fingerprint:
        raise ConfigError(f"phrase pool file {str(path)!r} was saved for another tokenizer: {hint}")
    if pool.level != config.level:
        raise ConfigError(f"phrase pool file {str(path)!r} holds {pool.level}-grams but --level is "
                          f"{config.level}: {hint}, or pass --level {pool.level}")
    if pool.capacity != config.pool_size:
        pool = PhrasePool.from_state_dict({**pool.state_dict(), "capacity": config.pool_size})
    return pool
