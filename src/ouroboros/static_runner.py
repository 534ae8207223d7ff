"""The fast path: a runner with a static KV cache whose forwards can be compiled.

`StaticRunner` has `ModelRunner`'s interface. Its keys and values live in transformers'
`StaticCache` buffers, written by position: rewinding sets a length (slots past it are masked out
and overwritten later), keeping the accepted path is an index copy inside the buffers. Each
forward is padded to one of a few shape buckets; forwards larger than the largest bucket (long
prompts) run eagerly on the same cache.

Compiled on CUDA: one graph per (bucket, capacity), replayed as CUDA graphs. Compiled on CPU:
inductor's freezing, which prepacks the weights for oneDNN (what makes it beat eager there), but
each graph holds its own packed copy of the weights (measured: +1 GB per graph for the 0.5B draft
in bf16). So on CPU one graph per capacity serves every bucket from 2 to the largest (the new-token
dimension is dynamic; a single token is padded to 2, which the eager table shows is no slower).

Buffers are pooled per model and reused across generations: under freezing a compiled graph holds
its cache buffers as attributes, so a graph is only valid for the buffers it was traced with (the
buffers are marked static with an identity guard, so other buffers get their own graph).
"""

from __future__ import annotations

import copy
import logging
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Sequence

import torch
from transformers import StaticCache

from .aot import MAX_TOKENS as AOT_MAX_TOKENS
from .aot import MIN_TOKENS as AOT_MIN_TOKENS
from .aot import aot_blocker, aot_forward, build_memory_shortfall, stored_cache_layout
from .errors import UnsupportedModelError
from .model_facts import cache_argument, text_config
from .runner import ModelRunner, Runner, attention_masks, attention_windows, tree_inputs
from .tree import DraftTree
from .vocab_subset import VocabSubset

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32)
"""New-token counts a forward is padded to; each one is a compiled graph per model and capacity."""
MIN_CAPACITY = 1024
"""Smallest cache: capacities are powers of two from here, each one a compiled graph (on CPU one
more packed copy of the weights), so most generations fit the first one."""
RECOMPILE_LIMIT = 256
"""Graphs per model class: buckets x capacities x models sharing one class (target and draft)."""

