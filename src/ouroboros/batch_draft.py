"""The batched draft: every row's proposer drafts on one shared draft `BatchRunner`, one forward per round.

A proposer drives its draft runner from inside `propose()` (several forwards, each followed by its
own verification and keep), so the rows' propose() calls run as threads that take turns, one at a
time in row order, like coroutines: a row runs until it asks its `RowRunner` for a forward or its
propose() returns, then the next row runs. When every row still inside propose() has asked, one
batched forward serves them all and each row, in turn, continues with its own logits. Taking turns
keeps the rows' Python work (and a shared phrase pool's updates) in a fixed order, never concurrent,
so a batch is deterministic; each row's logits come from its own masked rows of the forward, so its
drafting is what it would be alone, up to the batch runner's float rounding.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from .aot import MAX_ROWS
from .batch_runner import BatchRunner
from .proposers import Proposal
from .runner import ForwardRecord
from .tree import DraftTree

__all__ = ["DraftBatch", "RowRunner"]


class _Cancelled(BaseException):
    """Raised inside a row's propose() when the batch stops (an interrupt, or a failed batched
    forward); not an `Exception`, so that a proposer's own handlers do not swallow it."""


class DraftBatch:
    """One draft `BatchRunner` for the rows, and the turns that batch their draft forwards.

    Use as a context manager (it owns the rows' threads); `view(row)` is the runner a row's proposer
    drafts on, `propose(calls)` runs one step's propose() calls and returns their proposals."""

    def __init__(self, runner: BatchRunner):
        self.runner = runner
        """The draft model's batch runner, one row per row of the batch."""
        self._threads = ThreadPoolExecutor(max_workers=MAX_ROWS, thread_name_prefix="draft-row")
        self._cond = threading.Condition()
        self._turn: int | None = None
        """The row that may run now; None: the coordinator's turn."""
        self._asked: dict[int, tuple[Sequence[int], DraftTree]] = {}
        self._given: dict[int, torch.Tensor] = {}
        self._ended: dict[int, tuple[Proposal | None, BaseException | None]] = {}
        self._cancel = False

    def __enter__(self) -> DraftBatch:
        return self

    def __exit__(self, *exc) -> None:
        self._threads.shutdown(wait=True)

    def view(self, row: int) -> RowRunner:
        return RowRunner(self, row)

    def add(self, row: int) -> RowRunner:
        """A joining row: its slot in the draft cache, and its view."""
        self.runner.add(row)
        return self.view(row)

    def drop(self, rows: Sequence[int]) -> None:
        """Finished rows leave the draft cache too."""
        self.runner.drop(rows)

    def propose(self, calls: Mapping[int, Callable[[], Proposal]]
                ) -> tuple[dict[int, Proposal], dict[int, Exception]]:
        """Run every row's propose() call, batching their draft forwards: (the proposals, the errors of
        the rows whose call raised). A failing row leaves the others drafting, its draft step
        abandoned; a failing batched forward (every row's) raises once the rows have stopped."""
        self._ended = {}
        for row, call in calls.items():
            self._threads.submit(self._run, row, call)
        live = list(calls)
        with self._cond:
            try:
                while live:
                    for row in live:
                        self._resume(row)
                    for row in (row for row in live if row in self._ended):  # the rows that ended this round
                        error = self._ended[row][1]
                        if error is not None and not isinstance(error, Exception):  # an interrupt: stop all
                            raise error
                        if error is not None:
                            self.runner.abandon(row)
                    live = [row for row in live if row not in self._ended]
                    if live:
                        self._forward(live)
            finally:
                self._cancel_rows([row for row in live if row not in self._ended])
        errors = {row: error for row, (_, error) in self._ended.items() if error is not None}
        return {row: proposal for row, (proposal, error) in self._ended.items() if error is None}, errors

    def _forward(self, rows: list[int]) -> None:
        self._given.update(self.runner.forward({row: self._asked.pop(row) for row in rows}))

    def _run(self, row: int, call: Callable[[], Proposal]) -> None:
        """A row's thread: wait for its turn, propose, and hand the turn back whatever happens."""
        proposal, error = None, None
        try:
            with self._cond:
                self._wait_turn(row)
            with torch.inference_mode():
                proposal = call()
        except BaseException as exc:  # handed to the coordinator, which raises it
            error = exc
        with self._cond:
            self._ended[row] = (proposal, error)
            self._turn = None
            self._cond.notify_all()

    def _resume(self, row: int) -> None:
        """Coordinator, holding the lock: let `row` run until it asks for a forward or ends."""
        self._turn = row
        self._cond.notify_all()
        self._cond.wait_for(lambda: self._turn is None)

    def _wait_turn(self, row: int) -> None:
        """A row, holding the lock: wait until the coordinator resumes it."""
        self._cond.wait_for(lambda: self._turn == row)
        if self._cancel:
            raise _Cancelled

    def _cancel_rows(self, rows: list[int]) -> None:
        """End the rows still waiting (another row failed, or the batched forward did)."""
        self._cancel = True
        try:
            for row in rows:
                self._resume(row)
        finally:
            self._cancel = False

    def _ask(self, row: int, pending: Sequence[int], tree: DraftTree) -> torch.Tensor:
        """A row's forward: hand the turn back and wait for the batched forward's logits."""
        with self._cond:
            self._asked[row] = (pending, tree)
            self._turn = None
            self._cond.notify_all()
            self._wait_turn(row)
            return self._given.pop(row)


class RowRunner:
    """One row's view of the shared draft runner, with the `runner.Runner` interface: what a proposer
    calls (`rewind`, `forward`, `keep`) and what the stats read (`log`, `forwards`). Its log holds
    the batched forwards it took part in, each record shared by every row of that forward."""

    def __init__(self, batch: DraftBatch, row: int):
        self.batch = batch
        self.row = row
        self.model = batch.runner.model
        self.device = batch.runner.device
        self.dtype = batch.runner.dtype
        self.role = batch.runner.role
        self.compile_seconds = 0.0

    @property
    def tokens(self) -> list[int]:
        return self.batch.runner.tokens[self.row]

    @property
    def log(self) -> list[ForwardRecord]:
        return self.batch.runner.row_log(self.row)

    @property
    def forwards(self) -> int:
        return len(self.batch.runner.taken[self.row])

    def rewind(self, sequence: Sequence[int]) -> list[int]:
        return self.batch.runner.rewind(self.row, sequence)

    def forward(self, pending: Sequence[int], tree: DraftTree) -> torch.Tensor:
        return self.batch._ask(self.row, pending, tree)

    def keep(self, path: Sequence[int]) -> None:
        self.batch.runner.keep(self.row, path)
