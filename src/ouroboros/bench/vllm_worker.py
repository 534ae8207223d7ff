"""A vLLM engine in its own process, for the bench's vLLM contestants.

Run by a Python that has vLLM (`--vllm-python`, possibly another virtual environment: vLLM's CPU
build pins its own transformers), so this file imports only the standard library and vLLM.
Protocol: one JSON object per line. The first line this process writes is {"ready": true, ...}
once the engine is up (or {"error": ...}); then each request line {"prompts", "max_new_tokens",
"eos_ids", "temperature", "top_p", "seed"} gets {"rows", "seconds"}: the new token ids of each
prompt, and the wall time of one `LLM.generate` call on all of them, submitted together (prefill
included; one prompt is a single stream). vLLM's own
logs go to stderr: the protocol has the original stdout to itself.
"""

from __future__ import annotations

import json
import os
import sys
import time


def serve(settings: dict, requests, replies) -> None:
    """Start the engine `settings` describe, say ready, then answer requests until end of input."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    engine = dict(model=settings["target"], dtype=settings["dtype"], max_model_len=settings["max_model_len"],
                  enforce_eager=settings.get("enforce_eager", False), seed=0)
    method = settings.get("method")
    if method:
        speculation = {"method": method, "num_speculative_tokens": settings["num_speculative_tokens"]}
        if method == "draft_model":
            speculation["model"] = settings["draft"]
        elif method == "ngram":
            speculation["prompt_lookup_min"], speculation["prompt_lookup_max"] = settings["ngram_match"]
        elif method == "custom_class":
            speculation["model"] = settings["proposer"]
        engine["speculative_config"] = speculation
    start = time.perf_counter()
    llm = LLM(**engine)
    _reply(replies, {"ready": True, "startup_seconds": round(time.perf_counter() - start, 1),
                     "version": _version()})
    for line in requests:
        if not line.strip():
            continue
        request = json.loads(line)
        temperature = request.get("temperature", 0.0)
        params = SamplingParams(max_tokens=request["max_new_tokens"], stop_token_ids=request["eos_ids"],
                                temperature=temperature, top_p=request.get("top_p", 1.0) if temperature else 1.0,
                                seed=request.get("seed"), detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]]
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        _reply(replies, {"rows": [list(output.outputs[0].token_ids) for output in outputs], "seconds": seconds})


def _version() -> str:
    import vllm

    return vllm.__version__


def _reply(stream, message: dict) -> None:
    stream.write(json.dumps(message) + "\n")
    stream.flush()


def main() -> None:
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # vLLM and its engine processes log to stderr
    try:
        settings = json.loads(sys.stdin.readline())
        serve(settings, sys.stdin, replies)
    except Exception as exc:  # report why the engine could not start or answer, then exit non-zero
        _reply(replies, {"error": f"{type(exc).__name__}: {exc}"})
        raise


if __name__ == "__main__":  # vLLM starts its engine with spawn: this guard is required
    main()
