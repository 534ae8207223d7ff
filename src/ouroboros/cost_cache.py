"""Measured cost tables, cached per (model, device, dtype, threads, runner) in the user's cache.

A table is measured once (a few seconds: one prefill per cached length, then forwards of 1..32 new
tokens after it) and reused by later calls and processes. A cached table is trusted only when
everything it depends on is unchanged: a different model (weights or config), device, dtype,
thread count, torch or transformers version means a different file. A corrupt or foreign file is
refused with a warning that names it and is measured again; a cache directory that cannot be
written warns once and the table lives in memory only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from .aot import FORMAT as PACKAGE_FORMAT
from .costs import CostTable, ModelCosts
from .errors import ConfigError
from .files import write_json_atomically
from .model_facts import cost_cache_dir, identity_digest, vocab_size
from .runner import ForwardRecord, ModelRunner, Runner
from .static_runner import runner_kind
from .tree import DraftTree

FORMAT = "ouroboros-costs/1"
MEASURED_TOKENS = (1, 2, 4, 8, 16, 32)
MEASURED_CACHED = (64, 512)
REPEATS = 3
"""Timed forwards per (k, cached) cell, averaged."""
DRIFT_TOLERANCE = 0.3
"""A cached table whose prediction of a run's forwards is off by more than this share is measured again."""
DRIFT_MIN_SECONDS = 2.0
"""Predicted seconds of a model's forwards in a run before its table is judged: a few forwards, or
a tiny model's sub-millisecond ones, time mostly noise."""
_warned: set[str] = set()


def fingerprint(model) -> str:
    """A short hash of what makes one model's costs: class, config and a sample of its weights."""
    digest = identity_digest(model)
    with torch.inference_mode():
        for parameter in (next(model.parameters()), list(model.parameters())[-1]):
            sample = parameter.detach().reshape(-1)[:4096].float().cpu()
            digest.update(sample.numpy().tobytes())
            digest.update(str(tuple(parameter.shape)).encode())
    return digest.hexdigest()[:16]


def hardware(device: torch.device) -> str:
    """What runs the forwards: the GPU's name, or the CPU's model and the instruction set torch uses.

    The instruction set is part of it because it sets the price of a many-token forward (bf16 over 16
    tokens: ~1.1x one token with AVX-512-bf16 compiled, 8.6x with AVX2, in BENCHMARKS.md), and a cap on it
    (``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``) changes the price on the same chip.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    isa_cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return " ".join(filter(None, [_cpu_model(), torch.backends.cpu.get_cpu_capability(),
                                  isa_cap and f"oneDNN<={isa_cap}"]))


@functools.cache
def _cpu_model() -> str:
    """The CPU's model name, read once per process (it is part of every cost-cache key)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_key(model, runner: str = "eager") -> dict:
    """Everything a measured cost depends on besides the model itself."""
    import transformers

    parameter = next(model.parameters())
    key = {"device": str(parameter.device), "hardware": hardware(parameter.device),
           "dtype": str(parameter.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
           "runner": runner, "torch": torch.__version__, "transformers": transformers.__version__}
    if runner == "compiled" and parameter.device.type == "cpu":  # another package format runs other code
        key["package"] = PACKAGE_FORMAT
    return key


def measure_costs(model, tokens=MEASURED_TOKENS, cached=MEASURED_CACHED, repeats: int = REPEATS,
                  runner: ModelRunner | None = None) -> ModelCosts:
    """Forward costs of `model` on `runner` (default: the eager runner): prefill of each length in
    `cached`, then forwards of k new tokens after it (the mean of `repeats`, after untimed warm-ups;
    on the fast path those also compile). The mean, not the best: a replay adds these up, and the
    best of a few forwards was measured ~3-5% under what forwards cost inside a generation."""
    vocab = vocab_size(model)
    prefix = [(7919 * i + 11) % vocab for i in range(max(cached))]
    other = (prefix[-1] + 1) % vocab  # not the next cached token, so the rewind below drops it
    forward_ms: dict[int, dict[int, float]] = {}
    prefill_ms: dict[int, float] = {}
    with torch.inference_mode():
        runner = ModelRunner(model) if runner is None else runner
        _timed(runner, prefix[:8], [])  # warm-up: first-call allocations
        _timed(runner, [other], [1] * (max(tokens) - 1), rewind=prefix[:8])
        for length in sorted(cached):
            runner.rewind([])
            prefill_ms[length] = 1000 * _timed(runner, prefix[:length], [])
            row = {}
            for k in tokens:
                chain = [(31 * i + 5) % vocab for i in range(k - 1)]
                row[k] = 1000 * statistics.mean(_timed(runner, [other], chain, rewind=prefix[:length])
                                                for _ in range(repeats))
            forward_ms[length] = row
    return ModelCosts(forward_ms, prefill_ms)


def _timed(runner: ModelRunner, pending: list[int], chain: list[int], rewind: list[int] | None = None) -> float:
    tree = DraftTree()
    tree.add_chain(chain)
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    start = time.perf_counter()
    runner.forward(pending, tree)
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    seconds = time.perf_counter() - start
    runner.keep([])
    if rewind is not None:
        runner.rewind(rewind)
    return seconds


def model_costs(model, *, cache_dir: str | os.PathLike | None = None, progress: bool = False
                ) -> tuple[ModelCosts, float]:
    """(costs, seconds spent measuring: 0 when cached) for `model` on the eager runner."""
    costs, spent, _ = runner_costs(ModelRunner(model), cache_dir=cache_dir, progress=progress)
    return costs, spent


def runner_costs(runner: Runner, *, cache_dir=None, progress: bool = False) -> tuple[ModelCosts, float, Path]:
    """(costs, seconds spent measuring now, the cache file) of `runner`'s model, measured on
    `runner` (an empty one), or read from the cache when it was measured before in this setting."""
    return cached_measurement(runner.model, runner_kind(runner), vocab_key(runner.subset),
                              lambda: measure_costs(runner.model, runner=runner), ModelCosts.from_dict, progress,
                              cache_dir)


def vocab_key(subset) -> dict:
    """What a cost table's key adds for a runner whose output layer covers a subset of ids (a
    cheaper forward): nothing for the full layer, so that tables measured before stay valid."""
    return {} if subset is None else {"vocab": subset.key}


def cached_measurement(model, kind: str, extra: dict, measure, parse, progress: bool = False, cache_dir=None):
    """(a measurement of `model` on a `kind` runner, seconds spent measuring now, its cache file): read
    from the cache when one was taken for exactly this model and setting (`extra` adds to the key),
    else `measure()`d and written there; `parse` reads the file's table back."""
    key = {"model": fingerprint(model), **environment_key(model, kind), "statistic": f"mean of {REPEATS}", **extra}
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir) if cache_dir is not None else cost_cache_dir()
    path = path / f"{name}.json"
    costs = _read(path, key, parse)
    if costs is not None:
        return costs, 0.0, path
    if progress:
        batched = "batched " if "batch" in extra else ""
        print(f"ouroboros: measuring the {batched}forward costs of {type(model).__name__} on "
              f"{key['hardware']} ({key['dtype']}, {key['threads']} threads), once; cached in {path.parent}",
              file=sys.stderr, flush=True)
    start = time.perf_counter()
    costs = measure()
    spent = time.perf_counter() - start
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(path, {"format": FORMAT, "key": key, "measure_seconds": round(spent, 2),
                                     **costs.to_dict()}, indent=1)
    except OSError as exc:
        _warn_once(str(path.parent), f"cannot write the cost cache {path.parent} ({exc}); costs are kept in "
                                     "memory for this process only")
    return costs, spent, path


