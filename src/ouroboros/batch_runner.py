"""The batch runner: one model, one KV cache for several rows, each row its own tokens and length.

One forward feeds every stepping row's pending tokens plus its draft tree. Rows differ in length,
so all of them write their new tokens at the same slots [S, S + q), S the cache's length (at least
every row's): row i sees its own cached slots [0, len_i) and its new tokens as `tree_inputs` lays
them out, never the slots [len_i, S) (stale after a rewind, or another row's longer past), and a
row with fewer than q new tokens is padded with dummy tokens that see only themselves. `keep` then
copies each row's pending tokens and accepted nodes down to [len_i, ...), and the cache is cut to
the longest row. Each row's logits are what `ModelRunner` gives for it alone, up to float rounding.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import torch
from transformers import DynamicCache

from .runner import ForwardLog, attention_masks, reusable_prefix, tree_inputs
from .tree import DraftTree

__all__ = ["BatchRunner"]

PAD_TOKEN = 0
"""Fed where a row has fewer new tokens than the widest row; masked, so its value never matters."""


class BatchRunner(ForwardLog):
    """Runs one model over several rows with one `DynamicCache` [rows, heads, slots, dim].

    Rows are named by the ids given at construction and keep them when others are dropped."""

    def __init__(self, model, rows: Sequence[int], role: str = "target"):
        super().__init__(model, role)
        self.cache = DynamicCache()
        self.rows: list[int] = list(rows)
        """Row ids in the cache's batch order."""
        self.tokens: dict[int, list[int]] = {row: [] for row in self.rows}
        """Each row's token ids whose keys and values are in its slots [0, len), in order."""
        self._step: dict[int, tuple[int, list[int]]] = {}
        """Rows fed by the last forward and not kept yet: (pending count, fed tokens)."""
        self._moves: dict[int, tuple[int, list[int]]] = {}
        """Rows kept since the last forward: (their length before, offsets of the fed slots kept)."""
        self._start = 0
        """S of the last forward: where its new tokens were written."""

    def rewind(self, row: int, sequence: Sequence[int]) -> list[int]:
        """Forget row `row`'s cached tokens past its longest prefix shared with `sequence`, short of
        its last token (see `ModelRunner.rewind`); return the rest. Its slots stay, hidden."""
        tokens = self.tokens[row]
        del tokens[reusable_prefix(tokens, sequence):]
        return list(sequence[len(tokens):])

    def forward(self, steps: Mapping[int, tuple[Sequence[int], DraftTree]]) -> dict[int, torch.Tensor]:
        """One forward for the rows in `steps` (row -> (pending tokens, tree)); rows not in it are
        fed one masked dummy token. Returns each stepping row's logits [1 + tree.total, vocab]
        (float32) for its last pending token and its tree nodes, as `ModelRunner.forward`."""
        start = max((len(self.tokens[row]) for row in self.rows), default=0)
        self._crop(start)
        inputs = {row: tree_inputs(pending, tree, len(self.tokens[row])) for row, (pending, tree) in steps.items()}
        width = max((len(fed) for fed, _, _ in inputs.values()), default=1)
        ids, positions, masks = [], [], []
        for row in self.rows:
            past = len(self.tokens[row])
            fed, pos, allowed = inputs.get(row, ([], torch.zeros(0, dtype=torch.long), torch.zeros(0, 0, dtype=bool)))
            ids.append(fed + [PAD_TOKEN] * (width - len(fed)))
            pos, allowed = _pad(pos, allowed, width, past)  # [width], [width, width]
            positions.append(pos)
            masks.append(_hide_gap(attention_masks(self.windows, allowed, pos, start, self.dtype, self.device),
                                   past, start))
        first = min(len(steps[row][0]) - 1 for row in steps) if steps else width - 1
        before = time.perf_counter()
        out = self.model(
            input_ids=torch.tensor(ids, device=self.device),  # [rows, width]
            attention_mask=_stack(masks),  # [rows, 1, width, start + width] (a dict of them per layer type)
            position_ids=torch.stack(positions).to(self.device),  # [rows, width]
            use_cache=True,
            logits_to_keep=width - first,
            **{self.cache_argument: self.cache},
        )
        self._logged(before, len(self.rows) * width, start)
        self._start = start
        self._step = {row: (len(pending), inputs[row][0]) for row, (pending, _) in steps.items()}
        logits = out.logits.float()  # [rows, width - first, vocab]
        return {row: logits[self.rows.index(row), len(steps[row][0]) - 1 - first:len(inputs[row][0]) - first]
                for row in steps}

    def keep(self, row: int, path: Sequence[int]) -> None:
        """After `forward`: keep row `row`'s pending tokens and its accepted tree nodes `path`. Once
        every row of the forward is kept, their slots move down to each row's prefix (one index copy
        per layer for all rows) and the cache is cut to the longest row."""
        p, fed = self._step.pop(row)
        self._moves[row] = (len(self.tokens[row]), list(range(p)) + [p + node for node in path])
        self.tokens[row] += fed[:p] + [fed[p + node] for node in path]
        if not self._step:
            self._log_pending()
            self._compact()

    def drop(self, rows: Sequence[int]) -> None:
        """Remove finished rows from the batch, so that they cost nothing in later forwards."""
        keep = [i for i, row in enumerate(self.rows) if row not in rows]
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        for layer in self._layers():
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        self.rows = [self.rows[i] for i in keep]
        for row in rows:
            del self.tokens[row]

    def _compact(self) -> None:
        """Copy each kept row's fed slots (S + its kept offsets) to its own slots from its old length on."""
        batch, source, target = [], [], []
        for row, (length, offsets) in self._moves.items():
            batch += [self.rows.index(row)] * len(offsets)
            source += [self._start + offset for offset in offsets]
            target += range(length, length + len(offsets))
        self._moves = {}
        index = torch.tensor([batch, source, target], dtype=torch.long, device=self.device)  # [3, moved slots]
        index = index[:, index[1] != index[2]]
        if index.shape[1]:
            for layer in self._layers():
                layer.keys[index[0], :, index[2]] = layer.keys[index[0], :, index[1]]
                layer.values[index[0], :, index[2]] = layer.values[index[0], :, index[1]]
        self._crop(max(len(self.tokens[row]) for row in self.rows))

    def _crop(self, length: int) -> None:
        for layer in self._layers():
            if layer.keys.shape[-2] > length:
                layer.keys = layer.keys[..., :length, :]
                layer.values = layer.values[..., :length, :]

    def _layers(self):
        return [layer for layer in self.cache.layers if getattr(layer, "keys", None) is not None]


def _pad(positions: torch.Tensor, allowed: torch.Tensor, width: int, past: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`positions` [q] and `allowed` [q, q] of a row's fed tokens, extended to `width` with dummy
    tokens (at position `past`) that see only themselves: [width], [width, width]."""
    q = positions.shape[0]
    padded = torch.eye(width, dtype=torch.bool)
    padded[:q, :q] = allowed
    return torch.cat([positions, positions.new_full((width - q,), past)]), padded


def _hide_gap(mask, past: int, start: int):
    """Hide slots [past, start) of a row's mask(s) [1, 1, q, start + q]: not this row's tokens."""
    for part in mask.values() if isinstance(mask, dict) else (mask,):
        part[..., past:start] = torch.finfo(part.dtype).min
    return mask


def _stack(masks: list):
    """The rows' masks [1, 1, q, width] (or dicts of them by layer type) as one [rows, 1, q, width]."""
    if isinstance(masks[0], dict):
        return {kind: torch.cat([mask[kind] for mask in masks]) for kind in masks[0]}
    return torch.cat(masks)
