"""A cached cost table is checked against the forwards a run really timed, keyed by what the model
is (not where it was loaded from), and its one-off costs (measuring, compiling) stay out of tokens/s."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_exactness import VOCAB, prompt
from tiny_models import perturbed, tiny_model
from transformers import AutoModelForCausalLM

import ouroboros.static_runner as static_runner
from ouroboros import generate
from ouroboros.cost_cache import check_against_run, fingerprint, model_costs
from ouroboros.costs import vanilla_log
from ouroboros.engine import cost_table
from ouroboros.static_runner import StaticRunner
from ouroboros.tree import DraftTree


def test_the_fingerprint_does_not_depend_on_the_folder(tmp_path):
    model = tiny_model("qwen2", seed=2)
    paths = [tmp_path / "a", tmp_path / "elsewhere" / "b"]
    for path in paths:
        model.save_pretrained(path)
    loaded = [AutoModelForCausalLM.from_pretrained(path) for path in paths]
    assert loaded[0].name_or_path != loaded[1].name_or_path
    assert fingerprint(loaded[0]) == fingerprint(loaded[1]) == fingerprint(model)
    assert fingerprint(tiny_model("qwen2", seed=3)) != fingerprint(model)


def timed_like(table, model: str, factor: float, compiled: bool = False):
    """Plain decoding's forwards, timed at `factor` times what `table` predicts for them."""
    log = vanilla_log(64, 40)
    return [dataclasses.replace(record, model=model, compiled=compiled,
                                seconds=factor * table.costs(model).seconds(record)) for record in log]


@pytest.fixture
def table(tmp_path):
    target, draft = tiny_model("llama", seed=11, vocab=61), tiny_model("llama", seed=12, vocab=61)
    return cost_table(target, draft, cache_dir=tmp_path), target, draft, tmp_path


def test_a_table_that_matches_the_run_is_kept(table):
    costs, target, draft, cache = table
    log = timed_like(costs, "target", 1.2) + timed_like(costs, "draft", 0.8)
    assert check_against_run(costs, log, min_seconds=0) == []
    assert len(list(cache.glob("*.json"))) == 2


def test_a_table_off_by_more_than_30_percent_is_measured_again(table):
    costs, target, draft, cache = table
    with pytest.warns(UserWarning, match=r"the draft took 0\.14x their prediction"):
        dropped = check_against_run(costs, timed_like(costs, "draft", 0.14) + timed_like(costs, "target", 1.0),
                                    min_seconds=0)
    assert len(dropped) == 1
    assert check_against_run(costs, timed_like(costs, "draft", 0.14), min_seconds=0) == []  # judged once
    assert len(list(cache.glob("*.json"))) == 1  # the draft's file is gone, the target's kept
    _, spent = model_costs(draft, cache_dir=cache)
    assert spent > 0  # measured anew, not served from memory
    _, spent = model_costs(target, cache_dir=cache)
    assert spent == 0


def test_forwards_that_compiled_and_short_runs_are_not_judged(table):
    costs, *_ = table
    assert check_against_run(costs, timed_like(costs, "target", 50.0, compiled=True), min_seconds=0) == []
    assert check_against_run(costs, timed_like(costs, "target", 50.0), min_seconds=1e9) == []


def test_auto_reports_measuring_apart_from_generating(tmp_path, monkeypatch):
    monkeypatch.setenv("OUROBOROS_COST_CACHE", str(tmp_path))
    target = tiny_model("llama", seed=13, vocab=VOCAB)
    draft = perturbed(target)
    first = generate(target, prompt(0), draft=draft, method="auto", max_new_tokens=8, eos_token_id=[]).stats
    assert first.measure_seconds > 0
    assert first.decode_time == pytest.approx(first.wall_time - first.measure_seconds)
    assert first.tokens_per_second == pytest.approx(first.new_tokens / first.decode_time)
    again = generate(target, prompt(0), draft=draft, method="auto", max_new_tokens=8, eos_token_id=[]).stats
    assert again.measure_seconds == 0 and again.decode_time == again.wall_time


def test_a_forward_that_compiles_is_counted_apart(monkeypatch):
    """Compiling is replaced by an eager call here (a real compile takes seconds): what is tested is
    that the first forward of a graph is marked and its time kept out of tokens/s."""
    monkeypatch.setattr(static_runner, "_call_compiled", lambda model, device, inputs, dynamic=None: model(**inputs))
    target = tiny_model("llama", seed=14, vocab=VOCAB)
    runner = StaticRunner(target, compile=True, min_capacity=64, progress=False)
    with torch.inference_mode():
        for _ in range(3):
            tree = DraftTree()
            tree.add_chain([1, 2])
            runner.forward([3, 4, 5], tree)
            runner.keep([])
    assert [record.compiled for record in runner.log] == [False, True, False]  # the first fills the cache eagerly
    assert runner.compile_seconds == pytest.approx(runner.log[1].seconds, rel=0.5)


def test_the_summary_line_counts_generating_only():
    from ouroboros.cli import summary_line
    from ouroboros.generation import GenerationStats

    stats = GenerationStats(target_forwards=4, new_tokens=32, wall_time=120.0, compile_seconds=84.0,
                            measure_seconds=20.0)
    line = summary_line("auto", stats)
    assert "32 tokens in 16.00 s: 2.00 tokens/s" in line and "fast path took 84.0 s more" in line
    assert "compiling" not in summary_line("auto", GenerationStats(new_tokens=1, wall_time=1.0))
