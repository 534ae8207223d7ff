"""Running the contestants: HF's generate modes and this engine's methods on the same prompts,
interleaved per prompt, each call timed prefill included, and compared token by token with
hf_vanilla (the fairness rules are in `command`'s docstring, which `bench --help` shows)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..config import ADAPTIVE_SWITCHES, OuroborosConfig
from ..costs import vanilla_log
from ..errors import InvalidArgumentError
from ..generation import generate
from ..methods import METHODS, get_method
from ..pool import PhrasePool
from ..static_runner import capacities, fast_path_blocker
from .datasets import Question, prompt_ids
from .vllm_peer import VllmError

ABLATION_SWITCHES = ("phrase_drafting", "lengthen", "harvest", "context_phrases") + ADAPTIVE_SWITCHES
BASELINE = "hf_vanilla"
WARMUP_TOKENS = 16
TIMING_NOTE = "wall time is measured around each generate call and includes prefill, for every method"
COUNTING_NOTE = "new tokens are counted up to and including the first EOS, for every method (HF outputs truncated)"


@dataclass(frozen=True)
class Method:
    """One contestant: an HF generate mode (`hf`) or an engine method (`engine`)."""

    name: str
    hf: str | None = None
    """"greedy", "assisted" or "prompt_lookup"."""
    engine: str | None = None
    warm: bool = False
    """One PhrasePool across the whole run instead of a fresh one per prompt."""
    disable: tuple[str, ...] = ()
    """OuroborosConfig switches turned off (ablation)."""
    fast: bool | None = None
    """Overrides the run's runner choice (e.g. vanilla_eager: plain decoding on the eager runner)."""
    peer: str | None = None
    """Another engine, run in its own process (`vllm_peer`): "vllm" or "vllm_draft"."""

    @property
    def needs_draft(self) -> bool:
        """Whether this contestant runs the draft model (so a bench without --draft cannot run it)."""
        return (self.hf == "assisted" or self.peer == "vllm_draft"
                or (self.engine is not None and get_method(self.engine).needs_draft))

    @property
    def foreign(self) -> bool:
        """Another implementation (HF or a peer engine): its accepted lengths are not known."""
        return bool(self.hf or self.peer)


def engine_methods() -> list[str]:
    """This engine's methods: every entry of the method registry."""
    return list(METHODS)


def contestants() -> dict[str, Method]:
    """HF's generate modes, every registered engine method, the warm-pool and ablation variants."""
    table = [Method("hf_vanilla", hf="greedy"), Method("hf_assisted", hf="assisted"),
             Method("hf_prompt_lookup", hf="prompt_lookup")]
    table += [Method(name, engine=name) for name in engine_methods()]
    table += [Method("ouroboros_warm", engine="ouroboros", warm=True)]
    table += [Method(f"{name}_eager", engine=name, fast=False) for name in ("vanilla", "ouroboros", "auto")]
    table += [Method(f"ouroboros_no_{switch}", engine="ouroboros", disable=(switch,)) for switch in ABLATION_SWITCHES]
    table += [Method("ouroboros_classic", engine="ouroboros", disable=ADAPTIVE_SWITCHES)]
    table += [Method(name, peer=name) for name in PEERS]
    return {method.name: method for method in table}


DEFAULT_METHODS = ("hf_vanilla", "hf_assisted", "hf_prompt_lookup", "speculative", "lookahead", "prompt_lookup",
                   "ouroboros", "ouroboros_warm", "auto")
PEERS = ("vllm", "vllm_draft")
"""vLLM plain and with the draft model, when a Python with vLLM is available (`vllm_peer`)."""
ABLATION_METHODS = ("hf_vanilla", "ouroboros") + tuple(f"ouroboros_no_{s}" for s in ABLATION_SWITCHES) + (
    "ouroboros_classic",)
"""The ablation: every switch off in turn, and `ouroboros_classic` with all the adaptive ones
(issue 11's) off at once, i.e. the method as it was before them."""


