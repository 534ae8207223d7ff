"""Running the contestants: HF's generate modes and this engine's methods on the same prompts,
interleaved per prompt, each call timed prefill included, and compared token by token with
hf_vanilla (the fairness rules are in `command`'s docstring, which `bench --help` shows)."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from tqdm.auto import tqdm

from ..batch_generation import generate_batch
from ..config import OuroborosConfig
from ..costs import vanilla_log
from ..engine import engine_for
from ..generation import generate
from ..methods import get_method
from ..pool import PhrasePool
from ..static_runner import capacities, fast_path_blocker
from ..vocab_subset import DEFAULT_SIZE
from .contestants import (  # noqa: F401 (re-exported: the bench's modules and tests name them here)
    ABLATION_METHODS,
    ABLATION_SWITCHES,
    BASELINE,
    DEFAULT_METHODS,
    PEERS,
    SEQUENTIAL_METHODS,
    SEQUENTIAL_PARTNERS,
    Method,
    contestants,
    engine_methods,
    resolve_methods,
)
from .datasets import Question, prompt_ids
from .peer_process import PeerError

WARMUP_TOKENS = 16
TIMING_NOTE = "wall time is measured around each generate call and includes prefill, for every method"
COUNTING_NOTE = "new tokens are counted up to and including the first EOS, for every method (HF outputs truncated)"


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
    latency: float | None = None
    """Seconds from its group's start until its last turn came back (with --batch: a batched call's
    wall time, or the prompts before it included when run one at a time); None: its own wall time."""

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
    """Contestant name -> its running peer (`peer_process.PeerProcess`: vLLM, llama.cpp)."""
    batch: int = 1
    """--batch: prompts per group; each contestant that batches runs a group in one call."""
    draft_vocab: int = DEFAULT_SIZE
    """--draft-vocab: the ids the draft's output layer computes (`vocab_subset`; 0: all)."""


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


