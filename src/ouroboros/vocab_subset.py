"""The draft model's output layer over a subset of token ids (FR-Spec, arXiv 2502.14856).

Why: the output layer is 27% of the weights the built-in draft reads per forward (151,936 x 896), and
a draft forward reads every one of them to pick one likely token. Over a subset of the ids it reads
that much less (BENCHMARKS.md, session 11, has the measured draft costs).

Which ids: the first `size` ids of the vocabulary and the model's special ids (EOS, BOS, padding).
A BPE vocabulary numbers its tokens in merge order, so low ids are the frequent ones: no corpus is
needed and nothing is downloaded. Measured on the built-in pair's tokenizer, the ids below 65536
cover 98.5% of the tokens of HumanEval's prompts and 97% of Spec-Bench's questions (below 32768: 96%
and 92%, and the draft's accepted tokens per target forward fell by up to a quarter).

A needed id outside the subset: the draft model cannot propose it (its logit is -inf); the target
emits it with its own token of the step, and the context's and the phrase pool's continuations,
which are not limited to the subset, still draft it. The output stays exact whatever the draft
proposes: the target verifies every drafted token. The draft's logits only choose what to propose
(greedy), never enter the sampling arithmetic.

Where the runner computes the head itself (the eager runner, the compiled package) it multiplies by
the subset's rows only; where a compiled graph computes the full head (the in-process fallback and
CUDA), the logits outside the subset are masked, so every runner proposes the same tokens.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field

import torch

from .model_facts import special_token_ids, text_config, vocab_size

__all__ = ["DEFAULT_SIZE", "VocabSubset", "vocab_subset"]

DEFAULT_SIZE = 65536
"""Ids the draft's output layer keeps by default: on HumanEval 0-9 (the prompts it was chosen on)
`ouroboros` ran 1.06x faster than with the full layer, and 1.00x / 0.92x with 32768 / 16384 ids,
whose cheaper forwards lost more in acceptance; on other prompts the gain was within noise (1.015x on
HumanEval 0-19, 1.00x on new Spec-Bench questions; BENCHMARKS.md, session 11)."""

_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""model -> {subset key: (weight [S, hidden], bias [S] or None)}: the gathered rows, made once."""


@dataclass(frozen=True, eq=False)
class VocabSubset:
    """The ids a draft's output layer computes logits for, and the vocabulary they map back into."""

    ids: torch.Tensor
    """[S] sorted token ids (int64, on the model's device)."""
    vocab: int
    """The full vocabulary: every runner returns logits [..., vocab], -inf outside `ids`."""
    key: str = field(init=False)
    """Names the subset in the keys of cost tables and compiled packages (hashed once: `head` reads it
    on every draft forward)."""

    def __post_init__(self):
        digest = hashlib.sha256(self.ids.cpu().numpy().tobytes()).hexdigest()[:12]
        object.__setattr__(self, "key", f"{len(self.ids)} of {self.vocab} ids, {digest}")

    def head(self, model) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight [S, hidden], bias [S] or None): the output layer's rows for `ids`, gathered once."""
        heads = _HEADS.setdefault(model, {})
        if self.key not in heads:
            layer = model.get_output_embeddings()
            with torch.no_grad():
                weight = layer.weight.index_select(0, self.ids).contiguous()
                bias = None if layer.bias is None else layer.bias.index_select(0, self.ids)
            heads[self.key] = (weight, bias)
        return heads[self.key]

    def logits(self, model, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., hidden size] -> the subset's logits [..., S], in the model's dtype."""
        return torch.nn.functional.linear(hidden, *self.head(model))

    def expand(self, logits: torch.Tensor) -> torch.Tensor:
        """The subset's logits [..., S] -> [..., vocab] float32, -inf at every id outside it."""
        full = logits.new_full((*logits.shape[:-1], self.vocab), float("-inf"), dtype=torch.float32)
        return full.index_copy_(-1, self.ids.to(logits.device), logits.float())

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [..., vocab] (from a graph that computed every id) as this subset gives them."""
        return self.expand(logits.index_select(-1, self.ids.to(logits.device)))


def vocab_subset(model, size: int | None = DEFAULT_SIZE) -> VocabSubset | None:
    """The subset of `size` ids for `model`'s output layer, or None where the full layer stays: no
    size (0 or None), a vocabulary under twice the size (the saving would be small), or a head that is
    not a plain linear layer over the decoder's hidden states (logit scaling or soft-capping)."""
    if not size:
        return None
    vocab = vocab_size(model)
    layer = model.get_output_embeddings()
    if vocab < 2 * size or not isinstance(layer, torch.nn.Linear) or layer.weight.shape[0] != vocab:
        return None
    if getattr(text_config(model), "final_logit_softcapping", None) or hasattr(model, "logit_scale"):
        return None
    ids = sorted(set(range(size)) | set(special_token_ids(model)))
    return VocabSubset(torch.tensor(ids, dtype=torch.long, device=layer.weight.device), vocab)
