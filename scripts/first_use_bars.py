"""Issue 22's bars on the built-in pair, each command a fresh process as a user runs it:

1. the README's main command (`ouroboros generate PROMPT`) against the same with `--eager`, in
   alternating rounds, wall time from command to exit and peak RSS (`/usr/bin/time -v`), after one
   untimed run of each (models prepared, packages and cost tables cached);
2. `ouroboros serve --pool per-request`: the first and second chat completion after the server
   reports ready.

usage: python scripts/first_use_bars.py [--rounds 3] [--serve] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Write a Python function that checks whether a string is a palindrome."
OUROBOROS = str(Path(sys.executable).with_name("ouroboros"))


def timed(argv: list[str]) -> dict:
    """Run `argv` under /usr/bin/time -v; its wall seconds, peak RSS (GB) and summary line."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) / 1e6
    summary = [line for line in done.stderr.splitlines() if line.startswith("[")]
    return {"wall": wall, "rss_gb": rss, "summary": summary[-1] if summary else ""}


def one_shot(rounds: int, threads: int) -> None:
    runs = {"default": [OUROBOROS, "generate", "--threads", str(threads), PROMPT],
            "--eager": [OUROBOROS, "generate", "--threads", str(threads), "--eager", PROMPT]}
    for name, argv in runs.items():
        first = timed(argv)
        print(f"untimed first run, {name}: {first['wall']:.1f} s wall, {first['rss_gb']:.2f} GB peak RSS", flush=True)
    walls: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(rounds):
        for name, argv in runs.items():
            result = timed(argv)
            walls[name].append(result["wall"])
            print(f"round {i + 1} {name}: {result['wall']:.1f} s wall, {result['rss_gb']:.2f} GB peak RSS; "
                  f"{result['summary']}", flush=True)
    medians = {name: statistics.median(values) for name, values in walls.items()}
    print(json.dumps({"median_wall_s": medians, "ratio_default_to_eager": medians["default"] / medians["--eager"]}))


def serve(threads: int) -> None:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # one cold phrase pool per request: with the shared pool, the second request of the same prompt
    # drafts from phrases the first one taught it, which is learning, not warm-up
    process = subprocess.Popen([OUROBOROS, "serve", "--port", str(port), "--threads", str(threads),
                                "--pool", "per-request"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        start = time.perf_counter()
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.perf_counter() - start > 1200:
                raise SystemExit("the server did not become ready")
            time.sleep(1)
        print(f"ready {time.perf_counter() - start:.1f} s after start", flush=True)
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        body = {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": PROMPT}]}
        for which in ("first", "second"):
            begin = time.perf_counter()
            reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=1200)
            reply.raise_for_status()
            print(f"{which} request: {time.perf_counter() - begin:.2f} s, "
                  f"{reply.json()['usage']['completion_tokens']} tokens", flush=True)
    finally:
        process.terminate()
        process.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each command (default 3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--serve", action="store_true", help="measure the server's first and second request")
    parser.add_argument("--skip-one-shot", action="store_true", help="only the server")
    args = parser.parse_args()
    if not args.skip_one_shot:
        one_shot(args.rounds, args.threads)
    if args.serve:
        serve(args.threads)


if __name__ == "__main__":
    main()
