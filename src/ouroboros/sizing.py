"""Choose OuroborosConfig sizes from forward costs measured on the machine in use.

Speculative decoding pays only where a forward over k tokens costs much less than k single-token
forwards, and that ratio differs by an order of magnitude between a GPU, a CPU with bf16 matrix
units and one without. So sizes are chosen from the measured cost curves, not copied:

- gamma maximises the expected tokens per second of one draft-then-verify step, for a draft written
  token by token and accepted token by token with probability p: (1 + p + ... + p^g) tokens for
  T(g + 1) + g * D(1) seconds (T, D: target and draft forward cost over k tokens);
- phrase drafting (the draft's Jacobi window plus pool phrases) is switched on only where the draft
  forward it needs is "free": it costs at most `slack` times a one-token draft forward; then the
  window and the phrases per step grow as far as stays free;
- branches after the trunk: as many pool phrases as keep the target's forward free.

The predicted speedups count only the token-by-token acceptance: phrases that let the draft write
several tokens per forward, and branches that the target accepts, come on top (their hit rates
depend on the text, so the prediction for Ouroboros is a floor).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from .config import OuroborosConfig
from .cost_cache import MEASURED_TOKENS, measure_costs
from .costs import ModelCosts, interpolate
from .errors import ConfigError
from .files import write_json_atomically

FORMAT = "ouroboros-sizing/1"
SAMPLE_TEXT = (
    "def fibonacci(n: int) -> list[int]:\n"
    '    """Return the first n Fibonacci numbers."""\n'
    "    numbers = [0, 1]\n"
    "    while len(numbers) < n:\n"
    "        numbers.append(numbers[-1] + numbers[-2])\n"
    "    return numbers[:n]\n\n\n"
    "The quick brown fox jumps over the lazy dog. Speculative decoding lets a small model propose "
    "tokens that a large model then checks in one forward pass, so the output does not change.\n"
)
"""Text on which the draft's agreement with the target is measured, when no acceptance is given."""


@dataclass(frozen=True)
class CostCurve:
    """Seconds of one forward over k new tokens (on a short cache), for a few measured k."""

    seconds: dict[int, float]

    def __post_init__(self) -> None:
        if not self.seconds or any(k < 1 or not s > 0 for k, s in self.seconds.items()):
            raise ConfigError(f"a cost curve needs positive seconds for token counts >= 1, got {self.seconds}")

    @classmethod
    def at_cached(cls, costs: ModelCosts, cached: int) -> CostCurve:
        """A cost table's forward costs at one cache length, at the token counts measured at the
        nearest cache length the table has."""
        nearest = min(sorted(costs.forward_ms), key=lambda length: abs(length - cached))
        return cls({k: costs.forward(k, cached) for k in sorted(costs.forward_ms[nearest])})

    def at(self, k: float) -> float:
        """Seconds for a forward over `k` new tokens: `costs.interpolate` through the measured points."""
        return interpolate(sorted(self.seconds.items()), k)

    def to_dict(self) -> dict[str, float]:
        return {str(k): s for k, s in sorted(self.seconds.items())}

    def free_tokens(self, slack: float) -> int:
        """The most tokens (up to the largest measured) one forward takes for at most `slack` x one token."""
        limit = slack * self.at(1)
        return max([k for k in range(1, max(self.seconds) + 1) if self.at(k) <= limit], default=1)


