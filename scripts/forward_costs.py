"""Measure what speculative decoding costs on this machine, to choose OuroborosConfig sizes.

Prints (1) one Linear layer's time for 1..64 rows per dtype and (2) the draft's and target's forward
time through the engine's runner for k = 1..32 tokens on a 64-token cache (`ouroboros.sizing.measure`,
the same measurement `ouroboros tune` makes). Where k tokens cost about one, large trees pay; where
they cost about k, keep drafts short and trees lean.

    python scripts/forward_costs.py                    # built-in pair, bf16 and fp32
    python scripts/forward_costs.py --target DIR --draft DIR --dtypes bfloat16 --threads 2
    python scripts/forward_costs.py --linear-only
"""

import argparse
import time

import torch

from ouroboros.loading import load_pair
from ouroboros.sizing import measure


def best_ms(call, repeats: int = 3) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return round(min(times) * 1000, 1)


def linear_costs(dtypes) -> None:
    for dtype in dtypes:
        weight = torch.randn(4864, 896, dtype=dtype)
        inputs = {rows: torch.randn(rows, 896, dtype=dtype) for rows in (1, 4, 16, 64)}
        row = {rows: best_ms(lambda x=x, w=weight: torch.nn.functional.linear(x, w), 10) for rows, x in inputs.items()}
        print(f"linear 4864x896 {str(dtype):15s} ms by rows: {row}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target")
    parser.add_argument("--draft")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--linear-only", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads")
    linear_costs([getattr(torch, name) for name in args.dtypes])
    if args.linear_only:
        return
    for name in args.dtypes:
        target, draft, _ = load_pair(args.target, args.draft, dtype=name, progress=False)
        for role, model in (("draft", draft), ("target", target)):
            curve = measure(model, tokens=(1, 2, 4, 8, 16, 32), repeats=3)
            costs = {k: round(1000 * s, 1) for k, s in curve.seconds.items()}
            print(f"{role:6s} {name:9s} forward ms by tokens: {costs}")


if __name__ == "__main__":
    main()
