"""The model runner: one model, its own KV cache and the token ids in it, for one generation.

It feeds the pending tokens (known, not yet cached) plus a draft tree in one forward with explicit
positions and a 4-D mask, then keeps only the pending tokens and the accepted path in the cache.

Sliding-window layers (Gemma 2/3, Mistral, Qwen2 with use_sliding_window) keep every key in the cache,
as full layers do (a cache that drops keys past the window could not be rewound), and get their window
from the mask: one mask per layer type, each the tree mask cut to the window's band.
"""

from __future__ import annotations

import contextlib
import json
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .acceptance import StepResult, check_finite, greedy_verify
from .errors import InvalidArgumentError, UnsupportedModelError
from .files import write_json_atomically
from .model_facts import cache_argument, cost_cache_dir, identity_digest, text_config
from .tree import DraftTree
from .vocab_subset import VocabSubset

_TREE_ATTENTION_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

__all__ = ["ForwardLog", "ForwardRecord", "ModelAccess", "ModelRunner", "Runner", "UnsupportedModelError",
           "additive_mask", "attention_masks", "attention_windows", "check_tree_attention", "common_prefix",
           "decode_step", "move_accepted", "text_config", "tree_inputs"]

MASKED_LAYER_TYPES = ("full_attention", "sliding_attention")
"""Layer types whose attention the runners reproduce with a 4-D mask."""


@dataclass(frozen=True)
class ForwardRecord:
    """One forward of one model, for the forward log: what it cost and what it was asked to do."""

    model: str
    """Which model ran: "target" or "draft"."""
    fed: int
    """Tokens fed (pending tokens plus tree and window nodes)."""
    cached: int
    """Tokens already in the KV cache before it."""
    seconds: float
    """Wall time of the forward (on CUDA, up to the verification that reads its logits)."""
    started: float
    """`time.perf_counter()` when it began, to order the forwards of both models."""
    compiled: bool = False
    """It compiled a graph first (the fast path's first forward of a shape): `seconds` includes that."""


def check_tree_attention(model) -> None:
    """Fail early, naming the class, if `model` cannot verify a tree.

    Checked once per model object by running 3 tokens where the last one must not see the second:
    its logits must match running it alone, and differ from plain causal attention.
    """
    if model in _TREE_ATTENTION_OK:
        return
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name} is not a decoder-only causal LM")
    impl = getattr(config, "_attn_implementation", None)
    if impl not in (None, "eager", "sdpa"):
        raise UnsupportedModelError(
            f"{name} uses attn_implementation={impl!r}, which ignores a custom 4-D mask; "
            "load it with attn_implementation='sdpa' or 'eager'")
    attention_windows(model)
    known = _verdict_key(model)
    if known in _read_verdicts():  # the same class, config and versions passed before on this machine
        _TREE_ATTENTION_OK[model] = True
        return
    vocab = int(text_config(model).vocab_size)
    a, b, c = 1 % vocab, 2 % vocab, 3 % vocab
    try:
        with torch.inference_mode():
            tree_mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
            masked = _probe(model, [a, b, c], [0, 1, 1], tree_mask)[2]
            causal = _probe(model, [a, b, c], [0, 1, 2], torch.ones(3, 3, dtype=torch.bool).tril())[2]
            alone = _probe(model, [a, c], [0, 1], torch.ones(2, 2, dtype=torch.bool).tril())[1]
    except UnsupportedModelError:
        raise
    except Exception as exc:  # the model rejected the arguments: say which model and why
        raise UnsupportedModelError(
            f"{name} cannot run with position_ids, a custom 4-D attention mask and a DynamicCache: {exc}") from exc
    for logits in (masked, causal, alone):
        check_finite(logits)
    if not (masked - alone).abs().max() < (masked - causal).abs().max():
        raise UnsupportedModelError(f"{name} ignores a custom 4-D attention mask, so it cannot verify draft trees")
    _TREE_ATTENTION_OK[model] = True
    with contextlib.suppress(OSError):  # a read-only cache folder only means probing again next time
        cost_cache_dir().mkdir(parents=True, exist_ok=True)
        write_json_atomically(cost_cache_dir() / VERDICTS, sorted(_read_verdicts() | {known}))


