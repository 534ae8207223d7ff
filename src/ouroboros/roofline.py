"""The memory bound of plain decoding: a one-token forward reads every weight once, so it takes
about the weights' bytes over the machine's memory bandwidth (gpt-fast reports it the same way).
The bandwidth is measured with torch's own matrix-vector products, so a better kernel may beat it
by a few percent; it is a yardstick, not a proof.

Speculation beats that bound by verifying several tokens per read of the weights; compilation can
only approach it. `ouroboros tune` and `bench` show how close plain decoding is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

STREAM_BYTES = (16 << 20, 1 << 30)
"""Bytes streamed to measure the bandwidth: as many as the model's weights, within these bounds (a
model whose weights fit in a cache is read at the cache's speed; 1 GiB outgrows any CPU cache)."""
STREAM_COLUMNS = 8192


def weight_bytes(model) -> int:
    """Bytes one single-token forward reads: every parameter once (a tied embedding is one tensor),
    except an input embedding that is not also the output layer, of which it reads one row."""
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    return sum(p.numel() * p.element_size() for p in model.parameters() if tied or p is not embedding)


def stream_bandwidth(device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                     total_bytes: int = STREAM_BYTES[1], repeats: int = 3) -> float:
    """Bytes per second of matrix-vector products over `total_bytes` of `dtype` weights, what a
    one-token forward does; the best of `repeats` passes."""
    device = torch.device(device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = max(1, total_bytes // (itemsize * STREAM_COLUMNS * 8))
    with torch.inference_mode():
        matrices = [torch.full((rows, STREAM_COLUMNS), 0.5, dtype=dtype, device=device) for _ in range(8)]
        vector = torch.full((1, STREAM_COLUMNS), 0.5, dtype=dtype, device=device)
        best = float("inf")
        for _ in range(repeats + 1):  # the first pass warms up the kernels
            _sync(device)
            start = time.perf_counter()
            for matrix in matrices:
                vector @ matrix.T
            _sync(device)
            best = min(best, time.perf_counter() - start)
    return sum(m.numel() for m in matrices) * itemsize / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class MemoryBound:
    """Plain decoding's speed limit on this machine, and how close a measured forward comes."""

    weight_bytes: int
    bandwidth: float
    """Bytes per second (`stream_bandwidth`)."""
    one_token_seconds: float | None = None
    """A measured one-token forward, or None."""

    @property
    def bound_seconds(self) -> float:
        return self.weight_bytes / self.bandwidth

    def line(self) -> str:
        text = (f"memory bound: {self.weight_bytes / 1e9:.2f} GB of weights per forward at "
                f"{self.bandwidth / 1e9:.1f} GB/s (this machine's matrix-vector stream) = "
                f"{1000 * self.bound_seconds:.0f} ms, i.e. plain decoding at "
                f"{1 / self.bound_seconds:.1f} tok/s")
        if self.one_token_seconds:
            text += (f"; a one-token forward measured {1000 * self.one_token_seconds:.0f} ms "
                     f"({100 * self.bound_seconds / self.one_token_seconds:.0f}% of the bound's speed)")
        return text

    def to_dict(self) -> dict:
        return {"weight_bytes": self.weight_bytes, "bandwidth_gb_s": round(self.bandwidth / 1e9, 2),
                "bound_tokens_per_second": round(1 / self.bound_seconds, 2),
                "one_token_ms": None if self.one_token_seconds is None else round(1000 * self.one_token_seconds, 1)}


def memory_bound(model, one_token_seconds: float | None = None) -> MemoryBound:
    """`model`'s memory bound on its own device and dtype."""
    parameter = next(model.parameters())
    weights = weight_bytes(model)
    streamed = min(max(weights, STREAM_BYTES[0]), STREAM_BYTES[1])
    return MemoryBound(weights, stream_bandwidth(parameter.device, parameter.dtype, streamed), one_token_seconds)
