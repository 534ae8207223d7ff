"""The batch runner: one model, one KV cache for several rows, each row its own tokens and length.

One forward feeds every stepping row's pending tokens plus its draft tree. Rows differ in length,
so all of them write their new tokens at the same slots [S, S + q), S the cache's length (at least
every row's): row i sees its own cached slots [0, len_i) and its new tokens as `tree_inputs` lays
them out, never the slots [len_i, S) (stale after a rewind, or another row's longer past), and a
row with fewer than q new tokens is padded with dummy tokens that see only themselves. `keep` then
copies each row's pending tokens and accepted nodes down to [len_i, ...), and the cache is cut to
the longest row. Each row's logits are what `ModelRunner` gives for it alone, up to float rounding.

On the CPU fast path the forward is the model's compiled package (`aot`, whose row dimension is
dynamic) over buffers [rows, heads, capacity, dim] that grow in steps of `CAPACITY_STEP` slots: the
CPU's attention reads every slot of the capacity, so it is kept close to the longest row (the
built-in draft, eager, 8 rows x 2 tokens: attention 2.26 ms per layer at capacity 1024, 0.49 ms at
320, BENCHMARKS.md session 9).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from types import SimpleNamespace

import torch
from transformers import DynamicCache

from .aot import MAX_TOKENS as PACKAGE_MAX_TOKENS
from .aot import MIN_TOKENS as PACKAGE_MIN_TOKENS
from .aot import AotForward, aot_blocker, model_package
from .runner import ForwardRecord, ModelAccess, attention_masks, reusable_prefix, tree_inputs
from .static_runner import fast_path_blocker
from .tree import DraftTree
from .vocab_subset import VocabSubset

__all__ = ["BatchRunner", "make_batch_runner"]

PAD_TOKEN = 0
"""Fed where a row has fewer new tokens than the widest row; masked, so its value never matters."""
CAPACITY_STEP = 128
"""The packaged runner's buffers grow by whole steps of this many slots (a copy of the cache each)."""


def make_batch_runner(model, rows: Sequence[int], *, fast: bool | None = None, role: str = "target",
                      progress: bool = True, subset: VocabSubset | None = None) -> BatchRunner:
    """A `BatchRunner` (its output layer over `subset`) on the model's compiled package where the
    single-stream fast path would run one (`fast` as in `generate`), else on a `DynamicCache`; with
    `fast=True` it says why not."""
    reason = "the eager runner was asked for" if fast is False else fast_path_blocker(model, fast) or aot_blocker(model)
    if reason is None:
        package, layout, seconds = model_package(model, progress, subset)
        if package is not None:
            runner = BatchRunner(model, rows, role, package=(package, layout), subset=subset)
            runner.compile_seconds = seconds
            return runner
        reason = "its compiled package could not be built"
    if fast:
        warnings.warn(f"batched fast path off for {type(model).__name__}, using the eager batch runner: {reason}",
                      stacklevel=2)
    return BatchRunner(model, rows, role, subset=subset)


