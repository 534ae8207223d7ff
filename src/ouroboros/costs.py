"""Cost tables: what a forward of k new tokens after L cached tokens costs on one machine, and the
replay of a generation's forward log on such a table.

A replay answers "how fast would this same generation (same forwards, same sizes) run on the
machine this table describes?", which makes progress measurable on any machine, including one
where speculation cannot pay. Replayed figures are estimates: label them "replayed", never
"measured". The file format (milliseconds), as in the reference AVX-512-bf16 table the tests keep in
`tests/data/cpu-2core-avx512bf16.json`:
`{"target": {"forward_ms": {L: {k: ms}}, "prefill_ms": {P: ms}}, "draft": {...}, "machine": {...}}`.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .errors import ConfigError
from .runner import ForwardRecord


def interpolate(points: Sequence[tuple[float, float]], x: float) -> float:
    """The cost model's one interpolation, used by every cost table and curve: piecewise linear
    through (x, y) points sorted by x, extended past both ends linearly where that rises and flat
    where it would fall. A forward never gets cheaper with more tokens or more context, and a steep
    measured slope (a small model's attention over 64 against 512 cached tokens) extended down to a
    2-token context would reach zero. A single point says nothing of the slope: by the same rule
    its cost holds everywhere (flat), not proportionally to x."""
    if len(points) == 1:
        return points[0][1]
    xs = [p[0] for p in points]
    i = min(max(bisect.bisect_left(xs, x), 1), len(points) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return max(y0 + (y1 - y0) * (x - x0) / (x1 - x0), min(y0, y1))


@dataclass(frozen=True)
class ModelCosts:
    """One model's costs in milliseconds: `forward_ms[L][k]` and `prefill_ms[P]`."""

    forward_ms: dict[int, dict[int, float]]
    prefill_ms: dict[int, float]

    def __post_init__(self) -> None:
        if not self.forward_ms or any(not row for row in self.forward_ms.values()) or not self.prefill_ms:
            raise ValueError("a cost table needs forward_ms[L][k] and prefill_ms[P] entries")
        values = [v for row in self.forward_ms.values() for v in row.values()] + list(self.prefill_ms.values())
        counts = list(self.prefill_ms) + [k for row in self.forward_ms.values() for k in row]
        if any(not v > 0 for v in values) or min(counts) < 1:
            raise ValueError("costs must be positive milliseconds at token counts >= 1")

    @classmethod
    def from_dict(cls, data: Mapping) -> ModelCosts:
        forward = {int(L): {int(k): float(ms) for k, ms in row.items()} for L, row in data["forward_ms"].items()}
        prefill = {int(p): float(ms) for p, ms in data["prefill_ms"].items()}
        return cls(forward, prefill)

    def to_dict(self) -> dict:
        return {"forward_ms": {str(L): {str(k): ms for k, ms in sorted(row.items())}
                               for L, row in sorted(self.forward_ms.items())},
                "prefill_ms": {str(p): ms for p, ms in sorted(self.prefill_ms.items())}}

    def forward(self, tokens: int, cached: int) -> float:
        """Seconds for a forward of `tokens` new tokens after `cached` cached ones."""
        by_cached = [(L, interpolate(sorted(row.items()), tokens)) for L, row in sorted(self.forward_ms.items())]
        return interpolate(by_cached, cached) / 1000

    def prefill(self, tokens: int) -> float:
        """Seconds for a prompt of `tokens` tokens from an empty cache."""
        return interpolate(sorted(self.prefill_ms.items()), tokens) / 1000

    def seconds(self, record: ForwardRecord) -> float:
        return self.prefill(record.fed) if record.cached == 0 else self.forward(record.fed, record.cached)


@dataclass(frozen=True)
class CostTable:
    """The costs of a target and (optionally) a draft model on one machine, dtype and thread count."""

    target: ModelCosts
    draft: ModelCosts | None = None
    meta: dict = field(default_factory=dict)
    """Where it comes from: machine, dtype, threads, model fingerprints, how it was measured."""

    @classmethod
    def from_dict(cls, data: Mapping) -> CostTable:
        draft = data.get("draft")
        meta = {k: v for k, v in data.items() if k not in ("target", "draft")}
        return cls(ModelCosts.from_dict(data["target"]), ModelCosts.from_dict(draft) if draft else None, meta)

    def to_dict(self) -> dict:
        out = dict(self.meta)
        out["target"] = self.target.to_dict()
        if self.draft is not None:
            out["draft"] = self.draft.to_dict()
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> CostTable:
        """Read a cost file; a missing, corrupt, truncated or foreign file raises ConfigError naming it."""
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"cost file {os.fspath(path)!r} is not a usable cost table: {exc!r}") from None

    def costs(self, model: str) -> ModelCosts:
        costs = self.target if model == "target" else self.draft
        if costs is None:
            raise ConfigError(f"this cost table has no {model!r} model")
        return costs

    def replay(self, log: Iterable[ForwardRecord]) -> float:
        """Seconds the forwards of `log` would take on this table's machine (forwards only)."""
        return sum(self.costs(record.model).seconds(record) for record in log)


def vanilla_log(prompt_tokens: int, new_tokens: int) -> list[ForwardRecord]:
    """The forwards of plain decoding: the prefill (which yields the first token), then one
    single-token forward per further token."""
    log = [ForwardRecord("target", prompt_tokens, 0, 0.0, 0.0)]
    log += [ForwardRecord("target", 1, prompt_tokens + i, 0.0, 0.0) for i in range(new_tokens - 1)]
    return log
