"""Reporting a bench run: the figures per method (overall and per category), the terminal table,
the speedup chart, results.json and the Spec-Bench answer files.

The table's columns are a list (`TABLE_COLUMNS`), so that a new figure (e.g. a replayed cost) is a
new key in `method_figures`' dict plus one `Column`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .datasets import Question
from .running import BASELINE, COUNTING_NOTE, TIMING_NOTE, Answer, Method

# ---------------------------------------------------------------- figures

def _ratio(a: float | None, b: float) -> float | None:
    return a / b if a is not None and b else None


def _forwards(turns, name: str) -> int | None:
    """Total `target_forwards` or `draft_forwards` of some turns; None if any is unknown."""
    counts = [getattr(turn, name) for turn in turns]
    return None if None in counts else sum(counts)


def _replayed_rate(answer: Answer, costs) -> float | None:
    """Tokens per second of one answer replayed on `costs`; None without a forward log."""
    if costs is None or any(turn.forward_log is None for turn in answer.turns):
        return None
    return _ratio(answer.new_tokens, sum(costs.replay(turn.forward_log) for turn in answer.turns))


def method_figures(records: list[dict], method: Method, greedy: bool, costs=None) -> dict:
    """Spec-Bench figures for one method over some questions: tokens/s per question is
    sum(new_tokens)/sum(wall_time), then averaged; mean accepted is the mean of all accept lengths.
    With a cost table, the same for the forwards replayed on it ("replayed", never "measured")."""
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
        "mean_accepted": None if method.foreign else (sum(accept) / len(accept) if accept else None),
        "target_forwards_per_token": _ratio(_forwards(turns, "target_forwards"), tokens),
        "draft_forwards_per_token": _ratio(_forwards(turns, "draft_forwards"), tokens),
        "compared": method.compared,
        "identical_share": None,
        "divergences": [],
        "replayed_tokens_per_second": None,
    }
    replayed = [_replayed_rate(a, costs) for a in answers]
    if costs is not None and None not in replayed:
        figures["replayed_tokens_per_second"] = sum(replayed) / len(replayed)
    if greedy and method.compared:  # not llama.cpp: another numeric model, its text is its own
        if method.name == BASELINE:
            figures["identical_share"] = 1.0
        else:
            diverged = [(r["question"], r["divergences"][method.name]) for r in records
                        if r["divergences"][method.name] is not None]
            figures["identical_share"] = 1 - len(diverged) / len(records)
            figures["divergences"] = [{"question_id": q.question_id, **d} for q, d in diverged]
    return figures


def aggregate(records: list[dict], methods: list[Method], temperature: float, costs=None) -> dict:
    """Figures per method, overall and per Spec-Bench group, with speedups over hf_vanilla (and,
    with a cost table, replayed speedups over hf_vanilla replayed on the same table)."""
    greedy = temperature == 0
    groups: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        groups[record["question"].group].append(record)
    scopes = {"overall": records, **{name: groups[name] for name in sorted(groups)}}
    result = {}
    for scope, subset in scopes.items():
        figures = {method.name: method_figures(subset, method, greedy, costs) for method in methods}
        baseline = figures[BASELINE]["tokens_per_second"]
        replayed_baseline = figures[BASELINE]["replayed_tokens_per_second"]
        for values in figures.values():
            values["speedup"] = _ratio(values["tokens_per_second"], baseline)
            replayed = values["replayed_tokens_per_second"]
            values["replayed_speedup"] = _ratio(replayed, replayed_baseline) if replayed is not None else None
        result[scope] = figures
    overall = result.pop("overall")
    for method in methods:
        overall[method.name].update(group_figures(records, method))
    for values in overall.values():
        values["aggregate_speedup"] = _ratio(values["aggregate_tokens_per_second"],
                                             overall[BASELINE]["aggregate_tokens_per_second"])
    return {"temperature": temperature, "sampling": not greedy, "replayed": costs is not None,
            "overall": overall,
            "categories": result, "questions": [question_figures(record) for record in records]}


def group_figures(records: list[dict], method: Method) -> dict:
    """What a server's users see (`bench --batch N`), over whole groups of prompts: rows per call,
    all rows' new tokens over the sum of the groups' wall times (aggregate tokens/s), and the mean
    time until a row's result (a batched call's wall time; one at a time, the prompts before it
    included). Only overall: a category may hold part of a group."""
    answers = [record["answers"][method.name] for record in records]
    seconds = {record["group"]: record["group_seconds"][method.name] for record in records}
    size = max(Counter(record["group"] for record in records).values())
    latencies = [a.wall_time if a.latency is None else a.latency for a in answers]
    return {"batch": size if method.batches else 1,
            "aggregate_tokens_per_second": _ratio(sum(a.new_tokens for a in answers), sum(seconds.values())),
            "mean_latency": sum(latencies) / len(latencies)}


def question_figures(record: dict) -> dict:
    """Per-question numbers of every method, for the JSON file."""
    question = record["question"]
    methods = {}
    for name, answer in record["answers"].items():
        accept = [n for turn in answer.turns for n in (turn.accept_lengths or [])]
        methods[name] = {"new_tokens": answer.new_tokens, "wall_time": answer.wall_time, "latency": answer.latency,
                         "tokens_per_second": _ratio(answer.new_tokens, answer.wall_time),
                         "target_forwards": _forwards(answer.turns, "target_forwards"),
                         "draft_forwards": _forwards(answer.turns, "draft_forwards"),
                         "mean_accepted": sum(accept) / len(accept) if accept else None}
        if name in record["divergences"]:
            methods[name]["identical"] = record["divergences"][name] is None
            methods[name]["divergence"] = record["divergences"][name]
    return {"question_id": question.question_id, "category": question.category, "group": question.group,
            "batch_group": record["group"], "methods": methods}


# ---------------------------------------------------------------- output

def _number(value: float | None, form: str) -> str:
    return "-" if value is None else format(value, form)


@dataclass(frozen=True)
class Column:
    """One column of the terminal table: a header and how to read and print a method's figures."""

    header: str
    width: int
    value: Callable[[dict], float | None]
    form: str = ".2f"
    suffix: str = ""
    greedy_only: bool = False
    """Shown only at temperature 0 (e.g. token identity with vanilla, which sampling does not keep)."""
    replay_only: bool = False
    """Shown only when the run was replayed on a cost table (`bench --costs`)."""

    def cell(self, figures: dict) -> str:
        value = self.value(figures)
        return f"{'-' if value is None else format(value, self.form) + self.suffix:>{self.width}}"