class BatchRunner(ModelAccess):
    """Runs one model over several rows with one KV cache [rows, heads, slots, dim]: a `DynamicCache`,
    or with `package` (the model's `AotForward` and its cache layout (heads, head dims) per layer)
    static buffers that the package writes in place.

    Rows are named by the ids given at construction and keep them when others are dropped."""

    def __init__(self, model, rows: Sequence[int], role: str = "target",
                 package: tuple[AotForward, tuple[list[int], list[int]]] | None = None,
                 subset: VocabSubset | None = None):
        super().__init__(model, role, subset)
        self.package = package[0] if package is not None else None
        self.cache = DynamicCache() if package is None else _buffers(*package[1], len(rows), CAPACITY_STEP,
                                                                     self.dtype, self.device)
        self.rows: list[int] = list(rows)
        """Row ids in the cache's batch order."""
        self.tokens: dict[int, list[int]] = {row: [] for row in self.rows}
        """Each row's token ids whose keys and values are in its slots [0, len), in order."""
        self._step: dict[int, tuple[int, list[int]]] = {}
        """Rows fed by the last forward and not kept yet: (pending count, fed tokens)."""
        self._moves: dict[int, tuple[int, list[int]]] = {}
        """Rows kept since the last forward: (their length before, offsets of the fed slots kept)."""
        self._starts: dict[int, int] = {}
        """Where the last forward wrote each stepping row's new tokens (S, or its own length when fed alone)."""
        self.taken: dict[int, list[int]] = {row: [] for row in self.rows}
        """Each row's forwards (indices into `log`) that fed it."""

    def add(self, row: int) -> None:
        """A new row joins the batch (empty: its first forward feeds its prompt)."""
        if row in self.tokens:
            raise ValueError(f"row {row} is already in the batch")
        for layer in self._layers():
            layer.keys = torch.cat([layer.keys, layer.keys.new_zeros(1, *layer.keys.shape[1:])])
            layer.values = torch.cat([layer.values, layer.values.new_zeros(1, *layer.values.shape[1:])])
        self.rows.append(row)
        self.tokens[row] = []
        self.taken[row] = []

    def row_log(self, row: int) -> list[ForwardRecord]:
        """The forwards that fed `row` (each record is the whole forward's, shared by its rows)."""
        return [self.log[k] for k in self.taken[row] if k < len(self.log)]

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
        wide = set()
        if self.package is not None:
            steps = self._prefill_long_prompts(steps)
            wide = _wide_rows(steps)
        together = {row: step for row, step in steps.items() if row not in wide}
        logits = self._forward_all(together) if together else {}
        for row in wide:
            logits[row] = self._forward_alone(row, *steps[row])
        return logits

    def _forward_all(self, steps: Mapping[int, tuple[Sequence[int], DraftTree]]) -> dict[int, torch.Tensor]:
        """`forward` over every row at once: all write at the same slots S, the longest row's length."""
        start = max((len(self.tokens[row]) for row in self.rows), default=0)
        self._crop(start)
        inputs = {row: tree_inputs(pending, tree, len(self.tokens[row])) for row, (pending, tree) in steps.items()}
        width = max((len(fed) for fed, _, _ in inputs.values()), default=1)
        capacity = None
        if self.package is not None:
            width = max(width, PACKAGE_MIN_TOKENS)
            capacity = self._reserve(start + width)
        ids, positions, masks = [], [], []
        for row in self.rows:
            past = len(self.tokens[row])
            fed, pos, allowed = inputs.get(row, ([], torch.zeros(0, dtype=torch.long), torch.zeros(0, 0, dtype=bool)))
            ids.append(fed + [PAD_TOKEN] * (width - len(fed)))
            pos, allowed = _pad(pos, allowed, width, past)  # [width], [width, width]
            positions.append(pos)
            masks.append(_hide_gap(attention_masks(self.windows, allowed, pos, start, self.dtype, self.device,
                                                   width=capacity), past, start))
        first = min(len(steps[row][0]) - 1 for row in steps) if steps else width - 1
        before = time.perf_counter()
        ids = torch.tensor(ids, device=self.device)  # [rows, width]
        mask = _stack(masks)  # [rows, 1, width, start + width or capacity] (a dict of them per layer type)
        positions = torch.stack(positions).to(self.device)  # [rows, width]
        if self.package is not None:
            layers = self._layers()
            logits = self.package(ids, mask, positions, start, [layer.keys for layer in layers],
                                  [layer.values for layer in layers], torch.arange(first, width))
        else:
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                logits_to_keep=width - first, **{self.cache_argument: self.cache}).logits
            if self.subset is not None:  # the full output layer ran: propose as the subset's package would
                logits = self.subset.mask(logits)
        self.log.record(before, len(self.rows) * width, start)
        for row, (pending, _) in steps.items():
            self._fed(row, start, len(pending), inputs[row][0])
        logits = logits.float()  # [rows, width - first, vocab]
        return {row: logits[self.rows.index(row), len(steps[row][0]) - 1 - first:len(inputs[row][0]) - first]
                for row in steps}

    def _forward_alone(self, row: int, pending: Sequence[int], tree: DraftTree) -> torch.Tensor:
        """A packaged forward of one row on its own slice of the buffers, writing at its own length: a
        row's prompt, which would otherwise widen every row's forward to its length."""
        past, index = len(self.tokens[row]), self.rows.index(row)
        fed, positions, allowed = tree_inputs(pending, tree, past)
        width = max(len(fed), PACKAGE_MIN_TOKENS)
        capacity = self._reserve(past + width)
        ids = torch.tensor([fed + [PAD_TOKEN] * (width - len(fed))], device=self.device)  # [1, width]
        positions, allowed = _pad(positions, allowed, width, past)
        mask = attention_masks(self.windows, allowed, positions, past, self.dtype, self.device, width=capacity)
        layers = self._layers()
        before = time.perf_counter()
        logits = self.package(ids, mask, positions[None].to(self.device), past,
                              [layer.keys[index:index + 1] for layer in layers],
                              [layer.values[index:index + 1] for layer in layers],
                              torch.arange(len(pending) - 1, len(fed)))
        self.log.record(before, width, past)
        self._fed(row, past, len(pending), fed)
        return logits[0].float()

    def _fed(self, row: int, start: int, pending: int, fed: list[int]) -> None:
        self._starts[row] = start
        self._step[row] = (pending, fed)
        self.taken[row].append(self.forwards - 1)

    def keep(self, row: int, path: Sequence[int]) -> None:
        """After `forward`: keep row `row`'s pending tokens and its accepted tree nodes `path`. Once
        every row of the forward is kept, their slots move down to each row's prefix (one index copy
        per layer for all rows) and the cache is cut to the longest row."""
        p, fed = self._step.pop(row)
        self._moves[row] = (len(self.tokens[row]), list(range(p)) + [p + node for node in path])
        self.tokens[row] += fed[:p] + [fed[p + node] for node in path]
        if not self._step:
            self.log.close()
            self._compact()

    @property
    def settled(self) -> bool:
        """Whether every row the last forward fed was kept or abandoned (so the cache is compacted)."""
        return not self._step

    def abandon(self, row: int) -> None:
        """A row that failed between its forward and its `keep`: it keeps nothing of that forward, and
        the rows kept beside it are compacted as if it had kept (it is to be dropped next)."""
        if self._step.pop(row, None) is not None and not self._step:
            self.log.close()
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
            del self.tokens[row], self.taken[row]
        self._crop(max((len(tokens) for tokens in self.tokens.values()), default=0))

    def _compact(self) -> None:
        """Copy each kept row's fed slots (S + its kept offsets) to its own slots from its old length on."""
        batch, source, target = [], [], []
        for row, (length, offsets) in self._moves.items():
            batch += [self.rows.index(row)] * len(offsets)
            source += [self._starts[row] + offset for offset in offsets]
            target += range(length, length + len(offsets))
        self._moves = {}
        index = torch.tensor([batch, source, target], dtype=torch.long, device=self.device)  # [3, moved slots]
        index = index[:, index[1] != index[2]]
        if index.shape[1]:
            for layer in self._layers():
                layer.keys[index[0], :, index[2]] = layer.keys[index[0], :, index[1]]
                layer.values[index[0], :, index[2]] = layer.values[index[0], :, index[1]]
        self._crop(max(len(self.tokens[row]) for row in self.rows))

    def _prefill_long_prompts(self, steps: Mapping[int, tuple[Sequence[int], DraftTree]]
                              ) -> dict[int, tuple[Sequence[int], DraftTree]]:
        """Feed the pending tokens that would make a forward wider than the package takes (a long
        prompt) in forwards of their own, kept whole; return the steps with what is left to feed."""
        steps = dict(steps)
        while True:
            long = {row: (pending, tree) for row, (pending, tree) in steps.items()
                    if len(pending) + tree.total > PACKAGE_MAX_TOKENS}
            if not long:
                return steps
            chunks = {row: pending[:min(PACKAGE_MAX_TOKENS, len(pending) + tree.total - PACKAGE_MAX_TOKENS,
                                        len(pending) - 1)] for row, (pending, tree) in long.items()}
            if not all(chunks.values()):  # a tree alone as wide as a forward: drafts are never that wide
                raise ValueError(f"a draft tree wider than {PACKAGE_MAX_TOKENS} tokens cannot be verified")
            self.forward({row: (chunk, DraftTree(max_depth=0)) for row, chunk in chunks.items()})
            for row, chunk in chunks.items():
                self.keep(row, [])
                steps[row] = (steps[row][0][len(chunk):], steps[row][1])

    def _reserve(self, slots: int) -> int:
        """The packaged runner's capacity, grown (its buffers copied) to hold `slots` slots."""
        capacity = self.cache.layers[0].keys.shape[2]
        if slots > capacity:
            grown = -(-slots // CAPACITY_STEP) * CAPACITY_STEP
            for layer in self.cache.layers:
                for name in ("keys", "values"):
                    old = getattr(layer, name)
                    new = old.new_zeros(*old.shape[:2], grown, old.shape[3])
                    new[:, :, :capacity] = old
                    setattr(layer, name, new)
            capacity = grown
        return capacity

    def _crop(self, length: int) -> None:
        if self.package is not None:  # static buffers: slots past a row's length are masked, then overwritten
            return
        for layer in self._layers():
            if layer.keys.shape[-2] > length:
                layer.keys = layer.keys[..., :length, :]
                layer.values = layer.values[..., :length, :]

    def _layers(self):
        return [layer for layer in self.cache.layers if getattr(layer, "keys", None) is not None]


WIDE = 64
"""A row fed more than this many tokens (a prompt) runs alone on the packages, so that its width pads
no other row (BENCHMARKS.md session 9: 8 HumanEval prompts, 64 new tokens, batched `ouroboros` on the
built-in pair: 12.4 s with the prompts fed one by one, 14.1 s with them padded together)."""


def _wide_rows(steps: Mapping[int, tuple[Sequence[int], DraftTree]]) -> set[int]:
    """Rows fed a prompt: run one by one, they widen no other row's forward and pad nothing."""
    return {row for row, (pending, tree) in steps.items() if len(pending) + tree.total > WIDE}


def _buffers(heads: list[int], head_dims: list[int], rows: int, capacity: int, dtype, device) -> SimpleNamespace:
    """A static cache as the package takes it: `.layers`, each with `.keys` and `.values` [rows,
    heads, capacity, head_dim]."""
    return SimpleNamespace(layers=[SimpleNamespace(keys=torch.zeros(rows, h, capacity, d, dtype=dtype, device=device),
                                                   values=torch.zeros(rows, h, capacity, d, dtype=dtype, device=device))
                                   for h, d in zip(heads, head_dims)])


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
