"""The proposer contract: `propose(context) -> Proposal`, then `learn(context, proposal, result)`.

A proposer drafts candidates for one target forward and learns from the target's verdict on them.
Everything `learn` needs about what was drafted travels in the immutable `Proposal` (the tree, the
draft trunk, the phrases tried after it), so nothing is hidden in the proposer between the two
calls; what a proposer keeps across steps (a phrase pool, a Jacobi window, a draft model's cache)
is its own learned state. Like transformers' `CandidateGenerator` (`get_candidates` /
`update_candidate_strategy`) and vLLM's `spec_decode` proposers.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ..acceptance import StepResult
from ..pool import Phrase
from ..runner import Runner
from ..tree import DraftTree

if TYPE_CHECKING:
    from ..planning import Plan


@dataclass
class Context:
    tokens: list[int]
    """Prompt and output so far; the last token is the root of the next tree."""
    remaining: int
    """New tokens still allowed: a tree deeper than remaining - 1 is wasted work."""
    nodes: int | None = None
    """Most tree nodes this step may verify, set by a batch's load sizing (`batch_sizing`); None: the
    proposer's own budget."""
    draft_model: bool = True
    """Whether this step may run the draft model; False (a batch's load sizing): propose only what
    costs no draft forward (the context's own continuation, pool phrases)."""


@dataclass(frozen=True)
class Proposal:
    """One step's draft, handed back to `learn` with the verdict.

    The tree is frozen when the proposal is made: `tree.sources[i]` says where trie node i came
    from ("draft", "pool", "context", "branch", "spread")."""

    tree: DraftTree
    trunk: tuple[int, ...] = ()
    """Node ids of the draft model's continuation, root to leaf (empty without a draft model)."""
    tried: tuple[tuple[Phrase, tuple[int, ...]], ...] = ()
    """Pool phrases hung after the trunk as branches, each with its node ids."""
    confidence: tuple[float, ...] = ()
    """The draft model's top-1 probability for each trunk token (empty when it did not draft)."""

    def __post_init__(self) -> None:
        self.tree.freeze()


@runtime_checkable
class Proposer(Protocol):
    """What the generation loop needs from a drafting strategy."""

    events: Counter[str]
    """How often each acceptance path happened (diagnostics, and proof in tests)."""
    draft_runner: Runner | None
    """The draft model's runner, or None for strategies that use no draft model."""

    def propose(self, context: Context) -> Proposal: ...

    def learn(self, context: Context, proposal: Proposal, result: StepResult) -> None: ...


@runtime_checkable
class Planned(Protocol):
    """A proposer that chose its strategy before decoding (`auto`): the stats report its plan."""

    plan: Plan


class NullProposer:
    """Proposes nothing: plain one-token-per-forward decoding (the "vanilla" method), and the
    token-by-token drafting step of a draft model when phrase drafting is off."""

    draft_runner = None

    def __init__(self):
        self.events: Counter[str] = Counter()

    def propose(self, context: Context) -> Proposal:
        return Proposal(DraftTree(max_depth=context.remaining - 1))

    def learn(self, context: Context, proposal: Proposal, result: StepResult) -> None:
        pass
