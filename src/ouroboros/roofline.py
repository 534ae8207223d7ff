"""The memory bound of plain decoding: a one-token forward reads every weight once, so it takes
about the weights' bytes over the machine's memory bandwidth (gpt-fast reports it the same way).
The bandwidth is measured with torch's own matrix-vector products over the model's own weight
matrices, so a better kernel may beat it by a few percent; it is a yardstick, not a proof.

Speculation beats that bound by verifying several tokens per read of the weights; compilation can
only approach it. `ouroboros tune` and `bench` show how close plain decoding is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


def read_weights(model) -> list[torch.Tensor]:
    """The weights one single-token forward reads: every parameter once (a tied embedding is one
    tensor), except an input embedding that is not also the output layer, of which it reads one row."""
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    return [p for p in model.parameters() if tied or p is not embedding]


def weight_bytes(model) -> int:
    """Bytes one single-token forward reads (`read_weights`)."""
    return sum(p.numel() * p.element_size() for p in read_weights(model))


def stream_bandwidth(matrices: list[torch.Tensor], repeats: int = 3) -> float:
    """Bytes per second of one-row matrix-vector products over `matrices` (2-D, on one device), the
    way a one-token forward reads its weights; the best of `repeats` passes after a warm-up pass.
    Measured on the model's own weight matrices, so the shapes and kernels are the forward's."""
    device = matrices[0].device
    vectors = {m.shape[1]: torch.ones(1, m.shape[1], dtype=m.dtype, device=device) for m in matrices}
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats + 1):
            _sync(device)
            start = time.perf_counter()
            for matrix in matrices:
                vectors[matrix.shape[1]] @ matrix.T
            _sync(device)
            best = min(best, time.perf_counter() - start)
    return sum(m.numel() * m.element_size() for m in matrices) / best


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
                f"{self.bandwidth / 1e9:.1f} GB/s (torch's matrix-vector products over them here) = "
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
    matrices = [p for p in read_weights(model) if p.dim() == 2]
    return MemoryBound(weight_bytes(model), stream_bandwidth(matrices), one_token_seconds)
