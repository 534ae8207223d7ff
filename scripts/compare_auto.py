"""auto against ouroboros (or vanilla with --draft DIR, e.g. a useless draft), same process, same
prompts, alternating per prompt: a quick A/B of auto's choices without the whole bench.

    PYTHONPATH=src python scripts/compare_auto.py --prompts 0,1,2,3,4 [--fast]
    PYTHONPATH=src python scripts/compare_auto.py --draft /tmp/useless-draft --against vanilla
"""

from __future__ import annotations

import argparse
import time

import torch

from ouroboros import generate
from ouroboros.bench.datasets import load_humaneval, prompt_ids
from ouroboros.default_pair import default_pair_dirs
from ouroboros.loading import load_dirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default="0,1,2,3,4", help="HumanEval indices")
    parser.add_argument("--draft", help="draft model directory (default: the built-in draft)")
    parser.add_argument("--against", default="ouroboros", help="the method auto is compared with")
    parser.add_argument("--fast", action="store_true", help="the compiled fast path (default: eager)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(2)
    target_dir, draft_dir = default_pair_dirs(progress=False)
    target, draft, tokenizer = load_dirs(str(target_dir), args.draft or str(draft_dir), dtype="bfloat16",
                                         device="cpu", progress=False)
    questions = load_humaneval()
    methods = (args.against, "auto")
    warm = torch.tensor([prompt_ids(tokenizer, False, questions[0], [])])
    for method in methods:  # untimed: first-call costs (and compiling, with --fast)
        generate(target, warm, draft=draft, method=method, max_new_tokens=16, fast=args.fast)
    totals = {method: [0, 0.0] for method in methods}
    for index in (int(i) for i in args.prompts.split(",")):
        ids = torch.tensor([prompt_ids(tokenizer, False, questions[index], [])])
        for method in methods:
            start = time.perf_counter()
            out = generate(target, ids, draft=draft, method=method, max_new_tokens=args.max_new_tokens, fast=args.fast)
            seconds = time.perf_counter() - start
            tokens = out.sequences.shape[1] - ids.shape[1]
            totals[method][0] += tokens
            totals[method][1] += seconds
            arms = {k: v for k, v in out.stats.events.items() if k.startswith("auto_")}
            print(f"HumanEval/{index} {method:10s} {tokens / seconds:6.2f} tok/s  target forwards "
                  f"{out.stats.target_forwards:3d}  draft forwards {out.stats.draft_forwards:3d}  {arms}", flush=True)
    for method, (tokens, seconds) in totals.items():
        print(f"total {method:10s} {tokens / seconds:6.2f} tok/s")


if __name__ == "__main__":
    main()
