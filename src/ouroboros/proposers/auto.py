"""`method="auto"`: choose the drafting per step from what each choice is observed to yield.

Arms are ordinary proposers (plain decoding, prompt lookup, Ouroboros with a draft model). Each
step runs one arm; the time from its `propose` to its `learn` (its draft forwards, the target's
verification and the bookkeeping) and the tokens it emitted update that arm's running estimate.
The arm with the best tokens per second runs next.

Arms without a draft model are shadowed instead of probed: they propose too (cheap, no forward),
and what that draft would have yielded is read off the tokens the target goes on to emit (the
prefix it shares with them, plus the target's own token), priced at the target's measured cost
for that many tokens, calibrated online against the target's observed step times. A shadow
draft stays open until the output has gone past it, so a shadowed arm follows the output the way
it would had it run. So switching to plain decoding or prompt lookup never costs a trial step.

An arm with a draft model cannot be shadowed (its draft is a forward): it is probed now and then,
less often each time a probe loses, so a machine where speculation is slower falls back and stays
there at the cost of a rare probe. A draft model that has not run yet is probed only where the plan
predicts it faster than plain decoding and while its prefill would cost little against the
remaining generation, so a draft that is not expected to pay costs nothing, not even its prefill.

Exactness does not depend on the choice: every arm's proposal is verified by the same rule, and
which arm runs depends only on earlier steps.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ..acceptance import StepResult
from ..planning import Arm, Estimate, Plan
from ..pool import PhraseSource
from ..runner import common_prefix
from .base import Context, Proposal, Proposer

SMOOTHING = 0.25
"""Weight of the newest step in an arm's running estimate, when the arm also ran the step before;
older estimates fade with the steps since the arm last ran (a probe after a long gap counts more)."""
FADE_STEPS = 4
FIRST_PROBE = 8
"""Steps before a losing arm is tried again; doubled after each losing probe, up to MAX_PROBE."""
MAX_PROBE = 256
SWITCH_MARGIN = 1.1
"""Another arm replaces the running one only when its estimate is this much better: one step's
tokens vary a lot (a 15-token accept, then a 1-token one), and each switch has its price (a
draft model falls behind the context and must catch up)."""
LEAVE_MARGIN = 1.3
"""The margin to leave an arm that cannot be shadowed (a draft model): coming back to it costs a
probe, FIRST_PROBE steps or more later, and the draft model's catch-up on the context, whereas an
arm without a draft that is left goes on being scored for free."""
PROBE_STEPS = 3
"""Steps a probe runs: one step is too noisy a sample (its first step also pays the draft model's
catch-up on the context), and a probe that loses by luck waits twice as long for the next. The
start arm runs as many judged steps before anything replaces it."""
PREFILL_SHARE = 0.1
"""A draft model that has not run yet is probed only if its prefill costs below this share of the
predicted time for the remaining tokens."""


@dataclass(frozen=True)
class AutoProposal(Proposal):
    arm: Arm = Arm.VANILLA
    inner: Proposal | None = None
    started: float = 0.0
    shadows: tuple[tuple[Arm, int, tuple[int, ...]], ...] = ()
    """(arm, context length, the chain it would have drafted there) for shadowed arms without an
    open shadow draft."""


class AutoProposer:
    def __init__(self, arms: dict[Arm, Proposer], plan: Plan, *, pool: PhraseSource | None = None,
                 context_phrases: bool = False, clock: Callable[[], float] = time.perf_counter):
        self.events: Counter[str] = Counter()
        self.arms = {Arm(arm): proposer for arm, proposer in arms.items()}
        self.plan = plan
        self.pool = pool if context_phrases else None
        self.clock = clock
        self.estimates: dict[Arm, Estimate] = {arm: plan.estimates[arm] for arm in self.arms}
        self.last_run: dict[Arm, int] = {}
        self.steps = 0
        self.current = plan.start if plan.start in self.arms else next(iter(self.arms))
        self.shadowed = [arm for arm, proposer in self.arms.items() if proposer.draft_runner is None]
        probed = [arm for arm in self.arms if arm not in self.shadowed]
        self.waited = dict.fromkeys(probed, 0)
        self.probing: Arm | None = None
        self.probe_left = 0
        start_rate = self.estimates[self.current].rate
        self.patience = {arm: self._first_patience(start_rate, self.estimates[arm].rate) for arm in probed}
        if self.current in self.patience:  # it runs first: once left, it waits like a losing probe
            self.patience[self.current] = FIRST_PROBE
        runners = [arm.draft_runner for arm in self.arms.values() if arm.draft_runner is not None]
        self.draft_runner = runners[0] if runners else None
        self.open_shadows: dict[Arm, tuple[int, tuple[int, ...]]] = {}
        """arm -> (context length, chain) of its shadow draft not yet passed by the output."""
        self.scale = 1.0
        """Observed over table-predicted seconds of the target's part of a step (running average)."""

    def propose(self, context: Context) -> Proposal:
        arm = self._choose(context)
        started = self.clock()
        inner = self.arms[arm].propose(context)
        # none on the first step, as its arm is not judged on it: an answer's opening often repeats
        # the prompt's end, a long lookup match that says little about the rest
        shadowing = [other for other in self.shadowed if other != arm and other not in self.open_shadows]
        shadows = tuple((other, len(context.tokens), tuple(self.arms[other].propose(context).tree.tokens))
                        for other in (shadowing if self.steps else []))
        return AutoProposal(inner.tree, inner.trunk, inner.tried, arm=arm, inner=inner, started=started,
                            shadows=shadows)

    def learn(self, context: Context, proposal: Proposal, result: StepResult) -> None:
        arm = proposal.arm
        self.arms[arm].learn(context, proposal.inner, result)
        elapsed = self.clock() - proposal.started
        drafting, prefill = self._draft_seconds(proposal)
        seconds = elapsed - prefill
        self.events.update(self.arms[arm].events)
        self.arms[arm].events.clear()
        self.events[f"auto_{arm.value}_steps"] += 1
        if self.pool is not None and self.arms[arm].draft_runner is None:  # keep the pool's context current
            keep = self.pool.level - 1
            self.pool.insert_ngrams(context.tokens[-keep:] + result.emitted)
        self._follow_shadows(proposal, context.tokens + result.emitted)
        if self.steps:  # the first step carries the target's prefill: not a step cost of its arm
            self._calibrate(elapsed - drafting, 1 + proposal.tree.total)
            self._update(arm, len(result.emitted), max(seconds, 1e-9))
        self.steps += 1

    def _choose(self, context: Context) -> Arm:
        if self.probe_left:
            self.probe_left -= 1
            return self.probing
        if self.steps <= PROBE_STEPS:  # the first step is not judged: the start gets PROBE_STEPS judged ones
            return self.current
        best = self._best()
        margin = SWITCH_MARGIN if self.current in self.shadowed else LEAVE_MARGIN
        if self.estimates[best].rate < margin * self.estimates[self.current].rate:
            best = self.current
        for arm in self.waited:
            if arm != best:
                self.waited[arm] += 1
        probe = next((arm for arm in self.waited if arm != best and self.waited[arm] >= self.patience[arm]
                      and self._may_probe(arm, context)), None)
        if probe is not None:
            self.events["auto_probes"] += 1
            self.waited[probe] = 0
            self.probing, self.probe_left = probe, PROBE_STEPS - 1
            return probe
        if best != self.current:
            self.events["auto_fallbacks" if best == Arm.VANILLA else "auto_switches"] += 1
            self.current = best
        return best

    @staticmethod
    def _first_patience(best_rate: float, rate: float) -> int:
        """Steps before an arm's first probe: at once for one predicted about as fast as the start
        (the plan's guess is rough), longer the slower it is predicted."""
        ratio = best_rate / rate if rate > 0 else MAX_PROBE
        return int(min(max(FIRST_PROBE * (ratio ** 2 - 1), 1), MAX_PROBE))

    def _best(self) -> Arm:
        return max(self.arms, key=lambda arm: (self.estimates[arm].rate, arm == Arm.VANILLA))

    def _may_probe(self, arm: Arm, context: Context) -> bool:
        """A draft model that has not run yet is tried only if the plan predicts it faster than
        plain decoding (else its prefill and probes are a loss with little chance of return) and
        its prefill is a small share of the time left."""
        runner = self.arms[arm].draft_runner
        if runner is None or runner.forwards:
            return True
        if self.plan.estimates[arm].rate < self.plan.estimates[Arm.VANILLA].rate:
            return False
        per_token = 1 / max(self.estimates[self._best()].rate, 1e-9)
        return self.plan.draft_prefill < PREFILL_SHARE * context.remaining * per_token

    def _update(self, arm: Arm, tokens: float, seconds: float) -> None:
        self._blend(arm, tokens, seconds)
        if arm == self.probing and not self.probe_left:  # the probe's last step: did it win?
            won = self._best() == arm
            self.patience[arm] = FIRST_PROBE if won else min(max(2 * self.patience[arm], FIRST_PROBE), MAX_PROBE)
            self.probing = None

    def _blend(self, arm: Arm, tokens: float, seconds: float) -> None:
        """Fold one step's (tokens, seconds) into the arm's running estimate."""
        if arm in self.last_run:
            gap = self.steps - self.last_run[arm] - 1
            new = 1 - (1 - SMOOTHING) ** (1 + gap / FADE_STEPS)
            old = self.estimates[arm]
            tokens = (1 - new) * old.tokens + new * tokens
            seconds = (1 - new) * old.seconds + new * seconds
        self.last_run[arm] = self.steps
        self.estimates[arm] = Estimate(tokens, seconds)

    def _follow_shadows(self, proposal: AutoProposal, tokens: list[int]) -> None:
        """Score each shadow draft that the output `tokens` has now gone past."""
        self.open_shadows.pop(proposal.arm, None)  # it ran: its own step is its sample
        for arm, start, chain in proposal.shadows:
            if arm != proposal.arm:
                self.open_shadows[arm] = (start, chain)
        for arm, (start, chain) in list(self.open_shadows.items()):
            emitted = tokens[start:]
            if len(emitted) > common_prefix(list(chain), emitted):  # the target's token after it is known
                self._blend(arm, _yield(chain, emitted), self._target_seconds(1 + len(chain)))
                del self.open_shadows[arm]

    def _target_seconds(self, fed: int) -> float:
        """The target's step over `fed` tokens, from the cost table and the online calibration."""
        return self.scale * self.plan.target_curve.at(fed)

    def _calibrate(self, seconds: float, fed: int) -> None:
        if seconds > 0:
            ratio = seconds / self.plan.target_curve.at(fed)
            self.scale = (1 - SMOOTHING) * self.scale + SMOOTHING * ratio

    def _draft_seconds(self, proposal: Proposal) -> tuple[float, float]:
        """(all draft forwards, draft prefills) inside this step, in seconds: the prefill is a
        one-off cost, not the arm's step cost; neither is the target's part of the step."""
        runner = self.arms[proposal.arm].draft_runner
        drafting = prefill = 0.0
        for record in reversed(runner.log if runner is not None else []):  # this step's records: the newest
            if record.started < proposal.started:
                break
            drafting += record.seconds
            prefill += record.seconds if record.cached == 0 else 0.0
        return drafting, prefill


def _yield(chain: tuple[int, ...], emitted: list[int]) -> int:
    """Tokens a draft `chain` would have emitted in a step whose target emitted `emitted`: its
    prefix shared with them plus the target's own next token (at most what was emitted: beyond
    that the target's choice is unknown)."""
    return min(common_prefix(list(chain), emitted) + 1, len(emitted))
