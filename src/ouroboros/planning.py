"""The plan of `method="auto"`: which drafting to start with, with which sizes, and why.

Each candidate ("arm") gets a predicted rate, tokens per second, from the measured cost table at
the cache length the generation will mostly run at and the draft's expected acceptance:
- vanilla: 1 token per target forward of 1 token;
- prompt_lookup: context n-grams cost no draft forward; their hit rate is unknown before decoding,
  so it starts from a modest guess and is learned while decoding;
- ouroboros: sizes from `sizing.choose` (the same cost model as `ouroboros tune`), with the draft
  model's prefill spread over the tokens to generate (on a long prompt that prefill may cost more
  than the draft saves). Its rate is a floor: the better of the two that model predicts, Ouroboros
  without credit for phrase and branch hits, and the draft's plain chain (which its adaptive drafts
  can shrink to).

The start prefers the draft arm where its floor beats plain decoding and comes near prompt lookup's
guess: while the draft arm runs, prompt lookup is scored for free (shadowed), so a wrong start there
is corrected without cost; the other way round, the draft arm is only learned by probing it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum

from .config import OuroborosConfig
from .costs import CostTable
from .sizing import CostCurve, choose


class Arm(StrEnum):
    """One of auto's candidates. A str enum: its str, format and JSON are the plain value
    ("vanilla", ...), so event names, `GenerationStats.plan_start` and the plan's line read as before."""

    VANILLA = "vanilla"
    PROMPT_LOOKUP = "prompt_lookup"
    OUROBOROS = "ouroboros"


LOOKUP_PRIOR_TOKENS = 1.25
"""Tokens per step assumed for prompt lookup before any is observed: a modest hit rate, so that it
is tried first only where verifying its draft costs little more than one token."""
LOOKUP_DOUBT = 1.1
"""The draft arm starts instead of prompt lookup when its floor is within this factor of lookup's
guess (and above plain decoding)."""


@dataclass(frozen=True)
class Estimate:
    """Expected tokens emitted and seconds spent per decoding step of one arm."""

    tokens: float
    seconds: float

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Plan:
    start: Arm
    """The arm to start with."""
    config: OuroborosConfig
    """The ouroboros arm's config: the given sizes (its adaptive drafts size themselves) with this
    machine's draft cost and verification budget, and phrase drafting only where the draft's wider
    forward is free here."""
    lookup_gamma: int = 3
    """Draft length for prompt lookup, from the target's costs."""
    estimates: dict[Arm, Estimate] = field(default_factory=dict)
    draft_prefill: float = 0.0
    """Seconds the draft model's prefill of the prompt is predicted to cost."""
    reason: str = ""
    target_curve: CostCurve | None = None
    """The target's forward cost by tokens fed, at the cache length planned for: what auto prices
    the steps of the arms it does not run with (always set by `plan`)."""

    def __post_init__(self) -> None:  # a plain name given for an arm becomes its Arm (unknown: ValueError)
        object.__setattr__(self, "start", Arm(self.start))
        object.__setattr__(self, "estimates", {Arm(arm): e for arm, e in self.estimates.items()})

    def line(self) -> str:
        """One line for the terminal: the choice, its sizes, and why."""
        sizes = ""
        if self.start == Arm.OUROBOROS:
            c = self.config
            sizes = f" (draft_cost={c.draft_cost:.2f}, verify_budget={c.verify_budget})"
        return f"auto: {self.start.value}{sizes}: {self.reason}"


def plan(table: CostTable, prompt_tokens: int, max_new_tokens: int, *, acceptance: float,
         base: OuroborosConfig, has_draft: bool) -> Plan:
    cached = prompt_tokens + max_new_tokens // 2
    target = CostCurve.at_cached(table.target, cached)
    one = target.at(1)
    lookup_gamma = choose(target, None, acceptance=acceptance, base=base).config.gamma
    config = base
    lookup_guess = Estimate(LOOKUP_PRIOR_TOKENS, target.at(1 + lookup_gamma))
    estimates = {Arm.VANILLA: Estimate(1.0, one), Arm.PROMPT_LOOKUP: lookup_guess}
    draft_prefill = 0.0
    if has_draft and table.draft is not None:
        sizing = choose(target, CostCurve.at_cached(table.draft, cached), acceptance=acceptance, base=base)
        config = replace(base, draft_cost=sizing.config.draft_cost, verify_budget=sizing.config.verify_budget,
                         phrase_drafting=sizing.config.phrase_drafting)
        draft_prefill = table.draft.prefill(prompt_tokens)
        speedup = max(sizing.predicted.values())
        per_token = one / speedup + draft_prefill / max_new_tokens if speedup > 0 else float("inf")
        estimates[Arm.OUROBOROS] = Estimate(1.0, per_token)
    best = max(estimates, key=lambda arm: (estimates[arm].rate, arm == Arm.VANILLA))
    vanilla = estimates[Arm.VANILLA].rate
    draft = estimates.get(Arm.OUROBOROS)
    if best == Arm.PROMPT_LOOKUP and draft and draft.rate >= vanilla and LOOKUP_DOUBT * draft.rate >= lookup_guess.rate:
        best = Arm.OUROBOROS
    if best == Arm.OUROBOROS:
        reason = (f"predicted {estimates[best].rate / vanilla:.2f}x plain decoding from the measured costs "
                  f"(target over 16 tokens = {target.at(16) / one:.2f}x one token) and acceptance {acceptance:.2f}")
    elif Arm.OUROBOROS in estimates:
        reason = (f"the draft model is predicted at {estimates[Arm.OUROBOROS].rate / vanilla:.2f}x plain decoding "
                  f"(target over 16 tokens = {target.at(16) / one:.2f}x one token, draft prefill "
                  f"{draft_prefill:.2f} s); context n-grams are tried while decoding")
    else:
        reason = "no draft model; context n-grams are tried while decoding"
    return Plan(best, config, lookup_gamma, estimates, draft_prefill, reason, target)
