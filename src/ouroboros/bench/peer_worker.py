"""The worker side of the bench's peer protocol (the other side is `peer_process.PeerProcess`),
shared by the peer workers (`vllm_worker.py`, `llama_worker.py`).

A worker runs under another Python that may not have this package (`--vllm-python`,
`--llama-python`), as a script: so this module imports only the standard library, and a worker
imports it as a sibling (its folder is the script's first path entry).
Protocol: one JSON object per line. The first line a worker reads is its settings; the first line it
writes is {"ready": true, "version", "startup_seconds"} once its engine is up (or {"error": ...});
then each request line {"prompts", "max_new_tokens", "eos_ids", "temperature", "top_p", "seed"} gets
{"rows", "seconds"}: the new token ids of each prompt and the wall time of answering them all,
prefill included. The engine's own logs go to stderr: the protocol has the original stdout to itself.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable


def reply(stream, message: dict) -> None:
    stream.write(json.dumps(message) + "\n")
    stream.flush()


def answer_requests(requests: Iterable[str], replies, answer: Callable[[dict], dict]) -> None:
    """Each request line's `answer`, written as one line, until the end of input."""
    for line in requests:
        if line.strip():
            reply(replies, answer(json.loads(line)))


def run(serve: Callable[[dict, Iterable[str], object], None]) -> None:
    """A worker's main: `serve(settings, requests, replies)` on the first input line and the rest, with
    the engine's prints sent to stderr; why it could not start or answer is the last line it writes."""
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # engines (and vLLM's engine processes) log to stderr
    try:
        settings = json.loads(sys.stdin.readline())
        serve(settings, sys.stdin, replies)
    except Exception as exc:  # report why the engine could not start or answer, then exit non-zero
        reply(replies, {"error": f"{type(exc).__name__}: {exc}"})
        raise