def _share_percent(figures: dict) -> float | None:
    share = figures["identical_share"]
    return None if share is None else 100 * share


TABLE_COLUMNS = (
    Column("tok/s", 9, lambda f: f["tokens_per_second"]),
    Column("speedup", 9, lambda f: f["speedup"], suffix="x"),
    Column("batch", 6, lambda f: f.get("batch"), form="d"),
    Column("agg tok/s", 10, lambda f: f.get("aggregate_tokens_per_second")),
    Column("agg x", 8, lambda f: f.get("aggregate_speedup"), suffix="x"),
    Column("latency s", 10, lambda f: f.get("mean_latency")),
    Column("acc/fwd", 9, lambda f: f["mean_accepted"]),
    Column("tgt fwd/tok", 12, lambda f: f["target_forwards_per_token"]),
    Column("drf fwd/tok", 12, lambda f: f["draft_forwards_per_token"]),
    Column("identical", 11, _share_percent, form=".0f", suffix="%", greedy_only=True),
    Column("replayed tok/s", 16, lambda f: f["replayed_tokens_per_second"], replay_only=True),
    Column("replayed x", 12, lambda f: f["replayed_speedup"], suffix="x", replay_only=True),
)


def format_table(run: dict, questions: int, max_new_tokens: int, columns=TABLE_COLUMNS) -> str:
    """The terminal summary of one temperature: main figures, then speedup per category."""
    mode = "sampling" if run["sampling"] else "greedy"
    columns = [c for c in columns if not (c.greedy_only and run["sampling"])
               and not (c.replay_only and not run.get("replayed"))]
    lines = [f"temperature {run['temperature']:g} ({mode}), {questions} prompts, up to {max_new_tokens} new tokens",
             f"({TIMING_NOTE}; {COUNTING_NOTE})", ""]
    lines.append(f"{'method':<30}" + "".join(f"{c.header:>{c.width}}" for c in columns))
    for name, figures in run["overall"].items():
        lines.append(f"{_label(name, figures):<30}" + "".join(c.cell(figures) for c in columns))
    lines.append(f"(tok/s and speedup: per prompt, averaged, Spec-Bench's way; agg tok/s: all prompts' new tokens "
                 f"over the summed wall time of each group of {run.get('batch', 1)} prompts, agg x against "
                 f"{BASELINE}'s; latency: mean seconds until a prompt's result, from its group's start)")
    if any(not f.get("compared", True) for f in run["overall"].values()):
        lines.append(f"({OTHER_MODEL_MARK} {OTHER_MODEL_NOTE})")
    lines += divergence_lines(run)
    categories = list(run["categories"])
    if len(categories) > 1:
        lines += ["", "speedup over hf_vanilla per category",
                  f"{'method':<30}" + "".join(f"{c[:14]:>15}" for c in categories) + f"{'overall':>15}"]
        for name in run["overall"]:
            cells = [run["categories"][c][name]["speedup"] for c in categories] + [run["overall"][name]["speedup"]]
            lines.append(f"{name:<30}" + "".join(f"{_number(v, '.2f') + 'x':>15}" for v in cells))
    return "\n".join(lines)


OTHER_MODEL_MARK = "[Q]"
OTHER_MODEL_NOTE = ("another numeric model: llama.cpp runs the GGUF's quantized weights (Q4_K_M for the built-in "
                    "pair), not the model the others run (e.g. bf16); its text is its own, not compared with "
                    f"{BASELINE}'s (identical: -), and only its speed is comparable")


def _label(name: str, figures: dict) -> str:
    """A method's name in the table, marked when it runs another numeric model (`OTHER_MODEL_NOTE`)."""
    return name if figures.get("compared", True) else f"{name} {OTHER_MODEL_MARK}"


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

    from .. import __version__
    from ..cost_cache import hardware

    return {"versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "ouroboros": __version__},
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "cpu": hardware(torch.device("cpu"))}}


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


# ---------------------------------------------------------------- answer files

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


class AnswerFiles:
    """One Spec-Bench answer file per method, a line written and flushed as each answer comes, so
    an interrupted run keeps every answer it finished."""

    def __init__(self, paths: dict[str, Path], model_id: str):
        self.paths, self.model_id, self.files = paths, model_id, {}

    def __enter__(self) -> AnswerFiles:
        self.files = {name: open(path, "w", encoding="utf-8") for name, path in self.paths.items()}
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self.files.values():
            handle.close()

    def write(self, question: Question, answer: Answer) -> None:
        handle = self.files[answer.method.name]
        handle.write(json.dumps(answer_record(question, answer, self.model_id)) + "\n")
        handle.flush()
