"""The draft tree: candidate tokens for one forward, with their positions and attention mask.

Nodes hang from the root, the last token not yet in the model's cache. Chains added under a node
are merged into a trie, so candidates sharing a prefix share nodes (computed and verified once).
Besides the trie, a tree may carry a free-standing block of lookahead nodes (the Jacobi window)
with its own mask; those are never accepted, only read for their outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

ROOT = -1


class DraftTree:
    def __init__(self, max_depth: int | None = None):
        self.max_depth = max_depth
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.depths: list[int] = []
        self.sources: list[str] = []
        """Where each trie node came from (e.g. "draft", "pool", "context", "branch", "spread")."""
        self._children: dict[int, dict[int, int]] = {ROOT: {}}
        self.window_tokens: list[int] = []
        self.window_positions: torch.Tensor | None = None
        self.window_mask: torch.Tensor | None = None
        self._frozen = False

    def freeze(self) -> None:
        """No more nodes: a proposal's tree must be the one that was verified."""
        self._frozen = True

    def _check_open(self) -> None:
        if self._frozen:
            raise RuntimeError("this draft tree belongs to a proposal and can no longer change")

    @property
    def size(self) -> int:
        """Trie nodes (verifiable candidates)."""
        return len(self.tokens)

    @property
    def total(self) -> int:
        """All nodes fed to the model: trie then window."""
        return len(self.tokens) + len(self.window_tokens)

    def child(self, node: int, token: int) -> int | None:
        return self._children.get(node, {}).get(token)

    def add_chain(self, tokens: Sequence[int], parent: int = ROOT, source: str = "draft") -> list[int]:
        """Add `tokens` as a path under `parent`, reusing existing nodes; returns the node ids.

        The chain is cut at `max_depth` (no point drafting past the token budget). New nodes are
        labelled `source`; shared nodes keep the label of the chain that made them."""
        self._check_open()
        nodes = []
        depth = self.depths[parent] if parent != ROOT else 0
        for token in tokens:
            if self.max_depth is not None and depth >= self.max_depth:
                break
            token = int(token)
            node = self._children[parent].get(token)
            if node is None:
                node = len(self.tokens)
                self.tokens.append(token)
                self.parents.append(parent)
                self.depths.append(depth + 1)
                self.sources.append(source)
                self._children[parent][token] = node
                self._children[node] = {}
            nodes.append(node)
            parent, depth = node, depth + 1
        return nodes

    def set_window(self, tokens: Sequence[int], positions: torch.Tensor, mask: torch.Tensor) -> None:
        """Attach lookahead nodes: positions relative to the root, mask among themselves."""
        self._check_open()
        self.window_tokens = list(tokens)
        self.window_positions = positions
        self.window_mask = mask

    def path_tokens(self, nodes: Sequence[int]) -> list[int]:
        return [self.tokens[i] for i in nodes]

    def ancestor_mask(self) -> torch.Tensor:
        """[size, size] bool: node i sees node j iff j is i or an ancestor of i (pointer jumping)."""
        n = self.size
        mask = torch.eye(n, dtype=torch.bool)
        if n == 0:
            return mask
        parents = torch.tensor(self.parents + [ROOT])  # index n is a sentinel for "above the root"
        parents[parents == ROOT] = n
        rows = torch.arange(n)
        up = parents[:n]
        for _ in range(max(self.depths) - 1):
            inside = up < n
            mask[rows[inside], up[inside]] = True
            up = parents[up]
        return mask

    def layout(self) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """(tokens, positions relative to the root, [total, total] visibility) for all nodes."""
        trie_positions = torch.tensor(self.depths, dtype=torch.long)
        trie_mask = self.ancestor_mask()
        if not self.window_tokens:
            return self.tokens, trie_positions, trie_mask
        n, w = self.size, len(self.window_tokens)
        mask = torch.zeros(n + w, n + w, dtype=torch.bool)
        mask[:n, :n] = trie_mask
        mask[n:, n:] = self.window_mask
        positions = torch.cat([trie_positions, self.window_positions])
        return self.tokens + self.window_tokens, positions, mask