def left_padded(rows: list[list[int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) for HF's batched generate: rows padded on the left, as a tokenizer
    with padding_side="left" pads them; one row gets no padding and a mask of ones."""
    width = max(len(row) for row in rows)
    ids = [[pad_id] * (width - len(row)) + row for row in rows]
    mask = [[0] * (width - len(row)) + [1] * len(row) for row in rows]
    return (torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(mask, dtype=torch.long, device=device))


def _run_hf(bench: Bench, method: Method, rows: list[list[int]], max_new_tokens: int, temperature: float,
            seed: int):
    """transformers' generate on every row at once (left padded); forwards counted by hooks, since HF
    does not report them (each counts in every row, as the engine's batched forwards do)."""
    kwargs = _hf_kwargs(bench, method, max_new_tokens, temperature)
    input_ids, attention_mask = left_padded(rows, bench.pad_id, bench.device)
    target_count, draft_count = [0], [0]
    hooks = [_count_forwards(bench.target, target_count)]
    if bench.draft is not None:
        hooks.append(_count_forwards(bench.draft, draft_count))
    try:
        torch.manual_seed(seed)
        output, seconds = _timed(bench, lambda: bench.target.generate(
            input_ids, attention_mask=attention_mask, **kwargs))
    finally:
        for hook in hooks:
            hook.remove()
    new = output[:, input_ids.shape[1]:].tolist()
    return [(tokens, target_count[0], draft_count[0], None, None) for tokens in new], seconds


def _run_engine(bench: Bench, method: Method, rows: list[list[int]], max_new_tokens: int, temperature: float,
                seed: int, pool: PhrasePool | None):
    """This package's generate, greedy unless temperature > 0: one prompt as input_ids [1, L], several
    as a list (a batch; row i samples with seed + i), on the run's runner choice."""
    config = dataclasses.replace(bench.config, **dict.fromkeys(method.disable, False))
    sampling = dict(do_sample=True, temperature=temperature, top_p=bench.top_p, seed=seed) if temperature else {}
    fast = bench.fast if method.fast is None else method.fast
    vocab = bench.draft_vocab if method.draft_vocab is None else method.draft_vocab
    engine = engine_for(bench.target, bench.draft, fast, draft_vocab=vocab)
    if get_method(method.engine).needs_costs:  # a table an earlier run dropped is measured now, untimed
        engine.costs()
    prompts = rows if len(rows) > 1 else torch.tensor(rows, dtype=torch.long, device=bench.device)
    call = partial(generate_batch, size_by_load=not method.unsized) if len(rows) > 1 else generate
    output, seconds = _timed(bench, lambda: call(
        bench.target, prompts, draft=bench.draft, method=method.engine, max_new_tokens=max_new_tokens,
        eos_token_id=bench.eos_ids, pad_token_id=bench.pad_id, config=config, pool=pool, engine=engine, **sampling))
    stats = output.stats if isinstance(output.stats, list) else [output.stats]
    return [(output.sequences[i, len(ids):len(ids) + s.new_tokens].tolist(), s.target_forwards, s.draft_forwards,
             list(s.accept_lengths), s.forward_log) for i, (ids, s) in enumerate(zip(rows, stats))], seconds


def run_batch(bench: Bench, method: Method, rows: list[list[int]], *, max_new_tokens: int, temperature: float,
              seed: int, pool: PhrasePool | None) -> list[Turn]:
    """One generate call of `method` on the prompts `rows` (usually one), timed from the call to its
    return, prefill included: every row's Turn carries that call's wall time."""
    if method.peer:
        new, seconds = bench.peers[method.name].generate(rows, max_new_tokens, bench.eos_ids, temperature,
                                                         bench.top_p, seed)
        results = [(tokens, None, None, None, None) for tokens in new]
    elif method.hf:
        results, seconds = _run_hf(bench, method, rows, max_new_tokens, temperature, seed)
    else:
        results, seconds = _run_engine(bench, method, rows, max_new_tokens, temperature, seed, pool)
    turns = []
    for ids, (tokens, target_forwards, draft_forwards, accept, log) in zip(rows, results):
        tokens = cut_at_eos(tokens, bench.eos_ids)
        if method.hf == "greedy":
            log = vanilla_log(len(ids), len(tokens))
        text = bench.tokenizer.decode(tokens, skip_special_tokens=True)
        turns.append(Turn(ids, tokens, text, seconds, target_forwards, draft_forwards, accept, log))
    return turns


def run_turn(bench: Bench, method: Method, ids: list[int], *, max_new_tokens: int, temperature: float,
             seed: int, pool: PhrasePool | None) -> Turn:
    """One generate call of `method` on `ids`, timed from the call to its return, prefill included."""
    (turn,) = run_batch(bench, method, [ids], max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                        pool=pool)
    return turn


def run_question(bench: Bench, method: Method, question: Question, *, temperature: float, seed: int,
                 pool: PhrasePool | None, max_new_tokens: int | None = None) -> Answer:
    """All turns of one question; each later turn continues the method's own conversation."""
    (answer,), _ = _conversations(bench, method, [question], temperature=temperature, seed=seed, pool=pool,
                                  max_new_tokens=max_new_tokens)
    return answer


def run_group(bench: Bench, method: Method, questions: list[Question], *, temperature: float, seeds: list[int],
              pool: PhrasePool | None, max_new_tokens: int | None = None) -> tuple[list[Answer], float]:
    """A group of questions (`bench --batch N`): in one call per turn when the method batches, else one
    question after another. Returns the answers, each with its latency, and the group's wall time.
    Batched, row i samples with seeds[0] + i (`generate`'s rule); one at a time, with seeds[i]."""
    if len(questions) > 1 and method.batches:
        return _conversations(bench, method, questions, temperature=temperature, seed=seeds[0], pool=pool,
                              max_new_tokens=max_new_tokens)
    answers, elapsed = [], 0.0
    for question, seed in zip(questions, seeds):
        answers.append(run_question(bench, method, question, temperature=temperature, seed=seed, pool=pool,
                                    max_new_tokens=max_new_tokens))
        elapsed += answers[-1].wall_time
        answers[-1].latency = elapsed
    return answers, elapsed


def _conversations(bench: Bench, method: Method, questions: list[Question], *, temperature: float, seed: int,
                   pool: PhrasePool | None, max_new_tokens: int | None) -> tuple[list[Answer], float]:
    """Every turn of `questions` together, turn k of each in one call; each later turn continues the
    method's own conversation. Returns the answers (latency: until a row's last turn came back) and
    the wall time of all the calls."""
    answers = [Answer(method) for _ in questions]
    elapsed = 0.0
    for k in range(max(len(question.turns) for question in questions)):
        rows = [i for i, question in enumerate(questions) if len(question.turns) > k]
        ids = [prompt_ids(bench.tokenizer, bench.chat, questions[i], [turn.text for turn in answers[i].turns])
               for i in rows]
        turns = run_batch(bench, method, ids, max_new_tokens=max_new_tokens or bench.max_new_tokens,
                          temperature=temperature, seed=seed + k, pool=pool)
        elapsed += turns[0].wall_time
        for i, turn in zip(rows, turns):
            answers[i].turns.append(turn)
            answers[i].latency = elapsed
    return answers, elapsed


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
    one short one per method on the first prompt (on the first group, batched, for those that batch);
    then, for each longer KV cache the run will need on the fast path (one more compiled graph per
    model), a full one of each compiled engine method on the first prompt that needs it (batches run
    on the models' packages, whose cache has any size: nothing more to compile). Later turns of
    multi-turn questions are not foreseen."""
    first = [Question(q.question_id, q.category, q.turns[:1]) for q in questions]
    for method in tqdm(methods, desc="warm-up", unit="method", leave=False):
        short = min(WARMUP_TOKENS, bench.max_new_tokens)
        if method.batches and bench.batch > 1:
            group = first[:bench.batch]
            run_group(bench, method, group, temperature=temperature, seeds=[bench.seed] * len(group), pool=None,
                      max_new_tokens=short)
        else:
            run_question(bench, method, first[0], temperature=temperature, seed=bench.seed, pool=None,
                         max_new_tokens=short)
    compiled = [m for m in methods if m.engine and not (bench.batch > 1 and m.batches) and not fast_path_blocker(
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
    """For each prompt (with --batch N, each group of N consecutive prompts) every method in turn
    (interleaved); `record_answer` gets each answer as it comes (the answer files are written as the
    run goes).

    Returns one record per completed question (the answers, how each compares with vanilla, its
    group and every method's wall time on that group) and whether the run was interrupted (Ctrl-C,
    SIGTERM, or a vLLM peer that died): then the group in progress is dropped, so that every figure
    still compares all methods on the same prompts."""
    greedy = temperature == 0
    warm_pool = PhrasePool(bench.config.level, bench.config.pool_size)
    records = []
    try:
        warm_up(bench, methods, questions, temperature)
        bar = tqdm(total=len(questions), desc=f"temperature {temperature:g}", unit="prompt")
        for start in range(0, len(questions), bench.batch):
            group = questions[start:start + bench.batch]
            seeds = [question_seed(bench.seed, start + i) for i in range(len(group))]
            answers, seconds = {}, {}
            for method in methods:
                bar.set_postfix_str(method.name)
                answers[method.name], seconds[method.name] = run_group(
                    bench, method, group, temperature=temperature, seeds=seeds,
                    pool=warm_pool if method.warm else None)
                for question, answer in zip(group, answers[method.name]):
                    record_answer(question, answer)
            for i, question in enumerate(group):
                row = {name: rows[i] for name, rows in answers.items()}
                divergences = {}
                if greedy:
                    divergences = {name: first_divergence(bench, row[BASELINE], answer, greedy)
                                   for name, answer in row.items() if name != BASELINE and answer.method.compared}
                records.append({"question": question, "answers": row, "divergences": divergences,
                                "group": start // bench.batch, "group_seconds": seconds})
            bar.update(len(group))
    except KeyboardInterrupt:
        return records, True
    except PeerError as exc:  # a peer that died (e.g. out of memory) ends the run, keeping what is done
        print(f"\nouroboros bench: {exc}", file=sys.stderr)
        return records, True
    return records, False
