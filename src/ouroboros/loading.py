"""Loading a target/draft pair from local paths (or the built-in default pair) and checking that
they share one tokenizer, so that token ids mean the same thing to both models."""

from __future__ import annotations

import os

import torch

from .errors import InvalidArgumentError

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise InvalidArgumentError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def check_same_tokenizer(target_tokenizer, draft_tokenizer) -> None:
    """Raise ValueError naming the first difference between the two tokenizers' vocabularies."""
    a, b = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    if a != b:
        only_a = sorted(set(a) - set(b))[:3]
        only_b = sorted(set(b) - set(a))[:3]
        moved = sorted(t for t in set(a) & set(b) if a[t] != b[t])[:3]
        raise InvalidArgumentError(
            f"the target and draft tokenizers differ (target {len(a)} tokens, draft {len(b)}; "
            f"only in target: {only_a}, only in draft: {only_b}, different ids: {moved}): "
            "speculative decoding needs one shared tokenizer")


def load_pair(target: str | os.PathLike | None = None, draft: str | os.PathLike | None = None, *,
              dtype: str | torch.dtype = "bfloat16", device: str = "cpu", progress: bool = True):
    """(target, draft, tokenizer) from two local model directories, or the built-in pair when both
    are None. Models are in eval mode with sdpa attention (needed for tree masks)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (target is None) != (draft is None):
        raise InvalidArgumentError("give both a target and a draft path, or neither to use the built-in default pair")
    if target is None:
        from .default_pair import default_pair_dirs

        target, draft = default_pair_dirs(progress=progress)
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    for name, path in (("target", target), ("draft", draft)):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{name} model directory not found: {os.fspath(path)!r}")
    tokenizer = AutoTokenizer.from_pretrained(target)
    check_same_tokenizer(tokenizer, AutoTokenizer.from_pretrained(draft))
    models = [AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
              for path in (target, draft)]
    return models[0], models[1], tokenizer
