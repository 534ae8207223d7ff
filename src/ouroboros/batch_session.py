"""A running batch: rows join between steps, each step verifies every row's draft in one target
forward, and rows leave when they end or are cancelled (continuous batching).

Every row keeps its own proposer, context, budget, EOS, stop rule and sampler, so each row's tokens
are exactly what `generate` gives it alone, whatever joins or leaves around it. The draft model runs
batched too (`DraftBatch`), and each step's draft is sized to the batch's load (`batch_sizing`). In a
batch, `method="auto"` is that sizing over ouroboros's proposals (prompt lookup's without a draft
model): per step it picks, from measured costs, how much to speculate, down to plain decoding.
A joining prompt longer than `PREFILL_CHUNK` is fed a chunk per step while the other rows decode.
Memory: each row holds its own slots in the target's and draft's caches (its prompt and new tokens,
plus the widest step's), freed when it leaves; a caller bounds it by how many rows it adds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch

from .acceptance import greedy_verify
from .batch_draft import DraftBatch
from .batch_sizing import LoadSizer
from .config import OuroborosConfig
from .engine import Engine, engine_for
from .methods import Setup, get_method
from .pool import PhrasePool
from .proposers import Context, Proposal, Proposer
from .request import GenerationStats, emit, validate
from .tree import DraftTree

__all__ = ["BatchSession", "SessionRow"]

PREFILL_CHUNK = 256
"""Prompt tokens a joining row feeds per step while other rows decode (`BatchSession._prompt_chunks`):
the running rows wait for one chunk a step, not for the whole prompt. The built-in pair's compiled
prefill on 2 AVX-512 cores (its cost tables, BENCHMARKS.md session 10, "Prefill costs"): target 366 ms for 64
tokens and 1971 ms for 512, draft 145 and 690 ms: a chunk of 256 holds the others about 1.3 s a step
(interpolated), and a token costs more prefilled 256 at a time than 512 (3.9 ms a token at 512, 5.7 at
64), a price the chunked prompt's own first token pays."""


@dataclass
class SessionRow:
    """One request in the batch: its tokens so far, its proposer, and how it ended."""

    index: int
    prompt: list[int]
    context: Context
    proposer: Proposer
    verify: Callable
    eos: set[int]
    stopping: Callable[[list[int]], bool] | None
    started: float
    stats: GenerationStats = field(default_factory=GenerationStats)
    finish: str | None = None
    """None while running; then "stop" (EOS or the stopping callback), "length", "cancelled" or "error"."""
    error: Exception | None = None
    """What the row's own generation raised (its proposer, its verification: NaN logits), when
    `finish` is "error"; the other rows go on."""

    @property
    def new_tokens(self) -> list[int]:
        return self.context.tokens[len(self.prompt):]


