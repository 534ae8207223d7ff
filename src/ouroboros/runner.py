"""The model runner: one model, its own KV cache and the token ids in it, for one generation.

It feeds the pending tokens (known, not yet cached) plus a draft tree in one forward with explicit
positions and a 4-D mask, then keeps only the pending tokens and the accepted path in the cache.
"""

from __future__ import annotations

import inspect
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .acceptance import StepResult, check_finite, greedy_verify
from .errors import InvalidArgumentError, UnsupportedModelError
from .model_facts import text_config
from .tree import DraftTree

_TREE_ATTENTION_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

__all__ = ["ForwardRecord", "ModelRunner", "UnsupportedModelError", "check_tree_attention", "decode_step",
           "text_config"]


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


def _cache_argument(model) -> str:
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise UnsupportedModelError(f"{type(model).__name__}.forward takes no KV cache argument")


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
    decoder = text_config(model)
    if "sliding_attention" in (getattr(decoder, "layer_types", None) or ()) or getattr(
            decoder, "use_sliding_window", False):
        raise UnsupportedModelError(f"{name} uses sliding-window attention, which tree verification does not support")
    vocab = int(decoder.vocab_size)
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


def _probe(model, tokens, positions, allowed) -> torch.Tensor:
    runner = ModelRunner(model)
    mask = runner._additive_mask(allowed, 0)
    ids = torch.tensor([tokens], device=runner.device)
    pos = torch.tensor([positions], device=runner.device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                **{runner.cache_argument: runner.cache})
    return out.logits[0].float()


def decode_step(runner: ModelRunner, tokens: Sequence[int], tree: DraftTree, verify=greedy_verify) -> StepResult:
    """One forward of `runner` over its pending tokens and `tree`, verified, cache compacted."""
    pending = runner.rewind(tokens)
    logits = runner.forward(pending, tree)
    result = verify(tree, logits)
    runner.keep(result.path)
    return result


class ModelRunner:
    """Runs one model over pending tokens plus a draft tree with a `DynamicCache`; keeps a log of
    its forwards (`log`) so that their costs can be studied and replayed."""

    def __init__(self, model, role: str = "target"):
        self.model = model
        self.role = role
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.cache_argument = _cache_argument(model)
        self.cache = DynamicCache()
        self.tokens: list[int] = []
        """Token ids whose keys and values are in the cache, in order."""
        self.log: list[ForwardRecord] = []
        self._last: tuple[int, list[int]] | None = None
        self._started: tuple[float, int, int] | None = None  # CUDA: the forward timed until `keep`

    @property
    def forwards(self) -> int:
        return len(self.log) + (self._started is not None)

    def forward(self, pending: Sequence[int], tree: DraftTree) -> torch.Tensor:
        """Run pending tokens then the tree; returns logits [1 + tree.total, vocab] (float32) for
        the last pending token (the root) and every tree node, in tree order."""
        if not pending:
            raise InvalidArgumentError("a forward needs at least one pending token (the root)")
        past, p = len(self.tokens), len(pending)
        node_tokens, rel_positions, tree_mask = tree.layout()
        q = p + len(node_tokens)
        allowed = torch.zeros(q, q, dtype=torch.bool)
        allowed[:p, :p] = torch.ones(p, p, dtype=torch.bool).tril()
        allowed[p:, :p] = True
        allowed[p:, p:] = tree_mask
        positions = torch.cat([torch.arange(past, past + p), rel_positions + (past + p - 1)])
        ids = torch.tensor([list(pending) + node_tokens], device=self.device)
        start = time.perf_counter()
        out = self.model(
            input_ids=ids,
            attention_mask=self._additive_mask(allowed, past),
            position_ids=positions[None].to(self.device),
            use_cache=True,
            logits_to_keep=len(node_tokens) + 1,
            **{self.cache_argument: self.cache},
        )
        self._last = (p, list(pending) + node_tokens)
        logits = out.logits[0].float()
        if self.device.type == "cuda":  # asynchronous: the verification's read of the logits ends it
            self._started = (start, q, past)
        else:
            self.log.append(ForwardRecord(self.role, q, past, time.perf_counter() - start, start))
        return logits

    def _additive_mask(self, allowed: torch.Tensor, past: int) -> torch.Tensor:
        """[1, 1, q, past + q] mask in the model's dtype: 0 where visible, dtype-min elsewhere."""
        q = allowed.shape[0]
        mask = torch.zeros(q, past + q, dtype=self.dtype, device=self.device)
        mask[:, past:].masked_fill_(~allowed.to(self.device), torch.finfo(self.dtype).min)
        return mask[None, None]

    def keep(self, path: Sequence[int]) -> None:
        """After `forward`: keep the pending tokens and the accepted tree nodes `path`, drop the rest."""
        p, fed = self._last
        if self._started is not None:
            start, q, past = self._started
            self.log.append(ForwardRecord(self.role, q, past, time.perf_counter() - start, start))
            self._started = None
        base = len(self.tokens) + p
        path = list(path)
        if path != list(range(len(path))):  # accepted nodes are not already in place: move them
            index = torch.tensor(path, device=self.device) + base
            for layer in self.cache.layers:
                layer.keys[..., base:base + len(path), :] = layer.keys[..., index, :]
                layer.values[..., base:base + len(path), :] = layer.values[..., index, :]
        self.tokens += fed[:p] + [fed[p + i] for i in path]
        self._truncate(len(self.tokens))
        self._last = None

    def rewind(self, sequence: Sequence[int]) -> list[int]:
        """Crop the cache to its longest prefix shared with `sequence`, short of its last token (the
        root, whose logits the next forward needs, even when a draft ran ahead); return the rest."""
        common = min(_common_prefix(self.tokens, sequence), len(sequence) - 1)
        if common < len(self.tokens):
            del self.tokens[common:]
            self._truncate(common)
        return list(sequence[common:])

    def _truncate(self, length: int) -> None:
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.shape[-2] > length:
                layer.keys = layer.keys[..., :length, :]
                layer.values = layer.values[..., :length, :]


def _common_prefix(a: list[int], b: Sequence[int]) -> int:
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
