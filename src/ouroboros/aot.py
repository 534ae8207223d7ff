"""The CPU fast path's compiled forward, built once per machine and kept on disk (AOTInductor).

Why: `torch.compile` with inductor's freezing (the weights prepacked for oneDNN, which is what makes
the compiled CPU forward beat eager) caches nothing across processes: inductor bypasses its FX graph
cache for oneDNN-packed weights ("mkldnn tensors unpickleable") and AOTAutograd refuses frozen graphs,
so every process compiled again (measured: 84 s for the built-in 1.5B target, 51 s for the draft). An
AOTInductor package of the same frozen forward is built once instead and loaded by later processes
in under a second (0.2-0.7 s for the built-in pair, BENCHMARKS.md session 8), running at the same
speed, its logits bit-identical to the in-process graph's.

One package per model serves every forward of 1..`MAX_ROWS` rows, 2..`MAX_TOKENS` new tokens and
every cache capacity (the three dimensions are dynamic): the single-stream and the batch runners.
The KV cache is passed in as inputs that the package writes in place, so the runner keeps its
buffers (rewinding, compacting, growing the cache work as on the static runner). Freezing folds the
weights into the graph as prepacked constants: the package keeps them apart from its code, in a file
mapped in place when it loads (`aot_constants`), so they are neither copied nor duplicated in memory,
and the model's own weights are not read on this path (prompts up to `MAX_TOKENS`; a longer one is
prefilled eagerly by the single-stream runner, in chunks by the batch runner). A package is keyed by
a fingerprint of every weight tensor, the dtype, the CPU's instruction set and the torch and
transformers versions: another model or setting builds its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
import weakref
import zipfile
from pathlib import Path

import torch
from transformers import DynamicCache, StaticCache

from .aot_constants import DATA, INDEX, load_constants, save_constants
from .model_facts import available_memory, cache_argument, identity_digest
from .runner import attention_windows
from .vocab_subset import VocabSubset

FORMAT = "ouroboros-aot/5"
MIN_TOKENS = 2
MAX_TOKENS = 1024
"""New tokens per compiled forward: a prompt up to this long is prefilled by the package too."""
MIN_CAPACITY = 16
MAX_CAPACITY = 32768
MAX_ROWS = 64
"""Rows per compiled forward (the batch dimension is dynamic: one package serves 1..MAX_ROWS)."""
CACHE_ENV = "OUROBOROS_COMPILED_CACHE"

BUILD_MEMORY_FACTOR = 5
"""Memory a package's build may take at its peak, in multiples of the model's weight bytes
(measured: 16.5 GB peak for the built-in pair's first run, the target's weights 3.1 GB in bf16)."""

_LOCK = threading.Lock()
_LOADED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""model -> {output subset's key or None: its loaded package (`AotForward`), or the reason it has none}."""


def aot_cache_dir() -> Path:
    """``$OUROBOROS_COMPILED_CACHE`` if set, else ``compiled/`` in the package's cache directory."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    from .default_pair import default_cache_dir

    return default_cache_dir() / "compiled"


def aot_blocker(model) -> str | None:
    """Why `model` gets no AOTInductor package here (it is then compiled in-process), or None."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        return f"packages are built for the CPU, not {device.type}"
    if len(set(attention_windows(model).values())) > 1:
        return "its layers need different masks (sliding windows)"
    return None


def build_memory_shortfall(model) -> str | None:
    """Why building `model`'s package now could exhaust this machine's memory, or None (also where
    free memory cannot be read): the default path (`fast=None`) then stays eager instead."""
    need = BUILD_MEMORY_FACTOR * sum(p.numel() * p.element_size() for p in model.parameters())
    available = available_memory()
    if available is None or available >= need:
        return None
    return (f"building its compiled package needs about {need / 1e9:.1f} GB of free memory, "
            f"{available / 1e9:.1f} GB are available (give --fast to build it anyway)")


def package_key(model, subset: VocabSubset | None = None) -> dict:
    """What a package is valid for: the model's class, config and weights, the setting, and the
    output layer's subset of ids (`vocab_subset`) it computes logits for."""
    import transformers

    digest = identity_digest(model)
    with torch.inference_mode():
        for name, tensor in model.state_dict().items():  # the packed weights are baked in: every tensor counts
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(tensor.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    key = {"format": FORMAT, "weights": digest.hexdigest()[:24], "dtype": str(next(model.parameters()).dtype),
           "isa": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
           "transformers": transformers.__version__, "tokens": [MIN_TOKENS, MAX_TOKENS]}
    return key if subset is None else {**key, "vocab": subset.key}  # the full layer's key as before: no rebuild


class AotForward:
    """A loaded package: `(ids [rows, q], mask [rows, 1, q, capacity], positions [rows, q], past, keys,
    values, keep [k]) -> logits [rows, k, vocab]` for the `keep` positions; writes the q new keys and
    values of every layer into `keys[i]` / `values[i]` [rows, kv_heads, capacity, head_dim] at slots
    past..past+q of every row. A package built for a `subset` computes its ids' logits only; they
    come back in the full vocabulary, -inf elsewhere."""

    def __init__(self, folder: Path, subset: VocabSubset | None = None):
        self.subset = subset
        self._runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(folder / "model.so"), 1)
        self._file, self._weights = load_constants(self._runner, folder)
        """The package's weights file, mapped, and the weights over it: the runner reads them, these
        references keep them alive."""

    def __call__(self, ids, mask, positions, past: int, keys, values, keep) -> torch.Tensor:
        logits = self._runner.run([ids, mask, positions, torch.tensor(past), keep, *keys, *values])[0]
        return logits if self.subset is None else self.subset.expand(logits)


