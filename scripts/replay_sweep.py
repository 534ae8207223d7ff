"""Replay configs of `ouroboros` on a reference cost table: progress measured by the forwards made.

    PYTHONPATH=src python scripts/replay_sweep.py [--prompts 0-19] [--new-tokens 128]
        [--costs tests/data/cpu-2core-avx512bf16.json] [--variants today,adaptive,ablation]
        [--extra '{"name": {OuroborosConfig fields}}']

Runs the built-in pair in bf16 (2 threads, greedy) on HumanEval prompts and, per variant, sums over
prompts: the replayed speedup replay(vanilla_log(P, n)) / replay(forward_log), the mean accepted tokens
per target forward, draft forwards per token, and how many outputs equal the first variant's (bf16
near-ties may flip a token). Figures are "replayed on <table>", never measured: wall time is ignored.

Variants: `today` is `ouroboros` with every adaptive switch off (the method before issue 11);
`adaptive` is the default `OuroborosConfig`; `ablation` adds `adaptive` with each of
`config.ADAPTIVE_SWITCHES` flipped in turn.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields, replace
from pathlib import Path

import torch

from ouroboros.bench import load_humaneval
from ouroboros.config import ADAPTIVE_SWITCHES, OuroborosConfig
from ouroboros.costs import CostTable, vanilla_log
from ouroboros.generation import generate
from ouroboros.loading import load_default_pair

REFERENCE_COSTS = Path(__file__).resolve().parents[1] / "tests" / "data" / "cpu-2core-avx512bf16.json"
"""The reference AVX-512-bf16 cost table, kept with the tests."""


def variants(names: list[str], extra: dict) -> dict[str, OuroborosConfig]:
    adaptive = OuroborosConfig()
    today = adaptive.classic()
    table = {}
    for name in names:
        if name == "today":
            table["today"] = today
        elif name == "adaptive":
            table["adaptive"] = adaptive
        elif name == "ablation":
            table["adaptive"] = adaptive
            for switch in ADAPTIVE_SWITCHES:
                flipped = not getattr(adaptive, switch)
                table[f"{'with' if flipped else 'no'}_{switch}"] = replace(adaptive, **{switch: flipped})
        else:
            raise SystemExit(f"unknown variant {name!r}")
    known = {f.name for f in fields(OuroborosConfig)}
    for name, spec in extra.items():
        base = today if spec.pop("base", "adaptive") == "today" else adaptive
        unknown = set(spec) - known
        if unknown:
            raise SystemExit(f"unknown OuroborosConfig fields {sorted(unknown)}")
        table[name] = replace(base, **spec)
    return table


def prompt_range(text: str) -> list[int]:
    start, _, stop = text.partition("-")
    return list(range(int(start), int(stop or start) + 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", default="0-4", help="HumanEval indices, e.g. 0-19")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--costs", default=str(REFERENCE_COSTS),
                        help="cost table to replay on (default: the reference table in tests/data/)")
    parser.add_argument("--variants", default="today,adaptive", help="today, adaptive, ablation (comma-separated)")
    parser.add_argument("--extra", default="{}", help='JSON {"name": {"base": "today"|"adaptive", field: value}}')
    parser.add_argument("--verbose", action="store_true", help="print every prompt's figures")
    args = parser.parse_args()
    torch.set_num_threads(2)
    table = CostTable.load(args.costs)
    configs = variants([name for name in args.variants.split(",") if name], json.loads(args.extra))
    target, draft, tok = load_default_pair(dtype=torch.bfloat16, progress=False)
    eos = target.generation_config.eos_token_id
    questions = load_humaneval()
    totals = {name: {"vanilla": 0.0, "replayed": 0.0, "tokens": 0, "target": 0, "draft": 0, "same": 0}
              for name in configs}
    for index in prompt_range(args.prompts):
        ids = tok(questions[index].turns[0], return_tensors="pt").input_ids
        reference = None
        for name, config in configs.items():
            out = generate(target, ids, draft=draft, method="ouroboros", max_new_tokens=args.new_tokens,
                           eos_token_id=eos, config=config)
            tokens = out.sequences[0, ids.shape[1]:].tolist()
            reference = tokens if reference is None else reference
            stats, total = out.stats, totals[name]
            vanilla = table.replay(vanilla_log(ids.shape[1], stats.new_tokens))
            replayed = table.replay(stats.forward_log)
            for key, value in (("vanilla", vanilla), ("replayed", replayed), ("tokens", stats.new_tokens),
                               ("target", stats.target_forwards), ("draft", stats.draft_forwards),
                               ("same", tokens == reference)):
                total[key] += value
            if args.verbose:
                print(f"p{index} {name:24s} {vanilla / replayed:5.2f}x  acc {stats.mean_accepted:5.2f}  "
                      f"draft/token {stats.draft_forwards / stats.new_tokens:5.2f}  events {stats.events}",
                      flush=True)
    print(f"replayed on {args.costs.rsplit('/', 1)[-1]}: HumanEval {args.prompts}, {args.new_tokens} new tokens, "
          "bf16, greedy, prefill included")
    print(f"{'variant':26s} {'speedup':>8s} {'tok/target fwd':>15s} {'draft fwd/tok':>14s} {'same as first':>14s}")
    for name, total in totals.items():
        print(f"{name:26s} {total['vanilla'] / total['replayed']:7.2f}x {total['tokens'] / total['target']:15.2f} "
              f"{total['draft'] / total['tokens']:14.2f} {total['same']:14d}", flush=True)


if __name__ == "__main__":
    main()
