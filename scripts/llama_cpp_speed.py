"""llama.cpp's speed on the built-in pair's own GGUF files, for issue 20's side-by-side: the first step,
kept for the figures BENCHMARKS.md's session 10 took with it. The bench now runs llama.cpp as a peer
contestant, interleaved with every other method on the same prompt ids, plain, with prompt lookup
and with the draft model (`ouroboros bench --llama-python PYTHON`, `bench/llama_peer.py`): use that;
this script times text prompts, plain and prompt lookup only, outside the bench.

llama.cpp runs the Q4_K_M weights the built-in pair is published as; this package converts them to
bf16 and runs those. So llama.cpp's model is a different numeric model from ours: its greedy text is
its own, and only speed is compared. Modes: plain decoding, and llama-cpp-python's prompt-lookup
decoding (its n-gram drafts, `LlamaPromptLookupDecoding`); the binding has no draft-model mode of
its own (the bench's llama_cpp_draft brings one).
Per prompt, the modes run one after the other (interleaved), greedy, `--max-tokens` new tokens, wall
time around each call, prefill included; one untimed warm-up call per mode first.

Set-up and run (llama-cpp-python builds llama.cpp from source: see BENCHMARKS.md for how long):

    python3 -m venv /work/venv-llama && /work/venv-llama/bin/pip install llama-cpp-python==0.3.36
    .venv/bin/python -c "from ouroboros.default_pair import gguf_file; gguf_file('target', '/tmp/target.gguf')"
    .venv/bin/python -c "from ouroboros.bench.datasets import load_humaneval; import json; \\
        [print(json.dumps({'id': q.question_id, 'prompt': q.turns[0]})) for q in load_humaneval()[20:40]]" \\
        > /tmp/humaneval-20-39.jsonl
    /work/venv-llama/bin/python scripts/llama_cpp_speed.py /tmp/target.gguf /tmp/humaneval-20-39.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def run(llm, prompt: str, max_tokens: int) -> tuple[int, float]:
    """(new tokens, seconds) of one greedy completion, prefill included."""
    start = time.perf_counter()
    out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, top_k=1)
    return out["usage"]["completion_tokens"], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf")
    parser.add_argument("prompts", help="JSONL with a 'prompt' field per line")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lookup-tokens", type=int, default=10, help="prompt lookup's draft length")
    parser.add_argument("--out", help="write per-prompt results as JSON here")
    args = parser.parse_args()
    from llama_cpp import Llama  # after parsing: --help works where llama-cpp-python is not installed
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    prompts = [json.loads(line) for line in open(args.prompts) if line.strip()]
    common = dict(model_path=args.gguf, n_ctx=4096, n_threads=args.threads, n_threads_batch=args.threads,
                  verbose=False, seed=0)
    modes = {"llama.cpp": Llama(**common),
             "llama.cpp prompt lookup": Llama(**common, draft_model=LlamaPromptLookupDecoding(
                 num_pred_tokens=args.lookup_tokens))}
    for llm in modes.values():
        run(llm, prompts[0]["prompt"], 16)  # warm-up, untimed
    results = {mode: [] for mode in modes}
    for item in prompts:
        for mode, llm in modes.items():
            tokens, seconds = run(llm, item["prompt"], args.max_tokens)
            results[mode].append({"id": item.get("id"), "tokens": tokens, "seconds": seconds})
    for mode, rows in results.items():
        per_prompt = statistics.mean(r["tokens"] / r["seconds"] for r in rows)
        aggregate = sum(r["tokens"] for r in rows) / sum(r["seconds"] for r in rows)
        print(f"{mode}: {per_prompt:.2f} tok/s (mean of per-prompt), {aggregate:.2f} aggregate, {len(rows)} prompts")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
