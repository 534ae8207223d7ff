"""Lookahead (Jacobi) drafting on the verifying model itself: a window that makes phrases, and the
pool's phrases of the root token as candidates."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from ..acceptance import StepResult
from ..config import OuroborosConfig
from ..pool import PhraseSource
from ..tree import DraftTree
from ..window import JacobiWindow
from .base import Context, Proposal
from .prompt_lookup import likely_continuation

LIKELY_MATCH = 2
"""Suffix match length from which the context's own continuation is worth checking on the draft."""


class LookaheadProposer:
    """Used alone on the target ("lookahead") and as the draft model's drafting step inside
    Ouroboros. Each step checks `step_phrases` pool phrases that may follow the context and runs
    one Jacobi step of the window; the window's completed n-grams go into the pool.

    Example: pool {7: [(8, 9, 10)]}, context ending in 7: the tree holds the chain 8 9 10 and the
    window nodes; if the model's own choices after 7 are 8 9 11, tokens 8 9 11 are emitted at once.

    With `likely_phrases`, a step checks only candidates likely enough to pay for their tokens: the
    context's continuation of its longest suffix match (at least `LIKELY_MATCH` tokens, up to
    `draft_cap` tokens long, so one forward can accept many), then pool phrases seen more than once.
    """

    draft_runner = None

    def __init__(self, pool: PhraseSource, config: OuroborosConfig, seed: Sequence[int]):
        self.events: Counter[str] = Counter()
        self.pool = pool
        self.phrases = config.step_phrases
        self.likely = config.likely_phrases
        self.span = config.draft_cap
        self.window = JacobiWindow(config.window, config.level, seed)

    def propose(self, context: Context) -> Proposal:
        tree = DraftTree(max_depth=context.remaining - 1)
        phrases = self.pool.follow(context.tokens, self.phrases, min_seen=2 if self.likely else 1)
        if self.likely:
            match, known = likely_continuation(torch.tensor(context.tokens), self.span, self.span)
            if match >= LIKELY_MATCH and known:
                tree.add_chain(known, source="context")
        for phrase in phrases:
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
