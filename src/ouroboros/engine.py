"""The engine: a target model (and a draft model) ready to decode on this machine.

An `Engine` decides once which runner each model runs on (the compiled static-cache fast path where
it pays, else the eager one: `static_runner.make_runner`), makes a fresh runner of that kind for each
generation, and owns the cost tables measured on those same runners: the single-row table that
`auto` plans from and the batched tables that a batch's load sizing reads. Each table is measured on
first use (and cached on disk by `cost_cache`, so another process reads it back), kept for the
engine's life, and dropped when a run shows it wrong. Proposers get resolved runners and costs and
do no I/O when built.

The KV buffers and compiled graphs a runner uses are kept per model by the runner modules
(`static_runner`, `aot`), not per engine: a compiled graph is tied to the buffers it was traced
with, and engines of one model (alone, or with a draft) share both.

`generate(target, ...)` runs on `engine_for(target, draft, fast)`, a cached engine that holds its
models weakly, so that caching it keeps no model alive; an `Engine` built by hand holds its models.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Callable, Sequence

from .batch_costs import BatchCosts, batch_costs
from .batch_runner import BatchRunner, make_batch_runner
from .cost_cache import check_against_run, environment_key, runner_costs
from .costs import CostTable
from .runner import ForwardRecord, Runner
from .static_runner import make_runner, runs_compiled
from .vocab_subset import DEFAULT_SIZE, vocab_subset

__all__ = ["Engine", "cost_table", "engine_for"]

ROLES = ("target", "draft")


class Engine:
    """A (target, draft) pair on one runner choice: its runners and the cost tables measured on them.

    `fast` as in `generate`: True the compiled fast path (saying why not where it cannot), False the
    eager runner, None the fast path where it is expected to pay here. `make_runner(model, fast=,
    role=)` builds the single-stream runners (tests inject their own). `cache_dir` is where cost
    tables are cached (default: `model_facts.cost_cache_dir()`). `draft_vocab`: the ids the draft's
    output layer computes (`vocab_subset`; 0 or None: all of them)."""

    def __init__(self, target, draft=None, *, fast: bool | None = None, cache_dir: str | os.PathLike | None = None,
                 make_runner: Callable[..., Runner] = make_runner, hold_models: bool = True,
                 draft_vocab: int | None = DEFAULT_SIZE):
        self._models = {role: weakref.ref(model) for role, model in zip(ROLES, (target, draft)) if model is not None}
        self._held = (target, draft) if hold_models else ()
        self.fast = fast
        self.cache_dir = cache_dir
        self._make_runner = make_runner
        self.compiled = {role: runs_compiled(model, fast) for role, model in self.models().items()}
        """Per role: whether its runners are the compiled fast path (decided here, once)."""
        self.subsets = {"target": None, "draft": None if draft is None else vocab_subset(draft, draft_vocab)}
        """Per role: the ids its output layer computes (`vocab_subset`), None for all of them."""
        self._costs: CostTable | None = None
        self._batch_costs: dict[str, BatchCosts] = {}

    @property
    def target(self):
        return self._models["target"]()

    @property
    def draft(self):
        return self._models["draft"]() if "draft" in self._models else None

    def models(self) -> dict[str, object]:
        """role -> model, for the models this engine has."""
        return {role: ref() for role, ref in self._models.items()}

    @property
    def kind(self) -> str:
        """"compiled" or "eager": the target's runner, which the cost tables are keyed by."""
        return "compiled" if self.compiled["target"] else "eager"

    def runner(self, role: str = "target") -> Runner:
        """A fresh single-stream runner for `role`'s model (empty cache), of the kind decided at build."""
        return self._make_runner(self.models()[role], fast=self.compiled[role], role=role, subset=self.subsets[role])

    def batch_runner(self, role: str = "target", rows: Sequence[int] = ()) -> BatchRunner:
        """A batch runner for `role`'s model: on its compiled package where its runners compile."""
        return make_batch_runner(self.models()[role], rows, fast=self.compiled[role], role=role,
                                 subset=self.subsets[role])

    def costs(self, *, progress: bool = False) -> CostTable:
        """The pair's forward costs on this engine's runners, measured on first use (then read from
        the disk cache); `meta["measure_seconds"]` says how long measuring took when it ran."""
        if self._costs is None:
            tables, files, spent = {}, {}, 0.0
            for role in self._models:
                tables[role], seconds, files[role] = runner_costs(self.runner(role), cache_dir=self.cache_dir,
                                                                  progress=progress)
                spent += seconds
            meta = {"machine": environment_key(self.target, self.kind), "measure_seconds": round(spent, 2),
                    "files": {role: str(file) for role, file in files.items()}}
            self._costs = CostTable(tables["target"], tables.get("draft"), meta)
        return self._costs

    def timed_costs(self) -> tuple[CostTable, float]:
        """(`costs()`, seconds this call spent on it: 0 once the table is in memory)."""
        start = time.perf_counter()
        cached = self._costs is not None
        table = self.costs()
        return table, 0.0 if cached else time.perf_counter() - start

    def batch_costs(self, role: str = "target", *, progress: bool = False) -> BatchCosts:
        """`role`'s batched forward costs (rows x new tokens) on this engine's batch runners, measured on
        first use (`batch_costs`)."""
        if role not in self._batch_costs:
            self._batch_costs[role] = batch_costs(self.models()[role], fast=self.compiled[role], progress=progress,
                                                  subset=self.subsets[role])
        return self._batch_costs[role]

    def check_costs(self, table: CostTable, log: list[ForwardRecord], **limits) -> list[str]:
        """Judge `table` against the forwards a run timed (`cost_cache.check_against_run`, with its
        `limits`); a table of this engine found wrong is dropped, so the next use measures it again."""
        dropped = check_against_run(table, log, **limits)
        if dropped and table is self._costs:
            self._costs = None
        return dropped


_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""target -> {(draft's id, fast, cache_dir, draft_vocab): Engine}: what `generate` reuses from call to call."""


def engine_for(target, draft=None, fast: bool | None = None, cache_dir: str | os.PathLike | None = None,
               draft_vocab: int | None = DEFAULT_SIZE) -> Engine:
    """The cached engine of (target, draft, fast, draft_vocab): built on first use, holding its models weakly."""
    engines = _ENGINES.setdefault(target, {})
    key = (id(draft) if draft is not None else None, fast, None if cache_dir is None else os.fspath(cache_dir),
           draft_vocab)
    engine = engines.get(key)
    if engine is None or engine.draft is not draft:
        engine = engines[key] = Engine(target, draft, fast=fast, cache_dir=cache_dir, hold_models=False,
                                       draft_vocab=draft_vocab)
    return engine


def cost_table(target, draft=None, *, fast: bool | None = False, cache_dir=None, progress: bool = False,
               draft_vocab: int | None = DEFAULT_SIZE) -> CostTable:
    """Costs of the pair as it runs here (on the runners `generate(fast=fast, draft_vocab=draft_vocab)`
    uses), measured on first use and cached; `meta["measure_seconds"]` says how long measuring took."""
    return engine_for(target, draft, fast, cache_dir, draft_vocab).costs(progress=progress)