class _CacheForward(torch.nn.Module):
    """The model's forward with its static cache's tensors as inputs, for `torch.export`."""

    def __init__(self, model, cache_argument: str, keys: list[torch.Tensor], subset: VocabSubset | None = None):
        super().__init__()
        self.model, self.cache_argument = model, cache_argument
        self.head = None
        """The output layer's rows for `subset`, as parameters: freezing prepacks them like the model's."""
        if subset is not None:
            weight, bias = subset.head(model)
            self.head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
            self.head.weight = torch.nn.Parameter(weight, requires_grad=False)
            if bias is not None:
                self.head.bias = torch.nn.Parameter(bias, requires_grad=False)
        self.cache = StaticCache(config=model.config, max_cache_len=keys[0].shape[2])
        self.cache.early_initialization(1, [k.shape[1] for k in keys], [k.shape[-1] for k in keys], keys[0].dtype,
                                        keys[0].device)

    def forward(self, ids, mask, positions, past, keep, keys, values):
        for layer, k, v in zip(self.cache.layers, keys, values):
            layer.keys, layer.values, layer.cumulative_length = k, v, past.clone()
        inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                      **{self.cache_argument: self.cache})
        if self.head is None:
            return self.model(**inputs, logits_to_keep=keep).logits
        return self.head(self.model.get_decoder()(**inputs).last_hidden_state[:, keep])


def aot_forward(model, keys: list[torch.Tensor], values: list[torch.Tensor], cache_argument: str,
                progress: bool = True, subset: VocabSubset | None = None) -> tuple[AotForward | None, float]:
    """(the package's forward for `model` (its output layer over `subset`), or None where it has
    none; seconds spent loading or building it in this call). Built once per machine and setting into
    `aot_cache_dir()`, loaded once per process; `keys`/`values` are one layer's buffers each, to
    trace with. A failure to build warns once and returns None (the caller compiles in-process)."""
    with _LOCK:
        loaded = _LOADED.setdefault(model, {})
        which = None if subset is None else subset.key
        known = loaded.get(which)
        if isinstance(known, AotForward):
            return known, 0.0
        if known is not None:
            return None, 0.0
        start = time.perf_counter()
        folder, key = package_folder(model, subset)
        built = False
        try:
            if not _valid(folder, key):
                _say(progress, f"compiling {type(model).__name__} into {folder} (once per machine and setting) ...")
                _build(model, keys, values, cache_argument, folder, key, subset)
                built = True
            package = AotForward(folder, subset)
        except Exception as exc:  # any export or compiler failure: say why, compile in-process instead
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            loaded[which] = reason
            warnings.warn(f"no compiled package for {type(model).__name__} ({reason}); compiling in-process",
                          stacklevel=3)
            return None, time.perf_counter() - start
        loaded[which] = package
        seconds = time.perf_counter() - start
        _say(progress, f"{'compiled' if built else 'loaded'} {type(model).__name__}'s forward in {seconds:.1f} s")
        return package, seconds


def model_package(model, progress: bool = True, subset: VocabSubset | None = None
                  ) -> tuple[AotForward | None, tuple[list[int], list[int]], float]:
    """(the model's package (its output layer over `subset`) or None, the cache layout (heads, head
    dims per layer) it was traced on, seconds spent loading or building it now), for a runner that
    keeps its own buffers. Where none is built yet, one eager forward of two tokens lays a cache out."""
    layout = stored_cache_layout(model, subset)
    if layout is None:
        cache = DynamicCache()
        with torch.inference_mode():
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device),
                  use_cache=True, **{cache_argument(model): cache})
        layout = ([layer.keys.shape[1] for layer in cache.layers], [layer.keys.shape[-1] for layer in cache.layers])
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    keys = [torch.zeros(1, h, MIN_CAPACITY, d, dtype=dtype, device=device) for h, d in zip(*layout)]
    package, seconds = aot_forward(model, keys, [k.clone() for k in keys], cache_argument(model), progress, subset)
    return package, layout, seconds