class BatchSession:
    """Rows of one target (and draft) model decoded together, one target forward per `step`.

    Use as a context manager (the batched draft owns threads). `add` a prompt between steps, `step`
    until `active` is empty, `cancel` a row to free it at once; ended rows stay in `rows`."""

    def __init__(self, target, draft=None, *, method: str = "ouroboros", config: OuroborosConfig | None = None,
                 fast: bool | None = None, size_by_load: bool = True, engine: Engine | None = None):
        self.spec = get_method(method)
        if self.spec.name == "auto":  # in a batch, auto is the load sizing over ouroboros's proposals
            self.spec = get_method("ouroboros" if draft is not None else "prompt_lookup")
            size_by_load = True
        self.target, self.draft = target, draft
        self.engine = engine_for(target, draft, fast) if engine is None else engine
        self.config = OuroborosConfig() if config is None else config
        drafting = self.spec.takes_draft and draft is not None
        with torch.inference_mode():
            self.runner = self.engine.batch_runner("target")
            self.drafts = DraftBatch(self.engine.batch_runner("draft")) if drafting else None
            sized = size_by_load and self.spec.name != "vanilla"
            self.sizer = LoadSizer(self.engine.batch_costs("target"),
                                   self.engine.batch_costs("draft") if drafting else None,
                                   self.config.verify_budget - 1) if sized else None
        self.rows: dict[int, SessionRow] = {}
        self.active: list[int] = []

    def __enter__(self) -> BatchSession:
        return self

    def __exit__(self, *exc) -> None:
        if self.drafts is not None:
            self.drafts.__exit__(*exc)

    @property
    def compile_seconds(self) -> float:
        return self.runner.compile_seconds + (self.drafts.runner.compile_seconds if self.drafts is not None else 0.0)

    def add(self, prompt: Sequence[int], *, max_new_tokens: int, eos: set[int] = frozenset(),
            stopping: Callable[[list[int]], bool] | None = None, verify: Callable = greedy_verify,
            pool: PhrasePool | None = None) -> int:
        """A new row, decoded from the next step on; returns its id. `pool=None`: a fresh phrase pool."""
        prompt = list(prompt)
        validate(self.target, torch.tensor([prompt]), self.draft, self.spec.name, max_new_tokens, self.config, pool)
        index = len(self.rows)
        pool = PhrasePool(self.config.level, self.config.pool_size) if pool is None else pool
        with torch.inference_mode():
            draft_runner = self.drafts.add(index) if self.drafts is not None else None
            proposer = self.spec.build(Setup(prompt, self.config, pool, draft_runner, max_new_tokens))
            self.runner.add(index)
        self.rows[index] = SessionRow(index, prompt, Context(list(prompt), max_new_tokens), proposer, verify,
                                      set(eos), stopping, time.perf_counter())
        self.active.append(index)
        return index

    def cancel(self, row: int) -> None:
        """End a running row now (a client that left): its cache slots are freed, the rest go on."""
        if row in self.active:
            self.rows[row].finish = "cancelled"
            self._leave([row])

    def step(self) -> list[int]:
        """One step of every active row: propose, one target forward, verify, learn, emit. Returns the
        rows that ended in it. A row whose own work raises ends with "error" (see `SessionRow.error`)
        and the others go on; a failing batched forward raises."""
        rows = [self.rows[i] for i in self.active]
        chunks = self._prompt_chunks(rows)
        rows = [row for row in rows if row.index not in chunks]
        ended = []
        with torch.inference_mode():
            proposals, drafts, errors = self._propose(rows)
            rows = [row for row in rows if row.index not in errors]
            steps = {row.index: (self.runner.rewind(row.index, row.context.tokens), proposals[row.index].tree)
                     for row in rows}
            logits = self.runner.forward({**steps, **{index: (chunk, DraftTree(max_depth=0))
                                                      for index, chunk in chunks.items()}})
            for index in chunks:
                self.runner.keep(index, [])
            self._feed_draft(chunks)
            for row in rows:
                try:
                    if self._verify(row, proposals[row.index], logits[row.index], drafts):
                        ended.append(row.index)
                except Exception as exc:  # this row's own failure: it leaves, the others go on
                    self.runner.abandon(row.index)
                    errors[row.index] = exc
        for index, error in errors.items():
            self.rows[index].finish, self.rows[index].error = "error", error
        ended += list(errors)
        self._leave(ended)
        return ended

    def _prompt_chunks(self, rows: list[SessionRow]) -> dict[int, list[int]]:
        """The next `PREFILL_CHUNK` prompt tokens of each row with more than that left to feed, while
        other rows decode: those rows step between its chunks instead of waiting for its whole prefill
        (a row's last prompt token is always left for its first decoding step)."""
        unfed = {row.index: row.prompt[len(self.runner.tokens[row.index]):-1] for row in rows}
        chunks = {index: tokens[:PREFILL_CHUNK] for index, tokens in unfed.items() if len(tokens) > PREFILL_CHUNK}
        return chunks if len(chunks) < len(rows) else {}

    def _feed_draft(self, chunks: dict[int, list[int]]) -> None:
        """The same prompt chunks into the draft model's cache, in one forward, so that a row's first
        draft does not prefill its whole prompt either."""
        if self.drafts is None or not chunks:
            return
        runner = self.drafts.runner  # a chunked row has not drafted yet: its draft cache is behind the target's
        runner.forward({index: (self.rows[index].prompt[len(runner.tokens[index]):len(self.runner.tokens[index])],
                                DraftTree(max_depth=0)) for index in chunks})
        for index in chunks:
            runner.keep(index, [])

    def _propose(self, rows: list[SessionRow]) -> tuple[dict[int, Proposal], bool | None, dict[int, Exception]]:
        """(each row's proposal, whether the draft model could draft them, the rows whose proposer
        raised and why). The proposals are the proposers', within the node budget and drafting mode
        the load allows; when that budget is 0 no proposer runs (plain decoding: empty trees, and
        None for the mode)."""
        budget, drafts = self.sizer.plan([row.index for row in rows]) if self.sizer is not None else (None, True)
        if budget == 0:
            return {row.index: Proposal(DraftTree(max_depth=0)) for row in rows}, None, {}
        calls = {}
        for row in rows:
            context = row.context if budget is None else Context(
                row.context.tokens, min(row.context.remaining, budget + 1), nodes=budget, draft_model=drafts)
            calls[row.index] = partial(row.proposer.propose, context)
        if self.drafts is None or not drafts:  # no draft forward to batch: no turns to take
            proposals, failed = {}, {}
            for index, call in calls.items():
                try:
                    proposals[index] = call()
                except Exception as exc:
                    failed[index] = exc
            return proposals, drafts, failed
        start = time.perf_counter()
        proposals, failed = self.drafts.propose(calls)
        if self.sizer is not None and all(row.stats.accept_lengths for row in rows):  # not a prompt's prefill
            self.sizer.observe_draft(time.perf_counter() - start, len(rows), budget)
        return proposals, drafts, dict(failed)

    def _verify(self, row: SessionRow, proposal: Proposal, logits: torch.Tensor, drafts: bool | None) -> bool:
        """Verify a row's tree on its logits [1 + tree.total, vocab], keep, learn (unless no proposer
        ran: `drafts` None, a step sized to plain decoding) and emit, as one step of `generate`; True
        when the row has ended."""
        result = row.verify(proposal.tree, logits)
        self.runner.keep(row.index, result.path)
        if drafts is not None:
            if self.sizer is not None:
                self.sizer.row(row.index, drafts).observe(max(proposal.tree.depths, default=0), len(result.path))
            row.proposer.learn(row.context, proposal, result)
        emitted, ended = emit(row.context, result, row.eos)
        row.stats.accept_lengths.append(len(emitted))
        if ended or (row.stopping is not None and row.stopping(row.new_tokens)):
            row.finish = "stop"
        elif row.context.remaining <= 0:
            row.finish = "length"
        return row.finish is not None

    def _leave(self, ended: list[int]) -> None:
        if not ended:
            return
        self._record(ended)
        self.runner.drop(ended)
        if self.drafts is not None:
            self.drafts.drop(ended)
        if self.sizer is not None:
            self.sizer.forget(ended)
        self.active = [i for i in self.active if i not in ended]

    def _record(self, ended: list[int]) -> None:
        """Each ended row's stats: its steps, tokens, events and the forwards that fed it."""
        for index in ended:
            row = self.rows[index]
            stats = row.stats
            stats.wall_time = time.perf_counter() - row.started
            stats.target_forwards = len(stats.accept_lengths)
            draft_log = row.proposer.draft_runner.log if row.proposer.draft_runner is not None else []
            stats.draft_forwards = len(draft_log)
            stats.forward_log = sorted([*self.runner.row_log(index), *draft_log], key=lambda record: record.started)
            stats.events = dict(row.proposer.events)
            stats.new_tokens = len(row.new_tokens)
            stats.compile_seconds = self.compile_seconds

