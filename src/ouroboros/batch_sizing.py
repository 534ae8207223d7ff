"""Speculation sized by load: how many draft nodes each row of a batch may verify in one step, and
whether the draft model drafts them.

A batched forward's cost grows with all its rows' tokens together (rows x width), so a draft that
pays for one row alone can cost a batch more than it gains. Each step picks the node budget k,
shared by the rows (the forward is as wide as its widest row anyway), and the drafting mode that
maximize the batch's expected emitted tokens per second:

    rate(k, mode) = sum_i (1 + p_i (a_i + a_i^2 + ... + a_i^k)) / (T(rows, k + 1) + [draft] scale x k x D(rows, 2))

T and D are the target's and the draft's batched forward costs, rows x new tokens each, measured on
this machine's batch runners (`batch_costs`); per row and mode, p_i is how often the row had a
proposal and a_i its per-token acceptance (a geometric model: each drafted token is accepted with a_i
once its parent was), observed. The modes: the draft model drafts (its price per drafted node is
D(rows, 2) scaled by what drafting has taken so far, `draft_scale`), or free drafts only (the
context's own continuation and pool phrases: no draft forward). k = 0 is plain batched decoding: no
proposer runs that step.
SmartSpec (arXiv 2406.14066) sizes GPU batches by the same goodput rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .batch_costs import BatchCosts

__all__ = ["LoadSizer", "RowAcceptance"]

CHOICES = (0, 1, 2, 3, 4, 6, 8, 12, 16)
"""Node budgets a step may pick from (up to the method's own verify budget)."""


@dataclass
class RowAcceptance:
    """One row's acceptance in one drafting mode, from the target's verdicts: how often a step had
    anything to propose, and per drafted token, accepted over the positions tried (each position
    until the first rejection); the priors are worth a few steps."""

    accepted: float = 2.4
    tried: float = 4.0
    proposed: float = 1.6
    steps: float = 2.0

    @property
    def rate(self) -> float:
        return self.accepted / self.tried

    def observe(self, depth: int, accepted: int) -> None:
        """A step offered a tree `depth` nodes deep (0: nothing) and the target accepted `accepted`."""
        self.steps += 1
        if depth > 0:
            self.proposed += 1
            self.accepted += accepted
            self.tried += accepted + (accepted < depth)

    def expected(self, k: int) -> float:
        """Expected accepted drafted tokens for a k-node chain."""
        a = self.rate
        return self.proposed / self.steps * sum(a ** j for j in range(1, k + 1))


@dataclass
class LoadSizer:
    """Per step, the node budget for the batch's rows and whether they draft with the draft model
    (see the module docstring)."""

    target: BatchCosts
    draft: BatchCosts | None
    """The draft model's costs for methods whose proposals run it, else None."""
    ceiling: int
    """The method's own node budget for one row (its verify budget less the root)."""
    rows: dict[tuple[int, bool], RowAcceptance] = field(default_factory=dict)
    """Per (row, drafts with the draft model)."""
    draft_scale: float = 1.0
    """Observed draft seconds per drafted node over the table's one-token draft forward (a running
    mean): the draft's real price per node, its Python and any wider forward included."""

    def plan(self, rows: Sequence[int]) -> tuple[int, bool]:
        """(node budget k, whether the draft model drafts) for a step of `rows`; k = 0: plain decoding."""
        width = len(rows)
        plain = self.target.forward(width, 1)
        best, best_rate = (0, False), width / plain
        for k in (k for k in CHOICES if 0 < k <= self.ceiling):
            target = max(self.target.forward(width, k + 1), plain)  # measured noise aside, more is not cheaper
            for drafts in (False, True) if self.draft is not None else (False,):
                seconds = target + (self.draft_scale * k * self.draft.forward(width, 2) if drafts else 0.0)
                rate = sum(1 + self.row(row, drafts).expected(k) for row in rows) / seconds
                if rate > best_rate:
                    best, best_rate = (k, drafts), rate
        return best

    def row(self, row: int, drafts: bool) -> RowAcceptance:
        """Row `row`'s acceptance in a mode; the priors: 0.6 per token, proposing 80% of the steps
        with the draft model and half of them without. A prior of auto's 0.75 for the draft made
        batches of 8 try it and pay its prefill of every row (HumanEval 0-7: 57.5 aggregate tok/s
        against 66.8, BENCHMARKS.md session 9)."""
        return self.rows.setdefault((row, drafts), RowAcceptance() if drafts else RowAcceptance(proposed=1.0))

    def forget(self, rows: Sequence[int]) -> None:
        """Rows that left the batch: their acceptance is not needed again."""
        for row in rows:
            for drafts in (False, True):
                self.rows.pop((row, drafts), None)

    def observe_draft(self, seconds: float, rows: int, nodes: int) -> None:
        """A step's drafting took `seconds` for `rows` rows drafting up to `nodes` nodes each."""
        if nodes > 0 and self.draft is not None:
            self.draft_scale = 0.8 * self.draft_scale + 0.2 * seconds / (nodes * self.draft.forward(rows, 2))
