"""Prompt lookup: draft what followed the latest earlier occurrence of the context's last n-gram."""

from __future__ import annotations

from collections import Counter

import torch

from ..acceptance import StepResult
from ..tree import DraftTree
from .base import Context, Proposal


class PromptLookupProposer:
    """Matches the last `max_ngram` .. 1 tokens against the earlier context (longest first) and
    drafts the `gamma` tokens after the latest match.

    Example: context [5, 6, 7, 9, 5, 6], max_ngram 2, gamma 2: the bigram (5, 6) occurred at 0,
    so the draft is [7, 9].
    """

    draft_runner = None

    def __init__(self, gamma: int, max_ngram: int):
        self.events: Counter[str] = Counter()
        self.gamma = gamma
        self.max_ngram = max_ngram

    def propose(self, context: Context) -> Proposal:
        tree = DraftTree(max_depth=context.remaining - 1)
        tokens = torch.tensor(context.tokens)
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            earlier = tokens[:-1].unfold(0, n, 1)  # [len - n, n]: every earlier n-gram
            hits = (earlier == tokens[-n:]).all(dim=1).nonzero()
            if len(hits):
                start = int(hits[-1]) + n
                tree.add_chain(tokens[start:start + self.gamma].tolist(), source="context")
                break
        return Proposal(tree)

    def learn(self, context: Context, proposal: Proposal, result: StepResult) -> None:
        if proposal.tree.size:
            self.events["lookup_accepted" if result.path else "lookup_rejected"] += 1
