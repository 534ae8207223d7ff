"""Issue 19's curve: `ouroboros serve` under 1, 2, 4 and 8 concurrent chat clients (the real `openai`
client, streaming), with `--max-batch N` and with `--max-batch 1`.

Each client sends one chat request (a Spec-Bench question's first turn, `--max-tokens` new tokens,
greedy); all of a level's clients start together. Reported per level: aggregate tokens/s (all
completion tokens over the level's wall time), p50/p95 time to first token, and the mean per-request
tokens/s (completion tokens over the request's own time). The server is started once per setting
(its warm-up untimed) with `--pool per-request`, so no request drafts from another's phrases.

usage: python scripts/serve_load.py [--max-batch 8 1] [--clients 1 2 4 8] [--max-tokens 128]
       [--questions ../shared/data/spec_bench/question.jsonl] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
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


def start_server(max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([OUROBOROS, "serve", "--port", str(port), "--threads", str(threads), "--pool",
                                "per-request", "--max-batch", str(max_batch), "--log-level", "warning"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
            raise SystemExit(f"the server (--max-batch {max_batch}) did not become ready")
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
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    questions = [q.turns[0] for q in load_spec_bench(args.questions)][args.skip:args.skip + max(args.clients)]
    results = {}
    for max_batch in dict.fromkeys(args.max_batch):
        process, url = start_server(max_batch, args.threads)
        try:
            model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
            results[max_batch] = [level(url, model, questions, n, args.max_tokens) for n in args.clients]
        finally:
            process.terminate()
            process.wait(60)
        for row in results[max_batch]:
            print(f"--max-batch {max_batch}, {row['clients']} clients: {row['aggregate_tokens_per_second']:.2f} "
                  f"aggregate tok/s, TTFT p50 {row['ttft_p50']:.2f} s p95 {row['ttft_p95']:.2f} s, "
                  f"{row['request_tokens_per_second']:.2f} tok/s per request", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
