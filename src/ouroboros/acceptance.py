"""Acceptance: which drafted tokens the target keeps, given its logits over the tree.

Verification walks the trie from the root: at each node the target makes its own choice (argmax
when greedy, one fresh sample when sampling); the walk moves to the child holding that token and
stops where no child does. Every emitted token is therefore exactly what the target alone would
produce given the emitted prefix, whatever was drafted.

Sampling is exact because every proposal here is deterministic (greedy drafts, pool phrases,
context n-grams): a deterministic proposal has q = a point mass, for which speculative sampling's
min(1, p/q) rule reduces to "accept iff the target's own sample equals the drafted token", and the
residual is p itself. Each trie node is sampled at most once, and only when the walk reaches it,
so branches sharing a prefix share its sample and no token is drawn from a biased distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .tree import ROOT, DraftTree


@dataclass
class StepResult:
    emitted: list[int]
    """Tokens the target produced this step: accepted draft tokens plus one of its own."""
    path: list[int]
    """Accepted tree nodes, root to leaf."""
    argmax: list[int]
    """Target argmax at the root (index 0) and at every tree node i (index i + 1), for learning."""
    confidence: list[float] = field(default_factory=list)
    """The model's probability of each emitted token (only from `confident_verify`: a draft
    model's certainty, which decides how far to draft)."""
    runner_up: list[int] = field(default_factory=list)
    """The second most likely token where each emitted token was chosen (only from `confident_verify`)."""


def check_finite(logits: torch.Tensor) -> None:
    """NaN or +inf logits would make a silently wrong sample: fail loudly instead."""
    if torch.isnan(logits).any() or torch.isposinf(logits).any():
        raise FloatingPointError("the model produced NaN or inf logits, so no valid sample exists; "
                                 "check the weights and the dtype (fp16 overflows easily on CPU)")


def _walk(tree: DraftTree, choose: Callable[[int], int], argmax: list[int]) -> StepResult:
    """Follow the target's choices from the root; `choose(row)` picks the token at logits row `row`."""
    emitted, path = [choose(0)], []
    node = tree.child(ROOT, emitted[0])
    while node is not None:
        path.append(node)
        emitted.append(choose(node + 1))
        node = tree.child(node, emitted[-1])
    return StepResult(emitted, path, argmax)


def greedy_verify(tree: DraftTree, logits: torch.Tensor) -> StepResult:
    argmax = logits.argmax(dim=-1).tolist()
    return _walk(tree, argmax.__getitem__, argmax)


def confident_verify(tree: DraftTree, logits: torch.Tensor) -> StepResult:
    """Greedy verification that also gives each emitted token's probability and runner-up,
    computed only on the rows the walk emitted from (not on every node and window row)."""
    argmax = logits.argmax(dim=-1).tolist()
    result = _walk(tree, argmax.__getitem__, argmax)
    rows = logits[torch.tensor([0] + [node + 1 for node in result.path], device=logits.device)]  # [emitted, vocab]
    best = torch.tensor(result.emitted, device=logits.device)[:, None]  # [emitted, 1]: each row's argmax
    top2 = rows.topk(2, dim=-1).indices  # [emitted, 2]
    runner_up = torch.where(top2[:, :1] == best, top2[:, 1:], top2[:, :1])
    result.confidence = (rows.gather(1, best) - torch.logsumexp(rows, dim=-1, keepdim=True)).exp()[:, 0].tolist()
    result.runner_up = runner_up[:, 0].tolist()
    return result


class Sampler:
    """Draws the target's next token as transformers' `generate(do_sample=True)` does: the same
    warpers in the same order (temperature, top-k, top-p, min-p), then one multinomial draw."""

    def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 generator: torch.Generator | None = None):
        warpers = []
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        if min_p > 0.0:
            warpers.append(MinPLogitsWarper(min_p))
        self.warpers = LogitsProcessorList(warpers)
        self.generator = generator

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Warped distribution for each row of `logits` [rows, vocab]."""
        check_finite(logits)
        scores = self.warpers(torch.empty(logits.shape[0], 0, dtype=torch.long), logits.float().cpu())
        return torch.softmax(scores, dim=-1)

    def sample(self, logits: torch.Tensor) -> int:
        return int(torch.multinomial(self.probabilities(logits[None])[0], 1, generator=self.generator))

    def verify(self, tree: DraftTree, logits: torch.Tensor) -> StepResult:
        return _walk(tree, lambda row: self.sample(logits[row]), logits.argmax(dim=-1).tolist())
