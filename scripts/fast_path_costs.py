"""Per-forward ms of the eager runner vs the compiled static runner on the built-in pair.

    PYTHONPATH=src python scripts/fast_path_costs.py [--cached 256] [--ks 1,4,16] [--repeats 5]
    PYTHONPATH=src python scripts/fast_path_costs.py --models draft --draft-vocab 0,32768,16384 --runners compiled

Each model is measured after `--cached` tokens: one forward of k new tokens (a root and a chain
of k - 1), then rewound, so every repeat sees the same cache. Eager and compiled forwards are
interleaved (A/B in one process). The first compiled call compiles (on CPU one graph serves
k = 2..32; its time is printed). Peak RSS is printed too. `--draft-vocab` measures the draft with its
output layer over each subset size (`ouroboros.vocab_subset`; 0: the full layer), interleaved too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from ouroboros.default_pair import default_pair_dirs
from ouroboros.runner import ModelRunner
from ouroboros.static_runner import StaticRunner
from ouroboros.tree import DraftTree
from ouroboros.vocab_subset import vocab_subset


def rss_gb() -> float:
    """Current resident memory (GB): the peak is set by loading the fp32 checkpoint, not by compiling."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 2**20


def forward(runner, prefix: list[int], other: int, k: int, vocab: int) -> float:
    tree = DraftTree()
    tree.add_chain([(31 * i + 5) % vocab for i in range(k - 1)])
    runner.rewind(prefix)
    start = time.perf_counter()
    runner.forward([other], tree)
    seconds = time.perf_counter() - start
    runner.keep([])
    return seconds


def make_runner(kind: str, model, vocab: int):
    """An "eager" or "compiled" runner of `model`, its output layer over `vocab` ids (0: all)."""
    subset = vocab_subset(model, vocab)
    if kind == "eager":
        return ModelRunner(model, subset=subset)
    return StaticRunner(model, compile=True, subset=subset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cached", type=int, default=256)
    parser.add_argument("--ks", default="1,4,16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="target,draft")
    parser.add_argument("--runners", default="eager,compiled")
    parser.add_argument("--draft-vocab", default="0", help="the draft's output subset sizes, comma separated")
    args = parser.parse_args()
    torch.set_num_threads(2)
    ks = [int(k) for k in args.ks.split(",")]
    names = args.models.split(",")
    directories = dict(zip(("target", "draft"), default_pair_dirs()))
    models = {name: AutoModelForCausalLM.from_pretrained(directories[name], dtype=torch.bfloat16).eval()
              for name in names}  # only the models measured: less memory, less paging on a shared machine
    report = {"torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(),
              "cached": args.cached, "rss_loaded_gb": rss_gb(), "models": {}}
    for name, model in models.items():
        vocab = model.config.vocab_size
        prefix = [(7919 * i + 11) % vocab for i in range(args.cached)]
        other = (prefix[-1] + 1) % vocab
        sizes = [int(size) for size in args.draft_vocab.split(",")] if name == "draft" else [0]
        runners = {f"{kind}" + (f"/{size}" if len(sizes) > 1 else ""): make_runner(kind, model, size)
                   for kind in args.runners.split(",") for size in sizes}
        result = {"compile_s": {}, "ms": {}}
        with torch.inference_mode():
            for runner in runners.values():
                runner.forward(prefix, DraftTree())
                runner.keep([])
            for k in ks:
                result["compile_s"][k] = {label: forward(runner, prefix, other, k, vocab)  # warm-up, compiles
                                          for label, runner in runners.items()}
                times = {label: [] for label in runners}
                for _ in range(args.repeats):
                    for label, runner in runners.items():
                        times[label].append(forward(runner, prefix, other, k, vocab))
                result["ms"][k] = {label: {"median": 1000 * statistics.median(t), "min": 1000 * min(t)}
                                   for label, t in times.items()}
                print(name, k, json.dumps(result["ms"][k]), f"rss {rss_gb():.2f} GB", flush=True)
        result["rss_after_gb"] = rss_gb()
        report["models"][name] = result
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
