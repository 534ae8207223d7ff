"""`method="auto"`: choose the drafting per step from what each choice is observed to yield.

Arms are ordinary proposers (plain decoding, prompt lookup, Ouroboros with a draft model). Each
step runs one arm; the time from its `propose` to its `learn` (its draft forwards, the target's
verification and the bookkeeping) and the tokens it emitted update that arm's running estimate.
The arm with the best tokens per second runs next; the others are probed now and then, less often
each time a probe loses, so a machine where speculation is slower falls back to plain decoding and
stays there at the cost of a rare probe. A draft model that has not run yet is probed only while
its prefill would cost little against the remaining generation, so a draft that does not pay
costs nothing, not even its prefill.

Exactness does not depend on the choice: every arm's proposal is verified by the same rule, and
which arm runs depends only on earlier steps.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ..acceptance import StepResult
from ..planning import Estimate, Plan
from ..pool import PhraseSource
from .base import Context, Proposal, Proposer

SMOOTHING = 0.25
"""Weight of the newest step in an arm's running estimate, when the arm also ran the step before;
older estimates fade with the steps since the arm last ran (a probe after a long gap counts more)."""
FADE_STEPS = 4
FIRST_PROBE = 8
"""Steps before a losing arm is tried again; doubled after each losing probe, up to MAX_PROBE."""
MAX_PROBE = 256
PREFILL_SHARE = 0.1
"""A draft model that has not run yet is probed only if its prefill costs below this share of the
predicted time for the remaining tokens."""


@dataclass(frozen=True)
class AutoProposal(Proposal):
    arm: str = ""
    inner: Proposal | None = None
    started: float = 0.0


class AutoProposer:
    def __init__(self, arms: dict[str, Proposer], plan: Plan, *, pool: PhraseSource | None = None,
                 context_phrases: bool = False, clock: Callable[[], float] = time.perf_counter):
        self.events: Counter[str] = Counter()
        self.arms = arms
        self.plan = plan
        self.pool = pool if context_phrases else None
        self.clock = clock
        self.estimates: dict[str, Estimate] = {arm: plan.estimates[arm] for arm in arms}
        self.last_run: dict[str, int] = {}
        self.steps = 0
        self.current = plan.start if plan.start in arms else next(iter(arms))
        self.waited = dict.fromkeys(arms, 0)
        start_rate = self.estimates[self.current].rate
        self.patience = {arm: self._first_patience(start_rate, self.estimates[arm].rate) for arm in arms}
        runners = [arm.draft_runner for arm in arms.values() if arm.draft_runner is not None]
        self.draft_runner = runners[0] if runners else None

    def propose(self, context: Context) -> Proposal:
        arm = self._choose(context)
        started = self.clock()
        inner = self.arms[arm].propose(context)
        return AutoProposal(inner.tree, inner.trunk, inner.tried, arm=arm, inner=inner, started=started)

    def learn(self, context: Context, proposal: Proposal, result: StepResult) -> None:
        arm = proposal.arm
        self.arms[arm].learn(context, proposal.inner, result)
        seconds = self.clock() - proposal.started - self._prefill_seconds(proposal)
        self.events.update(self.arms[arm].events)
        self.arms[arm].events.clear()
        self.events[f"auto_{arm}_steps"] += 1
        if self.pool is not None and self.arms[arm].draft_runner is None:  # keep the pool's context current
            keep = self.pool.level - 1
            self.pool.insert_ngrams(context.tokens[-keep:] + result.emitted)
        if self.steps:  # the first step carries the target's prefill: not a step cost of its arm
            self._update(arm, len(result.emitted), max(seconds, 1e-9))
        self.steps += 1

    def _choose(self, context: Context) -> str:
        best = self._best()
        for arm in self.arms:
            if arm != best:
                self.waited[arm] += 1
        probe = next((arm for arm in self.arms if arm != best and self.waited[arm] >= self.patience[arm]
                      and self._may_probe(arm, context)), None)
        if probe is not None:
            self.events["auto_probes"] += 1
            self.waited[probe] = 0
            return probe
        if best != self.current:
            self.events["auto_fallbacks" if best == "vanilla" else "auto_switches"] += 1
            self.current = best
        return best

    @staticmethod
    def _first_patience(best_rate: float, rate: float) -> int:
        """Arms predicted far slower than the start wait longer for their first probe."""
        ratio = best_rate / rate if rate > 0 else MAX_PROBE
        return int(min(FIRST_PROBE * max(ratio, 1.0) ** 2, MAX_PROBE))

    def _best(self) -> str:
        return max(self.arms, key=lambda arm: (self.estimates[arm].rate, arm == "vanilla"))

    def _may_probe(self, arm: str, context: Context) -> bool:
        runner = self.arms[arm].draft_runner
        if runner is None or runner.forwards:
            return True
        per_token = 1 / max(self.estimates[self._best()].rate, 1e-9)
        return self.plan.draft_prefill < PREFILL_SHARE * context.remaining * per_token

    def _update(self, arm: str, tokens: int, seconds: float) -> None:
        was_best = self._best()
        if arm in self.last_run:
            gap = self.steps - self.last_run[arm] - 1
            new = 1 - (1 - SMOOTHING) ** (1 + gap / FADE_STEPS)
            old = self.estimates[arm]
            tokens = (1 - new) * old.tokens + new * tokens
            seconds = (1 - new) * old.seconds + new * seconds
        self.last_run[arm] = self.steps
        self.estimates[arm] = Estimate(tokens, seconds)
        if arm != was_best:  # a probe (or the first step of a new choice)
            won = self._best() == arm
            self.patience[arm] = FIRST_PROBE if won else min(2 * self.patience[arm], MAX_PROBE)

    def _prefill_seconds(self, proposal: Proposal) -> float:
        """Seconds of draft prefills inside this step: a one-off cost, not the arm's step cost."""
        runner = self.arms[proposal.arm].draft_runner
        if runner is None:
            return 0.0
        seconds = 0.0
        for record in reversed(runner.log):  # only this step's records: the newest ones
            if record.started < proposal.started:
                break
            seconds += record.seconds if record.cached == 0 else 0.0
        return seconds
