"""How much KV cache the server's running requests may reserve together (`--kv-memory`), and what a
set of requests reserves."""

from __future__ import annotations

import torch

from ..model_facts import available_memory

KV_SLACK = 256
"""Slots a row may take past its prompt and max_tokens: its widest step's draft tree and the batch
runner's buffer growth step (`batch_runner.CAPACITY_STEP`)."""
KV_SHARE = 0.5
"""The default `--kv-memory`: this share of the memory still available once the models are loaded."""
GIB = 1024 ** 3


def default_kv_memory(model) -> int:
    """`KV_SHARE` of the memory the model's device still has (CUDA's free memory; MemAvailable on a
    CPU), or 4 GiB where that is unknown."""
    device = next(model.parameters()).device
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_memory()
    return int(KV_SHARE * free) if free else 4 * GIB


def reserved(requests: list[tuple[int, int]], bytes_per_token: int) -> int:
    """Bytes of keys and values that requests of (prompt tokens, max_tokens) reserve decoded together:
    every row as long as the longest one's prompt, max_tokens and `KV_SLACK` (the batch's buffers are
    [rows, heads, slots, dim] in both models), so that a request waits rather than outgrow the memory
    mid-way."""
    longest = max(prompt + max_tokens for prompt, max_tokens in requests) + KV_SLACK
    return len(requests) * longest * bytes_per_token