VERDICTS = "tree-attention.json"
"""Models (class, config, library versions) that passed the tree-attention probe on this machine:
the probe runs three forwards of the whole model, which would read every weight of a model whose
forwards otherwise all run through its compiled package (`aot`)."""


def _verdict_key(model) -> str:
    import transformers

    digest = identity_digest(model)
    digest.update(f"{getattr(model.config, '_attn_implementation', None)} {transformers.__version__} "
                  f"{torch.__version__}".encode())
    return digest.hexdigest()[:24]


def _read_verdicts() -> set[str]:
    try:
        return set(json.loads((cost_cache_dir() / VERDICTS).read_text()))
    except (OSError, ValueError, TypeError):
        return set()


def _probe(model, tokens, positions, allowed) -> torch.Tensor:
    runner = ModelRunner(model)
    pos = torch.tensor(positions)
    mask = attention_masks(runner.windows, allowed, pos, 0, runner.dtype, runner.device)
    ids = torch.tensor([tokens], device=runner.device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos[None].to(runner.device), use_cache=True,
                **{runner.cache_argument: runner.cache})
    return out.logits[0].float()


def attention_windows(model) -> dict[str | None, int | None]:
    """Each attention layer type's sliding window (None: full attention), read from the config as
    transformers' own masks read it: `layer_types` names each layer's type, else `sliding_window`
    applies to every layer (Mistral, Phi-3). The key None stands for every layer.

    Raises UnsupportedModelError, naming it, for attention a 4-D mask cannot reproduce here."""
    name = type(model).__name__
    config = text_config(model)
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModelError(f"{name} uses bidirectional attention: it is not a causal LM")
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        other = sorted(set(types) - set(MASKED_LAYER_TYPES))
        if other:
            raise UnsupportedModelError(f"{name} has {', '.join(other)} layers; tree verification supports only "
                                        f"{' and '.join(MASKED_LAYER_TYPES)} layers")
        return {kind: window if kind == "sliding_attention" else None for kind in dict.fromkeys(types)}
    if getattr(config, "attention_chunk_size", None) is not None:
        raise UnsupportedModelError(f"{name} uses chunked attention, which tree verification does not support")
    return {None: window}


def decode_step(runner: Runner, tokens: Sequence[int], tree: DraftTree, verify=greedy_verify) -> StepResult:
    """One forward of `runner` over its pending tokens and `tree`, verified, cache compacted."""
    pending = runner.rewind(tokens)
    logits = runner.forward(pending, tree)
    result = verify(tree, logits)
    runner.keep(result.path)
    return result


class ForwardLog(Sequence):
    """The forwards one runner ran, a `ForwardRecord` each, in order. On CPU a forward is recorded
    when its logits are back; on CUDA (asynchronous) it stays open until `close`, which the runner
    calls after the verification has read the logits."""

    def __init__(self, role: str, device: torch.device):
        self.role = role
        self.records: list[ForwardRecord] = []
        self._deferred = device.type == "cuda"
        self._open: tuple[float, int, int, bool] | None = None

    def __getitem__(self, index):
        return self.records[index]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def forwards(self) -> int:
        """Forwards run, the open one included."""
        return len(self.records) + (self._open is not None)

    def record(self, start: float, fed: int, cached: int, compiled: bool = False) -> None:
        """A forward that began at `start` (perf_counter) fed `fed` tokens after `cached`."""
        self._open = (start, fed, cached, compiled)
        if not self._deferred:
            self.close()

    def close(self) -> None:
        """Time the open forward up to now and keep its record."""
        if self._open is not None:
            start, fed, cached, compiled = self._open
            self.records.append(ForwardRecord(self.role, fed, cached, time.perf_counter() - start, start, compiled))
            self._open = None


