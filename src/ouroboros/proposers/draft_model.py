"""A draft model writes the trunk; pool phrases lengthen it; the target's verdict teaches the pool.

This is speculative decoding when the drafting step proposes nothing and no branch is attached,
and Ouroboros when the drafting step is a `LookaheadProposer` sharing the pool (phrase drafting).
The adaptive switches of `OuroborosConfig` shape each step's draft: its length from the draft's
calibrated confidence, draft-free steps from the context's own continuation, and branches at several
points of the trunk up to the target's verify budget.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Sequence

import torch

from ..acceptance import StepResult, confident_verify
from ..config import OuroborosConfig
from ..pool import PhraseSource
from ..runner import ModelRunner, decode_step
from ..tree import ROOT, DraftTree
from .base import Context, NullProposer, Proposal, Proposer
from .prompt_lookup import likely_continuation

LONGEST_MATCH = 32
"""Longest suffix match looked for in the context (longer matches change no decision)."""
FREE_MATCH = 2
"""Context tokens a suffix must match for its continuation to be drafted without the draft model."""


class AcceptanceEstimate:
    """P(the target accepts a draft token | the draft's top-1 probability), learned online per
    probability bucket from the target's verdicts. Each bucket starts at its middle probability,
    worth `prior` observations, so that the estimate is sane before any verdict.

    Example: after the target rejected many tokens drafted at probability 0.97, `estimate(0.97)`
    drops below 0.97 and adaptive drafts stop earlier there."""

    EDGES = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.995)

    def __init__(self, prior: float = 4.0):
        bounds = (0.0,) + self.EDGES + (1.0,)
        self.accepted = [prior * (low + high) / 2 for low, high in zip(bounds, bounds[1:])]
        self.seen = [prior] * len(self.accepted)

    def __call__(self, confidence: float) -> float:
        bucket = bisect.bisect_right(self.EDGES, confidence)
        return self.accepted[bucket] / self.seen[bucket]

    def update(self, confidence: float, accepted: bool) -> None:
        bucket = bisect.bisect_right(self.EDGES, confidence)
        self.accepted[bucket] += accepted
        self.seen[bucket] += 1


def _add_within(tree: DraftTree, tokens: Sequence[int], parent: int, room: int, source: str) -> list[int]:
    """Add the chain `tokens` under `parent`, cut so that it adds at most `room` new nodes."""
    shared, node = 0, parent
    for token in tokens:
        node = tree.child(node, token)
        if node is None:
            break
        shared += 1
    return tree.add_chain(tokens[:shared + max(room, 0)], parent=parent, source=source)


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
        self.config = config
        self.gamma = config.gamma
        self.branches = config.branches if lengthen else 0
        self.harvest = harvest
        self.context_phrases = context_phrases
        self.estimate = AcceptanceEstimate()
        self.tokens, self.spent = 2.0, 1.0 + config.draft_cost
        """Tokens emitted and their cost in target forwards so far (a prior of one 2-token step)."""

    def draft(self, context: Context, room: int) -> tuple[list[int], list[float], list[int]]:
        """The draft model's greedy continuation (at least min(gamma, budget) tokens, or as far as
        `adaptive_length` finds it confident), with each token's top-1 probability and runner-up.
        It stops at `room`, the tokens the target will verify: a draft forward past them is wasted."""
        budget = min(context.remaining - 1, room)
        adaptive = self.config.adaptive_length
        goal = min(self.config.draft_cap if adaptive else self.gamma, budget)
        tokens, drafted, confidence, runner_up = list(context.tokens), [], [], []
        chance = 1.0
        # Under a batch's load sizing the draft drafts token by token: a phrase-drafting forward is as
        # wide as its window and phrases, and a batched draft forward as wide as its widest row.
        drafter = self.drafter if context.nodes is None else _TOKEN_BY_TOKEN
        while len(drafted) < goal:
            step_context = Context(tokens, budget - len(drafted) + 1)
            proposal = drafter.propose(step_context)
            result = decode_step(self.draft_runner, tokens, proposal.tree, confident_verify)
            drafter.learn(step_context, proposal, result)
            confidence += result.confidence
            runner_up += result.runner_up
            drafted += result.emitted
            tokens += result.emitted
            self.spent += self.config.draft_cost
            if adaptive:
                for probability in result.confidence:
                    chance *= self.estimate(probability)
                if chance < self.config.draft_cost * self.tokens / self.spent:
                    break
        keep = max(budget, 0)
        return drafted[:keep], confidence[:keep], runner_up[:keep]

    def propose(self, context: Context) -> Proposal:
        tree = DraftTree(max_depth=context.remaining - 1)
        config = self.config
        budget = _verify_budget(config, context)
        room = budget - 1 if config.spread_branches else context.remaining
        if context.nodes is not None:
            room = min(room, context.nodes)
        match, known = 0, []
        if config.draft_free or config.spread_branches or not context.draft_model:
            match, known = likely_continuation(torch.tensor(context.tokens), LONGEST_MATCH, room)
        confidence, runner_up = [], []
        if not context.draft_model:  # only what costs no draft forward: the context's or the pool's continuation
            from_context = match >= FREE_MATCH and bool(known)
            phrase = known if from_context else next(iter(self.pool.follow(context.tokens, 1)), ())
            trunk = tree.add_chain(list(phrase)[:room], source="context" if from_context else "pool")
            self.events["draft_free"] += bool(trunk)
        elif config.draft_free and match >= config.free_match and known:
            trunk = tree.add_chain(known, source="context")
            self.events["draft_free"] += 1
        else:
            drafted, confidence, runner_up = self.draft(context, room)
            trunk = tree.add_chain(drafted, source="draft")
        tried = []
        if trunk and self.branches:
            for phrase in self.pool.follow(context.tokens + tree.path_tokens(trunk), self.branches):
                nodes = _add_within(tree, phrase, trunk[-1], room - tree.size, "branch")
                if nodes:  # empty when the trunk already fills the target's forward
                    tried.append((phrase, tuple(nodes)))
        if config.spread_branches:
            self._spread(tree, context, trunk, confidence[:len(trunk)], runner_up, known, budget)
        return Proposal(tree, trunk=tuple(trunk), tried=tuple(tried), confidence=tuple(confidence[:len(trunk)]))

    def _spread(self, tree: DraftTree, context: Context, trunk: list[int], confidence: list[float],
                runner_up: list[int], known: list[int], span: int) -> None:
        """Spend the rest of the verify budget on the likeliest extra chains: the context's
        continuation after the trunk and at the root, and the draft's runner-up (followed by a pool
        phrase) where it was unsure; each scored by its estimated chance of being reached and right."""
        reach = [1.0]  # reach[i]: estimated chance that the first i trunk tokens are accepted
        for probability in confidence:
            reach.append(reach[-1] * self.estimate(probability))
        reach += [reach[-1] * 0.5] * (len(trunk) + 1 - len(reach))  # draft-free trunk: a rough guess
        after = context.tokens + tree.path_tokens(trunk)
        candidates = [(reach[-1] * 0.5, trunk[-1] if trunk else ROOT,
                       likely_continuation(torch.tensor(after), LONGEST_MATCH, span)[1]),
                      (0.5 * (1 - reach[1]) if trunk else 1.0, ROOT, known)]
        for i, probability in enumerate(confidence):
            parent = trunk[i - 1] if i else ROOT
            prefix = context.tokens + tree.path_tokens(trunk[:i]) + [runner_up[i]]
            phrase = next(iter(self.pool.follow(prefix, 1)), ())
            candidates.append((reach[i] * (1 - self.estimate(probability)) * 0.5, parent,
                               [runner_up[i], *phrase]))
        for _, parent, tokens in sorted(candidates, key=lambda c: -c[0]):
            room = span - 1 - tree.size
            if room <= 0:
                break
            _add_within(tree, tokens, parent, room, "spread")

    def learn(self, context: Context, proposal: Proposal, result: StepResult) -> None:
        trunk = proposal.trunk
        accepted = _shared_prefix(result.path, trunk)
        self.tokens += len(result.emitted)
        self.spent += 1
        for i, probability in enumerate(proposal.confidence[:accepted + 1]):
            self.estimate.update(probability, i < accepted)
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
        if any(proposal.tree.sources[node] == "spread" for node in result.path):
            self.events["spread_accepted"] += 1
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


_TOKEN_BY_TOKEN = NullProposer()


def _verify_budget(config: OuroborosConfig, context: Context) -> int:
    """Tokens the target may verify this step, root included: the config's, or less under load."""
    return config.verify_budget if context.nodes is None else min(config.verify_budget, context.nodes + 1)


def _shared_prefix(path: Sequence[int], trunk: Sequence[int]) -> int:
    """How many trunk nodes the accepted path follows (a branch may leave the trunk early)."""
    for i, (a, b) in enumerate(zip(path, trunk)):
        if a != b:
            return i
    return min(len(path), len(trunk))