def package_folder(model, subset: VocabSubset | None = None) -> tuple[Path, dict]:
    """Where `model`'s package (for `subset`) is kept, and the key it must match (`package_key`)."""
    key = package_key(model, subset)
    return aot_cache_dir() / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20], key


def stored_cache_layout(model, subset: VocabSubset | None = None) -> tuple[list[int], list[int]] | None:
    """(key-value heads, head size) per layer of the cache that `model`'s built package was traced on,
    or None before it is built. A runner lays its cache out from this instead of running a first eager
    forward, so on the package's path the model's own weights (mapped from disk) are never read."""
    folder, key = package_folder(model, subset)
    if not _valid(folder, key):
        return None
    layout = json.loads((folder / "cache.json").read_text())
    return layout["heads"], layout["head_dims"]


def _valid(folder: Path, key: dict) -> bool:
    try:
        return json.loads((folder / "key.json").read_text()) == key and all(
            (folder / name).is_file() for name in ("model.so", "cache.json", DATA, INDEX))
    except (OSError, ValueError):
        return False


def _build(model, keys, values, cache_argument: str, folder: Path, key: dict, subset: VocabSubset | None) -> None:
    """Export the forward with dynamic new tokens and capacity, compile it frozen with its weights
    apart, and keep the package's shared library and weights (`aot_constants`) in `folder`, written
    whole or not at all."""
    from torch.export import Dim

    module = _CacheForward(model, cache_argument, keys, subset)
    q, capacity = Dim("q", min=MIN_TOKENS, max=MAX_TOKENS), Dim("capacity", min=MIN_CAPACITY, max=MAX_CAPACITY)
    kept, rows = Dim("kept", min=1, max=MAX_TOKENS), Dim("rows", min=1, max=MAX_ROWS)
    layers = len(keys)
    # Every example is a tensor of its own (no expanded views): the package assumes its inputs' strides.
    example = (torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 1, 4, keys[0].shape[2], dtype=keys[0].dtype),
               torch.arange(8).reshape(2, 4), torch.tensor(0), torch.arange(4),
               [k.expand(2, -1, -1, -1).clone() for k in keys], [v.expand(2, -1, -1, -1).clone() for v in values])
    shapes = ({0: rows, 1: q}, {0: rows, 2: q, 3: capacity}, {0: rows, 1: q}, None, {0: kept},
              [{0: rows, 2: capacity}] * layers, [{0: rows, 2: capacity}] * layers)
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        with torch.no_grad(), _grouped_query_attention():  # freezing (the prepacking) needs no autograd
            program = torch.export.export(module, example, dynamic_shapes=shapes, strict=False)
            package = torch._inductor.aoti_compile_and_package(
                program, package_path=str(work / "model.pt2"),
                inductor_configs={"freezing": True, "aot_inductor.package_constants_in_so": False,
                                  "aot_inductor.package_constants_on_disk_format": "binary_blob"})
        with zipfile.ZipFile(package) as archive:
            for suffix, name in ((".so", "model.so"), ("_weights.blob", "weights.blob")):
                (member,) = [n for n in archive.namelist() if n.endswith(suffix)]
                with archive.open(member) as src, open(work / name, "wb") as dst:
                    shutil.copyfileobj(src, dst, 16 << 20)
        (work / "model.pt2").unlink()
        runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(work / "model.so"), 1)
        runner.update_constant_buffer_from_blob(str(work / "weights.blob"))  # the packed weights, as tensors
        save_constants(runner, work)
        del runner
        (work / "weights.blob").unlink()
        (work / "cache.json").write_text(json.dumps({"heads": [k.shape[1] for k in keys],
                                                     "head_dims": [k.shape[-1] for k in keys]}))
        (work / "key.json").write_text(json.dumps(key, indent=1))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(work, folder)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _remove_outdated(folder.parent)


GQA_ENV = "TRANSFORMERS_SDPA_FORCE_GQA"


@contextlib.contextmanager
def _grouped_query_attention():
    """Trace attention with SDPA's own grouped-query support (`enable_gqa`): with a mask transformers
    otherwise copies every key-value head once per query head first (`repeat_kv`), which on the CPU
    costs a batch dearly (the built-in target's package, 8 rows x 2 tokens: 153 ms with the copies,
    120 ms without, BENCHMARKS.md session 9). SDPA's result is the same, bit for bit (tested)."""
    old = os.environ.get(GQA_ENV)
    os.environ[GQA_ENV] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ[GQA_ENV]
        else:
            os.environ[GQA_ENV] = old


def _remove_outdated(parent: Path) -> None:
    """Delete packages of an older format (gigabytes each, never loaded again); others stay."""
    for key_file in parent.glob("*/key.json"):
        try:
            outdated = json.loads(key_file.read_text()).get("format") != FORMAT
        except (OSError, ValueError, AttributeError):
            continue
        if outdated:
            shutil.rmtree(key_file.parent, ignore_errors=True)


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"ouroboros: {message}", file=sys.stderr, flush=True)
