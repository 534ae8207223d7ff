"""Proposers: what to draft before each target forward, and what to learn from its verdict.

One small interface, one class per strategy (like transformers' candidate generators):
`propose(context) -> DraftTree` and `learn(context, tree, result)`. The generation loop is the same
for all of them, so methods can be compared side by side in one engine.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .acceptance import StepResult, greedy_verify
from .config import OuroborosConfig
from .pool import PhrasePool
from .runner import ModelRunner
from .tree import DraftTree
from .window import JacobiWindow


@dataclass
class Context:
    tokens: list[int]
    """Prompt and output so far; the last token is the root of the next tree."""
    remaining: int
    """New tokens still allowed: a tree deeper than remaining - 1 is wasted work."""


def decode_step(runner: ModelRunner, tokens: Sequence[int], tree: DraftTree, verify=greedy_verify) -> StepResult:
    """One forward of `runner` over its pending tokens and `tree`, verified, cache compacted."""
    pending = runner.rewind(tokens)
    logits = runner.forward(pending, tree)
    result = verify(tree, logits)
    runner.keep(result.path)
    return result


class Proposer:
    """Proposes nothing: plain one-token-per-forward decoding (the "vanilla" method)."""

    draft_forwards = 0

    def __init__(self):
        self.events: Counter[str] = Counter()
        """How often each acceptance path happened (diagnostics, and proof in tests)."""

    def propose(self, context: Context) -> DraftTree:
        return DraftTree(max_depth=context.remaining - 1)

    def learn(self, context: Context, tree: DraftTree, result: StepResult) -> None:
        pass


class PromptLookupProposer(Proposer):
    """Drafts the tokens that followed the latest earlier occurrence of the context's last n-gram."""

    def __init__(self, gamma: int, max_ngram: int):
        super().__init__()
        self.gamma = gamma
        self.max_ngram = max_ngram

    def propose(self, context: Context) -> DraftTree:
        tree = DraftTree(max_depth=context.remaining - 1)
        tokens = torch.tensor(context.tokens)
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            earlier = tokens[:-1].unfold(0, n, 1)
            hits = (earlier == tokens[-n:]).all(dim=1).nonzero()
            if len(hits):
                start = int(hits[-1]) + n
                tree.add_chain(tokens[start:start + self.gamma].tolist())
                break
        return tree


class LookaheadProposer(Proposer):
    """Jacobi decoding on the verifying model itself: a window that makes phrases, and pool
    phrases of the root token as candidates. Used alone on the target ("lookahead") and as the
    draft model's drafting step inside Ouroboros."""

    def __init__(self, pool: PhrasePool, config: OuroborosConfig, seed: Sequence[int]):
        super().__init__()
        self.pool = pool
        self.phrases = config.step_phrases
        self.window = JacobiWindow(config.window, config.level, seed)

    def propose(self, context: Context) -> DraftTree:
        tree = DraftTree(max_depth=context.remaining - 1)
        for phrase in self.pool.lookup(context.tokens[-1], self.phrases):
            tree.add_chain(phrase)
        tree.set_window(*self.window.nodes())
        return tree

    def learn(self, context: Context, tree: DraftTree, result: StepResult) -> None:
        if tree.size:
            self.events["phrase_accepted" if result.path else "phrase_rejected"] += 1
        outputs = result.argmax[1 + tree.size:]
        for key, phrase in self.window.update(context.tokens[-1], result.argmax[0], outputs):
            self.pool.insert(key, phrase)


class DraftModelProposer(Proposer):
    """A draft model writes a trunk of at least `gamma` tokens (its own greedy continuation);
    with `lengthen`, the pool's newest phrases of the trunk's last token hang after it as
    branches. This is speculative decoding when the drafter proposes nothing and nothing is
    attached, and Ouroboros when the drafter is a `LookaheadProposer` sharing the pool."""

    def __init__(self, runner: ModelRunner, drafter: Proposer, pool: PhrasePool, config: OuroborosConfig,
                 *, lengthen: bool, harvest: bool, context_phrases: bool):
        super().__init__()
        self.runner = runner
        self.drafter = drafter
        self.pool = pool
        self.gamma = config.gamma
        self.branches = config.branches if lengthen else 0
        self.harvest = harvest
        self.context_phrases = context_phrases
        self._trunk: list[int] = []
        self._tried: list[tuple[tuple[int, ...], list[int]]] = []

    @property
    def draft_forwards(self) -> int:
        return self.runner.forwards

    def draft(self, context: Context) -> list[int]:
        """The draft model's greedy continuation: at least min(gamma, budget) tokens."""
        budget = context.remaining - 1
        tokens, drafted = list(context.tokens), []
        while len(drafted) < min(self.gamma, budget):
            step_context = Context(tokens, budget - len(drafted) + 1)
            tree = self.drafter.propose(step_context)
            result = decode_step(self.runner, tokens, tree)
            self.drafter.learn(step_context, tree, result)
            drafted += result.emitted
            tokens += result.emitted
        return drafted[:max(budget, 0)]

    def propose(self, context: Context) -> DraftTree:
        tree = DraftTree(max_depth=context.remaining - 1)
        self._trunk = tree.add_chain(self.draft(context))
        self._tried = []
        if self._trunk and self.branches:
            last = self._trunk[-1]
            for phrase in self.pool.lookup(tree.tokens[last], self.branches):
                nodes = tree.add_chain(phrase, parent=last)
                if nodes:  # empty when the trunk already reaches the token budget
                    self._tried.append((phrase, nodes))
        return tree

    def learn(self, context: Context, tree: DraftTree, result: StepResult) -> None:
        accepted = min(len(result.path), len(self._trunk))  # the path follows the trunk first
        self._count_events(result, accepted)
        if self.harvest and self._trunk:
            self._harvest_rejected(tree, result, self._trunk[accepted:])
            self._refine_tried(tree, result)
        if self.context_phrases:
            keep = self.pool.level - 1
            self.pool.insert_ngrams(context.tokens[-keep:] + result.emitted)

    def _count_events(self, result: StepResult, accepted: int) -> None:
        if self._trunk:
            self.events["trunk_full" if accepted == len(self._trunk) else "trunk_partial"] += 1
        if self._tried and accepted == len(self._trunk):
            self.events["branch_accepted" if len(result.path) > accepted else "branch_rejected"] += 1
        self.events.update(self.drafter.events)
        self.drafter.events.clear()

    def _harvest_rejected(self, tree: DraftTree, result: StepResult, rejected: list[int]) -> None:
        """Runs of the target's own predictions over the rejected draft tail become phrases:
        from each rejected token a[k], follow t[k], t[k+1], ... while the draft agreed (a[j+1] == t[j])."""
        drafted = tree.path_tokens(rejected)
        target = [result.argmax[node + 1] for node in rejected]
        span = self.pool.level - 1
        for k in range(len(drafted) - span + 1):
            if drafted[k + 1:k + span] == target[k:k + span - 1]:
                self.pool.insert(drafted[k], target[k:k + span])

    def _refine_tried(self, tree: DraftTree, result: StepResult) -> None:
        """Each tried branch is replaced by the target's one-step correction of it."""
        after_trunk = result.argmax[self._trunk[-1] + 1]
        key = tree.tokens[self._trunk[-1]]
        for phrase, nodes in self._tried:
            if len(nodes) == len(phrase):
                corrected = [after_trunk] + [result.argmax[node + 1] for node in nodes[:-1]]
                self.pool.replace(key, phrase, corrected)