class ModelAccess:
    """What every runner has: its model, the facts a forward needs about it (device, dtype, KV cache
    argument, attention windows), its forward log and the seconds it spent compiling."""

    def __init__(self, model, role: str, subset: VocabSubset | None = None):
        self.model = model
        self.role = role
        self.subset = subset
        """The draft's output layer over a subset of ids (`vocab_subset`), or None: the full layer."""
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.cache_argument = cache_argument(model)
        self.windows = attention_windows(model)
        self.log = ForwardLog(role, self.device)
        self.compile_seconds = 0.0
        """Seconds of the forwards that compiled a graph first (the compile and that forward)."""

    @property
    def forwards(self) -> int:
        return self.log.forwards


class Runner(ModelAccess):
    """The single-stream runner interface: one sequence's KV cache and the token ids in it.

    `forward(pending, tree)` feeds the pending tokens (known, not yet cached) and a draft tree in one
    forward; `keep(path)` keeps the pending tokens and the accepted nodes; `rewind(sequence)` drops
    what the next sequence does not share. `ModelRunner` (a DynamicCache) and
    `static_runner.StaticRunner` (static buffers, compiled) implement it."""

    def __init__(self, model, role: str = "target", subset: VocabSubset | None = None):
        super().__init__(model, role, subset)
        self.tokens: list[int] = []
        """Token ids whose keys and values are in the cache, in order."""
        self._last: tuple[int, list[int]] | None = None
        """(pending count, fed tokens) of the forward not kept yet."""

    def forward(self, pending: Sequence[int], tree: DraftTree) -> torch.Tensor:
        """Run pending tokens then the tree; returns logits [1 + tree.total, vocab] (float32) for
        the last pending token (the root) and every tree node, in tree order."""
        raise NotImplementedError

    def keep(self, path: Sequence[int]) -> None:
        """After `forward`: keep the pending tokens and the accepted tree nodes `path`, drop the rest."""
        p, fed = self._last
        self.log.close()
        path = list(path)
        move_accepted(self.cache, len(self.tokens) + p, path)
        self.tokens += fed[:p] + [fed[p + i] for i in path]
        self._truncate(len(self.tokens))
        self._last = None

    def rewind(self, sequence: Sequence[int]) -> list[int]:
        """Drop cached tokens after the longest prefix shared with `sequence`, short of its last
        token (the root, whose logits the next forward needs, even when a draft ran ahead); return
        the pending rest."""
        common = reusable_prefix(self.tokens, sequence)
        if common < len(self.tokens):
            del self.tokens[common:]
            self._truncate(common)
        return list(sequence[common:])

    def _truncate(self, length: int) -> None:
        """Free the cache past `length` slots, where the cache is one that can shrink."""


class ModelRunner(Runner):
    """Runs one model over pending tokens plus a draft tree with a `DynamicCache` (the reference
    runner, and the one for models that cannot use the static-cache fast path)."""

    def __init__(self, model, role: str = "target", subset: VocabSubset | None = None):
        super().__init__(model, role, subset)
        self.cache = DynamicCache()
        """Full layers only (no config): sliding layers' keys stay too, the mask applies the window."""

    def forward(self, pending: Sequence[int], tree: DraftTree) -> torch.Tensor:
        past, p = len(self.tokens), len(pending)
        fed, positions, allowed = tree_inputs(pending, tree, past)
        ids = torch.tensor([fed], device=self.device)
        start = time.perf_counter()
        inputs = dict(input_ids=ids,
                      attention_mask=attention_masks(self.windows, allowed, positions, past, self.dtype, self.device),
                      position_ids=positions[None].to(self.device), use_cache=True,
                      **{self.cache_argument: self.cache})
        if self.subset is None:
            logits = self.model(**inputs, logits_to_keep=tree.total + 1).logits[0].float()
        else:  # the decoder, then the output layer's rows for the subset only
            hidden = self.model.get_decoder()(**inputs).last_hidden_state[0, -(tree.total + 1):]
            logits = self.subset.expand(self.subset.logits(self.model, hidden))
        self._last = (p, fed)
        self.log.record(start, len(fed), past)
        return logits

    def _truncate(self, length: int) -> None:
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.shape[-2] > length:
                layer.keys = layer.keys[..., :length, :]
                layer.values = layer.values[..., :length, :]


