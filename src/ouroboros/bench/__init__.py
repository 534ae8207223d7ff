"""`ouroboros bench`: every method side by side on the same prompts, the Spec-Bench way.

datasets (prompts) -> running (contestants, timed runs, comparison with hf_vanilla) -> reporting
(figures, table, chart, files); command ties them to the command line.
"""

from .command import add_bench_parser, check_numbers, cmd_bench
from .datasets import MT_BENCH_CATEGORIES, Question, load_humaneval, load_questions, load_spec_bench, select_questions
from .reporting import (
    TABLE_COLUMNS,
    AnswerFiles,
    Column,
    aggregate,
    format_table,
    group_figures,
    method_figures,
    write_results,
)
from .running import (
    ABLATION_METHODS,
    ABLATION_SWITCHES,
    BASELINE,
    DEFAULT_METHODS,
    Answer,
    Bench,
    Method,
    Turn,
    contestants,
    cut_at_eos,
    engine_methods,
    first_divergence,
    resolve_methods,
    run_comparison,
    run_group,
    run_question,
)

__all__ = ["ABLATION_METHODS", "ABLATION_SWITCHES", "BASELINE", "DEFAULT_METHODS", "MT_BENCH_CATEGORIES",
           "TABLE_COLUMNS", "Answer", "AnswerFiles", "Bench", "Column", "Method", "Question", "Turn",
           "add_bench_parser", "aggregate", "check_numbers", "cmd_bench", "contestants", "cut_at_eos",
           "engine_methods", "first_divergence", "format_table", "group_figures", "load_humaneval", "load_questions",
           "load_spec_bench", "method_figures", "resolve_methods", "run_comparison", "run_group", "run_question",
           "select_questions", "write_results"]