_LOCK = threading.Lock()
_FREE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""model -> {capacity: [idle StaticCache]}: buffers outlive a generation so graphs stay valid."""
_COMPILED: dict[tuple[type, str], object] = {}
"""(model class, device type) -> compiled forward (the unbound function: holds no model)."""
_BROKEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""model -> why compiling it failed: it then runs eagerly on the static cache."""
_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""model -> {(bucket or None, capacity, cache id)} already compiled, to say when a call will compile."""


class StaticRunner(Runner):
    """A `Runner` on a static KV cache, padded to shape buckets; compiled when `compile`."""

    def __init__(self, model, *, compile: bool = False, buckets: Sequence[int] = BUCKETS,
                 min_capacity: int = MIN_CAPACITY, progress: bool = True, role: str = "target",
                 subset: VocabSubset | None = None):
        check_static_support(model)
        super().__init__(model, role, subset)
        self.compile = compile
        self.dynamic = compile and self.device.type == "cpu"
        """One graph for all buckets (dynamic new-token count, at least 2): one packed weight copy."""
        self.buckets = tuple(sorted(b for b in buckets if b >= 2 or not self.dynamic)) or (2,)
        self.min_capacity = min_capacity
        self.progress = progress
        self.cache: StaticCache | None = None
        self.capacity = 0
        self._release = None
        self._compiled_now = False
        self._aot = None
        """The model's package (`aot.AotForward`), once loaded or built."""
        self._aot_wanted = compile and aot_blocker(model) is None
        """Whether to look for one: compiled, on the CPU, one mask for every layer."""

    def forward(self, pending: Sequence[int], tree: DraftTree) -> torch.Tensor:
        past, p = len(self.tokens), len(pending)
        fed, positions, allowed = tree_inputs(pending, tree, past)
        q = len(fed)
        start = time.perf_counter()
        self._reserve(past + max(q, AOT_MIN_TOKENS))
        package = self._package()
        if package is not None and q <= AOT_MAX_TOKENS:  # one graph for any size: padded only to its minimum
            bucket = max(q, AOT_MIN_TOKENS)
        else:
            bucket = next((b for b in self.buckets if b >= q), None)
        size = bucket or q
        self._reserve(past + size)
        ids = torch.tensor(fed, device=self.device)
        if size > q:  # padding: token 0 at the last position, seeing only itself; its slot is stale
            pad = size - q
            ids = torch.cat([ids, ids.new_zeros(pad)])
            positions = torch.cat([positions, positions[-1:].expand(pad)])
            allowed = torch.block_diag(allowed, torch.eye(pad, dtype=torch.bool))
        for layer in self.cache.layers:  # the model writes its new keys and values from here
            layer.cumulative_length.fill_(past)
        inputs = dict(input_ids=ids[None], attention_mask=attention_masks(self.windows, allowed, positions, past,
                                                                          self.dtype, self.device, width=self.capacity),
                      position_ids=positions[None].to(self.device), use_cache=True,
                      **{self.cache_argument: self.cache})
        if bucket is None:  # a long eager forward (a prompt): no logits for the pending tokens before the root
            inputs["logits_to_keep"] = q - p + 1
        if package is not None and bucket is not None:
            logits = package(inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"], past,
                             [layer.keys for layer in self.cache.layers], [layer.values for layer in self.cache.layers],
                             torch.arange(p - 1, q))[0]
        else:
            rows = self._run(bucket, inputs).logits[0]
            logits = rows if bucket is None else rows[p - 1:q]
            if self.subset is not None:  # a graph of the full output layer: the same proposals as the package's
                logits = self.subset.mask(logits)
        self._last = (p, fed)
        # CUDA graphs reuse their output buffers: copy out (in float32 that is not otherwise a copy)
        logits = logits.to(torch.float32, copy=self._compiled() and self.device.type == "cuda")
        self.log.record(start, q, past, compiled=self._compiled_now)
        if self._compiled_now:
            self.compile_seconds += time.perf_counter() - start
            self._compiled_now = False
        return logits

    def _compiled(self) -> bool:
        return self.compile and self.model not in _BROKEN

    def _package(self):
        """The model's AOTInductor package (`aot.AotForward`) when this runner compiles on the CPU,
        else None. A built one is loaded at once, the cache laid out as it was traced; to build one,
        the first forward runs eagerly to lay the cache out. Loading or building counts as this
        forward's compiling; a model with none stops looking."""
        if self._aot is None and self._aot_wanted and self.model not in _BROKEN:
            if not _initialized(self.cache):
                layout = stored_cache_layout(self.model, self.subset)
                if layout is None:  # not built yet: the first forward runs eagerly and lays the cache out
                    return None
                self.cache.early_initialization(1, *layout, self.dtype, self.device)
                _guard_buffers(self.cache)
            self._aot, seconds = aot_forward(self.model, [layer.keys for layer in self.cache.layers],
                                             [layer.values for layer in self.cache.layers], self.cache_argument,
                                             self.progress, self.subset)
            self._aot_wanted = self._aot is not None
            self._compiled_now = self._compiled_now or seconds > 0
        return self._aot

    def _run(self, bucket: int | None, inputs: dict):
        initialized = _initialized(self.cache)
        if bucket is None or not initialized or not self._compiled():
            out = self.model(**inputs)
            if not initialized:
                _guard_buffers(self.cache)
            return out
        key = (None if self.dynamic else bucket, self.capacity, id(self.cache))
        seen = _GRAPHS.setdefault(self.model, set())
        start = time.perf_counter()
        if key not in seen and self.progress:
            tokens = f"{self.buckets[0]}-{self.buckets[-1]}" if self.dynamic else f"{bucket}"
            print(f"ouroboros: compiling {type(self.model).__name__} for {tokens} new tokens, "
                  f"cache {self.capacity} ...", file=sys.stderr, end="", flush=True)
        try:
            out = _call_compiled(self.model, self.device.type, inputs,
                                 (self.buckets[0], self.buckets[-1]) if self.dynamic else None)
        except Exception as exc:  # any compiler failure: say why, run eagerly
            if key not in seen and self.progress:
                print(" failed", file=sys.stderr, flush=True)
            _BROKEN[self.model] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            warnings.warn(f"torch.compile failed for {type(self.model).__name__} ({_BROKEN[self.model]}); "
                          "running it eagerly on the static cache", stacklevel=3)
            for layer in self.cache.layers:
                layer.cumulative_length.fill_(len(self.tokens))
            return self.model(**inputs)
        if key not in seen:
            seen.add(key)
            self._compiled_now = True
            if self.progress:
                print(f" {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        return out

    def _reserve(self, needed: int) -> None:
        """Make room for `needed` slots: a bigger pooled cache, the cached keys and values copied in."""
        if needed <= self.capacity:
            return
        capacity = capacity_for(needed, self.min_capacity)
        old, old_release = self.cache, self._release
        self.cache = _acquire(self.model, capacity)
        self.capacity = capacity
        self._release = weakref.finalize(self, _give_back, self.model, capacity, self.cache)
        if old is not None:
            first = old.layers[0]
            if getattr(first, "is_initialized", False):
                if not getattr(self.cache.layers[0], "is_initialized", False):
                    self.cache.early_initialization(first.keys.shape[0], [layer.keys.shape[1] for layer in old.layers],
                                                    [layer.keys.shape[-1] for layer in old.layers],
                                                    first.keys.dtype, first.keys.device)
                    _guard_buffers(self.cache)
                length = len(self.tokens)
                for new, layer in zip(self.cache.layers, old.layers):
                    new.keys[..., :length, :] = layer.keys[..., :length, :]
                    new.values[..., :length, :] = layer.values[..., :length, :]
            old_release()


def check_static_support(model) -> None:
    """Raise UnsupportedModelError, saying why, if `model` cannot run on a static cache."""
    name = type(model).__name__
    config = text_config(model)
    try:
        cache = StaticCache(config=cache_config(model), max_cache_len=1)
    except Exception as exc:  # the config has no static cache layout
        raise UnsupportedModelError(f"{name} has no static KV cache layout: {exc}") from exc
    if any(type(layer).__name__ != "StaticLayer" for layer in cache.layers):
        raise UnsupportedModelError(f"{name} needs cache layers other than full attention ({config.model_type})")
    cache_argument(model)


def cache_config(model):
    """The config the static cache is laid out from: sliding-window layers as full ones, since a static
    sliding layer keeps only the last `window` keys in a ring, which rewinding cannot crop (the mask
    applies the window, as on the eager runner)."""
    if all(window is None for window in attention_windows(model).values()):
        return model.config
    config = copy.copy(text_config(model))
    config.layer_types = ["full_attention"] * config.num_hidden_layers
    config.sliding_window = None
    return config


def compile_blocker(model) -> str | None:
    """Why `model` cannot be compiled here, or None."""
    name = type(model).__name__
    if not getattr(model, "_can_compile_fullgraph", False):
        return f"transformers does not mark {name} as compilable (_can_compile_fullgraph)"
    if model in _BROKEN:
        return f"compiling {name} failed earlier ({_BROKEN[model]})"
    device = next(model.parameters()).device
    if device.type not in ("cpu", "cuda"):
        return f"no compiled fast path on {device.type}"
    return None


def compile_not_worth(model) -> str | None:
    """Why compiling `model` is not expected to pay on this device, or None (then `fast=None` compiles)."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    if device.type == "cuda":
        return None
    if dtype not in (torch.bfloat16, torch.float16):
        return f"{type(model).__name__} is {dtype}: on CPU compiling pays for bf16/fp16 weights (oneDNN prepacking)"
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith("AVX512") and "AMX" not in capability:
        return f"this CPU ({capability}) has no AVX-512: compiled forwards were not measured faster here"
    if aot_blocker(model) is None and stored_cache_layout(model) is None:  # its package would be built now
        shortfall = build_memory_shortfall(model)
        if shortfall:  # said, not only logged: the user gets the slower runner and should know why
            warnings.warn(f"{type(model).__name__} runs eagerly: {shortfall}", stacklevel=3)
        return shortfall
    return None


def capacity_for(slots: int, min_capacity: int = MIN_CAPACITY) -> int:
    """The cache that holds `slots` tokens: a power of two from `min_capacity`."""
    capacity = min_capacity
    while capacity < slots:
        capacity *= 2
    return capacity


def capacities(prompt_tokens: int, max_new_tokens: int, min_capacity: int = MIN_CAPACITY) -> set[int]:
    """Every cache capacity a generation may pass through (each is one compiled graph per model):
    from the prompt's to the one that holds the whole answer plus the largest bucket's padding."""
    low = capacity_for(prompt_tokens, min_capacity)
    high = capacity_for(prompt_tokens + max_new_tokens + BUCKETS[-1], min_capacity)
    return {low << i for i in range((high // low).bit_length())}


def fast_path_blocker(model, fast: bool | None) -> str | None:
    """Why `generate(fast=fast)` runs `model` eagerly, or None when it compiles it (if it can)."""
    if fast is False:
        return "the eager runner was asked for"
    return compile_blocker(model) or (None if fast else compile_not_worth(model))


def runs_compiled(model, fast: bool | None = None) -> bool:
    """Whether `generate(fast=fast)` runs `model` on the compiled fast path: True asks for it (and
    says why not where it cannot work), None takes it where it pays on this device (logging why not)."""
    if fast is False:
        return False
    reason = fast_path_blocker(model, fast)
    if reason is None:
        try:
            check_static_support(model)
            return True
        except UnsupportedModelError as exc:
            reason = str(exc)
    if fast:
        warnings.warn(f"fast path off, using the eager runner: {reason}", stacklevel=3)
    else:
        logger.info("fast path off, using the eager runner: %s", reason)
    return False


def make_runner(model, *, fast: bool | None = None, role: str = "target", subset: VocabSubset | None = None):
    """The runner for `model` (its output layer over `subset`): a compiled `StaticRunner` where
    `runs_compiled(model, fast)`, else `ModelRunner`."""
    if runs_compiled(model, fast):
        return StaticRunner(model, compile=True, role=role, subset=subset)
    return ModelRunner(model, role=role, subset=subset)


def runner_kind(runner) -> str:
    """"compiled" or "eager": what a cost table measured with `runner` describes."""
    return "compiled" if isinstance(runner, StaticRunner) and runner.compile else "eager"


def _call_compiled(model, device_type: str, inputs: dict, dynamic: tuple[int, int] | None = None):
    """The model's forward through torch.compile: freezing (weights prepacked as constants) on CPU,
    CUDA graphs on GPU; with `dynamic` (min, max), one graph for every new-token count in that range.
    Inductor keeps compiled graphs on disk (its FX graph cache, under TORCHINDUCTOR_CACHE_DIR, default
    /tmp/torchinductor_$USER), so a later process compiles faster."""
    key = (type(model), device_type)
    with _LOCK:
        if key not in _COMPILED:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
            mode = "reduce-overhead" if device_type == "cuda" else None
            _COMPILED[key] = torch.compile(type(model).forward, dynamic=False, mode=mode)
    if dynamic is not None:
        low, high = dynamic
        masks = inputs["attention_mask"]  # one mask, or one per layer type
        for tensor, dim in ((inputs["input_ids"], 1), (inputs["position_ids"], 1),
                            *((mask, 2) for mask in (masks.values() if isinstance(masks, dict) else [masks]))):
            torch._dynamo.mark_dynamic(tensor, dim, min=low, max=high)
    if device_type == "cuda":
        return _COMPILED[key](model, **inputs)
    with torch._inductor.config.patch(freezing=True):
        return _COMPILED[key](model, **inputs)


def _initialized(cache: StaticCache) -> bool:
    """Whether the cache's buffers exist (a static cache allocates them on its first update)."""
    return all(getattr(layer, "is_initialized", False) for layer in cache.layers)


def _guard_buffers(cache: StaticCache) -> None:
    """Mark the buffers static with an identity guard: a graph traced on them is not reused on others."""
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values, layer.cumulative_length):
            torch._dynamo.mark_static_address(tensor, guard=True)


def _acquire(model, capacity: int) -> StaticCache:
    with _LOCK:
        free = _FREE.setdefault(model, {}).get(capacity)
        if free:
            return free.pop()
    return StaticCache(config=cache_config(model), max_cache_len=capacity)


def _give_back(model, capacity: int, cache: StaticCache) -> None:
    with _LOCK:
        _FREE.setdefault(model, {}).setdefault(capacity, []).append(cache)