def _read(path: Path, key: dict, parse):
    """The cached table (read by `parse`) if `path` holds a valid one for exactly `key`; None if absent."""
    if not path.exists():
        return None
    try:
        with open(path) as f:
            document = json.load(f)
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ConfigError("unknown format (expected ouroboros-costs/1)")
        if document.get("key") != key:
            raise ConfigError("it was measured for another model or setting")
        return parse(document)
    except (OSError, json.JSONDecodeError, ConfigError, KeyError, TypeError, ValueError, AttributeError) as exc:
        warnings.warn(f"ignoring cost file {path}: {exc}; measuring again", stacklevel=3)
        return None


def _warn_once(topic: str, message: str) -> None:
    if topic not in _warned:
        _warned.add(topic)
        warnings.warn(message, stacklevel=3)


def check_against_run(table: CostTable, log: list[ForwardRecord], tolerance: float = DRIFT_TOLERANCE,
                      min_seconds: float = DRIFT_MIN_SECONDS) -> list[str]:
    """Compare a cached table with the forwards a generation really timed; a model whose forwards
    took more than `tolerance` away from the table's prediction (e.g. a table measured while the
    machine was busy: a one-token forward cached at 1720 ms against 235 ms idle) has its cached
    table dropped, so the next use measures it again. Returns one warning per dropped table.
    Forwards that compiled a graph are left out; a model's forwards must be predicted to take
    `min_seconds` at least."""
    warnings_given = []
    files = table.meta.get("files", {})  # a table from the cache says which files; a caller's own has none
    for model, file in list(files.items()):
        timed = [record for record in log if record.model == model and not record.compiled]
        predicted = sum(table.costs(model).seconds(record) for record in timed)
        if not timed or predicted < min_seconds:
            continue
        ratio = sum(record.seconds for record in timed) / predicted
        if abs(ratio - 1) > tolerance:
            del files[model]  # judged once: later runs with this table in memory do not warn again
            Path(file).unlink(missing_ok=True)
            message = (f"the cached forward costs of the {model} took {ratio:.2f}x their prediction in this run "
                       f"({len(timed)} forwards): dropped {file}, measured again on next use")
            warnings.warn(message, stacklevel=2)
            warnings_given.append(message)
    return warnings_given