@dataclass(frozen=True)
class Sizing:
    """A chosen config, what it was chosen from, and the speedups the cost model predicts."""

    config: OuroborosConfig
    target: CostCurve
    draft: CostCurve | None
    acceptance: float
    slack: float
    predicted: dict[str, float]

    def to_dict(self) -> dict:
        return {"format": FORMAT, "config": self.config.to_dict(), "acceptance": self.acceptance,
                "slack": self.slack, "predicted_speedup": self.predicted,
                "forward_seconds": {"target": self.target.to_dict(), "draft": self.draft and self.draft.to_dict()}}

    def report(self) -> str:
        """A few lines for the terminal: costs, the chosen sizes, the prediction."""
        lines = []
        for role, c in (("target", self.target), ("draft", self.draft)):
            if c is not None:
                costs = "  ".join(f"{k}: {1000 * s:.0f}" for k, s in sorted(c.seconds.items()))
                lines.append(f"{role:6s} forward ms by tokens  {costs}  "
                             f"(free up to {c.free_tokens(self.slack)} tokens at {self.slack:g}x one)")
        chosen = ", ".join(f"{k}={v}" for k, v in self.config.to_dict().items())
        lines.append(f"draft acceptance per token: {self.acceptance:.2f}")
        lines.append(f"chosen: {chosen}")
        lines.append("predicted speedup per decoding step, prefill excluded: "
                     + ", ".join(f"{k} {v:.2f}x" for k, v in self.predicted.items())
                     + (" (a floor for ouroboros: phrase and branch hits are not credited)"
                        if "ouroboros" in self.predicted else ""))
        verdict = self.verdict()
        if verdict:
            lines.append(verdict)
        return "\n".join(lines)

    def verdict(self) -> str | None:
        """Why nothing is predicted to pay, when nothing is; None otherwise."""
        if max(self.predicted.values(), default=0) >= 1.05:
            return None
        reasons = []
        if self.target.free_tokens(self.slack) < 4:
            reasons.append(f"a target forward over 4 tokens costs {self.target.at(4) / self.target.at(1):.1f}x "
                           "one over 1 token")
        if self.draft is not None and self.draft.at(1) > 0.3 * self.target.at(1):
            reasons.append(f"a draft forward costs {self.draft.at(1) / self.target.at(1):.2f} of a target forward")
        return ("no draft size is predicted to beat plain decoding on this device"
                + (": " + " and ".join(reasons) if reasons else ""))


def expected_tokens(p: float, gamma: int) -> float:
    """Tokens emitted by one step whose gamma draft tokens are each accepted with probability p."""
    return sum(p ** i for i in range(gamma + 1))


def draft_step_tokens(window: int, level: int, step_phrases: int) -> int:
    """Tokens in one Jacobi drafting forward: the pending token, the phrases, the full window."""
    return 1 + step_phrases * (level - 1) + (window - 1) + (level - 2) * window


