"""Settings of the Ouroboros method, validated up front so a bad value fails before any forward."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from .errors import ConfigError

ADAPTIVE_SWITCHES = ("adaptive_length", "draft_free", "spread_branches", "likely_phrases")
"""The switches that shape each step's draft (issue 11); only `ouroboros` uses them."""


@dataclass(frozen=True)
class OuroborosConfig:
    """Sizes and switches for drafting and verification.

    The sizes (gamma 3, window 1, one pool phrase per draft step, one branch) were chosen from
    forward costs measured on a 2-core AVX2 CPU without bf16 matrix units (BENCHMARKS.md, sessions
    1-2), where each extra token in a bf16 forward costs about one more single-token forward: they
    keep every forward small. The adaptive switches, on by default, were sized on the reference
    AVX-512-bf16 cost table (session 3), where a forward over 16 tokens costs about one token's:
    drafts run while they pay (up to `draft_cap`), the target's forward is filled up to
    `verify_budget`, and a draft forward costs `draft_cost` 0.4 of a target forward. With these
    defaults `ouroboros` measured 3.10x HF greedy on HumanEval 0-19 on such a CPU (session 5); on the
    AVX2 one no method beat plain decoding in bf16 at any size tried. `ouroboros tune`
    (`ouroboros.tune`) measures the device in use and chooses sizes from its costs.
    """

    gamma: int = 3
    """Draft tokens to produce before the target verifies (more are kept when a phrase overshoots)."""
    window: int = 1
    """W: columns of the Jacobi (lookahead) window that generates new phrases. Each draft forward
    feeds W-1 + W*(N-2) window tokens once the window is full, so W=1 still adds N-2."""
    level: int = 4
    """N: n-gram size; a phrase is the N-1 tokens that follow its key token."""
    pool_size: int = 8
    """G: phrases kept per key token in the pool (oldest dropped first)."""
    step_phrases: int = 1
    """Phrases (newest first) checked by each Jacobi drafting step."""
    branches: int = 1
    """K: newest phrases of the draft's last token verified by the target as extra branches."""
    max_ngram: int = 3
    """Longest context n-gram that prompt lookup tries to match."""
    phrase_drafting: bool = True
    """Draft with the Jacobi window and pool phrases (off: token by token)."""
    lengthen: bool = True
    """Attach pool phrases after the draft as branches for the target to verify."""
    harvest: bool = True
    """Learn phrases from the target's outputs on rejected and tried tokens."""
    context_phrases: bool = True
    """Seed the pool with n-grams of the prompt and of the output so far."""
    adaptive_length: bool = True
    """Draft while it pays: after each draft forward, stop once the estimated chance that the whole
    draft is accepted (the draft's top-1 probabilities, calibrated online on the target's verdicts)
    is below what a draft forward costs in tokens at the rate observed so far (`draft_cost` times
    tokens per target-forward time), or at `draft_cap` tokens; off: stop at `gamma`."""
    draft_cost: float = 0.4
    """A draft forward's cost in target forwards (`ouroboros tune` measures it; 0.4 on the reference
    AVX-512-bf16 CPU): what an extra draft forward must earn back."""
    draft_cap: int = 12
    """Most tokens an adaptive draft may reach (phrases that overshoot are kept up to the budget)."""
    draft_free: bool = True
    """Verify the context's own continuation (the longest earlier match of its last tokens) without
    running the draft model, when that match is at least `free_match` tokens long."""
    free_match: int = 4
    """Suffix match length from which a step goes draft-free."""
    spread_branches: bool = True
    """Fill the target's forward up to `verify_budget` tokens with branches at several points: the
    draft's runner-up where it was unsure, the context's and the pool's continuations."""
    verify_budget: int = 16
    """Most tokens (tree plus root) one target forward verifies with `spread_branches` (where a forward
    still costs about one token's: ~16 on AVX-512-bf16 CPUs and GPUs)."""
    likely_phrases: bool = True
    """On the draft model, check the context's continuation of its longest suffix match (up to
    `draft_cap` tokens) before pool phrases, and pool phrases only when seen more than once."""

    def __post_init__(self) -> None:
        minimum = {"gamma": 1, "window": 1, "level": 2, "pool_size": 1, "step_phrases": 0,
                   "branches": 0, "max_ngram": 1, "draft_cap": 1, "free_match": 1, "verify_budget": 2}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ConfigError(f"OuroborosConfig.{f.name} must be an int, got {value!r}")
                if value < minimum[f.name]:
                    raise ConfigError(f"OuroborosConfig.{f.name} must be >= {minimum[f.name]}, got {value}")
            elif f.type in ("float", float):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                    raise ConfigError(f"OuroborosConfig.{f.name} must be a number in (0, 1), got {value!r}")
            elif not isinstance(value, bool):
                raise ConfigError(f"OuroborosConfig.{f.name} must be a bool, got {value!r}")
        for name in ("step_phrases", "branches"):
            if getattr(self, name) > self.pool_size:
                raise ConfigError(
                    f"OuroborosConfig.{name}={getattr(self, name)} exceeds pool_size={self.pool_size}: "
                    "the pool never holds that many phrases per key")

    def to_dict(self) -> dict:
        return asdict(self)

    def classic(self) -> OuroborosConfig:
        """This config with every adaptive switch off: the methods that predate them."""
        return replace(self, **{switch: False for switch in ADAPTIVE_SWITCHES})
