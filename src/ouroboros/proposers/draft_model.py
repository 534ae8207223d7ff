"""A draft model writes the trunk; pool phrases lengthen it; the target's verdict teaches the pool.

This is speculative decoding when the drafting step proposes nothing and no branch is attached,
and Ouroboros when the drafting step is a `LookaheadProposer` sharing the pool (phrase drafting).
"""

from __future__ import annotations

from collections import Counter

from ..acceptance import StepResult
from ..config import OuroborosConfig
from ..pool import PhraseSource
from ..runner import ModelRunner, decode_step
from ..tree import DraftTree
from .base import Context, Proposal, Proposer


class DraftModelProposer:
    """The trunk is the draft model's own greedy continuation, at least `gamma` tokens; with
    `lengthen`, the pool's newest phrases of the trunk's last token hang after it as branches.

    Example (gamma 3, branches 1, pool {12: [(13, 14, 15)]}): the draft model writes 10 11 12,
    the tree is 10-11-12-13-14-15; if the target agrees up to 14 and then picks 20, the step emits
    10 11 12 13 14 20 from one target forward. With `harvest`, the target's own choices over the
    rejected tail become phrases, and each tried branch is replaced by its one-step correction.
    """

    def __init__(self, runner: ModelRunner, drafter: Proposer, pool: PhraseSource, config: OuroborosConfig,
                 *, lengthen: bool, harvest: bool, context_phrases: bool):
        self.events: Counter[str] = Counter()
        self.draft_runner = runner
        self.drafter = drafter
        self.pool = pool
        self.gamma = config.gamma
        self.branches = config.branches if lengthen else 0
        self.harvest = harvest
        self.context_phrases = context_phrases

    def draft(self, context: Context) -> list[int]:
        """The draft model's greedy continuation: at least min(gamma, budget) tokens."""
        budget = context.remaining - 1
        tokens, drafted = list(context.tokens), []
        while len(drafted) < min(self.gamma, budget):
            step_context = Context(tokens, budget - len(drafted) + 1)
            proposal = self.drafter.propose(step_context)
            result = decode_step(self.draft_runner, tokens, proposal.tree)
            self.drafter.learn(step_context, proposal, result)
            drafted += result.emitted
            tokens += result.emitted
        return drafted[:max(budget, 0)]

    def propose(self, context: Context) -> Proposal:
        tree = DraftTree(max_depth=context.remaining - 1)
        drafted = self.draft(context)
        trunk = tree.add_chain(drafted, source="draft")
        tried = []
        if trunk and self.branches:
            for phrase in self.pool.follow(context.tokens + tree.path_tokens(trunk), self.branches):
                nodes = tree.add_chain(phrase, parent=trunk[-1], source="branch")
                if nodes:  # empty when the trunk already reaches the token budget
                    tried.append((phrase, tuple(nodes)))
        return Proposal(tree, trunk=tuple(trunk), tried=tuple(tried))

    def learn(self, context: Context, proposal: Proposal, result: StepResult) -> None:
        trunk = proposal.trunk
        accepted = min(len(result.path), len(trunk))  # the path follows the trunk first
        self._count_events(proposal, result, accepted)
        if self.harvest and trunk:
            self._harvest_rejected(proposal.tree, result, list(trunk[accepted:]))
            self._refine_tried(proposal, result)
        if self.context_phrases:
            keep = self.pool.level - 1
            self.pool.insert_ngrams(context.tokens[-keep:] + result.emitted)

    def _count_events(self, proposal: Proposal, result: StepResult, accepted: int) -> None:
        trunk = proposal.trunk
        if trunk:
            self.events["trunk_full" if accepted == len(trunk) else "trunk_partial"] += 1
        if proposal.tried and accepted == len(trunk):
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

    def _refine_tried(self, proposal: Proposal, result: StepResult) -> None:
        """Each tried branch is replaced by the target's one-step correction of it."""
        tree, last = proposal.tree, proposal.trunk[-1]
        after_trunk = result.argmax[last + 1]
        key = tree.tokens[last]
        for phrase, nodes in proposal.tried:
            if len(nodes) == len(phrase):
                corrected = [after_trunk] + [result.argmax[node + 1] for node in nodes[:-1]]
                self.pool.replace(key, phrase, corrected)