@dataclass
class Turn:
    """One generate call's result, tokens already cut after the first EOS."""

    prompt_ids: list[int]
    tokens: list[int]
    text: str
    wall_time: float
    target_forwards: int | None
    draft_forwards: int | None
    """Forward counts; None where the engine does not expose them (vLLM)."""
    accept_lengths: list[int] | None
    """Tokens per target forward; None where the method does not expose it (HF)."""
    forward_log: list | None = None
    """Every forward of both models (`runner.ForwardRecord`), for replay on a cost table; for HF
    greedy the forwards of plain decoding; None where unknown (HF assisted and prompt lookup)."""


@dataclass
class Answer:
    method: Method
    turns: list[Turn] = field(default_factory=list)

    @property
    def new_tokens(self) -> int:
        return sum(len(turn.tokens) for turn in self.turns)

    @property
    def wall_time(self) -> float:
        return sum(turn.wall_time for turn in self.turns)


@dataclass
class Bench:
    """What every run needs: the models, token ids that end or pad, and the run's settings."""

    target: object
    draft: object
    """None when no contestant needs a draft model."""
    tokenizer: object
    eos_ids: list[int]
    pad_id: int
    chat: bool
    max_new_tokens: int
    config: OuroborosConfig
    top_p: float
    seed: int
    device: str
    fast: bool | None = None
    """generate()'s runner choice for engine methods (--fast / --eager; None: where it pays)."""
    peers: dict = field(default_factory=dict)
    """Contestant name -> running `vllm_peer.VllmPeer`."""


# ---------------------------------------------------------------- contestants

def resolve_methods(args: argparse.Namespace, peers_available: bool = False) -> list[Method]:
    """The methods to run, the hf_vanilla baseline always first; the default list includes the vLLM
    peers when `peers_available`."""
    table = contestants()
    if args.ablation and args.methods:
        raise InvalidArgumentError("give --methods or --ablation, not both")
    if args.ablation:
        names = list(ABLATION_METHODS)
    elif args.methods:
        names = [name.strip() for name in args.methods.split(",") if name.strip()]
        unknown = [name for name in names if name not in table]
        if unknown:
            raise InvalidArgumentError(f"unknown method {', '.join(map(repr, unknown))}; "
                                       f"choose from {', '.join(table)}")
    else:
        names = list(DEFAULT_METHODS) + (list(PEERS) if peers_available else [])
    names = [BASELINE] + [name for name in dict.fromkeys(names) if name != BASELINE]
    return [table[name] for name in names]


def _hf_kwargs(bench: Bench, method: Method, max_new_tokens: int, temperature: float) -> dict:
    """Every setting that decides the output, explicit, so the model's generation_config cannot
    slip in sampling or a repetition penalty. Greedy passes HF's own neutral values (HF warns about
    others); sampling switches top-k and min-p off, as the engine does."""
    kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=bench.eos_ids, pad_token_id=bench.pad_id,
                  repetition_penalty=1.0, no_repeat_ngram_size=0)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=bench.top_p, top_k=0, min_p=0.0)
    else:
        kwargs.update(do_sample=False, temperature=1.0, top_p=1.0, top_k=50)
    if method.hf == "assisted":
        kwargs["assistant_model"] = bench.draft
    elif method.hf == "prompt_lookup":
        kwargs["prompt_lookup_num_tokens"] = 10
    return kwargs


def _count_forwards(model, counter: list[int]):
    def hook(module, inputs):
        counter[0] += 1
    return model.register_forward_pre_hook(hook)


def _timed(bench: Bench, call):
    """(call(), seconds), synchronising an accelerator so its queued work is counted."""
    if bench.device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = call()
    if bench.device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def cut_at_eos(tokens: list[int], eos_ids: list[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[:i + 1]
    return tokens


def _run_hf(bench: Bench, method: Method, input_ids: torch.Tensor, max_new_tokens: int, temperature: float,
            seed: int):
    """transformers' generate; forwards counted by hooks, since HF does not report them."""
    kwargs = _hf_kwargs(bench, method, max_new_tokens, temperature)
    target_count, draft_count = [0], [0]
    hooks = [_count_forwards(bench.target, target_count)]
    if bench.draft is not None:
        hooks.append(_count_forwards(bench.draft, draft_count))
    try:
        torch.manual_seed(seed)
        output, seconds = _timed(bench, lambda: bench.target.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), **kwargs))
    finally:
        for hook in hooks:
            hook.remove()
    return output[0, input_ids.shape[1]:].tolist(), seconds, target_count[0], draft_count[0], None, None


def _run_engine(bench: Bench, method: Method, input_ids: torch.Tensor, max_new_tokens: int, temperature: float,
                seed: int, pool: PhrasePool | None):
    """This package's generate; greedy unless temperature > 0."""
    config = dataclasses.replace(bench.config, **dict.fromkeys(method.disable, False))
    sampling = dict(do_sample=True, temperature=temperature, top_p=bench.top_p, seed=seed) if temperature else {}
    output, seconds = _timed(bench, lambda: generate(
        bench.target, input_ids, draft=bench.draft, method=method.engine, max_new_tokens=max_new_tokens,
        eos_token_id=bench.eos_ids, config=config, pool=pool, fast=bench.fast if method.fast is None else method.fast,
        **sampling))
    stats = output.stats
    return (output.sequences[0, input_ids.shape[1]:].tolist(), seconds, stats.target_forwards, stats.draft_forwards,
            list(stats.accept_lengths), stats.forward_log)


def run_turn(bench: Bench, method: Method, ids: list[int], *, max_new_tokens: int, temperature: float,
             seed: int, pool: PhrasePool | None) -> Turn:
    """One generate call of `method` on `ids`, timed from the call to its return, prefill included."""
    input_ids = torch.tensor([ids], dtype=torch.long, device=bench.device)
    if method.peer:
        tokens, seconds = bench.peers[method.name].generate(ids, max_new_tokens, bench.eos_ids, temperature,
                                                            bench.top_p, seed)
        target_forwards = draft_forwards = accept = log = None
    elif method.hf:
        tokens, seconds, target_forwards, draft_forwards, accept, log = _run_hf(
            bench, method, input_ids, max_new_tokens, temperature, seed)
    else:
        tokens, seconds, target_forwards, draft_forwards, accept, log = _run_engine(
            bench, method, input_ids, max_new_tokens, temperature, seed, pool)
    tokens = cut_at_eos(tokens, bench.eos_ids)
    if method.hf == "greedy":
        log = vanilla_log(len(ids), len(tokens))
    text = bench.tokenizer.decode(tokens, skip_special_tokens=True)
    return Turn(ids, tokens, text, seconds, target_forwards, draft_forwards, accept, log)


def run_question(bench: Bench, method: Method, question: Question, *, temperature: float, seed: int,
                 pool: PhrasePool | None, max_new_tokens: int | None = None) -> Answer:
    """All turns of one question; each later turn continues the method's own conversation."""
    answer = Answer(method)
    for k in range(len(question.turns)):
        ids = prompt_ids(bench.tokenizer, bench.chat, question, [turn.text for turn in answer.turns])
        answer.turns.append(run_turn(bench, method, ids, max_new_tokens=max_new_tokens or bench.max_new_tokens,
                                     temperature=temperature, seed=seed + k, pool=pool))
    return answer


# ---------------------------------------------------------------- comparison with vanilla

def logit_gap(bench: Bench, ids: list[int], vanilla: list[int], other: list[int], index: int) -> dict:
    """The target's logits where the outputs part: one forward on the vanilla prefix. A top-2 gap
    of 0 is an exact tie, where batched verification may legitimately pick the other token."""
    prefix = torch.tensor([ids + vanilla[:index]], dtype=torch.long, device=bench.device)
    with torch.inference_mode():
        logits = bench.target(prefix).logits[0, -1].float()
    top = logits.topk(2).values
    record = {"top2_gap": float(top[0] - top[1])}
    if index < len(vanilla) and index < len(other):
        record["vanilla_minus_method_logit"] = float(logits[vanilla[index]] - logits[other[index]])
    return record


def first_divergence(bench: Bench, vanilla: Answer, answer: Answer, greedy: bool) -> dict | None:
    """None when every turn is token-identical to vanilla; else where the first difference is."""
    for k, (a, b) in enumerate(zip(vanilla.turns, answer.turns)):
        if a.tokens == b.tokens:
            continue
        index = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y),
                     min(len(a.tokens), len(b.tokens)))
        record = {"turn": k, "index": index,
                  "vanilla_token": a.tokens[index] if index < len(a.tokens) else None,
                  "method_token": b.tokens[index] if index < len(b.tokens) else None}
        if greedy:
            record.update(logit_gap(bench, a.prompt_ids, a.tokens, b.tokens, index))
        return record
    return None


# ---------------------------------------------------------------- one comparison run

def question_seed(base: int, index: int) -> int:
    """Each question gets its own seed (turn k adds k), the same for every method."""
    return base + 1000 * index


def warm_up(bench: Bench, methods: list[Method], questions: list[Question], temperature: float) -> None:
    """Untimed generations, so that first-call costs (compiling included) land on no timed prompt:
    one short one per method on the first prompt; then, for each longer KV cache the run will need
    on the fast path (one more compiled graph per model), a full one of each compiled engine method
    on the first prompt that needs it. Later turns of multi-turn questions are not foreseen."""
    first = [Question(q.question_id, q.category, q.turns[:1]) for q in questions]
    for method in tqdm(methods, desc="warm-up", unit="method", leave=False):
        run_question(bench, method, first[0], temperature=temperature, seed=bench.seed, pool=None,
                     max_new_tokens=min(WARMUP_TOKENS, bench.max_new_tokens))
    compiled = [m for m in methods if m.engine and not fast_path_blocker(
        bench.target, bench.fast if m.fast is None else m.fast)]
    covered = capacities(len(prompt_ids(bench.tokenizer, bench.chat, first[0], [])),
                         min(WARMUP_TOKENS, bench.max_new_tokens))
    for question in first if compiled else []:
        needed = capacities(len(prompt_ids(bench.tokenizer, bench.chat, question, [])), bench.max_new_tokens)
        if needed <= covered:
            continue
        covered |= needed
        for method in tqdm(compiled, desc=f"warm-up, cache {max(needed)}", unit="method", leave=False):
            run_question(bench, method, question, temperature=temperature, seed=bench.seed, pool=None)


def run_comparison(bench: Bench, questions: list[Question], methods: list[Method], temperature: float,
                   record_answer: Callable[[Question, Answer], None]) -> tuple[list[dict], bool]:
    """For each prompt every method in turn (interleaved); `record_answer` gets each answer as it
    comes (the answer files are written as the run goes).

    Returns one record per completed question (the answers and how each compares with vanilla) and
    whether the run was interrupted (Ctrl-C, SIGTERM, or a vLLM peer that died): then the prompt in
    progress is dropped, so that every figure still compares all methods on the same prompts."""
    greedy = temperature == 0
    warm_pool = PhrasePool(bench.config.level, bench.config.pool_size)
    records = []
    try:
        warm_up(bench, methods, questions, temperature)
        bar = tqdm(questions, desc=f"temperature {temperature:g}", unit="prompt")
        for index, question in enumerate(bar):
            answers = {}
            for method in methods:
                bar.set_postfix_str(method.name)
                answers[method.name] = run_question(bench, method, question, temperature=temperature,
                                                    seed=question_seed(bench.seed, index),
                                                    pool=warm_pool if method.warm else None)
                record_answer(question, answers[method.name])
            divergences = {}
            if greedy:
                divergences = {name: first_divergence(bench, answers[BASELINE], answer, greedy)
                               for name, answer in answers.items() if name != BASELINE}
            records.append({"question": question, "answers": answers, "divergences": divergences})
    except KeyboardInterrupt:
        return records, True
    except VllmError as exc:  # a peer that died (e.g. out of memory) ends the run, keeping what is done
        print(f"\nouroboros bench: {exc}", file=sys.stderr)
        return records, True
    return records, False
