"""llama.cpp (llama-cpp-python) in its own process, for the bench's llama.cpp contestants.

Run by a Python that has llama_cpp (`--llama-python`, usually its own virtual environment: the
binding builds llama.cpp from source), so this file imports only the standard library, llama_cpp (and
numpy, which it brings) and its sibling `peer_worker` (the protocol). Modes: plain decoding; the
binding's prompt lookup (`LlamaPromptLookupDecoding`, its n-gram drafts); and a draft model, which the
binding has no mode for but takes as any `LlamaDraftModel`: `DraftLlama`, a second `Llama` on the
draft's GGUF drafting its k greedy tokens, which the binding's own generate loop verifies (it feeds
the drafts to the target with the last token, samples at every position, keeps the drafts up to the
first that differs from the sampled token, and drops the rest from the KV cache).

Prompts come as token ids (the bench's tokenizer has the GGUF's vocabulary) and are decoded from an
empty KV cache each time, so that every prompt pays its prefill as it does in the other methods (the
binding would reuse a cached prefix). A request's prompts run one after another; "seconds" are the
wall time of all of them, prefill included.
"""

from __future__ import annotations

import itertools
import time

try:
    from .peer_worker import answer_requests, reply, run
except ImportError:  # run as a script by another Python, without this package: this folder is on sys.path
    from peer_worker import answer_requests, reply, run

GREEDY = {"temp": 0.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0}
"""The binding's sampling settings for greedy decoding (temperature 0 takes its greedy sampler)."""


def sampling(temperature: float, top_p: float) -> dict:
    """The binding's settings for the bench's sampling: temperature and nucleus only (top-k, min-p and
    typical off, no repetition penalty), as the engine samples; temperature 0 is greedy."""
    if not temperature:
        return GREEDY
    return {**GREEDY, "temp": temperature, "top_k": 0, "top_p": top_p}


def draft_model_class():
    """`DraftLlama`, made here because its base class lives in llama_cpp (imported by the worker only)."""
    from llama_cpp.llama_speculative import LlamaDraftModel

    class DraftLlama(LlamaDraftModel):
        """The draft model as the binding's drafter: a second Llama that keeps its own KV cache of the
        context (a call rewinds it to the prefix it shares with the new context and feeds the rest)
        and returns its next `k` greedy tokens."""

        def __init__(self, llama, k: int):
            self.llama, self.k = llama, k

        def reset(self) -> None:
            """Forget the cached context: the next call feeds the whole prompt (its prefill is paid)."""
            self.llama.reset()

        def __call__(self, input_ids, /, **kwargs):
            import numpy as np

            tokens = self.llama.generate(input_ids.tolist(), reset=True, **GREEDY)
            return np.array(list(itertools.islice(tokens, self.k)), dtype=np.intc)

    return DraftLlama


def decode(llama, prompt: list[int], max_new_tokens: int, eos_ids: list[int], settings: dict) -> list[int]:
    """One prompt's new tokens from an empty KV cache, up to and including the first EOS."""
    llama.reset()
    if getattr(llama, "draft_model", None) is not None and hasattr(llama.draft_model, "reset"):
        llama.draft_model.reset()
    room = llama.n_ctx() - len(prompt)
    new = []
    for token in llama.generate(prompt, reset=True, **settings):
        new.append(token)
        if token in eos_ids or len(new) >= min(max_new_tokens, room):
            break
    return new


def load(settings: dict):
    """The target's Llama, with the drafter the mode asks for.

    With a drafter the target is built with `logits_all=True`. The binding (0.3.36) turns every token's
    logits on whenever it has a draft model (`Llama.__init__`: `self._logits_all = logits_all if
    draft_model is None else True`), so `eval` copies each fed token's logits into `self.scores` at its
    position; but it sizes `self.scores` by the constructor's own `logits_all`: n_ctx rows if it is True,
    else only n_batch (512) rows. Left False, a context past 512 tokens (a long prompt, or prompt and
    answer together) overruns the buffer: "could not broadcast input array from shape (512 * n_vocab,)
    into shape (0,)". `logits_all=True` sizes it n_ctx rows and changes nothing else (the draft model had
    already turned all logits on); `n_batch=n_ctx` would size it the same but would also make llama.cpp
    decode a prompt in one batch and hold that many rows of logits itself too.

    The cost, per speculative worker (llama_cpp_lookup, llama_cpp_draft; plain llama_cpp and the draft
    model's own Llama keep the default): n_ctx x n_vocab float32 of address space, which for the bench's
    n_ctx (`command.PEER_CONTEXT`, the vLLM peer's max_model_len, 8192) and Qwen2.5's 151936 ids is 4.6
    GiB; numpy leaves it unwritten, so only the rows a context reaches become resident: 0.58 MiB a token
    (about 0.6 GiB per 1024 tokens of the run's longest prompt + answer)."""
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    common = dict(n_ctx=settings["n_ctx"], n_threads=settings["threads"], n_threads_batch=settings["threads"],
                  seed=0, verbose=False)
    mode, drafter = settings.get("mode"), None
    if mode == "lookup":
        drafter = LlamaPromptLookupDecoding(max_ngram_size=settings["lookup_ngram"],
                                            num_pred_tokens=settings["lookup_tokens"])
    elif mode == "draft":
        drafter = draft_model_class()(Llama(model_path=settings["draft"], **common), settings["draft_tokens"])
    elif mode is not None:
        raise ValueError(f"unknown llama.cpp mode {mode!r}")
    return Llama(model_path=settings["target"], draft_model=drafter, logits_all=drafter is not None, **common)


def serve(settings: dict, requests, replies) -> None:
    """Load the models `settings` name, say ready, then answer requests until end of input."""
    start = time.perf_counter()
    llama = load(settings)
    reply(replies, {"ready": True, "startup_seconds": round(time.perf_counter() - start, 1), "version": _version()})

    def answer(request: dict) -> dict:
        params = sampling(request.get("temperature", 0.0), request.get("top_p", 1.0))
        start = time.perf_counter()
        rows = []
        for prompt in request["prompts"]:
            if request.get("seed") is not None:
                llama.set_seed(request["seed"])
            rows.append(decode(llama, prompt, request["max_new_tokens"], request["eos_ids"], params))
        return {"rows": rows, "seconds": time.perf_counter() - start}

    answer_requests(requests, replies, answer)


def _version() -> str:
    import llama_cpp

    return llama_cpp.__version__


def main() -> None:
    run(serve)


if __name__ == "__main__":
    main()
