"""The Jacobi (lookahead) window: parallel guesses of future tokens that turn into new phrases.

Column i is one Jacobi trajectory. Level 0 holds the root (column 0) and W-1 guesses at relative
positions 1..W-1; level l (1..N-2) holds W tokens at positions l+i. A level-l token of column i sees
level-0 columns 0..i and levels 1..l of its own column. After a forward, the outputs of the last
level complete one n-gram per column (its level-0 token is the key); then the levels shift up.
Levels fill one per step at the start, so no n-gram comes from a half-built trajectory.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch


@lru_cache(maxsize=64)
def _layout(width: int, filled: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, mask) of the window nodes: level 0 columns 1..W-1, then levels 1..filled-1."""
    level = torch.cat([torch.zeros(width - 1, dtype=torch.long),
                       torch.arange(1, filled).repeat_interleave(width)])
    column = torch.cat([torch.arange(1, width), torch.arange(width).repeat(filled - 1)])
    same_column = column[:, None] == column[None, :]
    first_row = (level[None, :] == 0) & (column[None, :] <= column[:, None])
    own_trajectory = (level[None, :] >= 1) & same_column & (level[None, :] <= level[:, None])
    return level + column, first_row | own_trajectory


class JacobiWindow:
    def __init__(self, width: int, level: int, seed: Sequence[int]):
        """`seed`: tokens (e.g. the prompt's) to start level 0 from."""
        self.width = width
        self.level = level
        seed = list(seed) or [0]
        guesses = [seed[(len(seed) - width + 1 + i) % len(seed)] for i in range(width - 1)]
        self.levels: list[list[int]] = [guesses]

    def nodes(self) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """(tokens, positions relative to the root, mask) to attach to a draft tree."""
        positions, mask = _layout(self.width, len(self.levels))
        tokens = [t for row in self.levels for t in row]
        return tokens, positions, mask

    def update(self, root: int, root_output: int, outputs: Sequence[int]) -> list[tuple[int, tuple[int, ...]]]:
        """Advance one Jacobi step; return the completed n-grams as (key, phrase).

        `root` is the token that was at column 0, `root_output` the model's choice there, and
        `outputs` the model's choices at the window nodes, in `nodes()` order."""
        w = self.width
        last = list(outputs[-w:]) if len(self.levels) > 1 else [root_output] + list(outputs[:w - 1])
        if len(self.levels) < self.level - 1:
            self.levels.append(last)
            return []
        columns = [[root] + self.levels[0]] + self.levels[1:] + [last]
        ngrams = [(columns[0][i], tuple(row[i] for row in columns[1:])) for i in range(w)]
        rest = self.levels[1:] + [last]
        self.levels = [rest[0][1:]] + rest[1:]
        return ngrams