def tree_inputs(pending: Sequence[int], tree: DraftTree, past: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(token ids, absolute positions [q], visibility [q, q]) for pending tokens followed by `tree`:
    pending tokens are causal among themselves; every node sees them all and its own ancestors."""
    if not pending:
        raise InvalidArgumentError("a forward needs at least one pending token (the root)")
    p = len(pending)
    node_tokens, rel_positions, tree_mask = tree.layout()
    q = p + len(node_tokens)
    allowed = torch.zeros(q, q, dtype=torch.bool)
    allowed[:p, :p] = torch.ones(p, p, dtype=torch.bool).tril()
    allowed[p:, :p] = True
    allowed[p:, p:] = tree_mask
    positions = torch.cat([torch.arange(past, past + p), rel_positions + (past + p - 1)])
    return list(pending) + node_tokens, positions, allowed


def additive_mask(allowed: torch.Tensor, past: int, dtype: torch.dtype, device, width: int | None = None,
                  positions: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """[1, 1, q, width] mask in `dtype`: the `past` cached slots are visible, the next q slots as
    `allowed` [q, q] says, and any slot after them (a static cache's unused or stale slots) is
    hidden. Hidden is dtype-min, not -inf, so that a row seeing nothing still gives finite values.

    With a sliding `window`, a query at position p sees only keys at positions > p - window (as
    transformers' sliding masks): `positions` [q] are the fed tokens', a cached slot's is its index."""
    q = allowed.shape[0]
    width = past + q if width is None else width
    visible = torch.zeros(q, width, dtype=torch.bool)
    visible[:, :past] = True
    visible[:, past:past + q] = allowed
    if window is not None:
        keys = torch.cat([torch.arange(past), positions, positions.new_zeros(width - past - q)])
        visible &= keys[None, :] > positions[:, None] - window
    mask = torch.zeros(q, width, dtype=dtype, device=device)
    mask.masked_fill_(~visible.to(device), torch.finfo(dtype).min)
    return mask[None, None]


def attention_masks(windows: dict[str | None, int | None], allowed: torch.Tensor, positions: torch.Tensor, past: int,
                    dtype: torch.dtype, device, width: int | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
    """The forward's `attention_mask` for layer types with `windows` (see `attention_windows`): one
    `additive_mask` when every layer sees the same, else a dict keyed by layer type, which
    transformers' hybrid models (Gemma 2/3) take in place of the masks they would build."""
    masks = {window: additive_mask(allowed, past, dtype, device, width, positions, window)
             for window in set(windows.values())}
    if len(masks) == 1:
        return next(iter(masks.values()))
    return {kind: masks[window] for kind, window in windows.items()}


def move_accepted(cache, base: int, path: Sequence[int]) -> None:
    """Copy the keys and values of accepted tree nodes `path` (fed from slot `base` on) to the
    slots right after `base`, in path order; nothing moves when they are already there."""
    path = list(path)
    if path == list(range(len(path))):
        return
    for layer in cache.layers:
        index = torch.tensor(path, device=layer.keys.device) + base
        layer.keys[..., base:base + len(path), :] = layer.keys[..., index, :]
        layer.values[..., base:base + len(path), :] = layer.values[..., index, :]


def reusable_prefix(cached: list[int], sequence: Sequence[int]) -> int:
    """How many cached tokens a forward for `sequence` keeps: the common prefix, short of the
    sequence's last token (the root, whose logits the next forward needs, even when a draft ran
    ahead of the sequence)."""
    return min(common_prefix(cached, sequence), len(sequence) - 1)


def common_prefix(a: list[int], b: Sequence[int]) -> int:
    """Length of the common prefix, by bisection over C-level slice comparisons."""
    b = list(b[:len(a)])
    if a[:len(b)] == b:
        return len(b)
    lo, hi = 0, len(b)  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo
