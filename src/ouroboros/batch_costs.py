"""What a batched forward costs: rows x new tokens each, on the batch runner in use, measured once.

A single-row cost table does not say it: a batched forward costs more than one row's forward over
the same number of tokens, since each row attends over its own cache (measured on the built-in
target, compiled, 2 AVX-512 cores: 8 rows x 2 tokens 153 ms, one row x 16 tokens 111 ms). So
the load sizing (`batch_sizing`) reads this table: forwards of 1, 2, 4 and 8 rows x 1..16 new tokens
after `CACHED` cached tokens per row, cached on disk like the single-row tables (`cost_cache`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .batch_runner import make_batch_runner
from .cost_cache import cached_measurement, vocab_key
from .costs import interpolate
from .model_facts import vocab_size
from .tree import DraftTree
from .vocab_subset import VocabSubset

__all__ = ["BatchCosts", "batch_costs"]

ROWS = (1, 2, 4, 8)
WIDTHS = (1, 2, 4, 8, 16)
CACHED = 256
REPEATS = 3


@dataclass(frozen=True)
class BatchCosts:
    """One model's batched forward costs: `forward_ms[rows][width]` (milliseconds)."""

    forward_ms: dict[int, dict[int, float]]

    @classmethod
    def from_dict(cls, data: Mapping) -> BatchCosts:
        table = {int(r): {int(w): float(ms) for w, ms in row.items()} for r, row in data["forward_ms"].items()}
        if not table or any(not row or min(row.values()) <= 0 for row in table.values()):
            raise ValueError("a batch cost table needs positive forward_ms[rows][width] entries")
        return cls(table)

    def to_dict(self) -> dict:
        return {"forward_ms": {str(r): {str(w): ms for w, ms in sorted(row.items())}
                               for r, row in sorted(self.forward_ms.items())}}

    def forward(self, rows: int, width: int) -> float:
        """Seconds for a forward of `rows` rows x `width` new tokens, interpolated (linear beyond)."""
        by_rows = [(r, interpolate(sorted(row.items()), width)) for r, row in sorted(self.forward_ms.items())]
        return interpolate(by_rows, rows) / 1000


def batch_costs(model, *, fast: bool | None = None, progress: bool = False,
                subset: VocabSubset | None = None) -> BatchCosts:
    """`model`'s batched costs on the batch runner `generate_batch(fast=fast)` uses (its output layer
    over `subset`), measured on first use (seconds: a prefill of every row, then `REPEATS` forwards
    per cell) and cached."""
    runner = make_batch_runner(model, range(max(ROWS)), fast=fast, progress=progress, subset=subset)
    kind = "compiled" if runner.package is not None else "eager"
    return cached_measurement(model, kind, {"batch": {"rows": list(ROWS), "widths": list(WIDTHS), "cached": CACHED},
                                            **vocab_key(subset)},
                              lambda: _measure(model, fast, subset), BatchCosts.from_dict, progress)[0]


def _measure(model, fast: bool | None, subset: VocabSubset | None) -> BatchCosts:
    vocab = vocab_size(model)
    table: dict[int, dict[int, float]] = {}
    with torch.inference_mode():
        for rows in ROWS:
            runner = make_batch_runner(model, range(rows), fast=fast, progress=False, subset=subset)
            prefixes = {row: [(7919 * i + 11 * row + 5) % vocab for i in range(CACHED)] for row in range(rows)}
            _step(runner, {row: (prefix, DraftTree()) for row, prefix in prefixes.items()})
            table[rows] = {}
            for width in WIDTHS:
                times = []
                for _ in range(REPEATS + 1):  # the first one untimed
                    steps = {}
                    for row, prefix in prefixes.items():
                        runner.rewind(row, prefix + [(prefix[-1] + 1) % vocab])
                        tree = DraftTree()
                        tree.add_chain([(31 * i + 7) % vocab for i in range(width - 1)])
                        steps[row] = ([(prefix[-1] + 1) % vocab], tree)
                    times.append(_step(runner, steps))
                table[rows][width] = 1000 * statistics.mean(times[1:])
    return BatchCosts(table)


def _step(runner, steps) -> float:
    """One timed forward of `steps` (row -> (pending, tree)), then nothing kept but the pending tokens."""
    start = time.perf_counter()
    runner.forward(steps)
    seconds = time.perf_counter() - start
    for row in steps:
        runner.keep(row, [])
    return seconds
