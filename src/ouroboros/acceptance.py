"""Acceptance: which drafted tokens the target keeps, given its logits over the tree.

Greedy verification walks the trie from the root: at each node the target's choice is its argmax;
the walk moves to the child holding that token and stops where no child does. Every emitted token
is therefore the target's argmax given exactly the emitted prefix, whatever was drafted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tree import ROOT, DraftTree


@dataclass
class StepResult:
    emitted: list[int]
    """Tokens the target produced this step: accepted draft tokens plus one of its own."""
    path: list[int]
    """Accepted tree nodes, root to leaf."""
    argmax: list[int]
    """Target argmax at the root (index 0) and at every tree node i (index i + 1), for learning."""


def check_finite(logits: torch.Tensor) -> None:
    if not torch.isfinite(logits).all():
        raise FloatingPointError("the model produced NaN or inf logits; check the weights and dtype")


def greedy_verify(tree: DraftTree, logits: torch.Tensor) -> StepResult:
    argmax = logits.argmax(dim=-1).tolist()
    emitted, path = [argmax[0]], []
    node = tree.child(ROOT, argmax[0])
    while node is not None:
        path.append(node)
        emitted.append(argmax[node + 1])
        node = tree.child(node, emitted[-1])
    return StepResult(emitted, path, argmax)
