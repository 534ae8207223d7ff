"""Continuous batching for `ouroboros serve --max-batch N`: a request joins the running batch at the
next step and leaves when it ends, hits a stop string, or its client goes away (`BatchSession`).

Each request's text is exactly what it gets alone: the session decodes every row as `generate` does
on its own, and the request's stream, stop strings and metrics go through the same `TextTracker`
and counters as the one-at-a-time worker. A request's prompt is fed in a forward of its own on the
compiled packages, so it does not widen the running rows' forward to its length. A request that
`BatchSession.add` refuses gets its own error. A request whose own generation raises (its proposer,
NaN logits in its verification) ends with its own 500 (the traceback in the log) while the other
rows go on, their output unchanged; a failure of the whole step (the batched forward) ends that
step's requests with a 500 each and the batch starts afresh for the next ones.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch

from ..batch_session import BatchSession
from ..errors import OuroborosError
from ..model_facts import eos_token_ids
from ..request import GenerationStats, seeded_generator
from .schema import from_package_error, internal_error, verifier
from .text import Result, TextTracker

log = logging.getLogger("ouroboros.server")

__all__ = ["run_batched"]


@dataclass
class _Running:
    job: object
    tracker: object
    sent: int = 0
    """New tokens of its row already handed to the tracker."""
    alone: GenerationStats | None = None
    """What the job generated alone before it joined the batch (`_start_alone`), if it did."""


@dataclass
class _Alone:
    """A job that ran alone until others arrived: where it stands, for its row in the batch."""

    tracker: TextTracker
    tokens: list[int]
    stats: GenerationStats
    generator: torch.Generator


def run_batched(worker) -> None:
    """The worker's loop: admit waiting requests up to `worker.max_batch` rows, step, stream, finish."""
    while True:
        session = BatchSession(worker.target, worker.draft, method=worker.method, config=worker.config,
                               engine=worker.engine)
        with session:
            if not _serve(worker, session):
                return


def _serve(worker, session: BatchSession) -> bool:
    """Run `session` until the worker closes (False) or a step fails (True: start a new session)."""
    rows: dict[int, _Running] = {}
    while True:
        jobs = worker.next_jobs(worker.max_batch - len(rows), idle=not rows)
        if jobs is None:  # closing: the running requests end now with their text so far, as when alone
            for index, running in rows.items():
                session.cancel(index)
                _finish(worker, session, index, running)
            return False
        if not rows and len(jobs) == 1:
            _start_alone(worker, session, rows, jobs[0])
            if rows:  # it joined the batch: the requests now waiting join it before the next step
                continue
            jobs = []
        for job in jobs:
            _admit(worker, session, rows, job)
        stepped = len(rows)
        if rows:
            try:
                ended = session.step()
            except Exception as exc:  # the step's requests fail, each with its own error; the server goes on
                _fail_all(worker, rows, exc)
                worker.stepped([], 0)
                return True
            for index, running in list(rows.items()):
                _push(running, session.rows[index].new_tokens)  # a row that ended on EOS was not asked to stop
                if running.job.cancelled.is_set() and index in session.active:
                    session.cancel(index)
                    ended.append(index)
            for index in ended:
                _finish(worker, session, index, rows.pop(index))
        worker.stepped([running.job for running in rows.values()], stepped)
        worker.save_pool_when_due()


def _start_alone(worker, session: BatchSession, rows: dict[int, _Running], job) -> None:
    """A request that finds the batch empty runs the single-stream loop, as fast as `--max-batch 1`,
    until another request waits; then it joins the batch where it stands (its tokens so far extend
    its row's prompt, its random stream goes on), so its output is what it would be alone."""
    tracker, generator = worker.tracker(job), seeded_generator(job.sampling.get("seed"))
    handed = False

    def until(new: list[int]) -> bool:
        nonlocal handed
        handed = len(new) < job.max_tokens and worker.others_waiting()
        return handed

    out, error = worker.run_alone(job, tracker, until=until, generator=generator)
    if out is None or not handed or job.cancelled.is_set() or tracker.stopped:
        worker.conclude(job, tracker, out, error)
        return
    worker.handed_over()
    _admit(worker, session, rows, job, _Alone(tracker, out.sequences[0, len(job.prompt_ids):].tolist(), out.stats,
                                              generator))


def _admit(worker, session: BatchSession, rows: dict[int, _Running], job, alone: _Alone | None = None) -> None:
    if alone is None:
        tracker, done = worker.tracker(job), []
        tracker.put(torch.tensor(job.prompt_ids))  # its first call carries the prompt
        verify = verifier(job.sampling)
    else:
        tracker, done = alone.tracker, alone.tokens
        verify = verifier(job.sampling, alone.generator)
    running = _Running(job, tracker, alone=alone.stats if alone is not None else None)

    def stopping(new: list[int]) -> bool:  # after each step: this step's text out, then the stop rule
        _push(running, new)
        return job.cancelled.is_set() or tracker.stopped

    try:
        index = session.add(job.prompt_ids + done, max_new_tokens=job.max_tokens - len(done),
                            eos=set(eos_token_ids(worker.target, None)), stopping=stopping, pool=worker.pool,
                            verify=verify)
    except OuroborosError as exc:  # a request the session refuses that the schema let through
        worker.record(job, None, tracker)
        job.emit("error", from_package_error(exc))
        return
    rows[index] = running


def _push(running: _Running, new: list[int]) -> None:
    """Hand the row's new tokens not yet seen to its tracker (which streams their final text)."""
    if len(new) > running.sent:
        running.tracker.put(torch.tensor(new[running.sent:]))
        running.sent = len(new)


def _finish(worker, session: BatchSession, index: int, running: _Running) -> None:
    row = session.rows[index]
    if row.error is not None:  # its own failure: its own error, the other rows went on
        _fail_all(worker, {index: running}, row.error)
        return
    running.tracker.finish()
    stats = row.stats if running.alone is None else _joined(running.alone, row.stats)
    out = SimpleNamespace(stats=stats, finish_reason="length" if row.finish == "length" else "stop")
    finish = worker.record(running.job, out, running.tracker)
    running.job.emit("done", Result(running.tracker.text, finish, len(running.job.prompt_ids), stats.new_tokens))


def _joined(alone: GenerationStats, batched: GenerationStats) -> GenerationStats:
    """One job's stats from its lone part and its batched part."""
    return replace(alone, new_tokens=alone.new_tokens + batched.new_tokens,
                   target_forwards=alone.target_forwards + batched.target_forwards,
                   draft_forwards=alone.draft_forwards + batched.draft_forwards,
                   wall_time=alone.wall_time + batched.wall_time,
                   accept_lengths=alone.accept_lengths + batched.accept_lengths,
                   events=dict(Counter(alone.events) + Counter(batched.events)))


def _fail_all(worker, rows: dict[int, _Running], exc: Exception) -> None:
    """Each of `rows` ends with its own error for `exc`: a package error's 4xx, else a 500 naming
    its request id, with the traceback in the log."""
    if isinstance(exc, OuroborosError):
        errors = {index: from_package_error(exc) for index in rows}
    else:
        log.error("generation failed (request ids %s)", ", ".join(r.job.id for r in rows.values()),
                  exc_info=(type(exc), exc, exc.__traceback__))
        errors = {index: internal_error(running.job.id) for index, running in rows.items()}
    for index, running in rows.items():
        worker.record(running.job, None, running.tracker)
        running.job.emit("error", errors[index])