def choose(target: CostCurve, draft: CostCurve | None, *, acceptance: float = 0.8, slack: float = 1.25,
           base: OuroborosConfig | None = None, max_gamma: int = 12) -> Sizing:
    """Sizes for `base` (level, pool size and switches kept) from the two cost curves."""
    if not 0 <= acceptance < 1:
        raise ConfigError(f"acceptance must be in [0, 1), got {acceptance}")
    if slack < 1:
        raise ConfigError(f"slack must be >= 1, got {slack}")
    base = base or OuroborosConfig()
    one = target.at(1)
    draft_one = draft.at(1) if draft is not None else 0.0

    def rate(g: int, draft_cost: float, verified: int) -> float:
        return expected_tokens(acceptance, g) / (target.at(verified) + g * draft_cost)

    gamma = max(range(1, max_gamma + 1), key=lambda g: rate(g, draft_one, g + 1))
    changes: dict = {"gamma": gamma}
    predicted = {"speculative" if draft is not None else "prompt_lookup": one * rate(gamma, draft_one, gamma + 1)}
    if draft is not None:
        window, phrases = _jacobi_sizes(draft.free_tokens(slack), base.level, base.pool_size)
        drafting = window > 0 and base.phrase_drafting
        if drafting:
            changes.update(window=window, step_phrases=phrases)
        changes["phrase_drafting"] = drafting
        free = target.free_tokens(slack) - 1 - gamma
        changes["branches"] = min(base.pool_size, max(free, 0) // (base.level - 1)) if base.lengthen else 0
        changes["draft_cost"] = min(max(draft_one / one, 0.01), 0.99)  # what adaptive drafts weigh
        # the flat region spread branches fill, at most the default: past 16 tokens extra branches were
        # measured to cost more than they add (HumanEval, AVX-512: budget 32 was ~5% slower than 16)
        changes["verify_budget"] = max(min(target.free_tokens(slack), base.verify_budget), 2)
        step = draft.at(draft_step_tokens(window, base.level, phrases) if drafting else 1)
        predicted["ouroboros"] = one * rate(gamma, step, 1 + gamma + changes["branches"] * (base.level - 1))
    return Sizing(replace(base, **changes), target, draft, acceptance, slack,
                  {k: round(v, 3) for k, v in predicted.items()})


def _jacobi_sizes(free: int, level: int, pool_size: int) -> tuple[int, int]:
    """The largest, most balanced (window, phrases per step) whose drafting forward fits `free`
    tokens; (0, 0) if none. The window makes new phrases, the checked phrases use them."""
    fits = [(w, s) for w in range(1, 9) for s in range(1, min(pool_size, 4) + 1)
            if draft_step_tokens(w, level, s) <= free]
    return max(fits, key=lambda ws: (ws[0] + ws[1], min(ws), ws[1]), default=(0, 0))


def measure(model, tokens=MEASURED_TOKENS, cached: int = 64, repeats: int = 2) -> CostCurve:
    """Forward cost over k new tokens after `cached` tokens, the mean of `repeats` (after a warm-up)."""
    costs = measure_costs(model, tokens=tokens, cached=(cached,), repeats=repeats)
    return CostCurve({k: ms / 1000 for k, ms in costs.forward_ms[cached].items()})


def draft_agreement(target, draft, tokenizer, text: str = SAMPLE_TEXT) -> float:
    """Share of positions of `text` where the draft's greedy next token equals the target's."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    if ids.shape[1] < 2:
        raise ConfigError("the sample text is too short to measure the draft's agreement")
    with torch.inference_mode():
        wanted = target(ids.to(target.device)).logits[0].argmax(-1).cpu()
        proposed = draft(ids.to(draft.device)).logits[0].argmax(-1).cpu()
    return (wanted == proposed).float().mean().item()


def tune(target, draft, tokenizer=None, *, acceptance: float | None = None, slack: float = 1.25,
         base: OuroborosConfig | None = None, costs=None, fast: bool | None = None) -> Sizing:
    """Choose sizes from both models' cost table on this device (`costs`, or the cached table that
    `method="auto"` also uses, measured on first use); acceptance measured on SAMPLE_TEXT (with
    `tokenizer`) unless given."""
    from .engine import cost_table

    if acceptance is None:
        if tokenizer is None:
            raise ConfigError("give a tokenizer to measure the draft's acceptance, or pass acceptance=")
        acceptance = min(draft_agreement(target, draft, tokenizer), 0.99)
    costs = costs if costs is not None else cost_table(target, draft, fast=fast, progress=True)
    cached = min(costs.target.forward_ms)
    return choose(CostCurve.at_cached(costs.target, cached),
                  CostCurve.at_cached(costs.draft, cached) if costs.draft else None,
                  acceptance=acceptance, slack=slack, base=base)


def load_config(path: str | os.PathLike) -> OuroborosConfig:
    """An OuroborosConfig from a JSON file: a sizing file (`ouroboros tune --out`) or a plain object
    of config fields. Unknown fields and bad values are errors that name the file."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
    if isinstance(document, dict) and document.get("format") == FORMAT:
        document = document.get("config")
    if not isinstance(document, dict):
        raise ConfigError(f"config file {path} must hold a JSON object of OuroborosConfig fields")
    known = {f.name for f in fields(OuroborosConfig)}
    unknown = sorted(set(document) - known)
    if unknown:
        raise ConfigError(f"config file {path}: unknown field(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    try:
        return OuroborosConfig(**document)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def save_sizing(sizing: Sizing, path: str | os.PathLike) -> None:
    """Write the sizing JSON atomically."""
    write_json_atomically(path, sizing.to_dict(), indent=1)


__all__ = ["CostCurve", "Sizing", "choose", "draft_agreement", "expected_tokens", "load_config", "measure",
           "save_sizing", "tune"]
