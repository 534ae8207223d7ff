"""Facts about a model that generate, bench and server all need, each read in one place."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import InvalidArgumentError, UnsupportedModelError


def text_config(model):
    """The decoder's config (multimodal models nest it), where vocab size and context live; `model`
    may be a model or its config."""
    config = getattr(model, "config", model)
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


COST_CACHE_ENV = "OUROBOROS_COST_CACHE"


def cost_cache_dir() -> Path:
    """``$OUROBOROS_COST_CACHE`` if set, else ``costs/`` in the package's cache directory: what was
    measured of a model on this machine (its forward costs, whether it verifies draft trees)."""
    env = os.environ.get(COST_CACHE_ENV)
    if env:
        return Path(env).expanduser()
    from .default_pair import default_cache_dir

    return default_cache_dir() / "costs"


def identity_digest(model):
    """A sha256 of what a model is, before its weights: its class and config, less the folder it
    was loaded from (the same model elsewhere is the same model). Callers add what their key needs."""
    digest = hashlib.sha256(type(model).__name__.encode())
    config = model.config.to_dict()
    config.pop("_name_or_path", None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    return digest


def cache_argument(model) -> str:
    """The name under which `model.forward` takes its KV cache."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise UnsupportedModelError(f"{type(model).__name__}.forward takes no KV cache argument")


def vocab_size(model) -> int:
    return int(text_config(model).vocab_size)


def context_length(model) -> int | None:
    """The longest sequence the model (or config) was built for (prompt plus output), or None if unknown."""
    return getattr(text_config(model), "max_position_embeddings", None)


def eos_token_ids(model, override: int | Sequence[int] | torch.Tensor | None = None, tokenizer=None) -> list[int]:
    """The ids that end a generation, in order, without repeats.

    `override` (an id or a list; [] means none) wins; else the model's `generation_config` ids, plus
    the tokenizer's EOS when a tokenizer is given (chat models often end turns with a token that
    only one of the two names)."""
    ids = override
    if ids is None:
        ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            ids = _as_list(ids) + [tokenizer.eos_token_id]
    ids = _as_list(ids)
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise InvalidArgumentError(f"eos_token_id must be a non-negative int or a list of them, got {override!r}")
    return list(dict.fromkeys(ids))


def special_token_ids(model) -> list[int]:
    """The EOS, BOS and padding ids the model's config and generation config name, in range, sorted."""
    vocab = vocab_size(model)
    sources = (text_config(model), getattr(model, "generation_config", None))
    return sorted({int(i) for source in sources for name in ("eos_token_id", "bos_token_id", "pad_token_id")
                   for i in _as_list(getattr(source, name, None)) if 0 <= int(i) < vocab})


def _as_list(ids) -> list:
    if ids is None:
        return []
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return [ids] if isinstance(ids, int) else list(ids)


def kv_bytes_per_token(model) -> int:
    """Bytes one token's keys and values take in `model`'s KV cache: every layer, in its dtype."""
    config = text_config(model)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * next(model.parameters()).dtype.itemsize


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (Linux's MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
