"""Prompt lookup: draft what followed an earlier occurrence of the context's last tokens."""

from __future__ import annotations

from collections import Counter

import torch

from ..acceptance import StepResult
from ..tree import DraftTree
from .base import Context, Proposal


def suffix_matches(tokens: torch.Tensor, longest: int) -> tuple[int, torch.Tensor]:
    """(n, ends) for `tokens` [length]: n is the longest match (<= `longest`) of the context's last
    n tokens with an earlier place in it, and `ends` [hits] (ascending) the index right after each
    earlier occurrence, i.e. where its continuation starts. (0, empty) when the last token is new.

    Example: tokens 5 6 7 9 5 6, longest 4: the suffix 5 6 occurred at 0, so (2, [2]).
    """
    if len(tokens) < 2 or longest < 1:
        return 0, torch.empty(0, dtype=torch.long)
    ends = (tokens[:-1] == tokens[-1]).nonzero().flatten() + 1
    n = 1 if len(ends) else 0
    while 0 < n < longest:  # keep the occurrences whose match also holds one token further back
        before = ends - n - 1
        ends_kept = ends[before >= 0]
        longer = ends_kept[tokens[ends_kept - n - 1] == tokens[-1 - n]]
        if not len(longer):
            break
        ends, n = longer, n + 1
    return n, ends


def likely_continuation(tokens: torch.Tensor, longest: int, span: int) -> tuple[int, list[int]]:
    """(match length, up to `span` tokens) that most likely follow `tokens` [length] by its own
    history: among the longest suffix matches, the continuation whose first token followed most
    often (the latest of those), so that a repeated pattern beats a one-off."""
    n, ends = suffix_matches(tokens, longest)
    if not n:
        return 0, []
    following = tokens[ends]  # [hits]: the token after each occurrence
    values, inverse, counts = following.unique(return_inverse=True, return_counts=True)
    frequent = counts[inverse] == counts.max()
    start = int(ends[frequent][-1])
    return n, tokens[start:start + span].tolist()


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
        n, ends = suffix_matches(tokens, self.max_ngram)
        if n:
            start = int(ends[-1])
            tree.add_chain(tokens[start:start + self.gamma].tolist(), source="context")
        return Proposal(tree)

    def learn(self, context: Context, proposal: Proposal, result: StepResult) -> None:
        if proposal.tree.size:
            self.events["lookup_accepted" if result.path else "lookup_rejected"] += 1
