"""A vLLM engine in its own process, for the bench's vLLM contestants.

Run by a Python that has vLLM (`--vllm-python`, possibly another virtual environment: vLLM's CPU
build pins its own transformers), so this file imports only the standard library, vLLM and its
sibling `peer_worker` (the protocol). A request's "seconds" are the wall time of one `LLM.generate`
call on all its prompts, submitted together (prefill included; one prompt is a single stream).
"""

from __future__ import annotations

import time

try:
    from .peer_worker import answer_requests, reply, run
except ImportError:  # run as a script by another Python, without this package: this folder is on sys.path
    from peer_worker import answer_requests, reply, run


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
    reply(replies, {"ready": True, "startup_seconds": round(time.perf_counter() - start, 1), "version": _version()})

    def answer(request: dict) -> dict:
        temperature = request.get("temperature", 0.0)
        params = SamplingParams(max_tokens=request["max_new_tokens"], stop_token_ids=request["eos_ids"],
                                temperature=temperature, top_p=request.get("top_p", 1.0) if temperature else 1.0,
                                seed=request.get("seed"), detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]]
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        return {"rows": [list(output.outputs[0].token_ids) for output in outputs], "seconds": seconds}

    answer_requests(requests, replies, answer)


def _version() -> str:
    import vllm

    return vllm.__version__


def main() -> None:
    run(serve)


if __name__ == "__main__":  # vLLM starts its engine with spawn: this guard is required
    main()
