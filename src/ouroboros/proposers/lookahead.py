"""Lookahead (Jacobi) drafting on the verifying model itself: a window that makes phrases, and the
pool's phrases of the root token as candidates."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from ..acceptance import StepResult
from ..config import OuroborosConfig
from ..pool import PhraseSource
from ..tree import DraftTree
from ..window import JacobiWindow
from .base import Context, Proposal


class LookaheadProposer:
    """Used alone on the target ("lookahead") and as the draft model's drafting step inside
    Ouroboros. Each step checks `step_phrases` pool phrases that may follow the context and runs
    one Jacobi step of the window; the window's completed n-grams go into the pool.

    Example: pool {7: [(8, 9, 10)]}, context ending in 7: the tree holds the chain 8 9 10 and the
    window nodes; if the model's own choices after 7 are 8 9 11, tokens 8 9 11 are emitted at once.
    """

    draft_runner = None

    def __init__(self, pool: PhraseSource, config: OuroborosConfig, seed: Sequence[int]):
        self.events: Counter[str] = Counter()
        self.pool = pool
        self.phrases = config.step_phrases
        self.window = JacobiWindow(config.window, config.level, seed)

    def propose(self, context: Context) -> Proposal:
        tree = DraftTree(max_depth=context.remaining - 1)
        for phrase in self.pool.follow(context.tokens, self.phrases):
            tree.add_chain(phrase, source="pool")
        tree.set_window(*self.window.nodes())
        return Proposal(tree)

    def learn(self, context: Context, proposal: Proposal, result: StepResult) -> None:
        tree = proposal.tree
        if tree.size:
            self.events["phrase_accepted" if result.path else "phrase_rejected"] += 1
        outputs = result.argmax[1 + tree.size:]
        for key, phrase in self.window.update(context.tokens[-1], result.argmax[0], outputs):
            self.pool.insert(key, phrase)
