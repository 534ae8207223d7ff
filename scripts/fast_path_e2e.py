"""End to end on the built-in pair (bf16): tokens/s and text, eager runner vs fast path.

    PYTHONPATH=src python scripts/fast_path_e2e.py [--methods vanilla,ouroboros] [--max-new-tokens 96]

Each method runs once untimed on the fast path first (compiling, or loading inductor's cache), then
eager and fast alternate. Prints tokens/s, target forwards, peak RSS, and whether the texts match
(in bf16 they may differ where two logits nearly tie; fp32 exactness is what the tests check).
"""

from __future__ import annotations

import argparse
import resource

import torch

from ouroboros import generate
from ouroboros.loading import load_default_pair

PROMPT = "Write a Python function that returns the n-th Fibonacci number, with a docstring and tests."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="vanilla,ouroboros")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    target, draft, tokenizer = load_default_pair(dtype=torch.bfloat16, progress=False)
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    for method in args.methods.split(","):
        kwargs = dict(draft=draft, method=method, max_new_tokens=args.max_new_tokens)
        generate(target, ids, fast=True, **kwargs)  # compile (or load the compiled graphs)
        outputs = {}
        for _ in range(args.repeats):
            for label, fast in (("eager", False), ("fast", True)):
                out = generate(target, ids, fast=fast, **kwargs)
                outputs.setdefault(label, []).append(out)
        for label, runs in outputs.items():
            best = max(runs, key=lambda o: o.stats.tokens_per_second)
            print(f"{method:10s} {label:5s} {best.stats.tokens_per_second:6.2f} tok/s "
                  f"({best.stats.new_tokens} tokens, {best.stats.target_forwards} target forwards)", flush=True)
        same = torch.equal(outputs["eager"][0].sequences, outputs["fast"][0].sequences)
        print(f"{method:10s} same text eager vs fast: {same}", flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")


if __name__ == "__main__":
    main()
